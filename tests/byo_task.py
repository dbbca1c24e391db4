"""A task defined outside the package, reading its own file format: what a user writes (README's example).

Its data is a folder of plain numpy files, per split: `<split>.tokens.npy` (every sequence's tokens,
concatenated, int32) and `<split>.lengths.npy` (each sequence's length). Bucket b holds the
sequences of length in (b/2, b], padded to b with the token `vocab` (ignored by the loss). Nothing
of progressive's data formats is used: `plan` counts it from the index that `progressive data
index` writes with this task's `count` hook.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from progressive.task import Task
from progressive.tasks.seqlm import CausalLM


def write_token_files(folder: Path, *, seed: int = 0, vocab: int = 12, per_split: dict[str, int] | None = None,
                      max_len: int = 64) -> Path:
    """Random walks on a ring of `vocab` tokens (step +1 or +2), lengths uniform in [4, max_len]."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (per_split or {"train": 120, "val": 16, "test": 8}).items():
        lengths = rng.integers(4, max_len + 1, size=count)
        seqs = [(rng.integers(0, vocab) + np.cumsum(rng.integers(1, 3, size=n))) % vocab for n in lengths]
        np.save(folder / f"{split}.tokens.npy", np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, np.int32))
        np.save(folder / f"{split}.lengths.npy", lengths.astype(np.int64))
    return folder


class LengthBucket(Dataset[np.ndarray]):
    """Sequences of one split whose length is in (bucket/2, bucket], each padded to `bucket`."""

    def __init__(self, folder: str, bucket: int, split: str, pad: int) -> None:
        lengths = np.load(Path(folder) / f"{split}.lengths.npy")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        keep = (lengths > bucket // 2) & (lengths <= bucket)
        self.starts, self.lengths = starts[keep], lengths[keep]
        self.tokens = np.load(Path(folder) / f"{split}.tokens.npy", mmap_mode="r")
        self.bucket, self.pad = bucket, pad

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        out = np.full(self.bucket, self.pad, dtype=np.int64)
        s, n = int(self.starts[i]), int(self.lengths[i])
        out[:n] = self.tokens[s:s + n]
        return out


class TokenFileTask(Task):
    """Next-token prediction on the token files above; `step_sleep` slows steps (Slurm time-limit tests)."""

    def __init__(self, vocab: int = 12, d_model: int = 16, layers: int = 1, max_len: int = 64,
                 step_sleep: float = 0.0) -> None:
        self.vocab, self.d_model, self.layers, self.max_len, self.step_sleep = vocab, d_model, layers, max_len, step_sleep

    def build_model(self) -> torch.nn.Module:
        return CausalLM(self.vocab + 1, self.d_model, self.layers, heads=2, max_len=self.max_len)

    def count(self, data_path: str, bucket: int, split: str) -> int | None:
        # Cheap: the lengths file alone, not the tokens (what `data index` and `submit` call).
        lengths = np.load(Path(data_path) / f"{split}.lengths.npy")
        return int(((lengths > bucket // 2) & (lengths <= bucket)).sum())

    def dataset(self, data_path: str, bucket: int, split: str) -> Dataset[Any]:
        return LengthBucket(data_path, bucket, split, pad=self.vocab)

    def collate(self, samples: Sequence[Any]) -> torch.Tensor:
        return torch.from_numpy(np.stack(samples))

    def worker_init_fn(self, worker_id: int) -> None:
        pass

    def batch_len(self, batch: Any) -> int:
        return int(batch.shape[0])

    def _loss(self, model: torch.nn.Module, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               ignore_index=self.vocab, reduction=reduction)

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        if self.step_sleep:
            time.sleep(self.step_sleep)
        return self._loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, dataset: Dataset[Any], *, device: torch.device,
                 max_samples: int) -> dict[str, float]:
        count = min(len(dataset), max_samples)  # type: ignore[arg-type]
        if not count:
            return {"samples": 0.0}
        batch = self.collate([dataset[i] for i in range(count)]).to(device)
        tokens = int((batch[:, 1:] != self.vocab).sum())
        return {"samples": float(count), "loss": float(self._loss(model, batch, "sum")) / max(tokens, 1)}
