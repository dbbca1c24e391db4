"""Checkpoints: atomic writes, safe loads, the stage fingerprint check, RNG capture.

Layout of a stage's checkpoint folder (`StagePlan.checkpoint_dir`):

    step_00000120.pt   full trainer state after optimizer step 120 (the last K are kept)
    final.pt           the stage's final weights + metadata: what child stages start from
    step_00000140.pt.corrupt   a step file found torn or corrupt at resume, moved aside (never deleted)

A full-state checkpoint is a plain dict of tensors, numbers, strings, lists and dicts,
so it loads with `torch.load(weights_only=True)` (no pickled code runs on load). Every
file is written to a temp file in the same folder, fsynced, renamed over the target and
the folder fsynced: a crash at any point leaves the previous checkpoint intact and the
new one either complete or absent.
"""

from __future__ import annotations

import logging
import os
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

# The hint of a file that does not load: what a resume does by itself with a torn step file.
MOVE_ASIDE_HINT = "move it aside (rename it to <name>.corrupt); a stage then resumes from its newest intact step file"

log = logging.getLogger("progressive.checkpoint")

__all__ = [
    "FORMAT", "FINAL_NAME", "save_atomic", "load_checkpoint", "load_weights", "latest_checkpoint",
    "step_path", "prune_checkpoints", "clean_temp_files", "is_intact", "corrupt_files", "torn_files", "CORRUPT_SUFFIX",
    "check_fingerprint",
    "fingerprint_diff", "capture_rng", "restore_rng", "now_iso",
]

FORMAT = "progressive.checkpoint/1"
CORRUPT_SUFFIX = ".corrupt"  # step_00000140.pt -> step_00000140.pt.corrupt (then .corrupt.1, ...)


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
    """Delete all but the newest `keep` intact step checkpoints; returns the deleted.

    A torn file is neither counted toward `keep` nor deleted (the next resume moves it
    aside), so rotation never deletes the newest intact checkpoint in favour of a torn one.
    final.pt is never touched. The check is the cheap structural one (`is_intact`): rotation
    runs after every save, right after a file was written atomically.
    """
    intact = [p for _, p in _step_files(Path(stage_dir)) if is_intact(p)]
    doomed = intact[max(keep, 1):]
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


def _problem(path: Path, *, full: bool) -> str | None:
    """Why `path` cannot be resumed from (None when it can): the zip's structure, and with `full` every CRC.

    torch.load does not check the CRCs: a flipped bit in a tensor loads silently as a wrong
    weight. zipfile's testzip reads the whole file once (0.08 s for 256 MB from the page cache).
    """
    if not is_intact(path):
        return "truncated or not a torch checkpoint (no zip directory or no data.pkl)"
    if not full:
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    return f"corrupt: the CRC of its record {bad} does not match" if bad else None


def _move_aside(path: Path) -> Path | None:
    """Rename a corrupt step file to `<name>.corrupt` (never over an existing file); None if it is gone.

    Another rank of the same job may have moved it first: a missing file is not an error.
    """
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{n}")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    return target


def corrupt_files(stage_dir: str | Path) -> list[Path]:
    """The step files moved aside as corrupt (`step_*.pt.corrupt*`), by name."""
    folder = Path(stage_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_RE.match(p.name.split(CORRUPT_SUFFIX)[0])
                  and CORRUPT_SUFFIX in p.name)


def torn_files(stage_dir: str | Path) -> list[Path]:
    """Step files that fail the cheap structural check (not yet moved aside), newest first."""
    return [p for _, p in _step_files(Path(stage_dir)) if not is_intact(p)]


def latest_checkpoint(stage_dir: str | Path, *, resuming: bool = True) -> Path | None:
    """The newest intact full-state (`step_*.pt`) checkpoint of a stage, or None if it has none.

    `resuming` (the trainer, choosing where to resume): every candidate is verified in full
    (each record's CRC) and a torn or corrupt one is moved aside to `<name>.corrupt` with a
    warning in the stage's log, so that it is never counted toward `keep_checkpoints` and
    never deleted. `resuming=False` (`status`, read-only): the cheap structural check only,
    nothing moved. `final.pt` is not considered: it holds weights only.

    Raises:
        CheckpointError: no intact checkpoint is left but corrupt ones exist (or were moved
            aside earlier): refusing to silently restart the stage from scratch.
    """
    folder = Path(stage_dir)
    unmoved: list[str] = []
    for _, path in _step_files(folder):
        problem = _problem(path, full=resuming)
        if problem is None:
            return path
        if not resuming:
            unmoved.append(path.name)
            continue
        try:
            moved = _move_aside(path)
        except OSError as exc:  # e.g. a read-only folder: still never resume from it
            log.warning("checkpoint %s is %s and could not be moved aside (%s); trying an older one",
                        path, problem, exc)
            unmoved.append(path.name)
            continue
        if moved is not None:
            log.warning("checkpoint %s is %s: moved aside to %s (kept, not deleted); trying an older one",
                        path, problem, moved.name)
    names = unmoved + [p.name for p in corrupt_files(folder)]
    if names:
        raise CheckpointError(
            f"every checkpoint is truncated or corrupt ({', '.join(names)})", loc=str(folder),
            hint=f"nothing was deleted: the files are kept in {folder} (those moved aside end in {CORRUPT_SUFFIX}). "
                 "To resume from a backup, copy an intact step_XXXXXXXX.pt into that folder; to restart the stage "
                 "from its init, move the corrupt files out of it; then `progressive resume` the run")
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
                              loc=str(path), hint=MOVE_ASIDE_HINT)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refused to load: it contains objects beyond tensors and plain data ({exc})".split("\n")[0],
                              loc=str(path), hint="save plain state_dicts (tensors, numbers, strings, lists, dicts)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"the file is corrupt: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                              loc=str(path), hint=MOVE_ASIDE_HINT) from None
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
