"""The second built-in task: a tiny causal transformer on token sequences, curriculum by length.

A stage's bucket is the sequence length (64 -> 128 -> 256 tokens in examples/seq.toml);
its data is the dense-array layout (`progressive.data.arrays`), e.g. the synthetic
sequences of `progressive data generate-seq`. The weights do not depend on the length
(positions up to `max_len` are embedded), so a model trained on 64 tokens initialises 128.

Evaluation: mean next-token cross-entropy on held-out sequences of the stage's bucket
(`loss`, nats per token) and its perplexity (`ppl`).

Resume: the loss draws no random numbers (no dropout), so exact resume needs nothing but
the trainer's own state; a task that adds randomness must draw it from `generator`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from progressive.errors import DataError
from progressive.task import Task

__all__ = ["SequenceLMTask", "CausalLM", "next_token_loss"]


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class CausalLM(nn.Module):
    """Token + learned position embeddings, `layers` blocks, a final norm and a linear head."""

    def __init__(self, vocab: int, d_model: int = 32, layers: int = 2, heads: int = 2, max_len: int = 256) -> None:
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits (batch, length, vocab) for tokens (batch, length)."""
        n = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(n, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def next_token_loss(model: nn.Module, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting tokens[:, 1:] from what precedes them (nats per token)."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), reduction=reduction)


class SequenceLMTask(Task):
    """Next-token prediction on fixed-length token sequences, one length per bucket.

    Options (`[model.options]`):
        vocab: token ids are 0..vocab-1 (generate-seq's default is 16).
        d_model, layers, heads: the transformer's width, depth and attention heads.
        max_len: the longest sequence (bucket) the position embedding covers.
    """

    def __init__(self, vocab: int = 16, d_model: int = 32, layers: int = 2, heads: int = 2, max_len: int = 256) -> None:
        if vocab < 2 or d_model < 1 or layers < 1 or heads < 1 or d_model % heads or max_len < 2:
            raise ValueError("need vocab >= 2, layers >= 1, heads >= 1 dividing d_model, max_len >= 2")
        self.vocab, self.d_model, self.layers, self.heads, self.max_len = vocab, d_model, layers, heads, max_len

    def build_model(self) -> nn.Module:
        """A fresh CausalLM."""
        return CausalLM(self.vocab, self.d_model, self.layers, self.heads, self.max_len)

    def dataset(self, data_path: str, bucket: int, split: str) -> Dataset[Any]:
        """Bucket `bucket` (the sequence length) of a dense-array folder; checks length and vocabulary."""
        from progressive.data.arrays import ArrayDataset, read_manifest

        if bucket > self.max_len:
            raise DataError(f"bucket {bucket} is longer than max_len {self.max_len}", loc="[model.options].max_len",
                            hint=f"set max_len >= {bucket} (it sizes the position embedding)")
        data_vocab = (read_manifest(data_path).get("source") or {}).get("vocab")
        if isinstance(data_vocab, int) and data_vocab > self.vocab:
            raise DataError(f"the data has {data_vocab} token ids but the model {self.vocab}", loc="[model.options].vocab",
                            hint=f"set vocab = {data_vocab}")
        return ArrayDataset(data_path, bucket, split)  # type: ignore[return-value]

    def collate(self, samples: Sequence[Any]) -> torch.Tensor:
        """Stack equal-length sequences into a (batch, length) int64 tensor."""
        return torch.from_numpy(np.stack(samples).astype(np.int64))

    def worker_init_fn(self, worker_id: int) -> None:
        """Nothing to reopen: each worker maps the .npy file on first use."""

    def batch_len(self, batch: Any) -> int:
        """Sequences in the batch."""
        return int(batch.shape[0])

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Mean next-token cross-entropy (draws no random numbers)."""
        return next_token_loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset[Any], *, device: torch.device,
                 max_samples: int) -> dict[str, float]:
        """`loss` (nats per predicted token) and `ppl` = exp(loss) on up to `max_samples` sequences."""
        count = min(len(dataset), max_samples)  # type: ignore[arg-type]
        total, tokens = 0.0, 0
        for start in range(0, count, 32):
            batch = self.collate([dataset[i] for i in range(start, min(count, start + 32))]).to(device)
            total += float(next_token_loss(model, batch, reduction="sum"))
            tokens += batch.shape[0] * (batch.shape[1] - 1)
        if not tokens:
            return {"samples": 0.0}
        loss = total / tokens
        return {"samples": float(count), "tokens": float(tokens), "loss": loss, "ppl": math.exp(loss)}
