"""Two ways to make DDP's bucket layout independent of a job's history (bitwise resume at 3+ ranks), timed.

    .venv/bin/python benchmarks/bench_ddp.py [--world 2] [--steps 60] [--hidden 64]

- default DDP, buckets rebuilt once after the first iteration: what the trainer uses, with one
  untraced priming iteration at each job's start (trainer._prime_buckets), so no real step ever
  runs on the first-iteration layout; costs one forward + backward per job, nothing per step;
- find_unused_parameters=True: buckets never rebuilt, at the price of a walk of the autograd graph
  every step (the alternative considered).
Both run in the same launch, alternating in rounds of 10 steps, on gloo ranks over loopback, the
reference model on one batch of 4 n=256 matrices; the figure is the ratio of median step times.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rank(rank: int, world: int, port: int, steps: int, hidden: int, data: str, out: str) -> None:
    from progressive.config import TrainConfig
    from progressive.tasks.precond import PreconditionerTask
    from progressive.trainer import make_optimizer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    task = PreconditionerTask(hidden=hidden, layers=3, sketch=8)
    ds = task.dataset(data, 256, "train")
    batch = task.collate([ds[i] for i in range(4)])
    times: dict[bool, list[float]] = {False: [], True: []}
    models = {}
    for fixed in (False, True):
        torch.manual_seed(0)
        model = task.build_model()
        models[fixed] = (DistributedDataParallel(model, find_unused_parameters=fixed), make_optimizer(model, TrainConfig()))
    gen = torch.Generator().manual_seed(rank)
    for round_ in range(steps // 10):
        for fixed in (False, True):
            ddp, opt = models[fixed]
            for _ in range(10):
                t0 = time.perf_counter()
                task.loss(ddp, batch, gen).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if round_ > 0:  # the first round warms up (and is where DDP rebuilds its buckets)
                    times[fixed].append(time.perf_counter() - t0)
    if rank == 0:
        default, fixed_ = statistics.median(times[False]), statistics.median(times[True])
        Path(out).write_text(f"{default} {fixed_}\n")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    from progressive.data.generate import generate

    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "m.h5", Path(tmp) / "out.txt"
        generate(data, sizes=[256], counts=[10], seed=0, workers=1)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_rank, args=(args.world, port, args.steps, args.hidden, str(data), str(out)), nprocs=args.world)
        default, fixed = map(float, out.read_text().split())
    print(f"world {args.world}, hidden {args.hidden}, n=256 x 4, {args.steps - 10} timed steps per variant")
    print(f"| DDP default, rebuilt buckets (the trainer's) | {1000 * default:.1f} ms/step |")
    print(f"| find_unused_parameters=True (never rebuilt) | {1000 * fixed:.1f} ms/step |")
    print(f"| ratio find_unused / default | {fixed / default:.3f} |")


if __name__ == "__main__":
    main()
