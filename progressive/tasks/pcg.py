"""Preconditioned conjugate gradients and the baseline preconditioners the reference task is judged against.

Everything is float64 numpy/scipy on CPU: evaluation measures the preconditioner, not
the training device. One PCG implementation serves every preconditioner, so iteration
counts differ only by the preconditioner (plain CG is PCG with the identity).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

Apply = Callable[[np.ndarray], np.ndarray]

__all__ = ["SolveResult", "pcg", "jacobi", "ic0", "lower_factor_apply"]


@dataclass(frozen=True)
class SolveResult:
    """One PCG solve: iterations to the tolerance (or maxiter), whether it got there, and its cost."""

    iterations: int
    converged: bool
    relres: float  # final ||r|| / ||b|| (recurrence residual)
    seconds: float  # wall time of the iterations (preconditioner setup excluded)
    x: np.ndarray | None = None  # the approximate solution


def pcg(A: sp.spmatrix | sp.sparray, b: np.ndarray, apply_m: Apply | None = None, *, rtol: float = 1e-6,
        maxiter: int | None = None) -> SolveResult:
    """Solve A x = b (A SPD) by PCG from x0 = 0 until ||r_k|| <= rtol * ||b||.

    Args:
        A: sparse SPD matrix.
        b: right-hand side.
        apply_m: r -> M^{-1} r for an SPD preconditioner M; None is plain CG.
        rtol: relative residual target.
        maxiter: iteration cap (default 2 n + 100: CG needs at most n in exact arithmetic).
    """
    n = b.shape[0]
    maxiter = 2 * n + 100 if maxiter is None else maxiter
    start = time.perf_counter()
    b = np.asarray(b, dtype=np.float64)
    bnorm = float(np.linalg.norm(b))
    if bnorm == 0.0:
        return SolveResult(0, True, 0.0, 0.0, np.zeros_like(b))
    x = np.zeros_like(b)
    r = b.copy()
    z = apply_m(r) if apply_m else r
    p = z.copy()
    rz = float(r @ z)
    relres = 1.0
    for k in range(1, maxiter + 1):
        ap = A @ p
        alpha = rz / float(p @ ap)
        x += alpha * p
        r -= alpha * ap
        relres = float(np.linalg.norm(r)) / bnorm
        if relres <= rtol:
            return SolveResult(k, True, relres, time.perf_counter() - start, x)
        z = apply_m(r) if apply_m else r
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return SolveResult(maxiter, False, relres, time.perf_counter() - start, x)


def jacobi(A: sp.spmatrix | sp.sparray) -> Apply:
    """M = diag(A)."""
    inv = 1.0 / A.diagonal()
    return lambda r: inv * r


def lower_factor_apply(L: sp.spmatrix | sp.sparray) -> Apply:
    """r -> (L L^T)^{-1} r for a sparse lower-triangular L with nonzero diagonal: two triangular solves.

    SuperLU with natural ordering and no pivoting factors a triangular matrix without
    fill, so each application is two compiled sweeps (spsolve_triangular re-copies and
    rescales L on every call, which dominated the solve time in a measurement).
    """
    lu = spla.splu(sp.csc_matrix(L), permc_spec="NATURAL", diag_pivot_thresh=0.0,
                   options={"SymmetricMode": False})
    return lambda r: lu.solve(lu.solve(r), trans="T")


def ic0(A: sp.spmatrix | sp.sparray) -> sp.csr_matrix | None:
    """Incomplete Cholesky with zero fill: lower L on A's lower pattern, or None on breakdown.

    A row-by-row up-looking factorisation in plain Python over each row's pattern: fine
    for evaluation sizes (thousands of rows), not for production.
    """
    low = sp.tril(sp.csr_matrix(A, dtype=np.float64)).tocsr()
    low.sort_indices()
    n = low.shape[0]
    indptr, indices, data = low.indptr, low.indices, low.data.copy()
    # Per row: column -> position in data, for pattern look-ups.
    pos = [dict(zip(indices[indptr[i]:indptr[i + 1]].tolist(), range(indptr[i], indptr[i + 1]))) for i in range(n)]
    for i in range(n):
        row_cols = indices[indptr[i]:indptr[i + 1]]
        for k_pos in range(indptr[i], indptr[i + 1]):
            j = int(indices[k_pos])
            # L_ij = (A_ij - sum_{k<j} L_ik L_jk) / L_jj, over the shared pattern only (zero fill).
            s = data[k_pos]
            pj = pos[j]
            for m_pos in range(indptr[i], k_pos):
                q = pj.get(int(indices[m_pos]))
                if q is not None:
                    s -= data[m_pos] * data[q]
            if j == i:
                if s <= 0.0:
                    return None
                data[k_pos] = np.sqrt(s)
            else:
                data[k_pos] = s / data[indptr[j + 1] - 1]  # diagonal is the last entry of row j
        if row_cols.size == 0 or row_cols[-1] != i:
            return None  # no diagonal entry in row i
    return sp.csr_matrix((data, indices.copy(), indptr.copy()), shape=low.shape)
