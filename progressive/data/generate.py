"""Synthetic sparse SPD matrices, reproducible from a seed, written as a bucketed dataset.

Families:

- ``poisson``: -div(a grad u) on an nx-by-ny grid with exactly n = nx*ny unknowns (the factorisation
  of n closest to square), 5-point finite volumes, Dirichlet boundary. The coefficient a is a
  log-normal random field, fresh per sample (contrast up to ~e^8), smoothed over a random 0-3 cells,
  so the condition number grows like h^-2 times the contrast: harder as n grows.
- ``aniso``: the same grid with anisotropy: edges along one axis (random per sample) are weighted by
  eps, log-uniform in [1e-3, 1], times a mild random field.
- ``graph``: the Laplacian of a random geometric k-nearest-neighbour graph (points uniform in the
  unit square, k in 4..8, log-normal edge weights) plus a diagonal shift delta * mean degree, delta
  log-uniform in [1e-4, 1e-1]: SPD, and ill-conditioned when delta is small.
- ``mix``: each sample draws one of the three.

Sample j of size n depends only on (seed, family, n, j): the same seed gives the same matrices
whatever the number of workers, and adding sizes or samples does not change existing ones.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from progressive.signals import INTERRUPT_SIGNALS, ignore_job_signals
from progressive.data.format import DEFAULT_COMPRESSION, SPLITS, Sample, matrix_hash, sample_problem
from progressive.data.ops import DatasetWriter, assign_splits, check_split
from progressive.errors import DataError

if TYPE_CHECKING:
    import numpy as np

FAMILIES = ("poisson", "aniso", "graph", "mix")
DEFAULT_SIZES = (512, 1024, 1536, 2048, 3072, 4096)
DEFAULT_COUNTS = (1200, 900, 480, 144, 88, 30)
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
# Part of every sample's seed, so two families with one seed differ. Never renumber.
_FAMILY_CODE = {"poisson": 1, "aniso": 2, "graph": 3, "mix": 4}

Chunk = list[tuple[int, str, Sample, str]]  # (j, family drawn, sample with int32 index arrays, hash)


def grid_shape(n: int) -> tuple[int, int]:
    """The factorisation n = nx * ny (nx <= ny) closest to square."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    nx = math.isqrt(n)
    while n % nx:
        nx -= 1
    return nx, n // nx


def _smooth_field(rng: "np.random.Generator", shape: tuple[int, int], passes: int) -> "np.ndarray":
    """A standardised Gaussian field, smoothed by `passes` rounds of 5-point averaging."""
    import numpy as np

    z = rng.standard_normal(shape)
    for _ in range(passes):
        p = np.pad(z, 1, mode="edge")
        z = (p[1:-1, 1:-1] + p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]) / 5
    std = z.std()
    return (z - z.mean()) / std if std > 0 else z


def _grid_operator(a: "np.ndarray", ex: float, ey: float) -> tuple["np.ndarray", ...]:
    """CSR of -div(a grad u) on the grid of `a` (node coefficients), edge weights scaled by ex / ey."""
    import numpy as np

    nx, ny = a.shape
    idx = np.arange(nx * ny).reshape(nx, ny)
    harm = lambda p, q: 2 * p * q / (p + q)  # noqa: E731  (the flux-conserving edge coefficient)
    wx = ex * harm(a[:-1, :], a[1:, :])
    wy = ey * harm(a[:, :-1], a[:, 1:])
    # Dirichlet boundary: a ghost node at distance h outside each missing neighbour.
    diag = a * (ex * ((np.arange(nx) == 0) + (np.arange(nx) == nx - 1))[:, None]
                + ey * ((np.arange(ny) == 0) + (np.arange(ny) == ny - 1))[None, :])
    diag = diag.astype(np.float64)
    diag[:-1, :] += wx  # each edge adds its weight to both ends' diagonal
    diag[1:, :] += wx
    diag[:, :-1] += wy
    diag[:, 1:] += wy
    p = np.concatenate([idx[:-1, :].ravel(), idx[:, :-1].ravel()])
    q = np.concatenate([idx[1:, :].ravel(), idx[:, 1:].ravel()])
    w = np.concatenate([wx.ravel(), wy.ravel()])
    return _csr(nx * ny, p, q, w, diag.ravel())


def _csr(n: int, p: "np.ndarray", q: "np.ndarray", w: "np.ndarray", diag: "np.ndarray") -> tuple["np.ndarray", ...]:
    """Canonical float32 CSR of diag(diag) - sum_e w_e (e_p e_q^T + e_q e_p^T); exactly symmetric."""
    import numpy as np
    import scipy.sparse as sparse

    rows = np.concatenate([p, q, np.arange(n)])
    cols = np.concatenate([q, p, np.arange(n)])
    # Cast before assembly: both triangles then hold bit-identical float32 values.
    vals = np.concatenate([-w, -w, diag]).astype(np.float32)
    a = sparse.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    a.sum_duplicates()
    a.sort_indices()
    return a.indptr.astype(np.int64), a.indices.astype(np.int64), a.data.astype(np.float32)


def poisson(n: int, rng: "np.random.Generator") -> tuple["np.ndarray", ...]:
    """Variable-coefficient 2D Poisson, 5-point, n unknowns: (indptr, indices, data)."""
    import numpy as np

    shape = grid_shape(n)
    sigma = rng.uniform(0.5, 2.0)
    a = np.exp(sigma * _smooth_field(rng, shape, int(rng.integers(0, 4))))
    return _grid_operator(a, 1.0, 1.0)


def aniso(n: int, rng: "np.random.Generator") -> tuple["np.ndarray", ...]:
    """Anisotropic 2D diffusion, 5-point, n unknowns: (indptr, indices, data)."""
    import numpy as np

    shape = grid_shape(n)
    eps = 10 ** rng.uniform(-3, 0)
    a = np.exp(rng.uniform(0, 0.5) * _smooth_field(rng, shape, int(rng.integers(0, 4))))
    ex, ey = (eps, 1.0) if rng.random() < 0.5 else (1.0, eps)
    return _grid_operator(a, ex, ey)


def graph(n: int, rng: "np.random.Generator") -> tuple["np.ndarray", ...]:
    """Shifted Laplacian of a random geometric kNN graph with n nodes: (indptr, indices, data)."""
    import numpy as np
    from scipy.spatial import cKDTree

    k = min(int(rng.integers(4, 9)), n - 1)
    pts = rng.random((n, 2))
    _, nbr = cKDTree(pts).query(pts, k=k + 1)
    src = np.repeat(np.arange(n), k)
    dst = nbr[:, 1:].ravel()
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    pairs = np.unique(lo * n + hi)  # each undirected edge once
    p, q = pairs // n, pairs % n
    w = rng.lognormal(0.0, 0.5, size=len(p))
    deg = np.bincount(p, w, minlength=n) + np.bincount(q, w, minlength=n)
    shift = 10 ** rng.uniform(-4, -1) * deg.mean()
    return _csr(n, p, q, w, deg + shift)


_BUILDERS: dict[str, Callable[[int, "np.random.Generator"], tuple["np.ndarray", ...]]] = {
    "poisson": poisson, "aniso": aniso, "graph": graph}


def make_sample(family: str, n: int, seed: int, j: int, rhs: int = 1) -> tuple[str, Sample]:
    """Sample `j` of size `n`: (the family drawn, the sample). Depends only on the arguments."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed, _FAMILY_CODE[family], n, j]))
    drawn = ("poisson", "aniso", "graph")[int(rng.integers(0, 3))] if family == "mix" else family
    indptr, indices, data = _BUILDERS[drawn](n, rng)
    b = rng.standard_normal((rhs, n)).astype(np.float32)
    return drawn, Sample(n, indptr, indices, data, b)


def _make_chunk(task: tuple[str, int, int, int, int, int]) -> Chunk:
    """Worker: samples j0..j1-1 of one size, each checked and hashed (the writer need not redo it)."""
    import numpy as np

    family, n, seed, j0, j1, rhs = task
    out: Chunk = []
    for j in range(j0, j1):
        drawn, s = make_sample(family, n, seed, j, rhs)
        problem = sample_problem(s)
        if problem:  # a generator bug, not a user error; still say exactly which sample
            raise DataError(f"generated sample is invalid: {problem}", loc=f"{drawn} n={n} seed={seed} j={j}")
        digest = matrix_hash(n, s.indptr, s.indices, s.data)
        # int32 index arrays: half the bytes to pickle back to the parent, and what the file stores.
        out.append((j, drawn, s._replace(indptr=s.indptr.astype(np.int32), indices=s.indices.astype(np.int32)), digest))
    return out


def _worker_init() -> None:
    """Pool worker start-up: ignore job signals, and exit if the parent goes away.

    Ctrl-C, scancel's SIGTERM and SIGHUP reach the whole process group; the parent alone reacts
    (deletes its temp file, cancels the pool) and the workers end after their current task. A
    worker killed mid-task could die halfway through sending a result, which hangs the executor,
    hence the ignoring. (A signal that arrives while the workers start, before this runs, can
    still kill one: the pool then reports itself broken, and the command ends all the same, with
    Python 3.11 possibly printing a stray thread traceback, CPython gh-107219.) Should the parent
    die without cleaning up, the forkserver (our parent) exits with it, and the watchdog notices.
    """
    ignore_job_signals(INTERRUPT_SIGNALS)
    parent = os.getppid()

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()


def _tasks(family: str, sizes: Sequence[int], counts: Sequence[int], seed: int, rhs: int) -> Iterator[tuple[str, int, int, int, int, int]]:
    for n, count in zip(sizes, counts):
        per = max(1, 16384 // n)  # ~16k unknowns per task: tasks of ~10-50 ms, pickling negligible
        for j0 in range(0, count, per):
            yield (family, n, seed, j0, min(count, j0 + per), rhs)


def generate(path: str | Path, *, sizes: Sequence[int] = DEFAULT_SIZES, counts: Sequence[int] = DEFAULT_COUNTS,
             family: str = "poisson", seed: int = 0, split: Sequence[float] = DEFAULT_SPLIT, rhs: int = 1,
             workers: int = 2, overwrite: bool = False, compression: str = DEFAULT_COMPRESSION,
             progress: Callable[[int, int], None] | None = None) -> dict[int, dict[str, int]]:
    """Generate a dataset file; returns {n: {split: count}}.

    Args:
        path: the output file; written to a temp file in the same folder and renamed at the end.
        sizes, counts: matrix sizes (the buckets) and samples per size.
        family: one of FAMILIES.
        seed: everything random derives from it (matrices, right-hand sides, splits).
        split: train/val/test fractions.
        rhs: right-hand sides per sample.
        workers: processes building matrices (1: in this process).
        progress: called as progress(done, total) after each batch of samples; it may raise (the CLI
            raises KeyboardInterrupt there after a signal) to stop: then nothing is written.
    """
    from progressive import __version__

    if family not in FAMILIES:
        raise DataError(f"unknown family {family!r}", loc="--family", hint=f"use one of {', '.join(FAMILIES)}")
    if len(sizes) != len(counts):
        raise DataError(f"{len(sizes)} sizes but {len(counts)} counts", loc="--counts",
                        hint="give one count per size (or a single count for all)")
    if not sizes or any(n < 2 for n in sizes) or len(set(sizes)) != len(sizes):
        raise DataError(f"sizes must be distinct integers >= 2, got {list(sizes)}", loc="--sizes", hint="e.g. --sizes 512,1024")
    if any(c < 0 for c in counts):
        raise DataError(f"counts must be >= 0, got {list(counts)}", loc="--counts")
    if seed < 0 or rhs < 1 or workers < 1:
        raise DataError("seed must be >= 0, rhs and workers >= 1", loc="--seed/--rhs/--workers")
    fractions = check_split(split)
    total = sum(counts)
    labels = {n: assign_splits(c, fractions, seed, n) for n, c in zip(sizes, counts)}
    attrs = {
        "generator": f"progressive {__version__} (progressive.data.generate)",
        "family": family,
        "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rhs_per_sample": rhs,
        "history": [{"op": "generate", "family": family, "seed": seed, "sizes": list(sizes), "counts": list(counts),
                     "split": list(fractions), "rhs": rhs}],
    }
    tasks = list(_tasks(family, sizes, counts, seed, rhs))
    pool: ProcessPoolExecutor | None = None
    try:
        if workers > 1 and len(tasks) > 1:
            pool = _pool(workers)
            chunks: Iterator[Chunk] = pool.map(_make_chunk, tasks)
        else:
            chunks = map(_make_chunk, tasks)
        with DatasetWriter(path, attrs=attrs, overwrite=overwrite, compression=compression, verify=False) as w:
            done = 0
            for chunk in chunks:
                for j, _, s, digest in chunk:
                    w.add(s.n, SPLITS[labels[s.n][j]], s.indptr, s.indices, s.data, s.rhs, digest=digest)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return {n: dict(c) for n, c in w.counts.items()}
    except BrokenProcessPool:
        raise DataError("a worker process died (killed by a signal, or out of memory); nothing was written",
                        loc=str(path), hint="run it again, with --workers 1 if memory is short") from None
    finally:
        if pool is not None:
            # Interrupted: drop the queued tasks; the workers end after their current one (~50 ms;
            # they ignore the signal) or are gone already (a broken pool ends at once). Waiting here
            # rather than in Python's exit hook avoids its teardown races (stray thread tracebacks).
            pool.shutdown(wait=True, cancel_futures=True)


def _pool(workers: int) -> ProcessPoolExecutor:
    # forkserver, not fork: the parent runs threads (the progress bar), and forking a threaded
    # process can deadlock. The server preloads what workers need instead of the default
    # `__main__`, which in a script or notebook may import torch (2.5 s measured) for nothing.
    # ProcessPoolExecutor, not multiprocessing.Pool: when a worker dies, Pool silently replaces it
    # and can wait forever for the lost task; the executor reports a broken pool instead.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["progressive.data.generate", "numpy", "scipy.sparse", "scipy.spatial"])
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
