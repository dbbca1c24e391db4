"""The training loop every stage job runs: `train_stage(plan, stage)`.

Read it top to bottom: set-up (devices, precision, task, data, step counts), the early
exit for a stage already completed, model and optimizer, where the weights come from
(this stage's own checkpoint, else the parent's final weights, else a seeded init),
then the loop of optimizer steps, then evaluation and the final checkpoint.

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
import functools
import logging
import math
import os
import signal
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch.utils.data import DataLoader

from progressive.checkpoint import (
    FORMAT,
    capture_rng,
    check_fingerprint,
    clean_temp_files,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    now_iso,
    prune_checkpoints,
    restore_rng,
    save_atomic,
    step_path,
)
from progressive.config import parse_duration_min
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
from progressive.errors import CheckpointError, ConfigError, DataError
from progressive.metrics import MetricsWriter, peak_memory_mb
from progressive.plan import Plan, StagePlan, steps_per_epoch
from progressive.task import Task, load_task

log = logging.getLogger(__name__)

__all__ = ["StageOutcome", "train_stage", "get_lr", "micro_batch_sizes", "data_position",
           "checkpoint_interval", "resolve_precision"]


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


def resolve_precision(requested: str, device: torch.device) -> tuple[str, torch.dtype | None, bool]:
    """(name, autocast dtype or None, use a GradScaler) for the requested precision on this device.

    auto: bf16 on GPUs that support it, else fp16 with a GradScaler; fp32 on CPU. An
    explicit bf16/fp16 on CPU falls back to fp32 (CPU autocast gains nothing for this
    workload and sparse kernels lack half types).
    """
    if device.type != "cuda" or requested == "fp32":
        return "fp32", None, False
    if requested == "auto":
        requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (requested, torch.bfloat16, False) if requested == "bf16" else ("fp16", torch.float16, True)


def _seed(*parts: Any) -> int:
    # A stable 63-bit seed from its parts (Python's hash() is salted per process).
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63 - 1)


def _worker_init(user_init: Callable[[int], None], signums: tuple[int, ...], worker_id: int) -> None:
    # The pre-timeout signal and Ctrl-C go to the whole process group; workers must outlive them
    # so the main process can finish its step and checkpoint, whatever the task's own init does.
    from progressive.data.loader import ignore_job_signals

    ignore_job_signals(signums)
    user_init(worker_id)


@dataclass
class _State:
    step: int = 0
    elapsed_s: float = 0.0  # training wall time over all jobs of this stage
    last_saved_step: int = -1
    resumed_from: str | None = None


# --------------------------------------------------------------------------- the stage


def train_stage(plan: Plan, stage: StagePlan, *, stop_requested: Callable[[], bool] | None = None,
                on_progress: Callable[[dict[str, Any]], None] | None = None,
                device: str | None = None) -> StageOutcome:
    """Train one stage to completion or until a stop is requested; resumable any number of times.

    Args:
        plan: the run's plan (task, seed, data path).
        stage: the stage to train (its bucket, batch, epochs, train settings, paths, fingerprint).
        stop_requested: polled after every optimizer step; when it returns True (on any rank)
            the step is finished, a checkpoint saved and "stopped" returned.
        on_progress: called on rank 0 with every event dict (steps, checkpoints, end).
        device: "cpu", "cuda", "cuda:1"...; default: this rank's GPU if any, else CPU.

    Raises:
        CheckpointError: resume refused (different settings, corrupt file), parent weights missing
            or of the wrong shapes.
        ConfigError / DataError: bad task, world size unlike the plan's, data unlike the plan's.
    """
    rank, world, local = env_world()
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)  # DDP and the allocator want an explicit device
    if dev.type == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dist_info = init_distributed(dev.type)
    try:
        return _train(plan, stage, dist_info, dev, stop_requested or (lambda: False), on_progress)
    finally:
        shutdown_distributed(dist_info)


def _train(plan: Plan, stage: StagePlan, dist: DistInfo, dev: torch.device, stop_requested: Callable[[], bool],
           on_progress: Callable[[dict[str, Any]], None] | None) -> StageOutcome:
    tc = stage.train
    loc = f"stage {stage.name!r}"
    if dist.world_size != stage.world_size:
        raise ConfigError(f"the stage was planned for {stage.world_size} process(es) but runs with {dist.world_size}",
                          loc=loc, hint="launch one process per task (nodes x tasks_per_node), or change [slurm] to match")
    ckpt_dir = Path(stage.checkpoint_dir)
    final_path = Path(stage.final_checkpoint)
    fingerprint = dict(stage.fingerprint)

    # ---- a stage that already completed (a requeue racing the end, a re-run) is not trained twice
    if final_path.is_file():
        final = load_checkpoint(final_path)
        check_fingerprint(final, fingerprint, final_path)
        return StageOutcome("completed", int(final["step"]), int(final["total_steps"]), str(final_path),
                            final.get("metrics") or {})

    # ---- task, data and step counts
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
    per_rank = math.ceil(n_train / dist.world_size)
    precision, amp_dtype, use_scaler = resolve_precision(tc.precision, dev)
    autocast: Callable[[], Any] = (functools.partial(torch.autocast, dev.type, dtype=amp_dtype)
                                   if amp_dtype is not None else contextlib.nullcontext)

    # ---- model and optimizer (the seed makes every rank build identical initial weights)
    torch.manual_seed(plan.seed)
    model = task.build_model().to(dev)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(dev.type, enabled=use_scaler)
    loss_gen = torch.Generator(device=dev).manual_seed(_seed(plan.seed, stage.name, "loss", dist.rank))
    # Per-rank streams for anything random beyond the loss (dropout, augmentation in a user's task).
    torch.manual_seed(_seed(plan.seed, stage.name, "torch", dist.rank))

    # ---- where the weights come from: own checkpoint > parent's final weights > fresh init
    st = _State()
    sampler_state: dict[str, int] | None = None
    if dist.is_main:
        clean_temp_files(ckpt_dir)
    barrier(dist)
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        ck = load_checkpoint(resume)  # on CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
        check_fingerprint(ck, fingerprint, resume)
        if ck.get("train_samples") != n_train:
            raise CheckpointError(f"the checkpoint was written for {ck.get('train_samples')} training samples, "
                                  f"the data now has {n_train}", loc=str(resume),
                                  hint="use the data file the run started with, or start a new run")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        restore_rng(ck["rng"][dist.rank], loss_gen)
        st.step, st.elapsed_s, st.last_saved_step, st.resumed_from = int(ck["step"]), float(ck["elapsed_s"]), int(ck["step"]), str(resume)
        sampler_state = ck.get("sampler")
        del ck
    elif stage.init_from.kind in ("stage", "path"):
        _init_weights(model, stage, loc)

    raw_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    # ---- data loader: this rank's shard, restartable mid-epoch
    from progressive.data.loader import ResumableSampler

    sampler = ResumableSampler(n_train, seed=plan.seed, rank=dist.rank, world_size=dist.world_size, shuffle=True)
    if sampler_state is not None:
        sampler.load_state_dict(sampler_state)  # checks the data order's seed; the loop sets the position
    from progressive.data.loader import JOB_SIGNALS

    signums = tuple({*JOB_SIGNALS, getattr(signal, f"SIG{stage.slurm.signal}")})
    loader = DataLoader(train_ds, batch_size=stage.batch_size, sampler=sampler, collate_fn=task.collate,
                        num_workers=tc.num_workers, pin_memory=dev.type == "cuda", drop_last=False,
                        # Its own generator: iter(loader) would otherwise draw from the global torch RNG,
                        # and a resumed job calls iter() at a point where an uninterrupted one did not.
                        generator=torch.Generator().manual_seed(_seed(plan.seed, stage.name, "loader", dist.rank)),
                        worker_init_fn=functools.partial(_worker_init, task.worker_init_fn, signums)
                        if tc.num_workers > 0 else None)

    metrics = MetricsWriter(stage.metrics_path if dist.is_main else None, on_event=on_progress if dist.is_main else None,
                            tensorboard_dir=Path(stage.metrics_path).parent / "tensorboard"
                            if dist.is_main and tc.tensorboard else None)
    every_kind, every = checkpoint_interval(tc.checkpoint_every)
    job_start = time.time()
    last_save_time = time.perf_counter()
    if dist.is_main:
        log.info("stage %s: %s at step %d/%d on %s (%s, world size %d)", stage.name,
                 f"resuming {st.resumed_from}" if st.resumed_from else f"starting ({stage.init_from.kind} init)",
                 st.step, total, dev, precision, dist.world_size)
    hosts = rank_hosts(dist)  # a collective: every rank takes part, rank 0 records it
    metrics.write({"event": "start", "stage": stage.name, "step": st.step, "total_steps": total,
                   "resumed_from": st.resumed_from,
                   "init_from": None if st.resumed_from or stage.init_from.kind == "none" else stage.init_from.checkpoint,
                   "world_size": dist.world_size, "hosts": hosts, "nodes": sorted(set(hosts or [])),
                   "device": str(dev), "precision": precision, "time": job_start, "notes": metrics.notes})

    def save_state(reason: str) -> Path:
        # Every rank hands its RNG states to rank 0, which writes one file for all of them.
        t0 = time.perf_counter()
        rngs = gather_to_rank0(capture_rng(loss_gen), dist)
        path = step_path(ckpt_dir, st.step)
        if dist.is_main:
            epoch, in_epoch = data_position(st.step, spe, stage.batch_size, tc.grad_accum)
            save_atomic({
                "format": FORMAT, "kind": "state", "stage": stage.name, "fingerprint": fingerprint,
                "step": st.step, "total_steps": total, "epoch": epoch, "epoch_samples": min(in_epoch, per_rank),
                "train_samples": n_train, "world_size": dist.world_size, "elapsed_s": st.elapsed_s,
                # The sampler's own record of the position (the trainer recomputes it from `step`).
                "sampler": {"seed": plan.seed, "epoch": epoch, "start": min(in_epoch, per_rank)},
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": {"kind": "warmup_cosine", "step": st.step, "total": total},
                "scaler": scaler.state_dict() if use_scaler else None, "rng": rngs,
                "saved_at": now_iso(), "torch_version": str(torch.__version__),
            }, path)
            prune_checkpoints(ckpt_dir, tc.keep_checkpoints)
            secs = time.perf_counter() - t0
            metrics.write({"event": "checkpoint", "step": st.step, "reason": reason, "path": str(path),
                           "seconds": secs, "time": time.time()})
            log.info("stage %s: saved %s (%s, %.2fs)", stage.name, path.name, reason, secs)
        barrier(dist)  # nobody runs ahead (or returns) before the file is in place
        st.last_saved_step = st.step
        return path

    # ---- the loop: one iteration = one optimizer step
    model.train()
    try:
        it = None
        while st.step < total:
            epoch, in_epoch = data_position(st.step, spe, stage.batch_size, tc.grad_accum)
            if it is None:
                sampler.set_epoch(epoch, start=in_epoch)
                it = iter(loader)
            step_in_epoch = st.step - epoch * spe
            sizes = micro_batch_sizes(per_rank, stage.batch_size, tc.grad_accum, step_in_epoch)
            t0 = time.perf_counter()
            lr = get_lr(st.step, total, tc.warmup_frac, tc.lr, tc.min_lr_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_sum = torch.zeros((), device=dev)
            for i, size in enumerate(sizes):
                batch = next(it, None)
                if batch is None or task.batch_len(batch) != size:
                    got = "no batch" if batch is None else f"{task.batch_len(batch)} samples"
                    raise DataError(f"the loader gave {got} where micro-batch {i} of step {st.step} needs {size}",
                                    loc=loc, hint="the sampler must yield ceil(n / world_size) indices per rank from `start`")
                batch = task.to_device(batch, dev)
                # Gradients are all-reduced once per optimizer step, on its last micro-batch.
                sync = contextlib.nullcontext() if not dist.enabled or i == len(sizes) - 1 else model.no_sync()
                with sync:
                    with autocast():
                        loss = task.loss(model, batch, loss_gen)
                    # Weight by samples so a short last micro-batch counts for what it holds.
                    weighted = loss * (size / sum(sizes))
                    scaler.scale(weighted).backward()
                loss_sum += weighted.detach().float()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.clip_grad_norm or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            st.step += 1
            if st.step % spe == 0:
                it = None  # epoch done: the next step starts a new epoch (and a new iterator)

            # One all-reduce: any rank's stop request, rank 0's clock for time-based saves, the loss.
            now = time.perf_counter()
            due = (st.step % int(every) == 0) if every_kind == "steps" else (now - last_save_time >= every)
            stop_v, due_v, loss_v = sum_all([float(stop_requested()), float(due and dist.is_main), float(loss_sum)],
                                            dist, dev)
            dt = now - t0
            st.elapsed_s += dt
            if dist.is_main and (st.step % tc.log_every == 0 or st.step == total):
                metrics.write({"event": "step", "step": st.step, "total_steps": total, "epoch": epoch,
                               "loss": loss_v / dist.world_size, "lr": lr, "grad_norm": float(grad_norm),
                               "samples_per_s": sum(sizes) * dist.world_size / max(dt, 1e-9),
                               "peak_mem_mb": peak_memory_mb(dev), "time": time.time(), "elapsed_s": st.elapsed_s})
            if stop_v > 0:
                path = save_state("stop")
                metrics.write({"event": "stopped", "step": st.step, "total_steps": total, "checkpoint": str(path),
                               "time": time.time()})
                return StageOutcome("stopped", st.step, total, str(path), None, st.resumed_from)
            if due_v > 0 and st.step < total:
                save_state("periodic")
                last_save_time = time.perf_counter()
        del it

        # ---- the end: full state first (so a kill during eval redoes no step), then eval and final.pt
        if st.last_saved_step != total:
            save_state("end")
        results: dict[str, float] = {}
        if dist.is_main and tc.eval_samples > 0 and (stage.samples is None or stage.samples.get("val", 0) > 0):
            raw_model.eval()
            results = task.evaluate(raw_model, task.dataset(plan.data_path, stage.bucket, "val"), device=dev,
                                    max_samples=tc.eval_samples)
        results = broadcast_from_rank0(results, dist)
        if dist.is_main:
            save_atomic({"format": FORMAT, "kind": "final", "stage": stage.name, "fingerprint": fingerprint,
                         "step": total, "total_steps": total, "train_samples": n_train, "world_size": dist.world_size,
                         "elapsed_s": st.elapsed_s, "model": raw_model.state_dict(), "metrics": results,
                         "saved_at": now_iso(), "torch_version": str(torch.__version__)}, final_path)
            log.info("stage %s: completed, final weights %s", stage.name, final_path)
            metrics.write({"event": "completed", "step": total, "total_steps": total, "checkpoint": str(final_path),
                           "elapsed_s": st.elapsed_s, "eval": results, "time": time.time()})
        barrier(dist)
        return StageOutcome("completed", total, total, str(final_path), results, st.resumed_from)
    finally:
        metrics.close()


def _init_weights(model: torch.nn.Module, stage: StagePlan, loc: str) -> None:
    """Load the parent's (or a given file's) weights into `model`; fresh optimizer and schedule follow."""
    ref = stage.init_from
    path = Path(ref.checkpoint or "")
    if not path.is_file():
        what = f"parent stage {ref.stage!r} has no final checkpoint" if ref.kind == "stage" else "init_from file not found"
        raise CheckpointError(f"{what}: {path}", loc=loc,
                              hint="run the parent stage to completion first" if ref.kind == "stage"
                              else "check the init_from path in the stage graph")
    weights = load_weights(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes))
        if missing:
            parts.append("missing from the checkpoint: " + ", ".join(missing))
        if unexpected:
            parts.append("not in the model: " + ", ".join(unexpected))
        raise CheckpointError(f"weights in {path} do not fit this stage's model: " + " | ".join(parts), loc=loc,
                              hint="the parent must use the same task and [model.options] (hidden size, layers)")
    model.load_state_dict(weights)
