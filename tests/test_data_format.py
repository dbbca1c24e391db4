"""The file format: round trip, the sidecar index, and every bad-file message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (writing into Blosc datasets)
import numpy as np
import pytest

from progressive.data.format import (
    FORMAT_VERSION,
    Sample,
    bucket_counts,
    index_path,
    iter_samples,
    matrix_hash,
    open_bucket,
    read_attrs,
    sample_problem,
)
from progressive.data.generate import make_sample
from progressive.data.ops import DatasetWriter, inspect
from progressive.errors import DataError
from tests.conftest import TINY_COUNTS, TINY_SIZES

REPO = Path(__file__).resolve().parents[1]


def poke(path: Path, n: int, split: str, name: str, index: int | tuple[int, ...], value: float) -> None:
    """Change one stored number in place (as a broken exporter would)."""
    with h5py.File(path, "r+") as f:
        f[f"buckets/{n}/{split}/{name}"][index] = value


def test_round_trip_and_provenance(tmp_path: Path) -> None:
    path = tmp_path / "rt.h5"
    samples = [make_sample("poisson", 24, 5, j, rhs=2)[1] for j in range(5)]
    with DatasetWriter(path, attrs={"generator": "test", "family": "poisson", "seed": 5}) as w:
        for j, s in enumerate(samples):
            w.add(24, "train" if j < 4 else "test", s.indptr, s.indices, s.data, s.rhs)
    with open_bucket(path, 24, "train") as r:
        assert (len(r), r.n, r.rhs_per_sample) == (4, 24, 2)
        for j in range(4):
            got = r.read(j)
            assert got.indptr.dtype == np.int64 and got.indices.dtype == np.int64 and got.data.dtype == np.float32
            assert got.rhs.shape == (2, 24) and got.rhs.dtype == np.float32
            for a, b in zip(got, samples[j]):
                np.testing.assert_array_equal(a, b)
        assert r.hashes()[1] == matrix_hash(24, samples[1].indptr, samples[1].indices, samples[1].data)
        assert [s.data.tolist() for s in iter_samples(r, block=3)] == [s.data.tolist() for s in samples[:4]]
    attrs = read_attrs(path)
    assert attrs["format_version"] == FORMAT_VERSION
    assert (attrs["generator"], attrs["family"], attrs["seed"]) == ("test", "poisson", 5)
    assert bucket_counts(path) == {24: {"train": 4, "val": 0, "test": 1}}


def test_bucket_counts_from_sidecar_without_numpy_or_h5py(tiny_dataset: Path) -> None:
    code = ("import sys, json; from progressive.data.format import bucket_counts; c = bucket_counts(sys.argv[1]); "
            "print(json.dumps({'counts': {str(k): v for k, v in c.items()}, "
            "'heavy': [m for m in ('numpy', 'h5py', 'torch') if m in sys.modules]}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code, str(tiny_dataset)], capture_output=True, text=True,
                                    check=True, cwd=REPO).stdout)
    assert out["heavy"] == []
    counts = {int(k): v for k, v in out["counts"].items()}
    assert sorted(counts) == list(TINY_SIZES)
    assert [sum(counts[n].values()) for n in TINY_SIZES] == list(TINY_COUNTS)


def test_stale_or_damaged_sidecar_is_ignored_and_refreshed(tiny_copy: Path) -> None:
    expected = bucket_counts(tiny_copy)
    side = index_path(tiny_copy)
    side.write_text('{"format": "progressive-buckets", "format_version": 1, "size": 1, "mtime_ns": 1, '
                    '"counts": {"999": {"train": 5, "val": 0, "test": 0}}}')
    assert bucket_counts(tiny_copy) == expected  # size/mtime mismatch: the file itself answers
    assert json.loads(side.read_text())["size"] == tiny_copy.stat().st_size  # and the sidecar is rewritten
    side.write_text("{not json")
    assert bucket_counts(tiny_copy) == expected
    side.unlink()
    assert bucket_counts(tiny_copy) == expected and side.exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        bucket_counts(tmp_path / "nope.h5")
    assert exc.value.msg == "dataset file not found"
    assert exc.value.loc == str(tmp_path / "nope.h5")
    assert "progressive data generate -o PATH" in (exc.value.hint or "")


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "notes.h5"
    path.write_text("these are not matrices\n" * 100)
    with pytest.raises(DataError, match=r"not a readable HDF5 file \(truncated or corrupt\?\)") as exc:
        bucket_counts(path)
    assert exc.value.loc == str(path)


def test_truncated_file_even_with_a_sidecar(tiny_copy: Path) -> None:
    size = tiny_copy.stat().st_size
    with open(tiny_copy, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(DataError, match="truncated or corrupt") as exc:
        bucket_counts(tiny_copy)
    assert "copy it again" in (exc.value.hint or "")
    with pytest.raises(DataError, match="truncated or corrupt"):
        open_bucket(tiny_copy, 16, "train")


def test_corrupt_chunk_fails_its_checksum(tiny_copy: Path) -> None:
    with h5py.File(tiny_copy, "r") as f:
        info = f["buckets/16/train/data"].id.get_chunk_info(0)
    with open(tiny_copy, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(b"\xff\x00\xff\x00")
    with open_bucket(tiny_copy, 16, "train") as r, pytest.raises(DataError, match="cannot read the sample") as exc:
        r.read(0)
    assert exc.value.loc == f"{tiny_copy}:16/train[0]"
    report = inspect(tiny_copy, verify=True)
    assert report.problem_count >= 1 and "cannot read the sample" in report.problems[0]


def test_foreign_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(DataError, match="not a progressive dataset") as exc:
        bucket_counts(path)
    assert "docs/data-format.md" in (exc.value.hint or "")


@pytest.mark.parametrize("version, hint", [(FORMAT_VERSION + 1, "upgrade progressive"), (0, "re-create the file")])
def test_unsupported_format_version(tiny_copy: Path, version: int, hint: str) -> None:
    with h5py.File(tiny_copy, "r+") as f:
        f.attrs["format_version"] = version
    with pytest.raises(DataError) as exc:
        bucket_counts(tiny_copy)  # the sidecar no longer matches the file's mtime, so the file answers
    assert exc.value.msg == f"unsupported format version {version} (this progressive reads version {FORMAT_VERSION})"
    assert hint in (exc.value.hint or "")


def test_sidecar_of_another_version_is_not_trusted(tiny_copy: Path) -> None:
    side = index_path(tiny_copy)
    doc = json.loads(side.read_text())
    doc["format_version"] = FORMAT_VERSION + 1
    doc["counts"] = {"7": {"train": 1, "val": 0, "test": 0}}
    side.write_text(json.dumps(doc))
    assert 7 not in bucket_counts(tiny_copy)


def test_bucket_absent_lists_the_buckets_present(tiny_dataset: Path) -> None:
    with pytest.raises(DataError) as exc:
        open_bucket(tiny_dataset, 100, "train")
    assert exc.value.msg == "bucket 100 is not in tiny.h5 (present: 16, 32, 64)"
    assert "--sizes" in (exc.value.hint or "")


def test_unknown_split(tiny_dataset: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'dev'"):
        open_bucket(tiny_dataset, 16, "dev")


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_value_in_file(tiny_copy: Path, value: float, word: str) -> None:
    poke(tiny_copy, 32, "train", "data", 5, value)
    with open_bucket(tiny_copy, 32, "train") as r:
        with pytest.raises(DataError) as exc:
            r.read(0)
        assert exc.value.msg == f"matrix has 1 non-finite value(s) ({word})"
        assert exc.value.loc == f"{tiny_copy}:32/train[0]"
        assert "inspect PATH --verify" in (exc.value.hint or "")
        r.read(1)  # the others still read
        with pytest.raises(DataError, match="non-finite"):
            r.read_block()
    assert inspect(tiny_copy, verify=True).problems == [f"32/train[0]: matrix has 1 non-finite value(s) ({word})"]


def test_non_finite_rhs_in_file(tiny_copy: Path) -> None:
    poke(tiny_copy, 16, "val", "rhs", (1, 0, 3), float("nan"))
    with open_bucket(tiny_copy, 16, "val") as r, pytest.raises(DataError, match=r"right-hand side has 1 non-finite"):
        r.read(1)


def test_non_square_in_file(tiny_copy: Path) -> None:
    poke(tiny_copy, 16, "train", "indices", 2, 40)
    with open_bucket(tiny_copy, 16, "train") as r, pytest.raises(DataError) as exc:
        r.read(0)
    assert exc.value.msg == "matrix is not square: column index 40 outside 0..15 (n=16)"


def test_non_symmetric_in_file(tiny_copy: Path) -> None:
    with open_bucket(tiny_copy, 64, "train") as r:
        s = r.read(0)
    off = int(np.flatnonzero(s.indices != np.repeat(np.arange(64), np.diff(s.indptr)))[0])
    poke(tiny_copy, 64, "train", "data", off, float(s.data[off]) - 1.0)
    report = inspect(tiny_copy, verify=True)
    assert report.problem_count == 1
    assert report.problems[0].startswith("64/train[0]: matrix is not symmetric (max |A - A^T| = 1")


def test_writer_rejects_bad_samples_and_leaves_nothing(tmp_path: Path) -> None:
    good = make_sample("poisson", 16, 0, 0)[1]
    cases = {
        "matrix is not square: 15 rows but n=16": good._replace(indptr=good.indptr[:-1]),
        "matrix has 1 non-finite value(s) (NaN)": good._replace(data=np.where(np.arange(len(good.data)) == 3, np.nan, good.data)),
        "matrix is not symmetric": good._replace(data=good.data + np.linspace(0, 1, len(good.data), dtype=np.float32)),
        "diagonal is not positive": good._replace(data=-good.data),
    }
    for i, (message, bad) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.h5"
        with pytest.raises(DataError) as exc:
            with DatasetWriter(path, attrs={}) as w:
                w.add(16, "train", *bad[1:4], bad.rhs)
        assert exc.value.msg.startswith(message), exc.value.msg
        assert exc.value.loc == f"{path}:16/train[0]"
        assert list(tmp_path.iterdir()) == [], "a failed write must leave no file behind"
    with pytest.raises(DataError, match="indptr and indices must be integer arrays, got float64"):
        with DatasetWriter(tmp_path / "f.h5", attrs={}) as w:
            w.add(16, "train", good.indptr.astype(float), good.indices, good.data, good.rhs)
    assert list(tmp_path.iterdir()) == []


def test_sample_problem_accepts_generated_and_flags_unsorted() -> None:
    s = make_sample("graph", 40, 3, 1)[1]
    assert sample_problem(s) is None
    a, b = int(s.indptr[2]), int(s.indptr[3])
    swapped = s.indices.copy()
    swapped[a], swapped[a + 1] = swapped[a + 1], swapped[a]
    assert b - a >= 2
    assert sample_problem(s._replace(indices=swapped)) == "column indices are not sorted and unique within each row"
    assert str(sample_problem(Sample(40, s.indptr, s.indices, s.data, s.rhs[0]))).startswith("right-hand sides have shape")


def test_output_exists_needs_overwrite(tiny_dataset: Path) -> None:
    with pytest.raises(DataError, match="output file already exists") as exc:
        DatasetWriter(tiny_dataset, attrs={})
    assert "--force" in (exc.value.hint or "")


def test_atomic_replace_keeps_sidecar_consistent(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    s = make_sample("poisson", 16, 0, 0)[1]
    for count in (1, 3):
        with DatasetWriter(path, attrs={}, overwrite=True) as w:
            for _ in range(count):
                w.add(16, "train", s.indptr, s.indices, s.data, s.rhs)
        assert bucket_counts(path)[16]["train"] == count
    side = json.loads(index_path(path).read_text())
    st = os.stat(path)
    assert (side["size"], side["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5", "x.h5.index.json"]
