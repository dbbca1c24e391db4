"""The dense-array layout: pack-arrays and generate-seq on the command line, the dataset, and every refusal."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from progressive.data.arrays import ArrayDataset, array_counts, read_manifest, write_arrays
from progressive.data.counts import plan_counts
from progressive.data.seqgen import generate_sequences
from progressive.errors import DataError
from tests.util import run_cli


def test_pack_arrays_round_trip_and_plan_counts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train8, val8 = rng.integers(0, 100, (6, 8)).astype(np.int32), rng.integers(0, 100, (2, 8)).astype(np.int32)
    feats = rng.random((5, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "a.npz", train_8=train8, val_8=val8)
    np.save(tmp_path / "train_16.npy", feats)
    out = tmp_path / "data" / "packed"
    run_cli("data", "pack-arrays", str(tmp_path / "a.npz"), str(tmp_path / "train_16.npy"), "-o", str(out), check=True)
    assert array_counts(out) == {8: {"train": 6, "val": 2, "test": 0}, 16: {"train": 5, "val": 0, "test": 0}}
    assert plan_counts(out, buckets=[8, 16], task="any:Task") == array_counts(out)  # plan needs no index
    ds = ArrayDataset(out, 8, "train")
    assert len(ds) == 6 and all(np.array_equal(ds[i], train8[i]) for i in range(6))
    assert ds[0].dtype == np.int32
    assert np.array_equal(ArrayDataset(out, 16, "train")[4], feats[4])
    assert len(ArrayDataset(out, 8, "test")) == 0  # an absent split is empty
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives: it maps the file itself
    assert clone._arr is None and np.array_equal(clone[5], train8[5])
    assert [p.name for p in out.parent.iterdir()] == ["packed"]  # no temp folder left


@pytest.mark.parametrize("files, message, hint", [
    ({"a.npz": {"training_8": np.zeros((2, 8))}}, "array name 'training_8' is not <split>_<bucket>", "train_64"),
    ({"a.npz": {"train_0": np.zeros((2, 8))}}, "array name 'train_0' is not <split>_<bucket>", "val_64"),
    ({"a.npz": {"train_8": np.zeros((2, 8))}, "b.npz": {"train_8": np.zeros((2, 8))}}, "array 'train_8' is given twice",
     "a.npz"),
    ({"a.npz": {"train_8": np.array(["x", "y"])}}, "array of str32 with shape (2,) cannot be packed", "pad ragged"),
    ({"a.npz": {"train_8": np.float32(3.0)}}, "with shape () cannot be packed", "shape (samples, ...)"),
])
def test_pack_arrays_refuses_bad_inputs(tmp_path: Path, files: dict, message: str, hint: str) -> None:
    for name, arrays in files.items():
        np.savez(tmp_path / name, **arrays)
    proc = run_cli("data", "pack-arrays", *[str(tmp_path / n) for n in files], "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and message in proc.stderr and hint in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pack_arrays_output_and_input_refusals(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", train_8=np.zeros((2, 8)))
    missing = run_cli("data", "pack-arrays", str(tmp_path / "nope.npz"), "-o", str(tmp_path / "o"))
    assert missing.returncode == 2 and "nope.npz: input file not found" in missing.stderr
    (tmp_path / "notes").mkdir()
    foreign = run_cli("data", "pack-arrays", str(tmp_path / "a.npz"), "-o", str(tmp_path / "notes"), "--force")
    assert foreign.returncode == 2 and "is not an array dataset: refusing to replace it" in foreign.stderr
    out = tmp_path / "o"
    run_cli("data", "pack-arrays", str(tmp_path / "a.npz"), "-o", str(out), check=True)
    again = run_cli("data", "pack-arrays", str(tmp_path / "a.npz"), "-o", str(out))
    assert again.returncode == 2 and "output exists" in again.stderr and "--force" in again.stderr
    np.savez(tmp_path / "b.npz", train_8=np.ones((3, 8)), val_8=np.ones((1, 8)))
    run_cli("data", "pack-arrays", str(tmp_path / "b.npz"), "-o", str(out), "--force", check=True)
    assert array_counts(out)[8] == {"train": 3, "val": 1, "test": 0}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # old copy removed


def test_failed_write_keeps_the_previous_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    write_arrays(out, {8: {"train": np.zeros((2, 8))}})
    real_save, calls = np.save, []

    def failing_save(*args: object, **kw: object) -> None:  # the disk fills up at the second file
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real_save(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_arrays(out, {4: {"train": np.zeros((3, 4)), "val": np.zeros((1, 4))}}, force=True)
    assert array_counts(out) == {8: {"train": 2, "val": 0, "test": 0}}
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # the half-written temp folder is gone


def test_dataset_errors_name_the_bucket_and_file(tmp_path: Path) -> None:
    out = tmp_path / "o"
    write_arrays(out, {8: {"train": np.zeros((2, 8))}})
    with pytest.raises(DataError, match="no bucket 16") as info:
        ArrayDataset(out, 16, "train")
    assert "buckets in this dataset: 8" in str(info.value)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        ArrayDataset(out, 8, "dev")
    np.save(out / "8" / "train.npy", np.zeros((5, 8)))  # edited by hand
    with pytest.raises(DataError, match="holds 5 samples but the manifest says 2"):
        ArrayDataset(out, 8, "train")[0]
    (out / "arrays.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not a progressive-arrays manifest"):
        read_manifest(out)
    with pytest.raises(DataError, match="folder has no arrays.json"):
        read_manifest(tmp_path)


def test_generate_seq_is_reproducible_by_seed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_cli("data", "generate-seq", "-o", str(a), "--lengths", "16,32", "--counts", "20", "--seed", "4", check=True)
    generate_sequences(b, lengths=[16, 32], counts=[20], seed=4)
    generate_sequences(c, lengths=[16, 32], counts=[20], seed=5)
    for bucket in (16, 32):
        for split in ("train", "val", "test"):
            x, y = np.load(a / str(bucket) / f"{split}.npy"), np.load(b / str(bucket) / f"{split}.npy")
            assert np.array_equal(x, y) and x.shape[1] == bucket
    assert not np.array_equal(np.load(a / "16" / "train.npy"), np.load(c / "16" / "train.npy"))
    assert array_counts(a)[16] == {"train": 16, "val": 2, "test": 2}
    tokens = np.load(a / "32" / "train.npy")
    assert tokens.min() >= 0 and tokens.max() < 16 and set(np.unique(tokens[:, 0])) <= set(range(4))  # topic tokens
    src = read_manifest(a)["source"]
    assert src["vocab"] == 16 and 0 < src["entropy_floor"] < np.log(16)


def test_generate_seq_refuses_bad_arguments(tmp_path: Path) -> None:
    proc = run_cli("data", "generate-seq", "-o", str(tmp_path / "s"), "--lengths", "16,32", "--counts", "5,6,7")
    assert proc.returncode == 2 and "2 lengths but 3 counts" in proc.stderr and "one per length" in proc.stderr
    proc = run_cli("data", "generate-seq", "-o", str(tmp_path / "s"), "--vocab", "3", "--topics", "4")
    assert proc.returncode == 2 and "need 2 <= topics (4) <= vocab (3)" in proc.stderr
    proc = run_cli("data", "generate-seq", "-o", str(tmp_path / "s"), "--lengths", "1x")
    assert proc.returncode == 2 and "cannot parse '1x'" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_damaged_manifests_are_named(tmp_path: Path) -> None:
    out = tmp_path / "o"
    write_arrays(out, {8: {"train": np.zeros((2, 8))}})
    manifest = out / "arrays.json"
    good = manifest.read_text()
    manifest.write_text(good.replace('"format_version": 1', '"format_version": 9'))
    with pytest.raises(DataError, match="format version 9 is not supported") as info:
        read_manifest(out)
    assert "re-pack" in str(info.value)
    manifest.write_text(good.replace('"counts": {', '"counts": {"x": 1, '))
    with pytest.raises(DataError, match="the manifest's counts are damaged"):
        array_counts(out)
    manifest.write_text("{")
    with pytest.raises(DataError, match="cannot read arrays.json"):
        read_manifest(out)
    with pytest.raises(DataError, match="array dataset not found"):
        read_manifest(tmp_path / "absent")
    manifest.write_text(good)
    (out / "8" / "train.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read train of bucket 8"):
        ArrayDataset(out, 8, "train")[0]


def test_pack_arrays_refuses_unreadable_or_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    proc = run_cli("data", "pack-arrays", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "bad.npz: cannot read numpy arrays" in proc.stderr and "np.savez" in proc.stderr
    np.savez(tmp_path / "empty.npz")
    proc = run_cli("data", "pack-arrays", str(tmp_path / "empty.npz"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no arrays to write" in proc.stderr and "train_64" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_generate_seq_refuses_short_lengths_and_bad_splits(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="lengths must be >= 2"):
        generate_sequences(tmp_path / "s", lengths=[1], counts=[3])
    with pytest.raises(DataError, match=r"split \[0.5, -1.0, 0.5\] is not three non-negative fractions"):
        generate_sequences(tmp_path / "s", lengths=[8], counts=[3], split=[0.5, -1.0, 0.5])
    assert not (tmp_path / "s").exists()
