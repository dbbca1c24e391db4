"""The trainer's view of a dataset: one bucket as a torch Dataset, a resumable distributed sampler,
and a collate that batches matrices as one block-diagonal sparse operator.

The only data module that imports torch. Typical use::

    ds = BucketDataset("data/matrices.h5", bucket=1024, split="train")
    sampler = ResumableSampler(len(ds), seed=cfg.seed, rank=rank, world_size=world)
    sampler.set_epoch(epoch, start=consumed)          # consumed: this rank's samples done this epoch
    for batch in make_loader(ds, sampler, batch_size=8):
        y = batch.matvec(x)                           # or batch.csr() @ x
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from progressive.data.format import SPLITS, BucketReader, Sample, block_sample, open_bucket
from progressive.errors import CheckpointError, DataError
from progressive.signals import JOB_SIGNALS, ignore_job_signals

__all__ = ["Sample", "BucketDataset", "ResumableSampler", "Batch", "collate_block_diag",
           "worker_init_fn", "make_loader", "IN_MEMORY_MAX_BYTES"]

# `in_memory=None` loads a bucket whole when it needs at most this much RAM: in the benchmark
# (benchmarks/results/data.md) the in-memory dataset served an epoch ~7x faster than lazy reads,
# and the largest default bucket needs ~0.04 GB.
IN_MEMORY_MAX_BYTES = 2 * 1024**3

class BucketDataset(Dataset[Sample]):
    """The samples of one bucket (matrix size n) and split of a dataset file.

    Opening reads only the bucket's index (one offset per sample), never the matrices. Samples are
    read lazily through an h5py handle opened on first use in each process (so every DataLoader
    worker has its own), or, with `in_memory`, the whole bucket is loaded on first use with four
    bulk reads. `in_memory=None` decides by size (IN_MEMORY_MAX_BYTES).
    """

    def __init__(self, path: str | Path, bucket: int, split: str = "train", in_memory: bool | None = None) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}", loc=str(path), hint=f"use one of {', '.join(SPLITS)}")
        self.path, self.bucket, self.split = Path(path), int(bucket), split
        with open_bucket(self.path, self.bucket, split) as r:
            self.n = r.n
            self.rhs_per_sample = r.rhs_per_sample
            self.nnz_offsets = r.nnz_offsets
        self.count = len(self.nnz_offsets) - 1
        nnz = int(self.nnz_offsets[-1])
        # What the loaded arrays occupy: as stored (int32 indptr and indices, float32 values and rhs);
        # a sample's index arrays become int64 only when it is served.
        self.memory_bytes = nnz * 8 + self.count * ((self.n + 1) * 4 + self.rhs_per_sample * self.n * 4)
        self.in_memory = self.memory_bytes <= IN_MEMORY_MAX_BYTES if in_memory is None else bool(in_memory)
        self._reader: BucketReader | None = None
        self._pid: int | None = None
        self._arrays: tuple[np.ndarray, ...] | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.count:
            raise IndexError(f"sample {i} out of range for {self.count} samples of bucket {self.bucket}/{self.split}")
        if self.in_memory:
            offs, indptr, indices, data, rhs = self.load()
            return block_sample(self.n, offs, indptr, indices, data, rhs, i)
        return self._handle().read(i)

    def load(self) -> tuple[np.ndarray, ...]:
        """Read the whole bucket into memory now (once, checked): `BucketReader.read_block`'s arrays."""
        if self._arrays is None:
            with open_bucket(self.path, self.bucket, self.split, cache_bytes=0) as r:
                self._arrays = r.read_block()
        return self._arrays

    def _handle(self) -> BucketReader:
        # A handle inherited through fork shares HDF5 state with the parent: open our own.
        if self._reader is None or self._pid != os.getpid():
            self._reader = open_bucket(self.path, self.bucket, self.split)
            self._pid = os.getpid()
        return self._reader

    def close(self) -> None:
        """Drop the file handle and any loaded arrays."""
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader, self._pid, self._arrays = None, None, None

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers get the index (and loaded arrays), never a live h5py handle.
        state = self.__dict__.copy()
        state["_reader"], state["_pid"] = None, None
        return state


# --------------------------------------------------------------------------- sampling

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of an epoch: a function of (num_samples, seed, epoch) only.

    Sorting by a splitmix64 hash, written out here, rather than numpy's or torch's shuffles:
    their algorithms may change between versions, and a resumed job must see the same order.
    """
    base = _splitmix64(_splitmix64(seed & _MASK) ^ (epoch & _MASK))
    x = np.arange(num_samples, dtype=np.uint64) + np.uint64(base)  # wraps mod 2^64, as intended
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return np.argsort(x, kind="stable").astype(np.int64)


class ResumableSampler(Sampler[int]):
    """Shuffled, distributed, and resumable mid-epoch.

    Epoch e's order depends only on (seed, e). Like DistributedSampler (drop_last=False), the order is
    padded by wrapping around to a multiple of world_size and rank r takes positions r, r+W, ...; each
    rank sees ceil(num_samples / world_size) samples per epoch, so the steps per epoch equal
    `progressive.plan.steps_per_epoch` (last batch partial). `set_epoch(e, start)` skips the first
    `start` of this rank's samples: the trainer counts what it consumed, because DataLoader prefetching
    makes the sampler's own position run ahead of training.
    """

    def __init__(self, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if num_samples < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: num_samples={num_samples}, rank={rank}, world_size={world_size}")
        self.num_samples, self.seed, self.rank, self.world_size, self.shuffle = num_samples, seed, rank, world_size, shuffle
        self.per_rank = math.ceil(num_samples / world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from this rank's `start`-th sample (0 <= start <= samples per rank)."""
        if epoch < 0 or not 0 <= start <= self.per_rank:
            raise ValueError(f"set_epoch({epoch}, start={start}): start must be within 0..{self.per_rank}")
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> np.ndarray:
        """This rank's whole order for the current epoch (ignoring `start`)."""
        if self.num_samples == 0:
            return np.zeros(0, dtype=np.int64)
        order = (epoch_permutation(self.num_samples, self.seed, self.epoch) if self.shuffle
                 else np.arange(self.num_samples, dtype=np.int64))
        order = np.resize(order, self.per_rank * self.world_size)  # np.resize repeats from the start
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start

    def state_dict(self) -> dict[str, int]:
        """{"seed", "epoch", "start"}: store it in the checkpoint, with `start` the samples consumed."""
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a `state_dict()`; the seed must be this sampler's."""
        if int(state["seed"]) != self.seed:
            raise CheckpointError(f"the checkpoint's data order used seed {state['seed']}, this run uses seed {self.seed}",
                                  hint="resume with the run's original seed, or start the stage afresh")
        self.set_epoch(int(state["epoch"]), int(state.get("start", 0)))


# --------------------------------------------------------------------------- batching

@dataclasses.dataclass(frozen=True)
class Batch:
    """B matrices as one block-diagonal N x N CSR operator (N = sum of sizes).

    indptr (N+1,) int64, indices (nnz,) int64, values (nnz,) float32, row (nnz,) int64 (each
    nonzero's row: the edge list for message passing is (row, indices)), sizes: each matrix's n,
    offsets (B+1,) int64: matrix b owns rows offsets[b]:offsets[b+1], rhs (N,) float32: the first
    right-hand side of each matrix.
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    row: torch.Tensor
    sizes: tuple[int, ...]
    offsets: torch.Tensor
    rhs: torch.Tensor

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_rows(self) -> int:
        """N, the total size."""
        return int(self.offsets[-1])

    def _map(self, fn: Any) -> "Batch":
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The batch on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copy (DataLoader(pin_memory=True) calls this)."""
        return self._map(lambda t: t.pin_memory())

    def csr(self) -> torch.Tensor:
        """The operator as a torch.sparse_csr_tensor of shape (N, N)."""
        with warnings.catch_warnings():
            # torch calls sparse CSR "beta"; construction and CSR @ dense are its stable core. The
            # invariants hold by construction (collate_block_diag), so skip torch's O(nnz) check.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(self.indptr, self.indices, self.values, size=(self.num_rows, self.num_rows),
                                           check_invariants=False)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """A @ x for x of shape (N,) or (N, c), by scatter-add (works on every device and dtype)."""
        prod = self.values.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) * x[self.indices]
        return torch.zeros_like(x).index_add_(0, self.row, prod)


def collate_block_diag(samples: Sequence[Sample]) -> Batch:
    """Stack samples into one block-diagonal operator (a DataLoader collate_fn)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    sizes = tuple(int(s.n) for s in samples)
    nnzs = [len(s.data) for s in samples]
    row_off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    nnz_off = np.concatenate([[0], np.cumsum(nnzs)]).astype(np.int64)
    indptr = np.concatenate([np.zeros(1, np.int64)] + [np.asarray(s.indptr[1:], np.int64) + nnz_off[b]
                                                       for b, s in enumerate(samples)])
    indices = np.concatenate([np.asarray(s.indices, np.int64) + row_off[b] for b, s in enumerate(samples)])
    values = np.concatenate([np.asarray(s.data, np.float32) for s in samples])
    rhs = np.concatenate([np.asarray(s.rhs, np.float32).reshape(-1, s.n)[0] for s in samples])
    row = np.repeat(np.arange(row_off[-1], dtype=np.int64), np.diff(indptr))
    return Batch(indptr=torch.from_numpy(indptr), indices=torch.from_numpy(indices), values=torch.from_numpy(values),
                 row=torch.from_numpy(row), sizes=sizes, offsets=torch.from_numpy(row_off), rhs=torch.from_numpy(rhs))


# --------------------------------------------------------------------------- workers and the loader

def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore the job's signals (the handle opens lazily on first read).

    Slurm signals every process of a job step; the trainer in the main process reacts, and a
    worker killed by one would take the epoch down with it.
    """
    ignore_job_signals()


def _init_worker(signals: tuple[int, ...], then: Callable[[int], None] | None, worker_id: int) -> None:
    # The pre-timeout signal and Ctrl-C go to the whole process group; workers must outlive them
    # so the main process can finish its step and checkpoint, whatever `then` (a task's init) does.
    ignore_job_signals(signals)
    if then is not None:
        then(worker_id)


def make_loader(dataset: Dataset[Any], sampler: Sampler[int], batch_size: int, num_workers: int = 0,
                pin_memory: bool = False, *, collate_fn: Callable[[list[Any]], Any] = collate_block_diag,
                worker_init: Callable[[int], None] | None = None, signals: Sequence[int] = JOB_SIGNALS,
                generator: torch.Generator | None = None) -> DataLoader[Any]:
    """A DataLoader yielding batches: last batch partial (not dropped), workers ignore job signals.

    num_workers=0 is the measured best on 2 cores; with workers, an in-memory dataset not yet loaded
    is loaded by each worker (load() it first to share it through fork). Workers persist across epochs.

    Args:
        collate_fn: samples -> batch (default: one block-diagonal `Batch`; the trainer passes its task's).
        worker_init: run in each worker after it has ignored `signals` (e.g. a task's `worker_init_fn`).
        signals: the signals workers ignore (default JOB_SIGNALS; add the job's own pre-timeout signal).
        generator: the loader's own RNG for worker seeds; without one, every `iter(loader)` draws from
            torch's global RNG, which a resumed job would then see at a different point.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=pin_memory, drop_last=False, generator=generator,
                      worker_init_fn=functools.partial(_init_worker, tuple(signals), worker_init)
                      if num_workers > 0 else None,
                      persistent_workers=num_workers > 0)
