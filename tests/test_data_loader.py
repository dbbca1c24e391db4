"""The trainer's view: BucketDataset, ResumableSampler, the block-diagonal collate, workers and signals."""

from __future__ import annotations

import math
import os
import pickle
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from progressive.data.format import FORMAT_NAME, FORMAT_VERSION, open_bucket
from progressive.data.loader import (
    Batch,
    BucketDataset,
    ResumableSampler,
    collate_block_diag,
    epoch_permutation,
    make_loader,
)
from progressive.errors import CheckpointError, DataError
from progressive.plan import steps_per_epoch
from progressive.signals import JOB_SIGNALS

# --------------------------------------------------------------------------- sampler


def test_permutation_is_pinned() -> None:
    # Resuming must give the same order on any machine and library version: pin the algorithm.
    assert epoch_permutation(10, 0, 0).tolist() == [4, 8, 0, 1, 7, 6, 2, 5, 3, 9]
    assert epoch_permutation(10, 0, 1).tolist() == [4, 0, 1, 8, 5, 7, 9, 3, 2, 6]
    assert epoch_permutation(10, 1, 0).tolist() == [3, 5, 2, 4, 1, 9, 0, 6, 8, 7]
    assert sorted(epoch_permutation(1000, 3, 7).tolist()) == list(range(1000))


def test_order_depends_only_on_seed_and_epoch() -> None:
    walked = ResumableSampler(23, seed=5)
    for epoch in range(4):
        walked.set_epoch(epoch)
        order = list(walked)
    fresh = ResumableSampler(23, seed=5)
    fresh.set_epoch(3)
    assert list(fresh) == order
    fresh.set_epoch(2)
    assert list(fresh) != order
    other = ResumableSampler(23, seed=6)
    other.set_epoch(3)
    assert list(other) != order
    assert list(ResumableSampler(5, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_exact_resume_mid_epoch(world: int) -> None:
    for rank in range(world):
        full = ResumableSampler(23, seed=11, rank=rank, world_size=world)
        full.set_epoch(4)
        order = list(full)
        for start in range(len(order) + 1):
            s = ResumableSampler(23, seed=11, rank=rank, world_size=world)
            s.set_epoch(4, start=start)
            assert list(s) == order[start:] and len(s) == len(order) - start


def test_state_dict_round_trip_and_checks() -> None:
    s = ResumableSampler(40, seed=3)
    s.set_epoch(2, start=12)
    state = s.state_dict()
    assert state == {"seed": 3, "epoch": 2, "start": 12}
    t = ResumableSampler(40, seed=3)
    t.load_state_dict(state)
    assert list(t) == list(s)
    with pytest.raises(CheckpointError, match="used seed 3, this run uses seed 4"):
        ResumableSampler(40, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="start must be within 0..40"):
        t.set_epoch(0, start=41)


@pytest.mark.parametrize("n, world", [(23, 2), (24, 2), (10, 3), (1, 2), (0, 2)])
def test_ranks_partition_like_distributed_sampler(n: int, world: int) -> None:
    per_rank = [list(ResumableSampler(n, seed=1, rank=r, world_size=world)) for r in range(world)]
    assert all(len(p) == math.ceil(n / world) for p in per_rank)
    seen = [i for p in per_rank for i in p]
    assert set(seen) == set(range(n))
    assert len(seen) - n == (-n) % world  # only the padding repeats
    # Padding wraps around, as DistributedSampler(drop_last=False) does.
    whole = epoch_permutation(n, 1, 0).tolist() if n else []
    padded = (whole * (world + 1))[: len(seen)]
    assert [padded[r::world] for r in range(world)] == per_rank


@pytest.mark.parametrize("n, batch, world, accum", [(23, 4, 1, 1), (23, 4, 2, 1), (24, 5, 3, 2), (7, 8, 1, 1), (30, 3, 2, 3)])
def test_steps_per_epoch_agree_with_plan(n: int, batch: int, world: int, accum: int) -> None:
    micro = [math.ceil(len(ResumableSampler(n, seed=0, rank=r, world_size=world)) / batch) for r in range(world)]
    assert len(set(micro)) == 1  # every rank takes the same number of steps (DDP would hang otherwise)
    assert math.ceil(micro[0] / accum) == steps_per_epoch(n, batch, world, accum)


# --------------------------------------------------------------------------- collate


def test_block_diagonal_matvec_equals_per_matrix(tiny_dataset: Path) -> None:
    samples = [BucketDataset(tiny_dataset, 16, "train")[i] for i in range(3)] + \
              [BucketDataset(tiny_dataset, 32, "train")[i] for i in range(2)]
    batch = collate_block_diag(samples)
    assert isinstance(batch, Batch) and len(batch) == 5
    assert batch.sizes == (16, 16, 16, 32, 32) and batch.offsets.tolist() == [0, 16, 32, 48, 80, 112]
    assert batch.indptr.dtype == batch.indices.dtype == batch.row.dtype == batch.offsets.dtype == torch.int64
    assert batch.values.dtype == batch.rhs.dtype == torch.float32
    assert batch.num_rows == 112 and batch.indptr.shape == (113,) and batch.row.shape == batch.indices.shape
    x = torch.randn(112, dtype=torch.float64)
    expected = np.concatenate([
        sp.csr_matrix((s.data.astype(np.float64), s.indices, s.indptr), shape=(s.n, s.n)) @ x[o:o + s.n].numpy()
        for s, o in zip(samples, batch.offsets[:-1].tolist())])
    np.testing.assert_allclose(batch.matvec(x).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose((batch.csr().double() @ x).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(batch.matvec(torch.stack([x, 2 * x], 1)).numpy()[:, 1], 2 * expected, rtol=1e-12)
    np.testing.assert_array_equal(batch.rhs[16:32].numpy(), samples[1].rhs[0])
    rows_from_indptr = torch.repeat_interleave(torch.arange(112), batch.indptr.diff())
    assert torch.equal(batch.row, rows_from_indptr)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved.sizes == batch.sizes


# --------------------------------------------------------------------------- the dataset


def test_lazy_and_in_memory_serve_the_same_samples(tiny_dataset: Path) -> None:
    lazy = BucketDataset(tiny_dataset, 32, "train", in_memory=False)
    mem = BucketDataset(tiny_dataset, 32, "train", in_memory=True)
    assert len(lazy) == len(mem) == 10 and BucketDataset(tiny_dataset, 32, "train").in_memory  # small: auto in memory
    with open_bucket(tiny_dataset, 32, "train") as r:
        for i in range(len(lazy)):
            for a, b, c in zip(lazy[i], mem[i], r.read(i)):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(a, c)
            assert mem[i].indices.dtype == np.int64 and mem[i].indptr.dtype == np.int64
    with pytest.raises(IndexError):
        lazy[10]
    clone = pickle.loads(pickle.dumps(lazy))  # spawned workers receive it pickled: no live handle inside
    np.testing.assert_array_equal(clone[3].data, lazy[3].data)


def test_dataset_errors(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"bucket 48 is not in tiny.h5 \(present: 16, 32, 64\)"):
        BucketDataset(tiny_dataset, 48, "train")
    with pytest.raises(DataError, match="dataset file not found"):
        BucketDataset(tmp_path / "none.h5", 16, "train")
    with pytest.raises(DataError, match="unknown split"):
        BucketDataset(tiny_dataset, 16, "training")


def test_opening_reads_only_the_index(tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    original = h5py.Dataset.__getitem__

    def spy(self: h5py.Dataset, key: object) -> object:
        reads.append(self.name.rsplit("/", 1)[-1])
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    ds = BucketDataset(tiny_dataset, 16, "train", in_memory=True)
    assert reads == ["nnz_offsets"]
    ds[0]
    assert {"indptr", "indices", "data", "rhs"} <= set(reads)


def test_opening_a_file_with_huge_matrix_arrays(tmp_path: Path) -> None:
    # 10^11 declared nonzeros (400 GB), none written: opening must not touch them.
    path = tmp_path / "huge.h5"
    nnz = 10**11
    with h5py.File(path, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = FORMAT_NAME, FORMAT_VERSION
        g = f.create_group("buckets/8/train")
        g.attrs["n"] = 8
        g["nnz_offsets"] = np.array([0, nnz], dtype=np.int64)
        g.create_dataset("indptr", (1, 9), np.int32)
        g.create_dataset("indices", (nnz,), np.int32, chunks=(1 << 20,))
        g.create_dataset("data", (nnz,), np.float32, chunks=(1 << 20,))
        g.create_dataset("rhs", (1, 1, 8), np.float32)
        g.create_dataset("hash", (1,), "S32")
    assert path.stat().st_size < 1_000_000
    t = time.perf_counter()
    ds = BucketDataset(path, 8, "train")
    assert time.perf_counter() - t < 1.0
    assert len(ds) == 1 and not ds.in_memory  # 800 GB would not fit: lazy


# --------------------------------------------------------------------------- the loader and workers


def test_make_loader_batches_and_resumes(tiny_dataset: Path) -> None:
    ds = BucketDataset(tiny_dataset, 16, "train")
    sampler = ResumableSampler(len(ds), seed=2)
    sizes = [len(b) for b in make_loader(ds, sampler, batch_size=5)]
    assert sizes == [5, 5, 5, 5, 4]  # 24 samples: the last batch partial, not dropped
    sampler.set_epoch(0, start=10)
    first_resumed = next(iter(make_loader(ds, sampler, batch_size=5)))
    full = list(ResumableSampler(len(ds), seed=2))
    np.testing.assert_array_equal(first_resumed.values.numpy(), collate_block_diag([ds[i] for i in full[10:15]]).values.numpy())


def test_worker_reads_after_the_parent_did(tiny_dataset: Path) -> None:
    ds = BucketDataset(tiny_dataset, 16, "train", in_memory=False)
    ds[0]  # the parent now holds an h5py handle; the forked worker must open its own
    batches = list(make_loader(ds, ResumableSampler(len(ds), seed=0, shuffle=False), batch_size=6, num_workers=1))
    assert sum(len(b) for b in batches) == 24
    np.testing.assert_array_equal(batches[0].values[: len(ds[0].data)].numpy(), ds[0].data)


def _signal_first_worker(loader: DataLoader) -> tuple[int, list]:  # type: ignore[type-arg]
    it = iter(loader)
    got = [next(it)]
    pid = it._workers[0].pid  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGUSR2)
    time.sleep(0.3)
    got += list(it)
    return pid, got


def _dispositions(pid: int) -> tuple[set[int], set[int]]:
    """(ignored, caught) signals of process `pid`, from the SigIgn and SigCgt masks of /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    masks = [int(fields[k].strip(), 16) for k in ("SigIgn", "SigCgt")]
    return tuple({s for s in range(1, 65) if m >> (s - 1) & 1} for m in masks)  # type: ignore[return-value]


def _first_worker_pid(loader: DataLoader) -> tuple[int, object]:  # type: ignore[type-arg]
    it = iter(loader)
    next(it)  # the worker has run its init once it has produced a batch
    return it._workers[0].pid, it  # type: ignore[attr-defined]


def test_workers_survive_job_signals(tiny_dataset: Path) -> None:
    ds = BucketDataset(tiny_dataset, 16, "train", in_memory=False)
    loader = make_loader(ds, ResumableSampler(len(ds), seed=0), batch_size=2, num_workers=1)
    pid, got = _signal_first_worker(loader)
    assert sum(len(b) for b in got) == 24
    os.kill(pid, 0)  # still alive
    del loader


def test_without_the_worker_init_a_job_signal_would_kill_the_worker(tiny_dataset: Path) -> None:
    # The control, proving the test above can fail: a plain DataLoader worker keeps SIGUSR2's default action
    # (terminate): neither ignored nor caught, so the signal would kill it and with it the epoch. Read from the
    # worker's /proc, not by killing it: a worker killed while the main process waits on it once hung CI for an hour.
    ds = BucketDataset(tiny_dataset, 16, "train", in_memory=False)
    plain = DataLoader(ds, batch_size=2, sampler=ResumableSampler(len(ds), seed=0), num_workers=1,
                       collate_fn=collate_block_diag)
    pid, it = _first_worker_pid(plain)
    ignored, caught = _dispositions(pid)
    assert signal.SIGUSR2 not in ignored | caught
    del it
    ours = make_loader(ds, ResumableSampler(len(ds), seed=0), batch_size=2, num_workers=1)
    pid, it = _first_worker_pid(ours)
    ignored, _ = _dispositions(pid)
    assert set(JOB_SIGNALS) <= ignored, sorted(set(JOB_SIGNALS) - ignored)
    del it, ours
