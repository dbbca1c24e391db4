"""The generator: grid shapes, SPD families, difficulty growth, reproducibility, splits, Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from progressive.data.format import bucket_counts, open_bucket, read_attrs
from progressive.data.generate import generate, grid_shape, make_sample
from progressive.data.ops import assign_splits, split_counts
from progressive.errors import DataError


def dense(s) -> np.ndarray:  # type: ignore[no-untyped-def]
    return sp.csr_matrix((s.data, s.indices, s.indptr), shape=(s.n, s.n)).toarray().astype(np.float64)


@pytest.mark.parametrize("n, shape", [(512, (16, 32)), (1024, (32, 32)), (1536, (32, 48)), (2048, (32, 64)),
                                      (3072, (48, 64)), (4096, (64, 64)), (17, (1, 17)), (36, (6, 6))])
def test_grid_shape_is_closest_to_square(n: int, shape: tuple[int, int]) -> None:
    assert grid_shape(n) == shape


@pytest.mark.parametrize("family", ["poisson", "aniso", "graph", "mix"])
def test_families_are_spd_with_n_unknowns(family: str) -> None:
    for j in range(3):
        drawn, s = make_sample(family, 48, seed=1, j=j, rhs=2)
        a = dense(s)
        assert a.shape == (48, 48) and s.rhs.shape == (2, 48)
        np.testing.assert_array_equal(a, a.T)  # exactly symmetric, not just nearly
        assert np.linalg.eigvalsh(a).min() > 0
        assert drawn in ("poisson", "aniso", "graph")


def test_poisson_is_a_5_point_stencil() -> None:
    s = make_sample("poisson", 1536, 0, 0)[1]
    nx, ny = grid_shape(1536)
    assert len(s.data) == 5 * 1536 - 2 * (nx + ny)
    assert np.diff(s.indptr).max() == 5


def test_poisson_gets_harder_as_n_grows() -> None:
    def cond(n: int) -> float:
        return float(np.median([np.linalg.cond(dense(make_sample("poisson", n, 0, j)[1])) for j in range(4)]))

    assert cond(256) > 2 * cond(64)


def test_same_seed_same_matrices_whatever_the_workers(tmp_path: Path) -> None:
    kw = dict(sizes=[16, 40], counts=[10, 6], family="mix", seed=7)
    generate(tmp_path / "a.h5", workers=1, **kw)  # type: ignore[arg-type]
    generate(tmp_path / "b.h5", workers=2, **kw)  # type: ignore[arg-type]
    generate(tmp_path / "c.h5", workers=1, **{**kw, "seed": 8})  # type: ignore[arg-type]
    for n in (16, 40):
        for split in ("train", "val", "test"):
            with open_bucket(tmp_path / "a.h5", n, split) as a, open_bucket(tmp_path / "b.h5", n, split) as b:
                assert a.hashes() == b.hashes()
                for i in range(len(a)):
                    np.testing.assert_array_equal(a.read(i).rhs, b.read(i).rhs)
    with open_bucket(tmp_path / "a.h5", 16, "train") as a, open_bucket(tmp_path / "c.h5", 16, "train") as c:
        assert not set(a.hashes()) & set(c.hashes())


def test_adding_samples_keeps_the_existing_ones(tmp_path: Path) -> None:
    generate(tmp_path / "few.h5", sizes=[16], counts=[5], workers=1, split=(1, 0, 0))
    generate(tmp_path / "more.h5", sizes=[16, 32], counts=[9, 2], workers=1, split=(1, 0, 0))
    with open_bucket(tmp_path / "few.h5", 16, "train") as a, open_bucket(tmp_path / "more.h5", 16, "train") as b:
        assert b.hashes()[:5] == a.hashes()


def test_provenance_attributes(tiny_dataset: Path) -> None:
    attrs = read_attrs(tiny_dataset)
    assert attrs["generator"].startswith("progressive ")
    assert (attrs["family"], attrs["seed"], attrs["format"]) == ("mix", 0, "progressive-buckets")
    assert attrs["history"][0]["op"] == "generate" and attrs["history"][0]["counts"] == [30, 12, 6]


def test_split_counts_and_assignment() -> None:
    assert split_counts(30, (0.8, 0.1, 0.1)) == (24, 3, 3)
    assert split_counts(7, (0.8, 0.1, 0.1)) == (5, 1, 1)  # remainders .6, .7, .7: the largest win
    assert sum(split_counts(144, (0.8, 0.1, 0.1))) == 144
    labels = assign_splits(50, (0.6, 0.2, 0.2), seed=3, n=16)
    assert np.bincount(labels, minlength=3).tolist() == [30, 10, 10]
    assert assign_splits(50, (0.6, 0.2, 0.2), seed=3, n=16).tolist() == labels.tolist()
    assert assign_splits(50, (0.6, 0.2, 0.2), seed=4, n=16).tolist() != labels.tolist()


def test_interrupt_leaves_nothing(tmp_path: Path) -> None:
    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "x.h5", sizes=[16, 32], counts=[40, 40], workers=1, progress=stop)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw, message", [
    ({"family": "heat"}, "unknown family 'heat'"),
    ({"sizes": [16, 32], "counts": [3]}, "2 sizes but 1 counts"),
    ({"sizes": [16, 16], "counts": [3, 3]}, "sizes must be distinct integers >= 2"),
    ({"sizes": [16], "counts": [3], "split": (0.5, 0.2, 0.2)}, "split fractions 0.5,0.2,0.2 are not three"),
    ({"sizes": [16], "counts": [-1]}, "counts must be >= 0"),
])
def test_bad_arguments(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(DataError) as exc:
        generate(tmp_path / "x.h5", workers=1, **kw)
    assert exc.value.msg.startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_counts_of_the_tiny_dataset(tiny_dataset: Path) -> None:
    assert bucket_counts(tiny_dataset) == {16: {"train": 24, "val": 3, "test": 3}, 32: {"train": 10, "val": 1, "test": 1},
                                           64: {"train": 5, "val": 1, "test": 0}}


@pytest.mark.parametrize("family, digest", [
    ("poisson", "c6e51ea0082be0e5c719bd6ff2db1c1f"), ("aniso", "1418616f1aee0d79bdad13b03c192aca"),
    ("graph", "89caef411552bb3fc7e98487f33c333d"), ("mix", "3b3cf252ddb0dc183a5dbc420d09c85b"),
])
def test_generator_output_is_pinned(family: str, digest: str) -> None:
    # A seed names a dataset: if this fails, the generator (or numpy's random streams) changed what
    # an existing seed produces. Do not update the digests unless that is intended and announced.
    from progressive.data.format import matrix_hash

    s = make_sample(family, 64, seed=0, j=0)[1]
    assert matrix_hash(64, s.indptr, s.indices, s.data) == digest
