"""`progressive doctor --gpu`: the trainer's self-check on this machine's GPU (see `progressive.selfcheck`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from progressive.cli.render import console, err_console

STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow"}


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the doctor command."""
    p = sub.add_parser("doctor", help="check this machine for training: --gpu runs the trainer's GPU self-check",
                       description="--gpu: a self-check of the trainer on this machine's GPU, no Slurm, at most "
                       "about 5 minutes: autocast bf16/fp16 on each bundled task, deterministic gradients, "
                       "stop/SIGKILL/SIGUSR2 resumes bitwise equal to an uninterrupted run, the fp16 GradScaler's "
                       "state, the allocator's memory figures, GPU vs CPU throughput, host syncs per step, and 2-rank "
                       "NCCL when two GPUs are visible. Without CUDA the GPU-only checks are skipped with the reason "
                       "and the rest runs on the CPU. Run it on a compute node (e.g. `srun --gpus=1 progressive "
                       "doctor --gpu`). Exit 0 when no check fails.")
    p.add_argument("--gpu", action="store_true", required=True, help="run the GPU self-check (required for now)")
    p.add_argument("--device", default=None, metavar="DEV", help="device to check (default: cuda:0 if CUDA works, else cpu)")
    p.add_argument("--out", default="doctor-gpu.json", metavar="FILE",
                   help="where to write the results as JSON (default: doctor-gpu.json)")
    p.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Handler of `progressive doctor --gpu`: one line per check as it ends, then the JSON file."""
    import torch

    from progressive import atomic
    from progressive.selfcheck import Check, run_checks

    from progressive.errors import ConfigError

    con = console()
    dev = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(dev)
    except RuntimeError:
        raise ConfigError(f"{dev!r} is not a device", loc="--device", hint="use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"{dev} is not visible here ({torch.cuda.device_count() if torch.cuda.is_available() else 0} "
                          "CUDA device(s))", loc="--device", hint="leave --device out to check what is here")
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"the self-check runs on cpu or cuda, not {parsed.type}", loc="--device",
                          hint="use cpu, cuda or cuda:N")
    where = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else "CPU (no CUDA device)"
    con.print(f"GPU self-check on {dev}: {where}, torch {torch.__version__}")

    def show(c: Check) -> None:
        con.print(f"[{STYLE[c.status]}]{c.status:<4}[/] {c.name:<32} {c.detail} [dim]({c.seconds:.1f} s)[/]",
                  soft_wrap=True, highlight=False)

    results = run_checks(dev, on_result=show)
    counts = {s: sum(c.status == s for c in results) for s in ("pass", "fail", "skip")}
    atomic.write_text(args.out, json.dumps({"device": dev, "device_name": where, "torch": str(torch.__version__),
                                            "checks": [c.as_dict() for c in results]}, indent=1))
    con.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped; results in {Path(args.out)}")
    if counts["fail"]:
        err_console().print(f"the self-check failed: {', '.join(c.name for c in results if c.status == 'fail')}")
    return 1 if counts["fail"] else 0
