"""Synthetic token sequences with learnable structure, reproducible from a seed (no download).

Each sequence starts with a *topic* token t (one of `topics`, drawn uniformly); every later
token follows a first-order Markov chain whose transition table belongs to topic t. Each row
of a table puts most of its mass on `branching` successors. So a model that only counts
bigrams is beaten by one that also remembers the first token, however far back it is: a
language model has something to learn at every length, and what it learns at 64 tokens
still holds at 256 (the tables are shared by every bucket).

The tables depend only on the seed; the samples of bucket L on (seed, L). The entropy of
the next token given the topic and the previous token (the best achievable loss, ignoring
the unpredictable topic token) is stored with the data as `entropy_floor`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from progressive.errors import DataError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["transition_tables", "sample_sequences", "entropy_floor", "generate_sequences"]


def transition_tables(seed: int, vocab: int, topics: int, branching: int = 3) -> "np.ndarray":
    """(topics, vocab, vocab) row-stochastic tables; row [t, a] peaks on `branching` successors of a."""
    import numpy as np

    rng = np.random.default_rng([seed, 0x5E9])
    tables = np.full((topics, vocab, vocab), 0.02 / vocab)
    for t in range(topics):
        for a in range(vocab):
            succ = rng.choice(vocab, size=branching, replace=False)
            tables[t, a, succ] += 0.98 * rng.dirichlet(np.full(branching, 2.0))
    return tables / tables.sum(axis=2, keepdims=True)


def sample_sequences(tables: "np.ndarray", count: int, length: int, rng: "np.random.Generator") -> "np.ndarray":
    """`count` sequences of `length` tokens (int16): a topic token, then the topic's Markov chain."""
    import numpy as np

    topics, vocab, _ = tables.shape
    out = np.empty((count, length), dtype=np.int16)
    topic = rng.integers(0, topics, size=count)
    out[:, 0] = topic
    cdf = np.cumsum(tables, axis=2)
    prev = topic.copy()  # the topic token also serves as the chain's first state
    for i in range(1, length):
        u = rng.random(count)[:, None]
        nxt = (cdf[topic, prev] < u).sum(axis=1)
        prev = np.minimum(nxt, vocab - 1)
        out[:, i] = prev
    return out


def entropy_floor(tables: "np.ndarray") -> float:
    """Mean next-token entropy (nats) under each topic's stationary distribution: the loss a perfect model reaches."""
    import numpy as np

    total = 0.0
    for table in tables:
        w, v = np.linalg.eig(table.T)
        pi = np.real(v[:, np.argmin(np.abs(w - 1.0))])
        pi = pi / pi.sum()
        h = -(table * np.log(table)).sum(axis=1)
        total += float(pi @ h)
    return total / len(tables)


def generate_sequences(out: str | Path, *, lengths: Sequence[int], counts: Sequence[int], seed: int = 0,
                       vocab: int = 16, topics: int = 4, split: Sequence[float] = (0.8, 0.1, 0.1),
                       force: bool = False) -> dict[int, dict[str, int]]:
    """Write a token dataset in the dense-array layout: bucket L holds `counts[i]` sequences of L tokens.

    Raises DataError on bad arguments (nothing written).
    """
    import numpy as np

    from progressive.data.arrays import write_arrays

    if len(counts) == 1:
        counts = list(counts) * len(lengths)
    if len(counts) != len(lengths):
        raise DataError(f"{len(lengths)} lengths but {len(counts)} counts", loc="--counts",
                        hint="give one count, or one per length")
    if any(n < 2 for n in lengths) or any(c < 1 for c in counts):
        raise DataError("lengths must be >= 2 and counts >= 1", loc="--lengths/--counts")
    if not 2 <= topics <= vocab <= 32767:
        raise DataError(f"need 2 <= topics ({topics}) <= vocab ({vocab}) <= 32767", loc="--vocab/--topics")
    if len(split) != 3 or any(f < 0 for f in split) or sum(split) <= 0:
        raise DataError(f"split {list(split)} is not three non-negative fractions", loc="--split",
                        hint="e.g. --split 0.8,0.1,0.1")
    tables = transition_tables(seed, vocab, topics)
    fractions = np.asarray(split, dtype=float) / sum(split)
    arrays: dict[int, dict[str, Any]] = {}
    for length, count in zip(lengths, counts):
        seqs = sample_sequences(tables, count, length, np.random.default_rng([seed, length]))
        n_val = int(round(count * fractions[1]))
        n_test = int(round(count * fractions[2]))
        n_train = count - n_val - n_test
        arrays[length] = {"train": seqs[:n_train], "val": seqs[n_train:n_train + n_val],
                          "test": seqs[n_train + n_val:]}
    source = {"generator": "progressive.data.seqgen", "seed": seed, "vocab": vocab, "topics": topics,
              "entropy_floor": round(entropy_floor(tables), 6)}
    return write_arrays(out, arrays, force=force, source=source)
