"""A stage job's set-up: what is fixed while its loop runs, and where training starts.

`setup_job` builds the task, data, step counts, precision, model, optimizer, sampler and loader,
all fresh and seeded; `restore_state` picks where training starts (this stage's own checkpoint,
chosen by rank 0 for every rank, else the parent's final weights, else the seeded init) and
continues in the precision the checkpoint was written in; `distribute` wraps the model in DDP
and primes its gradient buckets so that every job reduces in the same order. The loop that runs
on top of a `StageJob` is `progressive.trainer`'s.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from progressive.checkpoint import clean_temp_files, latest_checkpoint, restore_rng
from progressive.config import TrainConfig
from progressive.data.loader import ResumableSampler, make_loader
from progressive.devices import autocast_for, bf16_supported, keep_precision, resolve_precision
from progressive.distributed import DistInfo, broadcast_from_rank0, gather_to_rank0, sum_all
from progressive.errors import CheckpointError, DataError, ProgressiveError
from progressive.plan import Plan, StagePlan, steps_per_epoch
from progressive.saver import CheckpointWriter
from progressive.signals import job_signals
from progressive.task import Task, load_task
from progressive.train_state import StageIdentity, TrainParts, TrainState, init_weights, load_state

__all__ = ["StageJob", "setup_job", "restore_state", "distribute", "make_optimizer", "stable_seed", "data_position"]


def data_position(step: int, spe: int, batch_size: int, grad_accum: int) -> tuple[int, int]:
    """(epoch, samples of that epoch this rank has consumed) after `step` optimizer steps."""
    epoch, in_epoch = divmod(step, spe)
    return epoch, in_epoch * batch_size * grad_accum


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on `parts` (Python's hash() is salted per process)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63 - 1)


@dataclass
class StageJob:
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


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases and norms)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))


def setup_job(plan: Plan, stage: StagePlan, dist: DistInfo, dev: torch.device) -> StageJob:
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
    # One precision for every rank: a job spanning two GPU models takes what all of them have.
    bf16 = bf16_supported(dev)
    if dist.enabled:
        bf16 = sum_all([float(bf16)], dist, dev)[0] == dist.world_size
    precision = resolve_precision(tc.precision, dev.type, bf16)

    torch.manual_seed(plan.seed)  # every rank builds identical initial weights
    model = task.build_model().to(dev)
    parts = TrainParts(model=model, optimizer=make_optimizer(model, tc), scaler=torch.amp.GradScaler(dev.type, enabled=precision == "fp16"),
                       sampler=ResumableSampler(n_train, seed=plan.seed, rank=dist.rank, world_size=dist.world_size),
                       loss_gen=torch.Generator(device=dev).manual_seed(stable_seed(plan.seed, stage.name, "loss", dist.rank)))
    # Per-rank streams for anything random beyond the loss (dropout, augmentation in a user's task).
    torch.manual_seed(stable_seed(plan.seed, stage.name, "torch", dist.rank))

    # This rank's shard, restartable mid-epoch; workers outlive the job's signals, the stage's own included.
    loader = make_loader(train_ds, parts.sampler, stage.batch_size, tc.num_workers, pin_memory=dev.type == "cuda",
                         collate_fn=task.collate, worker_init=task.worker_init_fn,
                         signals=job_signals(stage.slurm.signal),
                         # Its own generator: iter(loader) would otherwise draw from the global torch RNG,
                         # and a resumed job calls iter() at a point where an uninterrupted one did not.
                         generator=torch.Generator().manual_seed(stable_seed(plan.seed, stage.name, "loader", dist.rank)))
    ident = StageIdentity(stage=stage.name, fingerprint=dict(stage.fingerprint), total_steps=total,
                          train_samples=n_train, world_size=dist.world_size)
    return StageJob(plan=plan, stage=stage, dist=dist, dev=dev, task=task, parts=parts, loader=loader, ident=ident,
                spe=spe, per_rank=math.ceil(n_train / dist.world_size), precision=precision,
                autocast=autocast_for(precision, dev), saver=CheckpointWriter(stage.checkpoint_dir, tc.keep_checkpoints))


def restore_state(job: StageJob) -> TrainState:
    """Where training starts: this stage's own checkpoint > the parent's final weights > the seeded init."""
    state = TrainState()
    path = _choose_checkpoint(job)
    failed: ProgressiveError | None = None
    try:
        if path is not None:
            ck = load_state(path, job.ident)
            _adopt_precision(job, ck.precision, str(path))
            job.parts.restore(ck, rank=job.dist.rank, position=job.position(ck.step), path=path)
            state.load_state_dict(ck.to_dict(), source=str(path))
        elif job.stage.init_from.kind in ("stage", "path"):
            init_weights(job.parts.model, job.stage.init_from, job.loc)
    except ProgressiveError as exc:
        failed = exc
    raise_together(job.dist, failed)
    return state


def raise_together(dist: DistInfo, error: ProgressiveError | None) -> None:
    """Raise on every rank when any rank failed (the first rank's error), so none waits in a collective.

    A file another node cannot see yet, a precision one GPU lacks: a failure can be one rank's alone.
    """
    if not dist.enabled:
        if error is not None:
            raise error
        return
    mine = (type(error).__name__, error.msg, error.loc or "", error.hint or "") if error is not None else None
    gathered = gather_to_rank0(mine, dist)
    first = broadcast_from_rank0(next((e for e in gathered or [] if e is not None), None), dist)
    if first is not None:
        if error is not None:
            raise error
        raise CheckpointError(f"another rank could not resume: {first[1]}", loc=first[2] or None, hint=first[3] or None)


def _choose_checkpoint(job: StageJob) -> Path | None:
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
        except OSError as exc:
            choice = (None, (f"cannot read the checkpoint folder: {exc}", str(ckpt_dir), ""))
    path, error = broadcast_from_rank0(choice, job.dist)
    if error is not None:
        raise CheckpointError(error[0], loc=error[1] or None, hint=error[2] or None)
    return Path(path) if path is not None else None


def _adopt_precision(job: StageJob, saved: str | None, path: str) -> None:
    """Continue in the precision the checkpoint was written in (a requeue may land on another GPU model)."""
    kept = keep_precision(saved, job.precision, job.dev.type, bf16_supported(job.dev), path)
    if kept != job.precision:
        job.precision, job.autocast = kept, autocast_for(kept, job.dev)
        job.parts.scaler = torch.amp.GradScaler(job.dev.type, enabled=kept == "fp16")


def distribute(job: StageJob) -> torch.nn.Module:
    """The model the loss calls: wrapped in DDP once its weights are in place, or the bare model alone."""
    if not job.dist.enabled:
        return job.parts.model
    ddp = DistributedDataParallel(job.parts.model, device_ids=[job.dev.index] if job.dev.type == "cuda" else None)
    _prime_buckets(job, ddp)
    return ddp


def _prime_buckets(job: StageJob, ddp: DistributedDataParallel) -> None:
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
