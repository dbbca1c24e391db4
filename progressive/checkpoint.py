"""Checkpoints: atomic writes, safe loads, the stage fingerprint check, RNG capture.

Layout of a stage's checkpoint folder (`StagePlan.checkpoint_dir`):

    step_00000120.pt   full trainer state after optimizer step 120 (the last K are kept)
    final.pt           the stage's final weights + metadata: what child stages start from

A full-state checkpoint is a plain dict of tensors, numbers, strings, lists and dicts,
so it loads with `torch.load(weights_only=True)` (no pickled code runs on load). Every
file is written to a temp file in the same folder, fsynced, renamed over the target and
the folder fsynced: a crash at any point leaves the previous checkpoint intact and the
new one either complete or absent.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

# torch and numpy are imported by the functions that need them: finding checkpoints
# (`latest_checkpoint`, used by `progressive status` on a login node) must stay torch-free.

from progressive.atomic import is_temp, replacing
from progressive.errors import CheckpointError
from progressive.layout import FINAL_NAME, STEP_RE, step_path
from progressive.units import now_iso

__all__ = [
    "FORMAT", "FINAL_NAME", "save_atomic", "load_checkpoint", "load_weights", "latest_checkpoint",
    "step_path", "prune_checkpoints", "clean_temp_files", "is_intact", "check_fingerprint",
    "fingerprint_diff", "capture_rng", "restore_rng", "now_iso",
]

FORMAT = "progressive.checkpoint/1"


# --------------------------------------------------------------------------- writing


def save_atomic(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` atomically: temp file in the same folder, fsync, rename, fsync folder.

    Readers see either the old file or the complete new one, never a partial write,
    even if the process is killed (SIGKILL at a time limit) or the node loses power.
    """
    import torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def prune_checkpoints(stage_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step checkpoints (final.pt is never touched); returns the deleted."""
    steps = _step_files(Path(stage_dir))
    doomed = [p for _, p in steps[keep:]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def clean_temp_files(stage_dir: str | Path) -> list[Path]:
    """Remove temp files left by writers killed mid-save (only one job writes a stage's folder)."""
    folder = Path(stage_dir)
    if not folder.is_dir():
        return []
    leftovers = [p for p in folder.iterdir() if is_temp(p)]
    for p in leftovers:
        p.unlink(missing_ok=True)
    return leftovers


# --------------------------------------------------------------------------- finding and loading


def _step_files(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in `folder`, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def is_intact(path: str | Path) -> bool:
    """Cheap torn-file check: torch's zip container must have its central directory and a data.pkl.

    A file cut short (a copy interrupted, a full disk before atomic writes) loses the
    directory at its end, so this catches truncation without reading the tensors.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("data.pkl") for name in zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    """The newest intact full-state (`step_*.pt`) checkpoint of a stage, or None if it has none.

    Torn files are skipped in favour of the newest intact one. `final.pt` is not
    considered: it holds weights only (see `StagePlan.final_checkpoint`).

    Raises:
        CheckpointError: checkpoints exist but none of them is intact (refusing to silently
            restart the stage from scratch).
    """
    steps = _step_files(Path(stage_dir))
    for _, path in steps:
        if is_intact(path):
            return path
    if steps:
        names = ", ".join(p.name for _, p in steps)
        raise CheckpointError(f"every checkpoint is truncated or corrupt ({names})", loc=str(stage_dir),
                              hint="restore one from a backup, or delete them to restart the stage from its init")
    return None


def load_checkpoint(path: str | Path, *, map_location: "str | torch.device" = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; any failure is a CheckpointError naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", loc=str(path),
                              hint="check the path; a parent stage writes final.pt only when it completes")
    if not is_intact(path):
        raise CheckpointError(f"the file is truncated or not a torch checkpoint ({path.stat().st_size} bytes)",
                              loc=str(path), hint="delete it; an older checkpoint of the stage (if any) is used instead")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refused to load: it contains objects beyond tensors and plain data ({exc})".split("\n")[0],
                              loc=str(path), hint="save plain state_dicts (tensors, numbers, strings, lists, dicts)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"the file is corrupt: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                              loc=str(path), hint="delete it; an older checkpoint of the stage (if any) is used instead") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict, found a {type(obj).__name__}", loc=str(path))
    return obj


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict in a checkpoint: ours (final or full-state) or a plain `torch.save(state_dict)`."""
    import torch

    obj = load_checkpoint(path)
    weights = obj["model"] if obj.get("format") == FORMAT or isinstance(obj.get("model"), dict) else obj
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError("no model weights found: expected a state_dict or a dict with a 'model' state_dict",
                              loc=str(path), hint="save it as torch.save(model.state_dict(), path)")
    return weights


# --------------------------------------------------------------------------- fingerprints


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human lines `key: old -> new` for every key whose value differs (missing keys shown as <absent>)."""
    absent = "<absent>"
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, absent), new.get(key, absent)
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


def check_fingerprint(ckpt: Mapping[str, Any], expected: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint written under different stage settings, naming what differs (checkpoint -> now)."""
    saved = ckpt.get("fingerprint")
    if not isinstance(saved, dict):
        raise CheckpointError("the checkpoint has no stage fingerprint", loc=str(path),
                              hint="it was not written by progressive's trainer; use it as init_from instead")
    diff = fingerprint_diff(saved, expected)
    if diff:
        raise CheckpointError(
            "the checkpoint was written under different stage settings (checkpoint -> config):\n    "
            + "\n    ".join(diff), loc=str(path),
            hint="restore the old settings to resume, or start a new run (--run-name) to train with the new ones")


# --------------------------------------------------------------------------- RNG state


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, numpy, torch (CPU and CUDA) RNG states and an optional generator's, as tensors and numbers."""
    import numpy as np
    import torch

    version, state, gauss = random.getstate()
    np_name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    out: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        # This rank's own GPU only (the current device): with one GPU bound per task every rank's is
        # "device 0", and a list by position would restore another GPU's state after a remap.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "generator": generator.get_state() if generator is not None else None,
    }
    return out


def restore_rng(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Undo `capture_rng`: put every RNG (and `generator`, if given and saved) back where it was."""
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        # Written as [current device's state] (older files: every device's, this rank's at its local index).
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[torch.cuda.current_device()])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
