"""Execution backends: Slurm (`slurm`) and this machine (`local`), behind one interface.

Backends are looked up by name and imported on first use, so `status` on a local run
never imports the Slurm backend's dependencies, and neither imports torch.
"""

from __future__ import annotations

import importlib

from progressive.backends.base import Backend, JobInfo
from progressive.errors import RunError

__all__ = ["Backend", "JobInfo", "BACKENDS", "get_backend"]

# name -> "module:class"
BACKENDS: dict[str, str] = {
    "slurm": "progressive.backends.slurm:SlurmBackend",
    "local": "progressive.backends.local:LocalBackend",
}


def get_backend(name: str) -> Backend:
    """The backend called `name` (RunError listing the valid names otherwise)."""
    ref = BACKENDS.get(name)
    if ref is None:
        raise RunError(f"unknown execution backend {name!r}", loc="backend",
                       hint=f"valid backends: {', '.join(sorted(BACKENDS))}")
    module, _, cls = ref.partition(":")
    backend: Backend = getattr(importlib.import_module(module), cls)()
    return backend
