"""Atomic file replacement, shared by checkpoints, the run record and dataset files.

A writer fills a temp file in the target's folder; only once it is complete and
fsynced is it renamed over the target, and the folder is fsynced so the rename is
durable. A crash (SIGKILL at a time limit, a lost node) at any point leaves the
previous file intact and at worst a hidden temp file, never a torn target.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"  # temp files are ".<name>.tmp-<pid>": hidden, and recognisable for clean-up


def temp_path_for(path: Path) -> Path:
    """The temp file a writer of `path` in this process uses."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def is_temp(path: Path) -> bool:
    """True for a temp file left by a writer (possibly killed mid-write)."""
    return path.name.startswith(".") and TMP_MARK in path.name


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some filesystems refuse to fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # the rename itself is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success fsync it, rename it over `path`, fsync the folder.

    On any exception (Ctrl-C included) the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
