"""Whole-file operations: inspect/verify, subset, merge (duplicates), re-split."""

from __future__ import annotations

from pathlib import Path

import pytest

from progressive.data.format import SPLITS, bucket_counts, open_bucket, read_attrs
from progressive.data.ops import inspect, merge, resplit, subset
from progressive.errors import DataError


def hashes(path: Path) -> dict[tuple[int, str], list[str]]:
    out = {}
    for n in bucket_counts(path):
        for split in SPLITS:
            with open_bucket(path, n, split) as r:
                out[(n, split)] = r.hashes()
    return out


def all_hashes(path: Path) -> list[str]:
    return [h for hs in hashes(path).values() for h in hs]


def test_inspect_reports_buckets_and_verifies(tiny_dataset: Path) -> None:
    report = inspect(tiny_dataset, verify=True)
    assert [b.n for b in report.buckets] == [16, 32, 64]
    b16 = report.buckets[0]
    assert b16.counts == {"train": 24, "val": 3, "test": 3}
    assert 0 < b16.nnz_min <= b16.nnz_mean <= b16.nnz_max and b16.rhs_per_sample == 1
    assert b16.stored_bytes > 0 and b16.raw_bytes > 0
    assert report.verified and report.checked == 48 and report.problems == []
    assert report.format_version == 1 and report.to_json()["buckets"][0]["n"] == 16


def test_subset_is_reproducible_and_proportional(tiny_dataset: Path, tmp_path: Path) -> None:
    a = subset(tiny_dataset, tmp_path / "a.h5", max_samples=24, seed=42)
    b = subset(tiny_dataset, tmp_path / "b.h5", max_samples=24, seed=42)
    c = subset(tiny_dataset, tmp_path / "c.h5", max_samples=24, seed=43)
    assert a == b == c
    assert sum(sum(v.values()) for v in a.values()) == 24
    assert a[16]["train"] == 12 and a[64]["train"] in (2, 3)  # half of each stratum, rounded
    assert hashes(tmp_path / "a.h5") == hashes(tmp_path / "b.h5")
    assert hashes(tmp_path / "a.h5") != hashes(tmp_path / "c.h5")
    source = hashes(tiny_dataset)
    for key, hs in hashes(tmp_path / "a.h5").items():
        assert set(hs) <= set(source[key])  # kept in its own bucket and split
    assert read_attrs(tmp_path / "a.h5")["history"][-1]["op"] == "subset"
    assert inspect(tmp_path / "a.h5", verify=True).problem_count == 0


def test_subset_larger_than_file_and_bucket_filter(tiny_dataset: Path, tmp_path: Path) -> None:
    counts = subset(tiny_dataset, tmp_path / "all.h5", max_samples=10_000, seed=1, buckets=[32])
    assert counts == {32: {"train": 10, "val": 1, "test": 1}}
    with pytest.raises(DataError) as exc:
        subset(tiny_dataset, tmp_path / "x.h5", max_samples=5, seed=1, buckets=[32, 99])
    assert exc.value.msg == "bucket(s) 99 not in the file (buckets present: 16, 32, 64)"
    with pytest.raises(DataError, match="max-samples must be >= 0"):
        subset(tiny_dataset, tmp_path / "y.h5", max_samples=-1, seed=1)


def test_merge_detects_and_drops_duplicates(tiny_dataset: Path, tmp_path: Path) -> None:
    part = tmp_path / "part.h5"
    subset(tiny_dataset, part, max_samples=10, seed=5)
    report = merge([tiny_dataset, part], tmp_path / "m.h5")
    assert report.duplicates == 10 and not report.kept_duplicates
    assert report.examples[0].startswith(f"{part}:16/train[") and f"= {tiny_dataset}:16/train[" in report.examples[0]
    assert report.counts == bucket_counts(tiny_dataset)
    assert sorted(all_hashes(tmp_path / "m.h5")) == sorted(all_hashes(tiny_dataset))
    kept = merge([tiny_dataset, part], tmp_path / "k.h5", keep_duplicates=True)
    assert kept.duplicates == 10 and sum(sum(v.values()) for v in kept.counts.values()) == 48 + 10
    attrs = read_attrs(tmp_path / "m.h5")
    assert attrs["history"][0]["op"] == "merge" and attrs["family"] == "mix"


def test_merge_of_disjoint_files_and_bad_inputs(tmp_path: Path) -> None:
    from progressive.data.generate import generate

    generate(tmp_path / "a.h5", sizes=[16], counts=[6], seed=1, workers=1)
    generate(tmp_path / "b.h5", sizes=[16, 24], counts=[4, 3], seed=2, workers=1, family="graph")
    report = merge([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "m.h5")
    assert report.duplicates == 0
    assert {n: sum(c.values()) for n, c in report.counts.items()} == {16: 10, 24: 3}
    attrs = read_attrs(tmp_path / "m.h5")
    assert (attrs["family"], attrs["seed"]) == ("graph+poisson", -1)
    with pytest.raises(DataError, match="at least two input files"):
        merge([tmp_path / "a.h5"], tmp_path / "x.h5")
    with pytest.raises(DataError, match="the output is also an input"):
        merge([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "a.h5", overwrite=True)
    with pytest.raises(DataError, match="dataset file not found"):
        merge([tmp_path / "a.h5", tmp_path / "nope.h5"], tmp_path / "y.h5")
    assert not (tmp_path / "y.h5").exists()


def test_resplit_keeps_every_sample_and_follows_fractions(tiny_dataset: Path, tmp_path: Path) -> None:
    counts = resplit(tiny_dataset, tmp_path / "r.h5", seed=9, split=(0.5, 0.25, 0.25))
    assert counts[16] == {"train": 15, "val": 8, "test": 7}  # 7.5 and 7.5: the tie goes to val
    assert sum(counts[16].values()) == 30
    assert sorted(all_hashes(tmp_path / "r.h5")) == sorted(all_hashes(tiny_dataset))
    again = resplit(tiny_dataset, tmp_path / "r2.h5", seed=9, split=(0.5, 0.25, 0.25))
    assert again == counts and hashes(tmp_path / "r.h5") == hashes(tmp_path / "r2.h5")
    assert read_attrs(tmp_path / "r.h5")["history"][-1] == {"op": "split", "source": str(tiny_dataset), "seed": 9,
                                                            "split": [0.5, 0.25, 0.25]}
    with pytest.raises(DataError, match="split fractions"):
        resplit(tiny_dataset, tmp_path / "bad.h5", seed=9, split=(0.9, 0.9))
