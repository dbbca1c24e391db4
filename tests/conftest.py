"""Shared fixtures. Data: small real HDF5 datasets made by the real generator (session-scoped)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SIZES = (16, 32, 64)
TINY_COUNTS = (30, 12, 6)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mixed-family dataset: buckets 16, 32, 64 with 30, 12, 6 samples, seed 0, split 0.8/0.1/0.1.

    Session-scoped and shared: tests must not modify it (copy it first, see `tiny_copy`).
    """
    from progressive.data.generate import generate

    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    generate(path, sizes=TINY_SIZES, counts=TINY_COUNTS, family="mix", seed=0, workers=1)
    return path


@pytest.fixture
def tiny_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of `tiny_dataset` (with its sidecar index), free to damage."""
    import shutil

    from progressive.data.format import index_path

    dst = tmp_path / "copy.h5"
    shutil.copy2(tiny_dataset, dst)
    shutil.copy2(index_path(tiny_dataset), index_path(dst))
    return dst
