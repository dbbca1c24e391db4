"""The reference task: a GNN that learns an incomplete-Cholesky-like preconditioner.

The model reads a batch of SPD matrices as one block-diagonal graph (rows are nodes,
nonzeros are edges carrying their values) and writes a lower-triangular L with A's
lower sparsity pattern and a positive diagonal, so P = L L^T is SPD by construction
(the NeuralIF recipe, TMLR 2024). It is trained self-supervised with the sketched loss
||(L L^T - A) z|| / ||A z|| for random z: mat-vecs only, never a dense matrix.

Scale: the model works on the Jacobi-scaled matrix Ã = D^{-1/2} A D^{-1/2} (unit
diagonal), which makes every input scale-free and makes L = I exactly Jacobi. The
diagonal head is initialised so that the untrained model is (almost) Jacobi-PCG, and
training can only have to improve on it. The preconditioner of A is then
P = D^{1/2} L L^T D^{1/2}.

The weights do not depend on n, so a model trained at n=512 initialises n=1024.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from progressive.task import Task
from progressive.tasks.pcg import ic0, jacobi, lower_factor_apply, pcg

__all__ = ["PreconditionerTask", "PrecondGNN", "Graph", "make_graph", "sym_spmm", "sketched_loss", "lower_factor"]


# --------------------------------------------------------------------------- message passing


class _SymSpMM(torch.autograd.Function):
    """Y = A @ X for a constant symmetric sparse A: the backward is A @ dY, reusing A.

    torch's own backward of a sparse-CSR matmul builds A^T (a transpose and a re-sort
    every step); with A symmetric the transpose is A itself.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.a = a  # a sparse constant, not a differentiable input: kept by reference
        with fp32(x):
            return a @ x.float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
        # Under autocast the incoming gradient may be bf16/fp16 (from the half-precision layer that
        # consumed Y); the sparse kernels have fp32 only, so the product is taken in fp32.
        with fp32(grad):
            return None, ctx.a @ grad.float()


def fp32(t: torch.Tensor) -> Any:
    """Autocast off on `t`'s device: sparse CSR kernels exist for fp32 only (addmm_out_sparse_csr has
    no bf16/fp16 on CPU, cuSPARSE's products lose their accuracy in half), so sparse work leaves autocast."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def sym_spmm(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A @ X for a sparse CSR symmetric A (no gradient to A), in float32 even under autocast."""
    return _SymSpMM.apply(a, x)


# --------------------------------------------------------------------------- the graph of a batch


class Graph(NamedTuple):
    """A block-diagonal batch, Jacobi-scaled, with the index tensors the model and loss need."""

    n: int  # total rows of the batch
    a_off: torch.Tensor  # sparse CSR (n, n): Ã with a zero diagonal (values kept in the pattern)
    a_scaled: torch.Tensor  # sparse CSR (n, n): Ã = D^-1/2 A D^-1/2
    row: torch.Tensor  # (nnz,) row of each nonzero
    col: torch.Tensor  # (nnz,) column of each nonzero
    vals: torch.Tensor  # (nnz,) Ã values
    low: torch.Tensor  # (nnz_low,) positions of the strictly lower nonzeros, in CSR order
    diag: torch.Tensor  # (n,) position of each row's diagonal nonzero
    node_graph: torch.Tensor  # (n,) which matrix of the batch each row belongs to
    num_graphs: int
    scale: torch.Tensor  # (n,) D^-1/2


def _csr(indptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    n = indptr.numel() - 1
    with warnings.catch_warnings():
        # torch warns that sparse CSR is "beta"; the CSR x dense product used here is its stable core.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(indptr, col, values, (n, n), check_invariants=False)


def make_graph(batch: Any) -> Graph:
    """Jacobi-scale a block-diagonal batch (`progressive.data.loader.Batch` fields) into a Graph."""
    indptr, col, values = batch.indptr, batch.indices, batch.values.float()
    n = int(indptr.numel() - 1)
    row = batch.row if getattr(batch, "row", None) is not None else torch.repeat_interleave(
        torch.arange(n, device=indptr.device), indptr.diff())
    is_diag = row == col
    diag = torch.nonzero(is_diag).squeeze(1)
    if diag.numel() != n:
        raise ValueError(f"every row needs a stored diagonal entry: {diag.numel()} of {n} rows have one")
    d = values.index_select(0, diag)
    scale = d.clamp_min(torch.finfo(d.dtype).tiny).rsqrt()
    vals = values * scale.index_select(0, row) * scale.index_select(0, col)
    off = vals.masked_fill(is_diag, 0.0)
    low = torch.nonzero(row > col).squeeze(1)
    sizes = batch.offsets.diff()
    node_graph = torch.repeat_interleave(torch.arange(sizes.numel(), device=indptr.device), sizes)
    return Graph(n, _csr(indptr, col, off), _csr(indptr, col, vals), row, col, vals, low, diag, node_graph, int(sizes.numel()), scale)


# --------------------------------------------------------------------------- the model


class LowerFactor(NamedTuple):
    """L on A's lower pattern: `row`, `col`, `val` of its nonzeros (diagonal included), L for Ã."""

    row: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    n: int


class PrecondGNN(nn.Module):
    """Node message passing over Ã, then an edge head for L's off-diagonal and a node head for its diagonal.

    Each layer: h <- h + relu(W_self h + W_nb (Ã_off h)), with Ã_off @ h a sparse CSR matmul.
    Edge (i, j), i > j: L_ij = w . relu(U h_i + V h_j + u ã_ij + c). Diagonal: L_ii = softplus(w_d . h_i + b),
    b = log(e - 1) so that the untrained L starts near I (Jacobi).

    Args:
        hidden: width of node states.
        layers: message-passing rounds (the receptive field of L's entries).
        message_passing: False replaces Ã_off @ h by h (the benchmark's no-message-passing control).
    """

    IN_FEATURES = 4

    def __init__(self, hidden: int = 32, layers: int = 3, message_passing: bool = True) -> None:
        super().__init__()
        self.message_passing = message_passing
        self.encode = nn.Linear(self.IN_FEATURES, hidden)
        self.self_lin = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.nb_lin = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(layers))
        self.edge_src = nn.Linear(hidden, hidden)
        self.edge_dst = nn.Linear(hidden, hidden, bias=False)
        self.edge_val = nn.Parameter(torch.zeros(hidden))
        self.edge_out = nn.Linear(hidden, 1, bias=False)
        self.diag_out = nn.Linear(hidden, 1)
        with torch.no_grad():  # start close to L = I (Jacobi-PCG), which training then improves on
            self.edge_out.weight.mul_(0.1)
            self.diag_out.weight.mul_(0.1)
            self.diag_out.bias.fill_(math.log(math.e - 1.0))
            self.edge_val.normal_(0.0, 1.0)

    def node_features(self, g: Graph) -> torch.Tensor:
        """Scale-free row features: 1, sum |ã_ij|, sum ã_ij over j != i, log(1 + off-diagonal count)."""
        off = g.vals.masked_fill(g.row == g.col, 0.0)
        feats = torch.zeros(g.n, self.IN_FEATURES, device=off.device, dtype=off.dtype)
        feats[:, 0] = 1.0
        feats[:, 1].index_add_(0, g.row, off.abs())
        feats[:, 2].index_add_(0, g.row, off)
        feats[:, 3].index_add_(0, g.row, (off != 0).to(off.dtype))
        feats[:, 3] = torch.log1p(feats[:, 3])
        return feats

    def propagate(self, g: Graph, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The neighbour term of layer `layer`: W_nb (Ã_off @ h). Subclasses swap the message passing here."""
        return self.nb_lin[layer](sym_spmm(g.a_off, h) if self.message_passing else h)

    def forward(self, g: Graph) -> LowerFactor:  # type: ignore[override]
        """L for the batch graph `g`."""
        h = F.relu(self.encode(self.node_features(g)))
        for layer, lin_self in enumerate(self.self_lin):
            h = h + F.relu(lin_self(h) + self.propagate(g, h, layer))
        # index_select, not h[idx]: its backward is an index_add, not a slower scatter via advanced indexing.
        r, c = g.row.index_select(0, g.low), g.col.index_select(0, g.low)
        e = self.edge_src(h).index_select(0, r) + self.edge_dst(h).index_select(0, c)
        e = F.relu(e + g.vals.index_select(0, g.low).unsqueeze(1).to(e.dtype) * self.edge_val)
        off = self.edge_out(e).squeeze(1).float()
        dia = F.softplus(self.diag_out(h).squeeze(1).float())
        ar = torch.arange(g.n, device=h.device)
        return LowerFactor(torch.cat([r, ar]), torch.cat([c, ar]), torch.cat([off, dia]), g.n)


# --------------------------------------------------------------------------- loss


def lower_matvec(f: LowerFactor, x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """L @ x (or L^T @ x) for x of shape (n, k), differentiable in L's values and x."""
    src, dst = (f.row, f.col) if transpose else (f.col, f.row)
    contrib = f.val.unsqueeze(1) * x.index_select(0, src)
    return torch.zeros_like(x, dtype=contrib.dtype).index_add_(0, dst, contrib)


def sketched_loss(f: LowerFactor, g: Graph, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's matrices of ||(L L^T - Ã) Z||_F / ||Ã Z||_F, for sketch vectors Z (n, k).

    Always in fp32, autocast or not: the sparse product has no half kernels, and the residual is a
    difference of nearly equal terms that half precision would round away.
    """
    with fp32(z):
        z = z.float()
        f = LowerFactor(f.row, f.col, f.val.float(), f.n)
        az = g.a_scaled @ z
        resid = lower_matvec(f, lower_matvec(f, z, transpose=True)) - az
        return _relative_norm(resid, az, g)


def _relative_norm(resid: torch.Tensor, az: torch.Tensor, g: Graph) -> torch.Tensor:
    """Mean over the batch's matrices of ||resid|| / ||az||."""
    num = torch.zeros(g.num_graphs, device=az.device, dtype=resid.dtype).index_add_(0, g.node_graph, resid.square().sum(1))
    den = torch.zeros(g.num_graphs, device=az.device, dtype=az.dtype).index_add_(0, g.node_graph, az.square().sum(1))
    return (num / den.clamp_min(torch.finfo(den.dtype).tiny)).sqrt().mean()


def lower_factor(model: nn.Module, batch: Any) -> tuple[LowerFactor, Graph]:
    """Run the model on a batch; returns L (for Ã) and the scaled graph."""
    g = make_graph(batch)
    return model(g), g


# --------------------------------------------------------------------------- the task


class PreconditionerTask(Task):
    """Learn P = L L^T for SPD matrices; evaluate PCG iterations against CG, Jacobi and IC(0).

    Options (`[model.options]`):
        hidden: node state width (32: minutes per tiny CPU stage).
        layers: message-passing rounds.
        sketch: random vectors z per matrix in the loss.
        message_passing: False is the no-message-passing control.
        rtol: PCG relative-residual target in evaluation.
        ic0: also evaluate IC(0)-PCG (a Python factorisation; slow past ~10^5 nonzeros).
    """

    def __init__(self, hidden: int = 32, layers: int = 3, sketch: int = 8, message_passing: bool = True,
                 rtol: float = 1e-6, ic0: bool = True) -> None:
        if hidden < 1 or layers < 0 or sketch < 1 or not 0 < rtol < 1:
            raise ValueError("need hidden >= 1, layers >= 0, sketch >= 1 and 0 < rtol < 1")
        self.hidden, self.layers, self.sketch = hidden, layers, sketch
        self.message_passing, self.rtol, self.use_ic0 = message_passing, rtol, ic0

    def build_model(self) -> nn.Module:
        """A fresh PrecondGNN."""
        return PrecondGNN(self.hidden, self.layers, self.message_passing)

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """The sketched factorisation residual, z ~ N(0, I) drawn from `generator`."""
        f, g = lower_factor(model, batch)
        z = torch.randn(g.n, self.sketch, generator=generator, device=g.vals.device, dtype=torch.float32)
        return sketched_loss(f, g, z)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset[Any], *, device: torch.device,
                 max_samples: int) -> dict[str, float]:
        """PCG to `rtol` on up to `max_samples` matrices: mean iterations and seconds per preconditioner.

        Keys: `samples`, `loss`, and for each of `cg`, `jacobi`, `ic0`, `learned`: `<name>_iters`,
        `<name>_converged` (share), `<name>_solve_s`; `learned_setup_s` (the model's forward and
        factor set-up) and `ic0_setup_s`; `iters_vs_jacobi` (learned / Jacobi iterations, < 1 is better).
        """
        count = min(len(dataset), max_samples)  # type: ignore[arg-type]
        rows: list[dict[str, float]] = []
        gen = torch.Generator(device=device).manual_seed(0)  # a fixed sketch: comparable across stages
        for i in range(count):
            batch = self.to_device(self.collate([dataset[i]]), device)
            rows.append(self._evaluate_one(model, batch, gen))
        if not rows:
            return {"samples": 0}
        out: dict[str, float] = {"samples": float(len(rows))}
        for key in rows[0]:
            vals = [r[key] for r in rows if key in r and math.isfinite(r[key])]
            if vals:
                out[key] = float(np.mean(vals))
        if out.get("jacobi_iters"):
            out["iters_vs_jacobi"] = out.get("learned_iters", float("nan")) / out["jacobi_iters"]
        return out

    def _evaluate_one(self, model: nn.Module, batch: Any, gen: torch.Generator) -> dict[str, float]:
        t0 = time.perf_counter()
        f, g = lower_factor(model, batch)
        loss = float(sketched_loss(f, g, torch.randn(g.n, self.sketch, generator=gen, device=g.vals.device)))
        A, L = batch_to_scipy(batch), factor_to_scipy(f, g)
        apply_learned = lower_factor_apply(L)
        setup = time.perf_counter() - t0
        b = batch.rhs.detach().double().cpu().numpy()
        if not np.any(b):
            b = np.ones(A.shape[0])
        res: dict[str, float] = {"loss": loss, "learned_setup_s": setup}
        solvers = {"cg": None, "jacobi": jacobi(A), "learned": apply_learned}
        if self.use_ic0:
            t0 = time.perf_counter()
            L0 = ic0(A)
            res["ic0_setup_s"] = time.perf_counter() - t0
            solvers["ic0"] = lower_factor_apply(L0) if L0 is not None else None
            if L0 is None:
                res.update(ic0_iters=math.nan, ic0_converged=0.0, ic0_solve_s=math.nan)  # breakdown
        for name, apply in solvers.items():
            if name == "ic0" and apply is None:
                continue
            r = pcg(A, b, apply, rtol=self.rtol)
            res.update({f"{name}_iters": float(r.iterations), f"{name}_converged": float(r.converged),
                        f"{name}_solve_s": r.seconds})
        return res


def batch_to_scipy(batch: Any) -> sp.csr_matrix:
    """The batch's (block-diagonal) matrix as float64 scipy CSR."""
    n = int(batch.indptr.numel() - 1)
    return sp.csr_matrix((batch.values.detach().double().cpu().numpy(), batch.indices.cpu().numpy(),
                          batch.indptr.cpu().numpy()), shape=(n, n))


def factor_to_scipy(f: LowerFactor, g: Graph) -> sp.csr_matrix:
    """The preconditioner's factor for A itself: D^{1/2} L (so P = D^{1/2} L L^T D^{1/2})."""
    inv_scale = (1.0 / g.scale.double()).cpu().numpy()
    row, col = f.row.cpu().numpy(), f.col.cpu().numpy()
    val = f.val.detach().double().cpu().numpy() * inv_scale[row]
    return sp.csr_matrix((val, (row, col)), shape=(f.n, f.n))

