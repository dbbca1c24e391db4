"""Which device a rank trains on, in which precision, with which numerics: one owner for all three.

- `pick_device`: the device comes from the plan (`gpus_per_node`) and from what Slurm bound to the
  task (the GPUs CUDA can see), never from `torch.cuda.is_available()` alone: a `gpus_per_node = 0`
  stage trains on the CPU even on a GPU node, and a rank uses the GPU Slurm gave it whether the
  site binds one GPU per task (each task sees one device, index 0) or shows every task all of them.
- `resolve_precision` / `keep_precision`: what `precision = "auto"` means on this GPU, and the rule
  that a stage keeps the precision it started with when a requeue lands on another GPU model.
- `set_numerics`: TF32 only when asked, deterministic kernels when asked, set before the first
  CUDA kernel, the same way for the trainer and for calibration.

Pure functions take what they decide on as arguments, so the tests run them without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import TYPE_CHECKING, Any, Callable

from progressive.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

    from progressive.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["pick_device", "visible_gpus", "resolve_precision", "keep_precision", "set_numerics", "autocast_for",
           "bf16_supported", "CUBLAS_WORKSPACE"]

# What cuBLAS needs for reproducible results (PyTorch's reproducibility notes): exported by the job
# script when `deterministic = true`, and set here before CUDA starts for local runs.
CUBLAS_WORKSPACE = ":4096:8"


def visible_gpus() -> int:
    """GPUs this process can use (0 without CUDA); CUDA_VISIBLE_DEVICES (set by Slurm) already applied."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(gpus_per_node: int, tasks_per_node: int, local_rank: int, visible: int, *,
                require_gpu: bool = False) -> str:
    """This rank's device: "cpu" or "cuda:i".

    Args:
        gpus_per_node: the plan's request (0: a CPU stage, whatever the node has).
        tasks_per_node: ranks on this node (the plan's).
        local_rank: this rank's index on its node (SLURM_LOCALID / LOCAL_RANK).
        visible: GPUs this process sees (after Slurm's CUDA_VISIBLE_DEVICES).
        require_gpu: a Slurm job: a GPU stage that sees no GPU is an error, not a silent CPU run.

    Raises:
        ConfigError: a GPU stage with no GPU visible (when required), or more ranks than GPUs visible.
    """
    if gpus_per_node <= 0:
        return "cpu"
    if visible == 0:
        if require_gpu:
            raise ConfigError(f"the stage asks for {gpus_per_node} GPU(s) per node but this task sees none",
                              loc=f"rank {local_rank} on {os.uname().nodename}",
                              hint="check the partition has GPUs and that torch is a CUDA build "
                                   "(`progressive doctor --gpu` on a compute node)")
        log.warning("the stage asks for %d GPU(s) but none is visible: training on the CPU", gpus_per_node)
        return "cpu"
    if visible == 1:
        return "cuda:0"  # the site binds one GPU per task (or the node has one): it is ours
    if local_rank < visible:
        return f"cuda:{local_rank}"  # every task sees the node's GPUs: take the one of our local index
    raise ConfigError(f"local rank {local_rank} sees {visible} GPUs, fewer than the {tasks_per_node} tasks on its node",
                      loc=f"rank {local_rank} on {os.uname().nodename}",
                      hint="ask for one GPU per task (gpus_per_node = tasks_per_node) or fewer tasks per node")


def resolve_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """The precision a job trains in: "fp32", "bf16" or "fp16".

    auto: bf16 on GPUs that support it natively, else fp16 (with a GradScaler); fp32 on CPU.
    An explicit bf16/fp16 on CPU falls back to fp32 (the sparse kernels have no half types on
    CPU and CPU autocast gains nothing for this workload).
    """
    if device_type != "cuda" or requested == "fp32":
        return "fp32"
    if requested == "auto":
        return "bf16" if bf16_supported else "fp16"
    if requested == "bf16" and not bf16_supported:
        raise ConfigError("precision = \"bf16\" but this GPU has no native bf16", loc="[train] precision",
                          hint="use \"fp16\" (with a GradScaler) or \"auto\" on this GPU model")
    return requested


def keep_precision(saved: str | None, resolved: str, device_type: str, bf16_supported: bool, path: str) -> str:
    """The precision a resumed job continues in: the one its checkpoint was written in.

    A requeue onto another GPU model must not switch bf16 <-> fp16 and so drop (or invent) the
    GradScaler's state. fp16 runs on every CUDA GPU, fp32 everywhere; bf16 only where it is native.

    Raises:
        CheckpointError: the checkpoint's precision cannot run on this device.
    """
    if saved is None or saved == resolved:
        return resolved  # a checkpoint from before precision was recorded: nothing to keep
    if saved == "fp32" or (saved == "fp16" and device_type == "cuda") or (
            saved == "bf16" and device_type == "cuda" and bf16_supported):
        if saved != resolved:
            log.warning("resuming in %s, the precision the stage started in (this device would choose %s)",
                        saved, resolved)
        return saved
    where = "this GPU has no native bf16" if device_type == "cuda" else f"this job runs on {device_type}"
    raise CheckpointError(f"the stage trained in {saved} but {where}", loc=path,
                          hint="keep the stage on the GPU model it started on ([slurm] constraint / partition), "
                               "or start a new run with an explicit [train] precision")


def set_numerics(dev: "torch.device", tc: "TrainConfig") -> None:
    """TF32 and determinism as the stage asks; call before the first kernel on `dev`."""
    import torch

    # The current API (allow_tf32 is the legacy one): "highest" keeps fp32 matmuls in full fp32.
    torch.set_float32_matmul_precision("high" if tc.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tc.tf32  # cuDNN's default is True: off unless asked
    if dev.type == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # Both ways: these are process-wide, and local mode trains several stages in one process.
    if tc.deterministic:  # effective where CUDA has not started yet (the job script exports it for Slurm jobs)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(tc.deterministic)
    torch.backends.cudnn.deterministic = tc.deterministic
    torch.backends.cudnn.benchmark = False


def autocast_for(precision: str, dev: "torch.device") -> "Callable[[], Any]":
    """A factory of the autocast context the step runs under (a null context in fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, dev.type, dtype=dtype)


def bf16_supported(dev: "torch.device") -> bool:
    """Native bf16 on this device (always False on CPU, where `resolve_precision` picks fp32 anyway)."""
    import torch

    return dev.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
