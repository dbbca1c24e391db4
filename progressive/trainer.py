"""The training loop every stage job runs: `train_stage(plan, stage)`.

`_train` reads top to bottom: set up (task, data, model, optimizer, loader), restore (this
stage's own checkpoint, else the parent's final weights, else a seeded init), then one
`_train_step` per optimizer step, saving when a stop is asked or a checkpoint is due, then
`_finish` (evaluation and final.pt). The set-up and the restore are `progressive.train_setup`'s;
what a checkpoint holds, and how each part goes into it and comes back out, is
`progressive.train_state`'s.

Exact resume is by construction, not by luck:
- the data position is a pure function of the optimizer step (every step but an epoch's
  last consumes `batch_size * grad_accum` samples per rank), and the sampler restarts at
  that position (`set_epoch(epoch, start)`), independent of DataLoader prefetching;
- every random number comes from RNGs whose states are saved per rank, the loss's
  included (the task draws its randomness from the generator we pass);
- checkpoints are written only between optimizer steps, so none is ever redone.

A stop request (the pre-timeout signal, Ctrl-C) is polled after every optimizer step
and agreed across ranks with one all-reduce, so every rank stops after the same step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch.nn.parallel import DistributedDataParallel

from progressive.checkpoint import save_atomic, step_path
from progressive.distributed import (
    DistInfo,
    barrier,
    broadcast_from_rank0,
    env_world,
    gather_to_rank0,
    init_distributed,
    rank_hosts,
    shutdown_distributed,
    sum_all,
)
from progressive.devices import (
    pick_device,
    set_numerics,
    visible_gpus,
)
from progressive.errors import CheckpointError, ConfigError, DataError
from progressive.layout import TENSORBOARD_DIR
from progressive.metrics import MetricsWriter, peak_memory_mb
from progressive.plan import Plan, StagePlan
from progressive.task import Task
from progressive.tracking.hub import open_hub
from progressive.train_setup import StageJob, data_position, distribute, make_optimizer, restore_state, setup_job
from progressive.train_state import (
    FinalCheckpoint,
    TrainParts,
    TrainState,
    load_final,
)
from progressive.units import parse_duration_min

log = logging.getLogger(__name__)

__all__ = ["StageOutcome", "train_stage", "get_lr", "micro_batch_sizes", "data_position",
           "checkpoint_interval", "make_optimizer", "apply_step"]


@dataclass(frozen=True)
class StageOutcome:
    """How `train_stage` ended.

    Attributes:
        status: "completed" (final.pt written) or "stopped" (a stop was requested; state saved).
        step: optimizer steps done so far.
        total_steps: optimizer steps of the whole stage.
        checkpoint: final.pt when completed, else the checkpoint just saved.
        metrics: evaluation metrics when completed, else None.
        resumed_from: the checkpoint this call resumed from, if any.
    """

    status: Literal["completed", "stopped"]
    step: int
    total_steps: int
    checkpoint: str | None
    metrics: dict[str, float] | None = None
    resumed_from: str | None = None


# --------------------------------------------------------------------------- pure helpers


def get_lr(step: int, total: int, warmup_frac: float, lr: float, min_lr_frac: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine down to lr * min_lr_frac."""
    warmup = int(warmup_frac * total)
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    min_lr = lr * min_lr_frac
    decay_steps = max(1, total - warmup)
    ratio = min(1.0, (step - warmup) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def micro_batch_sizes(per_rank: int, batch_size: int, grad_accum: int, step_in_epoch: int) -> list[int]:
    """Samples in each micro-batch of one optimizer step (on one rank); the epoch's last may be short."""
    start = step_in_epoch * batch_size * grad_accum
    left = per_rank - start
    if left <= 0:
        raise ValueError(f"step {step_in_epoch} is past the epoch ({per_rank} samples per rank)")
    count = min(grad_accum, math.ceil(left / batch_size))
    return [min(batch_size, left - i * batch_size) for i in range(count)]


def checkpoint_interval(value: str | int) -> tuple[Literal["steps", "seconds"], float]:
    """`train.checkpoint_every` as ("steps", k) for an int, or ("seconds", s) for a duration string."""
    if isinstance(value, int):
        return "steps", float(value)
    return "seconds", parse_duration_min(value) * 60.0


class _SaveClock:
    """When a periodic checkpoint is due: every k optimizer steps, or every s seconds of rank 0's clock."""

    def __init__(self, every: str | int) -> None:
        self.kind, self.every = checkpoint_interval(every)
        self.last = time.perf_counter()

    def due(self, step: int, now: float) -> bool:
        """Whether a checkpoint is due after optimizer step `step`, at perf_counter time `now`."""
        return step % int(self.every) == 0 if self.kind == "steps" else now - self.last >= self.every

    def saved(self) -> None:
        """A periodic checkpoint was just written: the next one is due an interval from now."""
        self.last = time.perf_counter()


@dataclass(frozen=True)
class _StepDone:
    """What one optimizer step reports for its metrics line."""

    epoch: int
    lr: float
    samples: int  # on this rank
    loss_sum: torch.Tensor  # this rank's loss, weighted over its micro-batches
    grad_norm: torch.Tensor
    t0: float  # perf_counter at the step's start


# --------------------------------------------------------------------------- the stage


def train_stage(plan: Plan, stage: StagePlan, *, stop_requested: Callable[[], bool] | None = None,
                on_progress: Callable[[dict[str, Any]], None] | None = None,
                device: str | None = None, require_gpu: bool = False) -> StageOutcome:
    """Train one stage to completion or until a stop is requested; resumable any number of times.

    Args:
        plan: the run's plan (task, seed, data path).
        stage: the stage to train (its bucket, batch, epochs, train settings, paths, fingerprint).
        stop_requested: polled after every optimizer step; when it returns True (on any rank)
            the step is finished, a checkpoint saved and "stopped" returned.
        on_progress: called on rank 0 with every event dict (steps, checkpoints, end).
        device: "cpu", "cuda", "cuda:1"...; default: from the plan's gpus_per_node and the GPUs
            Slurm made visible to this task (`progressive.devices.pick_device`).
        require_gpu: a GPU stage that sees no GPU fails instead of training on the CPU (Slurm jobs).

    Raises:
        CheckpointError: resume refused (different settings, corrupt file), parent weights missing
            or of the wrong shapes.
        ConfigError / DataError: bad task, world size unlike the plan's, data unlike the plan's.
    """
    _, _, local = env_world()
    tc = stage.train
    if device is None:
        device = pick_device(stage.slurm.gpus_per_node, stage.slurm.tasks_per_node, local, visible_gpus(),
                             require_gpu=require_gpu)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)  # DDP and the allocator want an explicit device
    set_numerics(dev, tc)
    dist_info = init_distributed(dev, timeout_min=tc.dist_timeout)
    try:
        return _train(plan, stage, dist_info, dev, stop_requested or (lambda: False), on_progress)
    finally:
        shutdown_distributed(dist_info)


def _train(plan: Plan, stage: StagePlan, dist: DistInfo, dev: torch.device, stop_requested: Callable[[], bool],
           on_progress: Callable[[dict[str, Any]], None] | None) -> StageOutcome:
    if dist.world_size != stage.world_size:
        raise ConfigError(f"the stage was planned for {stage.world_size} process(es) but runs with {dist.world_size}",
                          loc=f"stage {stage.name!r}",
                          hint="launch one process per task (nodes x tasks_per_node), or change [slurm] to match")
    if Path(stage.final_checkpoint).is_file():  # a requeue racing the end, a re-run: not trained twice
        final = load_final(stage.final_checkpoint, stage.fingerprint)
        return StageOutcome("completed", int(final.step), int(final.total_steps), str(Path(stage.final_checkpoint)),
                            final.metrics or {})

    entered = time.time()  # set-up (task, data, model, checkpoint load) is timed for `progressive report`
    job = setup_job(plan, stage, dist, dev)
    state = restore_state(job)
    model = distribute(job)
    metrics = _open_metrics(job, on_progress, resumed_at=state.step)
    try:
        clock = _SaveClock(stage.train.checkpoint_every)
        _log_start(job, state, metrics, setup_s=time.time() - entered)
        model.train()
        batches: Iterator[Any] | None = None
        while state.step < job.total:
            if batches is None:
                batches = _epoch_batches(job, state.step)
            done = _train_step(job, model, batches, state)
            if state.step % job.spe == 0:
                batches = None  # epoch done: the next step starts a new epoch (and a new iterator)
            now = time.perf_counter()
            stop, due, loss = _agree(job, stop_requested(), clock.due(state.step, now), done.loss_sum)
            state.elapsed_s += now - done.t0
            _log_step(job, state, metrics, done, loss, now - done.t0)
            _log_saves(job, metrics)
            if stop:
                return _stop(job, state, metrics)
            if due and state.step < job.total:
                _save(job, state, metrics, "periodic")
                clock.saved()
        del batches
        return _finish(job, state, metrics)
    finally:
        metrics.close()


def _open_metrics(job: StageJob, on_progress: Callable[[dict[str, Any]], None] | None, *, resumed_at: int) -> MetricsWriter:
    """Rank 0's metrics stream (a no-op writer on the other ranks)."""
    main, path = job.dist.is_main, Path(job.stage.metrics_path)
    if not main:
        return MetricsWriter(None)
    tensorboard = job.plan.tracking.tensorboard or job.stage.train.tensorboard
    try:
        hub = open_hub(job.plan, job.stage, resumed_at)
    except Exception as exc:  # noqa: BLE001  (a tracker can never stop training: no hub, one warning)
        log.warning("tracking off for this job: %s: %s", type(exc).__name__, exc)
        hub = None
    if hub is None:
        return MetricsWriter(path, on_event=on_progress, tensorboard_dir=path.parent / TENSORBOARD_DIR if tensorboard else None)

    def fan_out(event: dict[str, Any]) -> None:
        hub.event(event)
        if on_progress is not None:
            on_progress(event)

    return MetricsWriter(path, on_event=fan_out, on_close=hub.close,
                         tensorboard_dir=path.parent / TENSORBOARD_DIR if tensorboard else None)


def _log_start(job: StageJob, state: TrainState, metrics: MetricsWriter, *, setup_s: float) -> None:
    stage, dist = job.stage, job.dist
    if dist.is_main:
        log.info("stage %s: %s at step %d/%d on %s (%s, world size %d)", stage.name,
                 f"resuming {state.resumed_from}" if state.resumed_from else f"starting ({stage.init_from.kind} init)",
                 state.step, job.total, job.dev, job.precision, dist.world_size)
    hosts = rank_hosts(dist)  # a collective: every rank takes part, rank 0 records it
    metrics.write({"event": "start", "stage": stage.name, "step": state.step, "total_steps": job.total,
                   "resumed_from": state.resumed_from,
                   "init_from": None if state.resumed_from or stage.init_from.kind == "none" else stage.init_from.checkpoint,
                   "world_size": dist.world_size, "hosts": hosts, "nodes": sorted(set(hosts or [])),
                   "device": str(job.dev),
                   "precision": job.precision, "time": time.time(), "setup_s": setup_s, "notes": metrics.notes})


# --------------------------------------------------------------------------- one optimizer step


def _epoch_batches(job: StageJob, step: int) -> Iterator[Any]:
    """An iterator over the rest of the epoch `step` is in: the sampler restarts at the samples consumed."""
    job.parts.sampler.set_epoch(*job.position(step))
    return iter(job.loader)


def _next_batch(job: StageJob, batches: Iterator[Any], size: int, i: int, step: int) -> Any:
    """Micro-batch `i` of optimizer step `step`, on the device; it must hold `size` samples."""
    batch = next(batches, None)
    if batch is None or job.task.batch_len(batch) != size:
        got = "no batch" if batch is None else f"{job.task.batch_len(batch)} samples"
        raise DataError(f"the loader gave {got} where micro-batch {i} of step {step} needs {size}",
                        loc=job.loc, hint="the sampler must yield ceil(n / world_size) indices per rank from `start`")
    return job.task.to_device(batch, job.dev)


def apply_step(task: Task, model: torch.nn.Module, parts: TrainParts, micro: Iterable[tuple[Any, int]], n_micro: int,
               total: int, autocast: Callable[[], Any], clip: float | None, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The core of an optimizer step: accumulate the gradients of `n_micro` (batch on the device, samples)
    micro-batches, weighted by samples; unscale, clip, apply, zero. Returns (weighted loss sum, grad norm).

    Shared with `progressive.calibrate`, so what calibration times is what the trainer runs.
    """
    loss_sum = torch.zeros((), device=dev)
    for i, (batch, size) in enumerate(micro):
        # Gradients are all-reduced once per optimizer step, on its last micro-batch.
        last = i == n_micro - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
            with autocast():
                loss = task.loss(model, batch, parts.loss_gen)
            # Weight by samples so a short last micro-batch counts for what it holds.
            weighted = loss * (size / total)
            parts.scaler.scale(weighted).backward()
        loss_sum += weighted.detach().float()
    parts.scaler.unscale_(parts.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), clip or float("inf"))
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def _train_step(job: StageJob, model: torch.nn.Module, batches: Iterator[Any], state: TrainState) -> _StepDone:
    """One optimizer step: accumulate its micro-batches' gradients, clip, apply; advances `state.step`."""
    tc, parts = job.stage.train, job.parts
    epoch, _ = job.position(state.step)
    sizes = micro_batch_sizes(job.per_rank, job.stage.batch_size, tc.grad_accum, state.step - epoch * job.spe)
    t0 = time.perf_counter()
    lr = get_lr(state.step, job.total, tc.warmup_frac, tc.lr, tc.min_lr_frac)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr

    micro = ((_next_batch(job, batches, size, i, state.step), size) for i, size in enumerate(sizes))
    loss_sum, grad_norm = apply_step(job.task, model, parts, micro, len(sizes), sum(sizes), job.autocast,
                                     tc.clip_grad_norm, job.dev)
    state.step += 1
    return _StepDone(epoch=epoch, lr=lr, samples=sum(sizes), loss_sum=loss_sum, grad_norm=grad_norm, t0=t0)


def _agree(job: StageJob, stop: bool, due: bool, loss_sum: torch.Tensor) -> tuple[bool, bool, float]:
    """(stop, save due, mean loss) over ranks in one all-reduce: any rank's stop, rank 0's clock.

    Rank 0's failed background save rides along, so that every rank raises, not rank 0 alone while
    the others wait in the next collective.
    """
    failed = job.dist.is_main and job.saver.failed
    stop_v, due_v, loss_v, failed_v = sum_all([float(stop), float(due and job.dist.is_main), float(loss_sum),
                                               float(failed)], job.dist, job.dev)
    if failed_v > 0:
        if job.dist.is_main:
            job.saver.wait()  # raises the write's own error
        raise CheckpointError("rank 0's background checkpoint write failed", loc=job.loc,
                              hint="see rank 0's log for the error (a full disk?)")
    return stop_v > 0, due_v > 0, loss_v / job.dist.world_size


def _log_step(job: StageJob, state: TrainState, metrics: MetricsWriter, done: _StepDone, loss: float, dt: float) -> None:
    if job.dist.is_main and (state.step % job.stage.train.log_every == 0 or state.step == job.total):
        metrics.write({"event": "step", "step": state.step, "total_steps": job.total, "epoch": done.epoch,
                       "loss": loss, "lr": done.lr, "grad_norm": float(done.grad_norm),
                       "samples_per_s": done.samples * job.dist.world_size / max(dt, 1e-9),
                       "peak_mem_mb": peak_memory_mb(job.dev), "time": time.time(), "elapsed_s": state.elapsed_s})


# --------------------------------------------------------------------------- saving and the end


def _save(job: StageJob, state: TrainState, metrics: MetricsWriter, reason: str) -> Path:
    """Checkpoint the state after `state.step`: every rank hands its RNG states to rank 0, which writes one file."""
    t0 = time.perf_counter()
    rngs = gather_to_rank0(job.parts.rng_state(), job.dist)
    path = step_path(job.stage.checkpoint_dir, state.step)
    # The sampler records what training consumed, not how far the loader prefetched; the live
    # iterator already holds its order, so moving the sampler's position does not disturb it.
    job.parts.sampler.set_epoch(*job.position(state.step))
    background = job.stage.train.async_checkpoint and reason == "periodic"
    if job.dist.is_main and rngs is not None:
        job.saver.save(job.parts.capture(job.ident, state, rngs, job.precision).to_dict(), path, state.step, reason,
                       background=background)
        _log_saves(job, metrics, gathered_s=time.perf_counter() - t0 if not background else 0.0)
    if not background:
        barrier(job.dist)  # nobody runs ahead (or returns) before the file is in place
    state.last_saved_step = state.step
    return path


def _log_saves(job: StageJob, metrics: MetricsWriter, gathered_s: float = 0.0) -> None:
    """A metrics line for each save that has finished (a background one ends while training goes on)."""
    if not job.dist.is_main:
        return
    for done in job.saver.finished():
        # seconds: what the save cost the training loop (for a background save only the copy to host memory),
        # as `progressive report` accounts it; write_s: the write itself.
        secs = done.blocked_s if done.background else max(done.blocked_s, gathered_s)
        metrics.write({"event": "checkpoint", "step": done.step, "reason": done.reason, "path": str(done.path),
                       "seconds": secs, "write_s": done.write_s, "background": done.background, "time": time.time()})
        log.info("stage %s: saved %s (%s, %.2fs%s)", job.stage.name, done.path.name, done.reason, done.write_s,
                 f", the loop waited {done.blocked_s:.2f}s" if done.background else "")


def _stop(job: StageJob, state: TrainState, metrics: MetricsWriter) -> StageOutcome:
    """A stop was asked (on some rank): save after this step and say so."""
    path = _save(job, state, metrics, "stop")
    metrics.write({"event": "stopped", "step": state.step, "total_steps": job.total, "checkpoint": str(path),
                   "time": time.time()})
    return StageOutcome("stopped", state.step, job.total, str(path), None, state.resumed_from)


def _evaluate(job: StageJob) -> dict[str, float]:
    """Rank 0's evaluation on the validation split (empty if none is asked or there is none)."""
    tc, stage = job.stage.train, job.stage
    if not job.dist.is_main or tc.eval_samples <= 0 or (stage.samples is not None and stage.samples.get("val", 0) <= 0):
        return {}
    job.parts.model.eval()
    return job.task.evaluate(job.parts.model, job.task.dataset(job.plan.data_path, stage.bucket, "val"), device=job.dev,
                             max_samples=tc.eval_samples)


def _finish(job: StageJob, state: TrainState, metrics: MetricsWriter) -> StageOutcome:
    """Full state first (so a kill during evaluation redoes no step), then evaluation and final.pt."""
    if state.last_saved_step != job.total:
        _save(job, state, metrics, "end")
    t_eval = time.perf_counter()
    results: dict[str, float] = broadcast_from_rank0(_evaluate(job), job.dist)
    eval_s = time.perf_counter() - t_eval
    final_path = str(Path(job.stage.final_checkpoint))
    if job.dist.is_main:
        t_save = time.perf_counter()
        ident = job.ident
        final = FinalCheckpoint(stage=ident.stage, fingerprint=ident.fingerprint, step=job.total, total_steps=job.total,
                                train_samples=ident.train_samples, world_size=ident.world_size,
                                elapsed_s=state.elapsed_s, model=job.parts.model.state_dict(), metrics=results)
        save_atomic(final.to_dict(), final_path)
        log.info("stage %s: completed, final weights %s", job.stage.name, final_path)
        # eval_s / final_save_s: where the end of a stage's time goes (`progressive report`).
        metrics.write({"event": "completed", "step": job.total, "total_steps": job.total, "checkpoint": final_path,
                       "elapsed_s": state.elapsed_s, "eval": results, "eval_s": eval_s,
                       "final_save_s": time.perf_counter() - t_save, "time": time.time()})
    barrier(job.dist)
    return StageOutcome("completed", job.total, job.total, final_path, results, state.resumed_from)
