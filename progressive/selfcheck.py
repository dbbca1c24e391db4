"""`progressive doctor --gpu`: a self-check of the trainer on this machine's GPU, no Slurm, a few minutes.

Each check trains or steps a tiny model of a bundled task for real and compares numbers:
- amp: autocast bf16 and fp16, forward and backward, on each bundled task: finite loss and
  gradients, the reference task's sparse products in fp32, the loss within 2% of fp32's;
- deterministic: with `deterministic = true`, two backward passes give bitwise equal gradients;
- resume: a stage stopped mid-run and resumed, and one killed (SIGKILL) in a fresh process and
  resumed, end bitwise equal to an uninterrupted run; the stop comes from a real SIGUSR2;
- scaler: fp16 with a GradScaler: its state survives a stop and resume (GPU only);
- memory: the allocator's figures are consistent (allocated <= reserved <= used <= total; GPU only);
- throughput: optimizer steps per second on the GPU against the CPU (GPU only);
- syncs: host synchronisations in one optimizer step (GPU only);
- nccl: two NCCL ranks all-reduce (when two GPUs are visible).
Without CUDA the GPU-only checks are skipped with the reason, and the others run on the CPU.
The library returns the results; `progressive.cli` prints the table and writes the JSON.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from progressive.config import parse_config
from progressive.devices import CUBLAS_WORKSPACE
from progressive.plan import Plan, build_plan

__all__ = ["Check", "run_checks", "amp_check", "CHECKS"]

PRECOND = "progressive.tasks.precond:PreconditionerTask"
SEQLM = "progressive.tasks.seqlm:SequenceLMTask"
BUDGET_S = 300.0  # the whole self-check; a check that would start later is skipped


@dataclass
class Check:
    """One line of the self-check: pass, fail or skip, what was seen, and its figures."""

    name: str
    status: str  # "pass" | "fail" | "skip"
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)


class _Skip(Exception):
    """A check that cannot run here (no CUDA, one GPU): its reason."""


# --------------------------------------------------------------------------- tiny data and plans


def _data(folder: Path, task: str) -> Path:
    """A tiny dataset of the task's kind (made once per folder)."""
    if task == PRECOND:
        from progressive.data.generate import generate

        path = folder / "matrices.h5"
        if not path.exists():
            generate(path, sizes=[64], counts=[24], seed=0, workers=1)
        return path
    from progressive.data.seqgen import generate_sequences

    path = folder / "seq"
    if not path.exists():
        generate_sequences(path, lengths=[32], counts=[40], seed=0)
    return path


def _plan(folder: Path, name: str, *, train: str = "", epochs: int = 2, gpus: int = 0) -> Plan:
    """A one-stage plan of the reference task on the tiny data, its run folders under `folder/name`."""
    from progressive.data.format import bucket_counts

    data = _data(folder, PRECOND)
    text = (f'[run]\nname = "{name}"\ndata = "{data}"\ncheckpoints = "{folder / "ck"}"\njobs = "{folder / "jobs"}"\n'
            f'[slurm]\ngpus_per_node = {gpus}\n[train]\ncheckpoint_every = 1\neval_samples = 0\n{train}\n'
            f'[model]\ntask = "{PRECOND}"\n[model.options]\nhidden = 16\nlayers = 2\nsketch = 4\n'
            f'[[stage]]\nname = "s"\nbucket = 64\nbatch_size = 4\nepochs = {epochs}\n')
    cfg = parse_config(text, source=str(folder / f"{name}.toml"))
    return build_plan(cfg, folder / f"{name}.toml", counts=bucket_counts)


def _batch(task_ref: str, folder: Path, dev: torch.device) -> tuple[Any, Any]:
    """(task, a batch of 4 on `dev`) of a bundled task."""
    from progressive.task import load_task

    options = {"hidden": 16, "layers": 2, "sketch": 4} if task_ref == PRECOND else {"max_len": 64}
    task = load_task(task_ref, options)
    ds = task.dataset(str(_data(folder, task_ref)), 64 if task_ref == PRECOND else 32, "train")
    return task, task.to_device(task.collate([ds[i] for i in range(4)]), dev)


def _grads(task: Any, batch: Any, dev: torch.device, dtype: torch.dtype | None) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, gradients) of one forward and backward from a seeded model, under autocast `dtype` (None: fp32)."""
    torch.manual_seed(0)
    model = task.build_model().to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = task.loss(model, batch, gen)
    loss.backward()
    return float(loss.detach()), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- the checks


def amp_check(task_ref: str, dtype: torch.dtype, dev: torch.device, folder: Path) -> Check:
    """Autocast `dtype` forward and backward on a bundled task against fp32 on the same batch."""
    name = f"amp {task_ref.rsplit(':', 1)[1]} {str(dtype).removeprefix('torch.')}"
    task, batch = _batch(task_ref, folder, dev)
    ref, _ = _grads(task, batch, dev, None)
    try:
        loss, grads = _grads(task, batch, dev, dtype)
    except RuntimeError as exc:
        return Check(name, "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    figures: dict[str, Any] = {"loss_fp32": ref, "loss": loss, "rel_diff": abs(loss - ref) / max(abs(ref), 1e-12)}
    bad = [k for k, g in grads.items() if not torch.isfinite(g).all()]
    problems = []
    if not math.isfinite(loss) or bad:
        problems.append(f"non-finite loss or gradients ({', '.join(bad[:3]) or 'loss'})")
    if figures["rel_diff"] > 0.02:
        problems.append(f"loss {loss:.5f} vs fp32 {ref:.5f}: {100 * figures['rel_diff']:.2f}% apart (> 2%)")
    if task_ref == PRECOND:
        from progressive.tasks.precond import make_graph, sym_spmm

        g = make_graph(batch)
        with torch.autocast(dev.type, dtype=dtype):
            out = sym_spmm(g.a_off, torch.ones(g.n, 2, device=dev, dtype=dtype))
        figures["sparse_dtype"] = str(out.dtype).removeprefix("torch.")
        if out.dtype != torch.float32:
            problems.append(f"the sparse product ran in {out.dtype}, not fp32")
    detail = "; ".join(problems) or f"finite; loss within {100 * figures['rel_diff']:.2f}% of fp32"
    return Check(name, "fail" if problems else "pass", detail, figures)


def deterministic_check(dev: torch.device, folder: Path) -> Check:
    """Bitwise equal gradients over two backward passes with deterministic algorithms on."""
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    try:
        task, batch = _batch(PRECOND, folder, dev)
        runs = [_grads(task, batch, dev, None)[1] for _ in range(2)]
    except RuntimeError as exc:  # an op without a deterministic kernel on this device
        return Check("deterministic gradients", "fail", str(exc).splitlines()[0])
    finally:
        torch.use_deterministic_algorithms(before)
    differ = [k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k])]
    if differ:
        return Check("deterministic gradients", "fail", f"gradients differ between two passes: {', '.join(differ[:4])}")
    return Check("deterministic gradients", "pass", f"{len(runs[0])} gradients bitwise equal over 2 passes")


def _final(plan: Plan) -> dict[str, torch.Tensor]:
    from progressive.checkpoint import load_weights

    return load_weights(plan.stages[0].final_checkpoint)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def _child(plan: Plan, dev: torch.device, action: str, at_step: int) -> subprocess.CompletedProcess[str]:
    """Train the stage in a fresh process that is killed (SIGKILL) or signalled (SIGUSR2) after `at_step`."""
    args = [sys.executable, "-m", "progressive.selfcheck", plan.model_dump_json(), str(dev), action, str(at_step)]
    return subprocess.run(args, capture_output=True, text=True, timeout=180, check=False)


def resume_check(dev: torch.device, folder: Path, precision: str = "auto", name: str = "resume") -> Check:
    """Uninterrupted vs stopped+resumed vs SIGKILLed-in-a-fresh-process+resumed vs SIGUSR2+resumed."""
    from progressive.trainer import train_stage

    train = f'precision = "{precision}"\ndeterministic = true'
    gpus = 1 if dev.type == "cuda" else 0
    ref = _plan(folder, f"{name}-ref", train=train, gpus=gpus)
    train_stage(ref, ref.stages[0], device=str(dev))
    expected = _final(ref)
    t0 = time.perf_counter()
    figures: dict[str, Any] = {}
    problems: list[str] = []
    for how in ("stop", "sigkill", "sigusr2"):
        plan = _plan(folder, f"{name}-{how}", train=train, gpus=gpus)
        if how == "stop":
            calls = iter(range(10**6))
            out = train_stage(plan, plan.stages[0], device=str(dev), stop_requested=lambda: next(calls) >= 2)
            stopped = out.status == "stopped"
        else:
            res = _child(plan, dev, how, at_step=3)
            stopped = (res.returncode == -signal.SIGKILL) if how == "sigkill" else (
                res.returncode == 0 and '"stopped"' in res.stdout)
            if not stopped:
                problems.append(f"{how}: the child ended with {res.returncode}: {res.stderr.strip()[-300:]}")
                continue
        final = train_stage(plan, plan.stages[0], device=str(dev))
        figures[f"{how}_resumed_from"] = Path(final.resumed_from or "").name
        differ = _same(expected, _final(plan))
        if not stopped or differ:
            problems.append(f"{how}: final weights differ ({', '.join(differ[:3])})" if differ else f"{how}: did not stop")
    figures["seconds"] = round(time.perf_counter() - t0, 2)
    detail = "; ".join(problems) or "stop, SIGKILL and SIGUSR2 resumes bitwise equal to the uninterrupted run"
    return Check(name, "fail" if problems else "pass", detail, figures)


def _need_cuda(dev: torch.device) -> None:
    if dev.type != "cuda":
        raise _Skip(f"no CUDA device (torch {torch.__version__}, "
                    f"{'CPU build' if torch.version.cuda is None else 'CUDA ' + str(torch.version.cuda) + ', no GPU visible'})")


def scaler_check(dev: torch.device, folder: Path) -> Check:
    """fp16 with a GradScaler: stop and resume bitwise, the scaler's state in the checkpoint."""
    _need_cuda(dev)
    check = resume_check(dev, folder, precision="fp16", name="scaler")
    from progressive.checkpoint import latest_checkpoint, load_checkpoint

    last = latest_checkpoint(_plan(folder, "scaler-stop", gpus=1).stages[0].checkpoint_dir)
    scaler = load_checkpoint(last)["scaler"] if last else None
    if not scaler or "scale" not in scaler:
        return Check("fp16 GradScaler", "fail", "the fp16 checkpoint holds no GradScaler state")
    check.name, check.figures["scale"] = "fp16 GradScaler", float(scaler["scale"])
    return check


def memory_check(dev: torch.device, folder: Path) -> Check:
    """allocated <= reserved <= used <= total after a step, as calibration reads them."""
    _need_cuda(dev)
    from progressive.calibrate import _gpu_memory

    task, batch = _batch(PRECOND, folder, dev)
    torch.cuda.reset_peak_memory_stats(dev)
    _grads(task, batch, dev, torch.bfloat16)
    mem = _gpu_memory(dev) or {}
    chain = [mem["max_allocated_mb"], mem["max_reserved_mb"], mem["device_used_mb"], mem["device_total_mb"]]
    ok = all(a <= b + 1e-6 for a, b in zip(chain, chain[1:]))
    return Check("gpu memory figures", "pass" if ok else "fail",
                 "allocated <= reserved <= used <= total" + ("" if ok else f" broken: {chain}"),
                 {k: round(v, 1) if isinstance(v, float) else v for k, v in mem.items()})


def _steps_per_s(dev: torch.device, folder: Path, seconds: float = 3.0) -> float:
    from progressive.config import TrainConfig
    from progressive.trainer import make_optimizer

    task, batch = _batch(PRECOND, folder, dev)
    model = task.build_model().to(dev)
    opt = make_optimizer(model, TrainConfig())
    gen = torch.Generator(device=dev).manual_seed(0)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        task.loss(model, batch, gen).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        count += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return count / (time.perf_counter() - t0)


def throughput_check(dev: torch.device, folder: Path) -> Check:
    """Optimizer steps per second of the reference task, GPU against CPU (same batch, same model)."""
    _need_cuda(dev)
    gpu, cpu = _steps_per_s(dev, folder), _steps_per_s(torch.device("cpu"), folder)
    return Check("throughput", "pass", f"{gpu:.1f} steps/s on the GPU, {cpu:.1f} on the CPU ({gpu / cpu:.2f}x)",
                 {"gpu_steps_per_s": gpu, "cpu_steps_per_s": cpu, "ratio": gpu / cpu})


def syncs_check(dev: torch.device, folder: Path) -> Check:
    """Host synchronisations in one forward + backward + optimizer step (torch's sync debug mode)."""
    _need_cuda(dev)
    task, batch = _batch(PRECOND, folder, dev)
    model = task.build_model().to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            task.loss(model, batch, gen).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in seen)
    return Check("host syncs per step", "pass", f"{syncs} synchronising call(s) in one forward + backward",
                 {"syncs": syncs})


def nccl_check(dev: torch.device, folder: Path) -> Check:
    """Two NCCL ranks all-reduce (two GPUs needed)."""
    _need_cuda(dev)
    if torch.cuda.device_count() < 2:
        raise _Skip("one GPU visible: the 2-rank NCCL check needs two")
    code = ("import os, torch, torch.distributed as d\n"
            "r = int(os.environ['RANK']); dev = torch.device('cuda', r); torch.cuda.set_device(dev)\n"
            "d.init_process_group('nccl', rank=r, world_size=2, device_id=dev)\n"
            "t = torch.full((4,), float(r + 1), device=dev); d.all_reduce(t); print(float(t[0]))\n"
            "d.destroy_process_group()\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:  # a hung rank must not keep holding its GPU after doctor ends
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    ok = all(p.returncode == 0 and o.strip() == "3.0" for p, (o, _) in zip(procs, outs))
    return Check("nccl 2 ranks", "pass" if ok else "fail", "all-reduce of 1 + 2 = 3 on both ranks" if ok
                 else "; ".join(e.strip()[-200:] for _, e in outs))


def _amp(task_ref: str, dtype: torch.dtype) -> Callable[[torch.device, Path], Check]:
    return lambda dev, folder: amp_check(task_ref, dtype, dev, folder)


CHECKS: list[tuple[str, Callable[[torch.device, Path], Check]]] = [
    ("amp PreconditionerTask bfloat16", _amp(PRECOND, torch.bfloat16)),
    ("amp PreconditionerTask float16", _amp(PRECOND, torch.float16)),
    ("amp SequenceLMTask bfloat16", _amp(SEQLM, torch.bfloat16)),
    ("amp SequenceLMTask float16", _amp(SEQLM, torch.float16)),
    ("deterministic gradients", deterministic_check),
    ("resume", lambda dev, folder: resume_check(dev, folder)),
    ("fp16 GradScaler", scaler_check),
    ("gpu memory figures", memory_check),
    ("throughput", throughput_check),
    ("host syncs per step", syncs_check),
    ("nccl 2 ranks", nccl_check),
]


def run_checks(device: str | None = None, budget_s: float = BUDGET_S,
               on_result: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check on `device` (default: cuda:0 if CUDA works, else the CPU), within `budget_s` seconds."""
    dev = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    results: list[Check] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="progressive-doctor-") as tmp:
        for name, fn in CHECKS:
            t0 = time.perf_counter()
            if t0 - start > budget_s:
                check = Check(name, "skip", f"the self-check's {budget_s:.0f} s budget was spent")
            else:
                try:
                    check = fn(dev, Path(tmp))
                except _Skip as why:
                    check = Check(name, "skip", str(why))
                except Exception as exc:  # a check that crashes is a failed check, and the others still run
                    check = Check(name, "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            check.seconds = round(time.perf_counter() - t0, 2)
            results.append(check)
            if on_result:
                on_result(check)
    return results


def _child_main(plan_json: str, device: str, action: str, at_step: str) -> int:
    """A fresh process training the stage: SIGKILLs itself, or sends itself SIGUSR2, after step `at_step`."""
    from progressive.signals import StopFlag
    from progressive.trainer import train_stage

    plan = Plan.model_validate_json(plan_json)
    flag = StopFlag()
    flag.install(signal.SIGUSR2)

    def on_progress(event: dict[str, Any]) -> None:
        if event.get("event") == "checkpoint" and event["step"] == int(at_step):
            os.kill(os.getpid(), signal.SIGKILL if action == "sigkill" else signal.SIGUSR2)

    out = train_stage(plan, plan.stages[0], device=device, stop_requested=flag, on_progress=on_progress)
    print(json.dumps({"status": out.status, "step": out.step}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(*sys.argv[1:5]))
