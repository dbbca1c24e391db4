"""`progressive sync RUN|SWEEP`: upload a run's (or a sweep's) W&B offline runs, oldest first.

Compute nodes often have no internet: with `[tracking.wandb] mode = "offline"` every job of a
stage writes an offline-run folder under the stage's folder, all with the stage's one run id.
`wandb sync` uploads the folders given to it; for several folders of one run id it uploads them
one after another in start order (each later one resumes the run), so no segment overwrites
another. Folders already uploaded (marked .synced by wandb) are skipped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from progressive.config import validate_name
from progressive.errors import MissingDependencyError, RunError, TrackingError
from progressive.tracking import files

__all__ = ["target_folder", "pending", "sync"]


def target_folder(jobs_root: Path, name: str) -> Path:
    """jobs/<name> of a run or a sweep (the name validated first: it becomes a path)."""
    try:
        validate_name(name, "run or sweep name")
    except ValueError as exc:
        raise RunError(str(exc), loc="RUN") from None
    folder = jobs_root / name
    if not folder.is_dir():
        raise RunError(f"no run or sweep named {name!r} under {jobs_root}", loc="sync",
                       hint="`progressive runs` lists them (or pass --jobs DIR)")
    return folder


def pending(folder: Path) -> list[Path]:
    """The offline runs below `folder` still to upload, in upload order."""
    return files.unsynced_runs(folder)


def sync(runs: list[Path], *, timeout_s: float = 3600.0) -> str:
    """Upload `runs` with W&B's own `wandb sync`; its output. Raises TrackingError with its words."""
    try:
        import wandb  # noqa: F401  (only to say what to install)
    except ImportError:
        raise MissingDependencyError("uploading W&B runs needs the wandb package", loc="sync",
                                     hint='pip install "progressive[wandb]"') from None
    cmd = [sys.executable, "-m", "wandb", "sync", *map(str, runs)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise TrackingError(f"wandb sync did not finish within {timeout_s:.0f} s", cmd=cmd) from None
    if res.returncode != 0:
        raise TrackingError(f"wandb sync failed (exit {res.returncode})", cmd=cmd, output=res.stderr or res.stdout,
                            hint="check `wandb login` and the network; run again: folders already uploaded are skipped")
    return res.stdout + res.stderr
