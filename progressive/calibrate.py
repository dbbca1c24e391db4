"""Measure one stage on the resources it runs on: step time, memory, evaluation, checkpoint, start-up.

`measure_stage(plan, stage)` builds the stage's task, data, model and optimizer the way
the trainer does, then:
- times `steps` optimizer steps, and at least `min_seconds` of them (after `warmup` untimed
  ones), on batches drawn at random from the bucket, as an epoch draws them. Their *mean* is
  what an estimate multiplies: the slow steps (a busy machine's time slices, allocator
  growth) are real costs an epoch pays; median and p10/p90 show the spread;
- runs steps on the bucket's *largest* samples (most non-zeros): the worst batch an epoch
  meets, for peak memory (and the worst step time);
- times one evaluation (`task.evaluate` on `eval_samples` validation samples) and one
  full-state checkpoint save (to a temporary folder);
- takes the job's start-up as this process's age once data, model and DDP are ready,
  plus the warm-up steps' excess over a steady step; and its exit as the time a process that
  has imported what this one has (torch, torch._dynamo, the task) takes to end after its last
  statement: torch's teardown alone is ~1 s, most of a seconds-long stage's estimate error;
- with `find_batch_size`, searches the largest micro-batch that fits the memory budget.

Peak memory: host RSS high-water mark (VmHWM) always; on GPU also the allocator's
allocated/reserved peaks and the device's used memory as nvidia-smi shows it
(`torch.cuda.mem_get_info`). The GPU paths are written and guarded, and have only run
on CPU here.

Entry points: `measure_stage` (in-process), `main` (`python -m progressive.calibrate`,
one subprocess per stage for `calibrate --local`, so each stage has its own clean
memory high-water mark and start-up), `calibration_job` (the Slurm job's function).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import numpy as np
import torch

from progressive.calibration import CalibrationError, stage_key
from progressive.checkpoint import FORMAT, capture_rng, save_atomic
from progressive.devices import autocast_for, bf16_supported, pick_device, resolve_precision, set_numerics, visible_gpus
from progressive.distributed import DistInfo, env_world, gather_to_rank0, init_distributed, shutdown_distributed
from progressive.metrics import peak_memory_mb
from progressive.plan import Plan, StagePlan
from progressive.task import Task, load_task
from progressive.data.loader import ResumableSampler
from progressive.train_state import TrainParts
from progressive.trainer import apply_step, make_optimizer

__all__ = ["measure_stage", "calibration_job", "process_age_s", "spread", "fit_batch_size", "main"]

MAX_BATCH = 4096  # the search never proposes more than this many samples per micro-batch
MAX_TIMED_STEPS = 1000  # with min_seconds: enough for a stable mean of millisecond steps


# --------------------------------------------------------------------------- pure helpers


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None where unknown."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, after the comm field
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return max(0.0, time.time() - (btime + start_ticks / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# Imports `sys.argv[1:]`, prints the time, ends: the parent times what is left (the interpreter's teardown).
_EXIT_PROBE = ("import importlib, sys, time\n"
               "for m in sys.argv[1:]:\n    importlib.import_module(m)\n"
               "sys.stdout.write(repr(time.time()))\n")


def exit_cost_s(modules: Sequence[str], timeout_s: float = 120.0) -> float | None:
    """Seconds a process that has imported `modules` takes to end after its last statement.

    Measured on a probe subprocess (module names go in as arguments, never into the code); None
    when the probe fails or times out, which the estimate then reports as not measured.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        proc = subprocess.run([sys.executable, "-c", _EXIT_PROBE, *modules], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
        end = time.time()
        return round(max(0.0, end - float(proc.stdout)), 3) if proc.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return None


def _loaded_heavy_modules(task: object) -> list[str]:
    """What a stage's job has imported that costs time to tear down: torch (and its compiler stack,
    which the optimizers import), and the task's own module."""
    mods = ["torch"] + [m for m in ("torch._dynamo",) if m in sys.modules]
    module = type(task).__module__
    if module and module != "__main__":
        mods.append(module)
    return mods


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, p10, p90, mean, min, max of a sample of durations."""
    v = sorted(values)
    return {"median": statistics.median(v), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "mean": statistics.fmean(v), "min": v[0], "max": v[-1], "n": len(v)}


def fit_batch_size(points: dict[int, float], budget_mb: float, cap: int) -> int:
    """Largest batch whose predicted peak fits `budget_mb`, from measured {batch: peak MB}.

    Peak memory grows about linearly in the batch; the line goes through the two largest
    measured batches (the most relevant ones). With a single point the whole peak is taken as
    per-sample (a pessimistic guess). Never less than 1 nor more than `cap`.
    """
    sizes = sorted(points)
    b1 = sizes[-1]
    if len(sizes) == 1:
        slope, base = points[b1] / b1, 0.0
    else:
        b0 = sizes[-2]
        slope = max((points[b1] - points[b0]) / (b1 - b0), 1e-6)
        base = points[b1] - slope * b1
    return int(max(1, min(cap, math.floor((budget_mb - base) / slope))))


def _vm_hwm_mb() -> float:
    return peak_memory_mb(torch.device("cpu"))


def _reset_host_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs 5); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the bench


class _Bench:
    """A stage's model, optimizer and data, stepped the way the trainer steps them."""

    def __init__(self, plan: Plan, stage: StagePlan, dev: torch.device, dist: DistInfo) -> None:
        tc = stage.train
        self.stage, self.dev, self.dist = stage, dev, dist
        self.task: Task = load_task(plan.model.task, plan.model.options)
        self.train_ds = self.task.dataset(plan.data_path, stage.bucket, "train")
        self.n_train = len(self.train_ds)  # type: ignore[arg-type]
        if self.n_train == 0:
            raise CalibrationError(f"bucket n={stage.bucket} has no training samples", loc=f"stage {stage.name!r}")
        self.task.collate([self.train_ds[0]])  # the first access loads an in-memory bucket: part of start-up
        # Numerics, precision and DDP as the trainer sets them: what is timed is what will run.
        set_numerics(dev, tc)
        self.precision = resolve_precision(tc.precision, dev.type, bf16_supported(dev))
        self.autocast: Callable[[], Any] = autocast_for(self.precision, dev)
        torch.manual_seed(plan.seed)
        self.raw_model = self.task.build_model().to(dev)
        self.parts = TrainParts(model=self.raw_model, optimizer=make_optimizer(self.raw_model, tc),
                                scaler=torch.amp.GradScaler(dev.type, enabled=self.precision == "fp16"),
                                sampler=ResumableSampler(self.n_train, seed=plan.seed),
                                loss_gen=torch.Generator(device=dev).manual_seed(plan.seed + dist.rank))
        self.model: torch.nn.Module = self.raw_model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.raw_model, device_ids=[dev.index] if dev.type == "cuda" else None)
        # Samples by size, largest first: the worst case an epoch meets.
        nnz = getattr(self.train_ds, "nnz_offsets", None)
        if nnz is not None:
            counts = np.diff(np.asarray(nnz))
            self.by_size = [int(i) for i in np.argsort(-counts, kind="stable")]
            self.largest_nnz, self.mean_nnz = int(counts.max()), float(counts.mean())
        else:  # a user's dataset without an index: sizes unknown, take them in order
            self.by_size = list(range(self.n_train))
            self.largest_nnz, self.mean_nnz = None, None  # type: ignore[assignment]
        self.rng = np.random.default_rng(plan.seed)
        self.metrics: IO[str] | None = None
        if dist.is_main:
            run_dir = Path(plan.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = tempfile.TemporaryFile("w", dir=run_dir)  # deleted on close, nameless on Linux

    def close(self) -> None:
        """Drop the scratch metrics file."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def random_batches(self, batch: int) -> list[list[int]]:
        """One step's micro-batches of random samples (as a shuffled epoch would give them)."""
        idx = self.rng.choice(self.n_train, size=min(self.n_train, batch * self.stage.train.grad_accum), replace=False)
        return [list(map(int, idx[i:i + batch])) for i in range(0, len(idx), batch)]

    def largest_batches(self, batch: int) -> list[list[int]]:
        """One step of micro-batches each made of the largest samples."""
        top = self.by_size[:batch] if batch <= self.n_train else [self.by_size[i % self.n_train] for i in range(batch)]
        return [list(top) for _ in range(self.stage.train.grad_accum)]

    def step(self, micro: list[list[int]]) -> float:
        """One optimizer step over these micro-batches, as the trainer does it; its seconds.

        Included, as in the trainer's wall time: reading the data, and the per-step metrics line
        (peak memory read, one JSON line written and flushed to the run's folder).
        """
        t0 = time.perf_counter()
        total = sum(len(m) for m in micro)
        batches = ((self.task.to_device(self.task.collate([self.train_ds[j] for j in ids]), self.dev), len(ids))
                   for ids in micro)
        loss_sum, _ = apply_step(self.task, self.model, self.parts, batches, len(micro), total, self.autocast,
                                 self.stage.train.clip_grad_norm, self.dev)
        loss_v = float(loss_sum)  # the trainer reads the loss every step: the same device sync
        if self.metrics is not None:
            self.metrics.write(json.dumps({"event": "step", "loss": loss_v, "peak_mem_mb": peak_memory_mb(self.dev),
                                           "time": time.time()}) + "\n")
            self.metrics.flush()
        return time.perf_counter() - t0

    def state(self) -> dict[str, Any]:
        """A full trainer state, as a periodic checkpoint holds it."""
        return {"format": FORMAT, "kind": "state", "stage": self.stage.name, "fingerprint": dict(self.stage.fingerprint),
                "step": 0, "model": self.raw_model.state_dict(), "optimizer": self.parts.optimizer.state_dict(),
                "scaler": self.parts.scaler.state_dict() if self.parts.scaler.is_enabled() else None,
                "rng": [capture_rng(self.parts.loss_gen)], "torch_version": str(torch.__version__)}


# --------------------------------------------------------------------------- memory


def _gpu_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _gpu_memory(dev: torch.device) -> dict[str, Any] | None:
    """Allocator peaks and the device's used memory (nvidia-smi's view: every context on it)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    return {"max_allocated_mb": torch.cuda.max_memory_allocated(dev) / 2**20,
            "max_reserved_mb": torch.cuda.max_memory_reserved(dev) / 2**20,
            # The reserved peak may have been released since: add what the allocator no longer holds.
            "device_used_mb": (total - free) / 2**20 + max(0.0, (torch.cuda.max_memory_reserved(dev)
                                                               - torch.cuda.memory_reserved(dev)) / 2**20),
            "device_total_mb": total / 2**20,
            "device_name": torch.cuda.get_device_name(dev)}


def gpu_memory_available_mb(dev: torch.device) -> float:
    """What this process may still use on `dev`: the device's free memory plus what our allocator holds.

    Not the total: other processes (another rank on the same GPU, the display, MPS) use some of it.
    """
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    return (free + torch.cuda.memory_reserved(dev)) / 2**20


def _peak_at(bench: _Bench, batch: int) -> float | None:
    """Peak memory (MB) of one step on `batch` largest samples: device on GPU, RSS on CPU; None on OOM."""
    dev = bench.dev
    if dev.type == "cuda":
        # Each trial starts from an empty cache: blocks the previous (larger or failed) trial reserved
        # would otherwise count toward this one's reserved peak.
        torch.cuda.empty_cache()
        _gpu_reset(dev)
        try:
            bench.step(bench.largest_batches(batch))
        except torch.cuda.OutOfMemoryError:
            bench.parts.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return None
        return torch.cuda.max_memory_reserved(dev) / 2**20
    _reset_host_peak()
    bench.step(bench.largest_batches(batch))
    return _vm_hwm_mb()


def find_batch_size(bench: _Bench, budget_mb: float, cap: int) -> dict[str, Any]:
    """The largest micro-batch whose worst-case step stays under `budget_mb`.

    GPU: double until an OOM or the budget is crossed, then bisect (an OOM here is caught
    and costs nothing). CPU: an OOM would be the kernel's OOM killer, so a batch is only
    tried when the line through the measured peaks predicts it fits; the answer is the
    line's prediction, checked by one measurement and bisected down if that was over.
    """
    points: dict[int, float] = {}
    good, bad = 0, None
    b = 1
    on_gpu = bench.dev.type == "cuda"
    while b <= cap:
        if not on_gpu and points and fit_batch_size(points, budget_mb, cap=MAX_BATCH) < b:
            break  # predicted not to fit: not tried
        peak = _peak_at(bench, b)
        if peak is None or peak > budget_mb:
            bad = b
            break
        points[b], good = peak, b
        b *= 2
    if not on_gpu and points and bad is None:
        guess = fit_batch_size(points, budget_mb, cap)
        if guess > good:
            peak = _peak_at(bench, guess)
            if peak is not None and peak <= budget_mb:
                points[guess], good = peak, guess
            else:
                bad = guess
    while bad is not None and bad - good > 1:  # bisect between the last fit and the first miss
        mid = (good + bad) // 2
        peak = _peak_at(bench, mid)
        if peak is None or peak > budget_mb:
            bad = mid
        else:
            points[mid], good = peak, mid
    return {"budget_mb": budget_mb, "cap": cap, "measured": {str(k): round(v, 1) for k, v in sorted(points.items())},
            "batch_size": good or None}


# --------------------------------------------------------------------------- the measurement


def measure_stage(plan: Plan, stage: StagePlan, *, steps: int = 10, warmup: int = 3, min_seconds: float = 3.0,
                  find_batch: bool = False, margin: float = 0.1, device: str | None = None, dist: DistInfo | None = None) -> dict[str, Any]:
    """Measure `stage` here and return its calibration entry (see `progressive.calibration`).

    Raises:
        CalibrationError: no training data, or --find-batch-size without a memory budget.
        ConfigError / DataError: the task or data is unusable (as the trainer would raise).
    """
    if steps < 1 or warmup < 0:
        raise CalibrationError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}", loc="--steps")
    dev = torch.device(device or pick_device(stage.slurm.gpus_per_node, stage.slurm.tasks_per_node,
                                             env_world()[2], visible_gpus()))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dist = dist or DistInfo()
    bench = _Bench(plan, stage, dev, dist)
    ready_s = process_age_s()
    batch = stage.batch_size

    warm = [bench.step(bench.random_batches(batch)) for _ in range(warmup)]
    # At least `steps` steps and `min_seconds` of them: short steps on a busy machine must see the
    # time slices other processes take, not only the quiet moments between them.
    timed: list[float] = []
    while len(timed) < steps or (sum(timed) < min_seconds and len(timed) < MAX_TIMED_STEPS):
        timed.append(bench.step(bench.random_batches(batch)))
    step = spread(timed)
    # Warm-up's excess over a steady step (allocator growth, first-call kernels) is paid once per job.
    warm_excess = max(0.0, sum(warm) - warmup * step["mean"])

    _gpu_reset(dev)
    worst = [bench.step(bench.largest_batches(batch)) for _ in range(max(2, min(steps, 3)))]
    peak_train_rss = _vm_hwm_mb()
    gpu = _gpu_memory(dev)

    eval_s, eval_n = 0.0, 0
    if stage.train.eval_samples > 0 and dist.is_main:
        val = bench.task.dataset(plan.data_path, stage.bucket, "val")
        eval_n = min(stage.train.eval_samples, len(val))  # type: ignore[arg-type]
        if eval_n:
            bench.raw_model.eval()
            t0 = time.perf_counter()
            bench.task.evaluate(bench.raw_model, val, device=dev, max_samples=stage.train.eval_samples)
            eval_s = time.perf_counter() - t0
            bench.raw_model.train()

    ckpt_s, ckpt_mb = 0.0, 0.0
    if dist.is_main:
        # On the checkpoints' own filesystem: an fsync on a network or overlay disk costs what /tmp's does not.
        ckpt_root = Path(stage.checkpoint_dir).parent
        ckpt_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".calibrate-", dir=ckpt_root) as tmp:
            times = []
            for i in range(2):
                t0 = time.perf_counter()
                path = save_atomic(bench.state(), Path(tmp) / f"step_{i}.pt")
                times.append(time.perf_counter() - t0)
            ckpt_s, ckpt_mb = min(times), path.stat().st_size / 2**20
    peak_rss = _vm_hwm_mb()
    exit_s = exit_cost_s(_loaded_heavy_modules(bench.task)) if dist.is_main else None

    search = None
    if find_batch:
        if dev.type == "cuda":
            budget = (1 - margin) * gpu_memory_available_mb(dev)
        elif stage.slurm.mem:
            budget = (1 - margin) * stage.slurm.mem / stage.slurm.tasks_per_node
        else:
            raise CalibrationError("--find-batch-size on CPU needs the stage's memory request", loc=f"stage {stage.name!r}",
                                   hint="set mem (e.g. mem = \"8G\") in [slurm] or the stage")
        search = find_batch_size(bench, budget, cap=min(MAX_BATCH, math.ceil(bench.n_train / dist.world_size)))

    bench.close()
    peaks = gather_to_rank0([peak_rss, peak_train_rss], dist)
    if peaks is not None:  # the busiest rank sets the node's need
        peak_rss, peak_train_rss = max(p[0] for p in peaks), max(p[1] for p in peaks)
    micro = batch * stage.train.grad_accum * dist.world_size
    return {
        "key": stage_key(plan, stage, device=dev.type),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "device": str(dev),
        "device_name": gpu["device_name"] if gpu else "cpu",
        "threads": torch.get_num_threads(),
        "torch_version": str(torch.__version__),
        "precision": bench.precision,
        "warmup": warmup,
        "step_s": step,
        "samples_per_s": micro / step["mean"],
        "worst_step_s": spread(worst),
        "largest_nnz": bench.largest_nnz,
        "mean_nnz": bench.mean_nnz,
        "peak_rss_mb": round(peak_rss, 1),
        "peak_train_rss_mb": round(peak_train_rss, 1),
        "gpu": {k: v for k, v in gpu.items() if k != "device_name"} if gpu else None,
        "ready_s": ready_s,
        "startup_s": (ready_s or 0.0) + warm_excess,
        "exit_s": exit_s,
        "eval_s": eval_s,
        "eval_samples": eval_n,
        "checkpoint_s": ckpt_s,
        "checkpoint_mb": round(ckpt_mb, 2),
        "batch_search": search,
        "suggested_batch_size": search["batch_size"] if search else None,
    }


def calibration_job(plan_json: str, stage_name: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """The function a Slurm calibration job runs on each of its tasks; rank 0 returns the entry."""
    from progressive.backends import slurm
    from progressive.job import _ddp_env

    plan = Plan.model_validate_json(plan_json)
    stage = plan.stage(stage_name)
    env = dict(slurm.job_env())
    _ddp_env(env)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        torch.set_num_threads(int(cpus))  # as the stage's job does
    # Not require_gpu: a GPU stage calibrated where no GPU is visible is measured on the CPU (with a warning in
    # the job's log), and plan shows the entry as stale ("device cpu -> cuda") rather than calibrate failing.
    dev = pick_device(stage.slurm.gpus_per_node, stage.slurm.tasks_per_node, env["local_rank"], visible_gpus())
    info = init_distributed(torch.device(dev), timeout_min=stage.train.dist_timeout)
    try:
        entry = measure_stage(plan, stage, device=dev, dist=info, **options)
    finally:
        shutdown_distributed(info)
    return entry if info.is_main else None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m progressive.calibrate --plan FILE --stage NAME --out FILE`: one stage, in this process."""
    p = argparse.ArgumentParser(prog="python -m progressive.calibrate")
    p.add_argument("--plan", required=True, help="the plan as JSON (Plan.model_dump_json)")
    p.add_argument("--stage", required=True)
    p.add_argument("--out", required=True, help="where to write the entry (JSON)")
    p.add_argument("--options", default="{}", help="measure_stage keyword options as JSON")
    args = p.parse_args(argv)
    from progressive import atomic
    from progressive.errors import ProgressiveError

    plan = Plan.model_validate_json(Path(args.plan).read_text(encoding="utf-8"))
    try:
        entry: dict[str, Any] = measure_stage(plan, plan.stage(args.stage), **json.loads(args.options))
    except ProgressiveError as exc:
        entry = {"error": {"msg": exc.msg, "loc": exc.loc, "hint": exc.hint, "kind": type(exc).__name__}}
    atomic.write_text(args.out, json.dumps(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
