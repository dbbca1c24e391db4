"""The reference task: message passing, the factor L, the sketched loss, PCG and its baselines."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from progressive.data.format import Sample
from progressive.data.generate import make_sample
from progressive.data.loader import collate_block_diag
from progressive.tasks.pcg import ic0, jacobi, lower_factor_apply, pcg
from progressive.tasks.precond import (
    LowerFactor,
    PrecondGNN,
    PreconditionerTask,
    lower_factor,
    make_graph,
    sketched_loss,
    sym_spmm,
)
from tests.test_trainer_support import one_thread  # noqa: F401  (autouse fixture)


def poisson_2d(m: int) -> sp.csr_matrix:
    """The 5-point Laplacian on an m x m grid (n = m^2): a small SPD test matrix."""
    t = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(m, m))
    eye = sp.identity(m)
    return sp.csr_matrix(sp.kron(t, eye) + sp.kron(eye, t), dtype=np.float64)


def sample_of(A: sp.spmatrix, seed: int = 0) -> Sample:
    A = sp.csr_matrix(A)
    A.sort_indices()
    rhs = np.random.default_rng(seed).standard_normal((1, A.shape[0])).astype(np.float32)
    return Sample(A.shape[0], A.indptr.astype(np.int64), A.indices.astype(np.int64), A.data.astype(np.float32), rhs)


def poisson_samples(n: int, count: int, family: str = "poisson") -> list[Sample]:
    return [make_sample(family, n, seed=0, j=j)[1] for j in range(count)]


def scipy_of(s: Sample) -> sp.csr_matrix:
    return sp.csr_matrix((s.data.astype(np.float64), s.indices, s.indptr), shape=(s.n, s.n))


def test_sym_spmm_gradient_equals_dense_autograd() -> None:
    g = make_graph(collate_block_diag(poisson_samples(16, 2)))
    x = torch.randn(g.n, 5, requires_grad=True)
    w = torch.randn(g.n, 5)
    (sym_spmm(g.a_off, x) * w).sum().backward()
    dense = g.a_off.to_dense()
    x2 = x.detach().clone().requires_grad_(True)
    ((dense @ x2) * w).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert torch.allclose(dense, dense.T)  # the reuse of A in the backward relies on this


def test_factor_is_lower_triangular_on_a_pattern_with_positive_diagonal() -> None:
    samples = poisson_samples(16, 2) + poisson_samples(25, 1, "graph")
    batch = collate_block_diag(samples)
    torch.manual_seed(0)
    f, g = lower_factor(PrecondGNN(hidden=8, layers=2), batch)
    row, col = f.row.numpy(), f.col.numpy()
    assert (row >= col).all() and f.n == sum(s.n for s in samples)
    A = sp.block_diag([scipy_of(s) for s in samples], format="csr")
    low = sp.tril(A).tocoo()
    assert set(zip(row.tolist(), col.tolist())) == set(zip(low.row.tolist(), low.col.tolist()))
    assert (f.val[row == col] > 0).all()


def test_sketched_loss_is_zero_for_the_exact_factor_and_per_matrix_averaged() -> None:
    # A tridiagonal SPD matrix has an exact Cholesky factor on its own lower pattern.
    m = 12
    tri = sp.diags([-1.0, 2.5, -1.0], [-1, 0, 1], shape=(m, m), format="csr")
    g = make_graph(collate_block_diag([sample_of(tri)]))
    scaled = g.a_scaled.to_dense().double().numpy()
    chol = sp.tril(np.linalg.cholesky(scaled)).tocoo()  # same lower pattern as tri
    order = np.lexsort((chol.col, chol.row))
    exact = LowerFactor(torch.from_numpy(chol.row[order]).long(), torch.from_numpy(chol.col[order]).long(),
                        torch.from_numpy(chol.data[order]).float(), m)
    z = torch.randn(m, 4, generator=torch.Generator().manual_seed(0))
    assert float(sketched_loss(exact, g, z)) < 1e-5
    eye = LowerFactor(torch.arange(m), torch.arange(m), torch.ones(m), m)  # L = I: Jacobi
    az = g.a_scaled @ z
    assert float(sketched_loss(eye, g, z)) == pytest.approx(float((z - az).norm() / az.norm()), rel=1e-5)

    # Per-matrix losses averaged: a batch of two equals the mean of each alone (same z rows).
    samples = poisson_samples(16, 1) + poisson_samples(36, 1, "aniso")
    torch.manual_seed(0)
    model = PrecondGNN(hidden=8, layers=2)
    z = torch.randn(52, 3, generator=torch.Generator().manual_seed(1))
    f, g = lower_factor(model, collate_block_diag(samples))
    both = sketched_loss(f, g, z).item()
    alone = [sketched_loss(*lower_factor(model, collate_block_diag([s])), zz).item()
             for s, zz in zip(samples, (z[:16], z[16:]))]
    assert both == pytest.approx(np.mean(alone), rel=1e-5)


def test_training_lowers_the_loss_and_beats_jacobi() -> None:
    train = poisson_samples(36, 8)
    held_out = [make_sample("poisson", 36, seed=1, j=j)[1] for j in range(4)]
    task = PreconditionerTask(hidden=16, layers=2, sketch=4)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    before = task.evaluate(model, held_out, device=torch.device("cpu"), max_samples=4)
    losses = []
    for step in range(120):
        batch = collate_block_diag(train[(step % 2) * 4:(step % 2) * 4 + 4])
        loss = task.loss(model, batch, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = task.evaluate(model, held_out, device=torch.device("cpu"), max_samples=4)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert after["loss"] < before["loss"]
    assert after["learned_converged"] == 1.0 and after["learned_iters"] < after["jacobi_iters"] < after["cg_iters"]


def test_pcg_plain_and_exact_factor() -> None:
    A = poisson_2d(10)
    b = np.random.default_rng(0).standard_normal(100)
    r = pcg(A, b, rtol=1e-6)
    assert r.converged and np.linalg.norm(b - A @ r.x) <= 1e-5 * np.linalg.norm(b)
    exact = pcg(A, b, lower_factor_apply(sp.csr_matrix(np.linalg.cholesky(A.toarray()))), rtol=1e-6)
    assert exact.iterations == 1
    stuck = pcg(A, b, rtol=1e-12, maxiter=3)
    assert not stuck.converged and stuck.iterations == 3


def test_jacobi_iterations_match_scipy_cg() -> None:
    for j in range(3):
        s = make_sample("poisson", 64, seed=0, j=j)[1]
        A, b = scipy_of(s), s.rhs[0].astype(np.float64)
        ours = pcg(A, b, jacobi(A), rtol=1e-6)
        count = []
        x, info = spla.cg(A, b, rtol=1e-6, atol=0.0, M=sp.diags(1.0 / A.diagonal()), maxiter=1000,
                          callback=lambda xk: count.append(1))
        assert info == 0 and ours.converged
        assert abs(ours.iterations - len(count)) <= 1, (ours.iterations, len(count))
        assert ours.iterations < pcg(A, b, rtol=1e-6).iterations  # Jacobi helps on variable coefficients


def test_ic0_is_exact_without_fill_and_matches_a_on_its_pattern() -> None:
    tri = sp.diags([-1.0, 3.0, -1.0], [-1, 0, 1], shape=(8, 8), format="csr")
    L = ic0(tri)
    assert L is not None and np.allclose(L.toarray(), np.linalg.cholesky(tri.toarray()))
    A = poisson_2d(6)
    L = ic0(A)
    assert L is not None
    prod = (L @ L.T).toarray()
    mask = A.toarray() != 0
    assert np.allclose(prod[mask], A.toarray()[mask])  # IC(0): exact on the pattern, fill dropped
    b = np.random.default_rng(0).standard_normal(36)
    assert pcg(A, b, lower_factor_apply(L)).iterations < pcg(A, b, jacobi(A)).iterations
    assert ic0(sp.csr_matrix(np.array([[1.0, 2.0], [2.0, 1.0]]))) is None  # not SPD: breakdown reported
