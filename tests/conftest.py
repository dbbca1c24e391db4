"""Shared fixtures. Data: small real HDF5 datasets made by the real generator (session-scoped)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SIZES = (16, 32, 64)
# Per-test time caps (pytest-timeout; the default, 600 s, is in pyproject.toml). A hung test fails with every
# thread's stack instead of eating the CI run's whole budget. Slurm tests wait on Slurm's states with their
# own bounded waits (up to 1500 s for a stage cut by its time limit a few times): they get more.
SLURM_TEST_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slurm") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLURM_TEST_TIMEOUT_S))

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
