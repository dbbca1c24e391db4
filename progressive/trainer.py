"""The training loop every stage job runs: `train_stage(plan, stage)`.

`_train` reads top to bottom: set up (task, data, model, optimizer, loader), restore (this
stage's own checkpoint, else the parent's final weights, else a seeded init), then one
`_train_step` per optimizer step, saving when a stop is asked or a checkpoint is due, then
`_finish` (evaluation and final.pt). What a checkpoint holds, and how each part goes into it
and comes back out, is `progressive.train_state`'s business.

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
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from progressive.checkpoint import clean_temp_files, latest_checkpoint, restore_rng, save_atomic, step_path
from progressive.data.loader import ResumableSampler, make_loader
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
    autocast_for,
    bf16_supported,
    keep_precision,
    pick_device,
    resolve_precision,
    set_numerics,
    visible_gpus,
)
from progressive.errors import CheckpointError, ConfigError, DataError
from progressive.layout import TENSORBOARD_DIR
from progressive.metrics import MetricsWriter, peak_memory_mb
from progressive.config import TrainConfig
from progressive.plan import Plan, StagePlan, steps_per_epoch
from progressive.saver import CheckpointWriter
from progressive.signals import job_signals
from progressive.task import Task, load_task
from progressive.tracking.hub import open_hub
from progressive.train_state import (
    FinalCheckpoint,
    StageIdentity,
    TrainParts,
    TrainState,
    init_weights,
    load_final,
    load_state,
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


def data_position(step: int, spe: int, batch_size: int, grad_accum: int) -> tuple[int, int]:
    """(epoch, samples of that epoch this rank has consumed) after `step` optimizer steps."""
    epoch, in_epoch = divmod(step, spe)
    return epoch, in_epoch * batch_size * grad_accum


def checkpoint_interval(value: str | int) -> tuple[Literal["steps", "seconds"], float]:
    """`train.checkpoint_every` as ("steps", k) for an int, or ("seconds", s) for a duration string."""
    if isinstance(value, int):
        return "steps", float(value)
    return "seconds", parse_duration_min(value) * 60.0


def _seed(*parts: Any) -> int:
    # A stable 63-bit seed from its parts (Python's hash() is salted per process).
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63 - 1)


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


@dataclass
class _Job:
    """This job's set-up of a stage: fixed while the loop runs (the progress lives in a TrainState)."""

    plan: Plan
    stage: StagePlan
    dist: DistInfo
    dev: torch.device
    task: Task
    parts: TrainParts
    loader: DataLoader[Any]
    ident: StageIdentity
    spe: int  # optimizer steps per epoch
    per_rank: int  # samples per rank per epoch
    precision: str
    autocast: Callable[[], Any]
    saver: CheckpointWriter  # rank 0's step-checkpoint writes (in the background with async_checkpoint)

    @property
    def loc(self) -> str:
        return f"stage {self.stage.name!r}"

    @property
    def total(self) -> int:
        return self.ident.total_steps

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, samples of it this rank has consumed) after `step` optimizer steps."""
        epoch, in_epoch = data_position(step, self.spe, self.stage.batch_size, self.stage.train.grad_accum)
        return epoch, min(in_epoch, self.per_rank)


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
    job = _setup(plan, stage, dist, dev)
    state = _restore(job)
    model = _distribute(job)
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


# --------------------------------------------------------------------------- set-up and restore


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases and norms)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))


def _setup(plan: Plan, stage: StagePlan, dist: DistInfo, dev: torch.device) -> _Job:
    """Task, data, step counts, precision, model, optimizer, sampler and loader, all fresh."""
    tc, loc = stage.train, f"stage {stage.name!r}"
    task: Task = load_task(plan.model.task, plan.model.options)
    train_ds = task.dataset(plan.data_path, stage.bucket, "train")
    n_train = len(train_ds)  # type: ignore[arg-type]
    if n_train == 0:
        raise DataError(f"bucket n={stage.bucket} has no training samples", loc=f"{plan.data_path}: {loc}")
    spe = steps_per_epoch(n_train, stage.batch_size, dist.world_size, tc.grad_accum)
    total = spe * stage.epochs
    if stage.total_steps is not None and stage.total_steps != total:
        raise DataError(f"the training split has {n_train} samples ({total} steps) but the plan counted "
                        f"{stage.samples and stage.samples.get('train')} ({stage.total_steps} steps)",
                        loc=f"{plan.data_path}: {loc}", hint="the data file changed since the plan was made: re-plan the run")
    precision = resolve_precision(tc.precision, dev.type, bf16_supported(dev))

    torch.manual_seed(plan.seed)  # every rank builds identical initial weights
    model = task.build_model().to(dev)
    parts = TrainParts(model=model, optimizer=make_optimizer(model, tc), scaler=torch.amp.GradScaler(dev.type, enabled=precision == "fp16"),
                       sampler=ResumableSampler(n_train, seed=plan.seed, rank=dist.rank, world_size=dist.world_size),
                       loss_gen=torch.Generator(device=dev).manual_seed(_seed(plan.seed, stage.name, "loss", dist.rank)))
    # Per-rank streams for anything random beyond the loss (dropout, augmentation in a user's task).
    torch.manual_seed(_seed(plan.seed, stage.name, "torch", dist.rank))

    # This rank's shard, restartable mid-epoch; workers outlive the job's signals, the stage's own included.
    loader = make_loader(train_ds, parts.sampler, stage.batch_size, tc.num_workers, pin_memory=dev.type == "cuda",
                         collate_fn=task.collate, worker_init=task.worker_init_fn,
                         signals=job_signals(stage.slurm.signal),
                         # Its own generator: iter(loader) would otherwise draw from the global torch RNG,
                         # and a resumed job calls iter() at a point where an uninterrupted one did not.
                         generator=torch.Generator().manual_seed(_seed(plan.seed, stage.name, "loader", dist.rank)))
    ident = StageIdentity(stage=stage.name, fingerprint=dict(stage.fingerprint), total_steps=total,
                          train_samples=n_train, world_size=dist.world_size)
    return _Job(plan=plan, stage=stage, dist=dist, dev=dev, task=task, parts=parts, loader=loader, ident=ident,
                spe=spe, per_rank=math.ceil(n_train / dist.world_size), precision=precision,
                autocast=autocast_for(precision, dev), saver=CheckpointWriter(stage.checkpoint_dir, tc.keep_checkpoints))


def _restore(job: _Job) -> TrainState:
    """Where training starts: this stage's own checkpoint > the parent's final weights > the seeded init."""
    state = TrainState()
    path = _choose_checkpoint(job)
    if path is not None:
        ck = load_state(path, job.ident)
        _adopt_precision(job, ck.precision, str(path))
        job.parts.restore(ck, rank=job.dist.rank, position=job.position(ck.step), path=path)
        state.load_state_dict(ck.to_dict(), source=str(path))
    elif job.stage.init_from.kind in ("stage", "path"):
        init_weights(job.parts.model, job.stage.init_from, job.loc)
    return state


def _choose_checkpoint(job: _Job) -> Path | None:
    """Rank 0 picks the checkpoint every rank resumes from, and tells the others.

    Each rank listing the folder itself could pick different steps: shared file systems cache
    directory listings per node, so a file rank 0 just wrote may not be listed on another node yet.
    """
    choice: tuple[str | None, tuple[str, str, str] | None] = (None, None)
    if job.dist.is_main:
        ckpt_dir = Path(job.stage.checkpoint_dir)
        clean_temp_files(ckpt_dir)
        try:
            found = latest_checkpoint(ckpt_dir)
            choice = (str(found) if found else None, None)
        except CheckpointError as exc:  # every rank must raise it, or the others wait in the broadcast
            choice = (None, (exc.msg, exc.loc or "", exc.hint or ""))
    path, error = broadcast_from_rank0(choice, job.dist)
    if error is not None:
        raise CheckpointError(error[0], loc=error[1] or None, hint=error[2] or None)
    return Path(path) if path is not None else None


def _adopt_precision(job: _Job, saved: str | None, path: str) -> None:
    """Continue in the precision the checkpoint was written in (a requeue may land on another GPU model)."""
    kept = keep_precision(saved, job.precision, job.dev.type, bf16_supported(job.dev), path)
    if kept != job.precision:
        job.precision, job.autocast = kept, autocast_for(kept, job.dev)
        job.parts.scaler = torch.amp.GradScaler(job.dev.type, enabled=kept == "fp16")


def _distribute(job: _Job) -> torch.nn.Module:
    """The model the loss calls: wrapped in DDP once its weights are in place, or the bare model alone."""
    if not job.dist.enabled:
        return job.parts.model
    ddp = DistributedDataParallel(job.parts.model, device_ids=[job.dev.index] if job.dev.type == "cuda" else None)
    _prime_buckets(job, ddp)
    return ddp


def _prime_buckets(job: _Job, ddp: DistributedDataParallel) -> None:
    """One forward and backward that leaves no trace, so DDP re-buckets before the first real step.

    DDP reduces its first iteration with buckets in parameter order, then rebuilds them in the
    order gradients became ready. Without this, the first step of every job (a resumed one
    included) would reduce each gradient at another buffer position, so in another summation
    order over 3+ ranks, than the same step of an uninterrupted run: resume would not be bitwise
    (tests/test_trainer_ddp.py, 4 ranks). With it every real step of every job uses the rebuilt
    buckets. Cheaper than find_unused_parameters=True (which never rebuilds, at the price of an
    autograd-graph walk every step; benchmarks/bench_ddp.py). RNG states and buffers (batch-norm
    statistics) are put back and the gradients dropped, so training is as if it had not run.
    """
    parts = job.parts
    rngs = parts.rng_state()
    buffers = {name: b.detach().clone() for name, b in parts.model.named_buffers()}
    batch = job.task.to_device(job.task.collate([job.loader.dataset[0]]), job.dev)
    was_training = ddp.training
    ddp.train()
    with job.autocast():
        loss = job.task.loss(ddp, batch, parts.loss_gen)
    loss.float().backward()
    ddp.train(was_training)
    for param in parts.model.parameters():
        param.grad = None
    with torch.no_grad():
        for name, b in parts.model.named_buffers():
            b.copy_(buffers[name])
    restore_rng(rngs, parts.loss_gen)


def _open_metrics(job: _Job, on_progress: Callable[[dict[str, Any]], None] | None, *, resumed_at: int) -> MetricsWriter:
    """Rank 0's metrics stream (a no-op writer on the other ranks)."""
    main, path = job.dist.is_main, Path(job.stage.metrics_path)
    if not main:
        return MetricsWriter(None)
    tensorboard = job.plan.tracking.tensorboard or job.stage.train.tensorboard
    hub = open_hub(job.plan, job.stage, resumed_at)
    if hub is None:
        return MetricsWriter(path, on_event=on_progress, tensorboard_dir=path.parent / TENSORBOARD_DIR if tensorboard else None)

    def fan_out(event: dict[str, Any]) -> None:
        hub.event(event)
        if on_progress is not None:
            on_progress(event)

    return MetricsWriter(path, on_event=fan_out, on_close=hub.close,
                         tensorboard_dir=path.parent / TENSORBOARD_DIR if tensorboard else None)


def _log_start(job: _Job, state: TrainState, metrics: MetricsWriter, *, setup_s: float) -> None:
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


def _epoch_batches(job: _Job, step: int) -> Iterator[Any]:
    """An iterator over the rest of the epoch `step` is in: the sampler restarts at the samples consumed."""
    job.parts.sampler.set_epoch(*job.position(step))
    return iter(job.loader)


def _next_batch(job: _Job, batches: Iterator[Any], size: int, i: int, step: int) -> Any:
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


def _train_step(job: _Job, model: torch.nn.Module, batches: Iterator[Any], state: TrainState) -> _StepDone:
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


def _agree(job: _Job, stop: bool, due: bool, loss_sum: torch.Tensor) -> tuple[bool, bool, float]:
    """(stop, save due, mean loss) over ranks in one all-reduce: any rank's stop, rank 0's clock."""
    stop_v, due_v, loss_v = sum_all([float(stop), float(due and job.dist.is_main), float(loss_sum)], job.dist, job.dev)
    return stop_v > 0, due_v > 0, loss_v / job.dist.world_size


def _log_step(job: _Job, state: TrainState, metrics: MetricsWriter, done: _StepDone, loss: float, dt: float) -> None:
    if job.dist.is_main and (state.step % job.stage.train.log_every == 0 or state.step == job.total):
        metrics.write({"event": "step", "step": state.step, "total_steps": job.total, "epoch": done.epoch,
                       "loss": loss, "lr": done.lr, "grad_norm": float(done.grad_norm),
                       "samples_per_s": done.samples * job.dist.world_size / max(dt, 1e-9),
                       "peak_mem_mb": peak_memory_mb(job.dev), "time": time.time(), "elapsed_s": state.elapsed_s})


# --------------------------------------------------------------------------- saving and the end


def _save(job: _Job, state: TrainState, metrics: MetricsWriter, reason: str) -> Path:
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


def _log_saves(job: _Job, metrics: MetricsWriter, gathered_s: float = 0.0) -> None:
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


def _stop(job: _Job, state: TrainState, metrics: MetricsWriter) -> StageOutcome:
    """A stop was asked (on some rank): save after this step and say so."""
    path = _save(job, state, metrics, "stop")
    metrics.write({"event": "stopped", "step": state.step, "total_steps": job.total, "checkpoint": str(path),
                   "time": time.time()})
    return StageOutcome("stopped", state.step, job.total, str(path), None, state.resumed_from)


def _evaluate(job: _Job) -> dict[str, float]:
    """Rank 0's evaluation on the validation split (empty if none is asked or there is none)."""
    tc, stage = job.stage.train, job.stage
    if not job.dist.is_main or tc.eval_samples <= 0 or (stage.samples is not None and stage.samples.get("val", 0) <= 0):
        return {}
    job.parts.model.eval()
    return job.task.evaluate(job.parts.model, job.task.dataset(job.plan.data_path, stage.bucket, "val"), device=job.dev,
                             max_samples=tc.eval_samples)


def _finish(job: _Job, state: TrainState, metrics: MetricsWriter) -> StageOutcome:
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
