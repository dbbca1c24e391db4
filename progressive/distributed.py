"""DDP plumbing for the trainer: process group from the environment, and the few collectives it needs.

The caller (a Slurm job wrapper via submitit, or torchrun) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (or with WORLD_SIZE=1) training
is single-process and every helper here is a no-op.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from progressive.errors import ProgressiveError

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "sum_all", "gather_to_rank0",
           "broadcast_from_rank0", "barrier", "rank_hosts"]

DDP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group is in use
    owns_group: bool = False  # we created it, so we destroy it

    @property
    def is_main(self) -> bool:
        """Rank 0: the only writer of checkpoints and metrics."""
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment; (0, 1, 0) when unset."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ProgressiveError(f"bad torch.distributed environment: {exc}", loc="environment",
                               hint="RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    return rank, world, local


def init_distributed(dev: torch.device, timeout_min: float = 30.0) -> DistInfo:
    """Join (or create) the default process group when WORLD_SIZE > 1: NCCL on GPU, gloo on CPU.

    On a GPU the rank's device is made current and handed to the process group (`device_id`)
    before NCCL starts, so its communicator is bound to that device and never to cuda:0.
    `timeout_min` bounds every collective: it must cover what the other ranks wait for (rank 0's
    evaluation and checkpoint saves).
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env_world()[2], True, False)
    rank, world, local = env_world()
    if world <= 1:
        return DistInfo()
    missing = [k for k in DDP_ENV if k not in os.environ and k != "LOCAL_RANK"]
    if missing:
        raise ProgressiveError(f"WORLD_SIZE={world} but {', '.join(missing)} unset", loc="environment",
                               hint="launch with torchrun or the Slurm job wrapper, which set all of "
                                    "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT")
    timeout = timedelta(minutes=timeout_min)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and object collectives need the device chosen first
        dist.init_process_group(backend="nccl", rank=rank, world_size=world, timeout=timeout, device_id=dev)
    else:
        dist.init_process_group(backend="gloo", rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank, world, local, True, True)


def shutdown_distributed(info: DistInfo) -> None:
    """Destroy the process group if `init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def sum_all(values: Sequence[float], info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (one small all-reduce); identity without DDP."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_to_rank0(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's `obj` as a list on rank 0 (None elsewhere); `[obj]` without DDP."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_rank0(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op without DDP)."""
    if info.enabled:
        dist.barrier()


def rank_hosts(info: DistInfo) -> list[str] | None:
    """Each rank's host name, in rank order, on rank 0 (None elsewhere): where the ranks really run."""
    return gather_to_rank0(socket.gethostname(), info)
