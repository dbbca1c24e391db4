"""Checkpoints at model scale: save and load of a ~1.5 GB trainer state against this disk's own bandwidth.

    .venv/bin/python benchmarks/bench_checkpoint.py [--gb 1.5] [--dir checkpoints/bench] [--repeats 3]

Per repeat, in the same run:
- baseline write: the same number of bytes written sequentially in 64 MiB chunks, fsynced;
- baseline read: that file read back sequentially after its pages were dropped from the cache
  (posix_fadvise DONTNEED after an fsync: a cold read, without root);
- save: `progressive.checkpoint.save_atomic` of a trainer state (a wide MLP's weights and AdamW's two
  moments: 3 x the parameters), which is torch.save + fsync + rename + folder fsync;
- load: `load_checkpoint` (torch.load, weights_only=True) of that file, its pages dropped first;
- async: what `[train] async_checkpoint` blocks the loop for (the copy of the state to host memory,
  `progressive.saver.to_host`, into the host buffers of the previous save, as the trainer's writer
  does from its second save on) against the synchronous save.
Ratios are medians over the repeats. Goals (issue 24): save >= 0.70 of the write baseline, load >= 0.70
of the read baseline, async block <= 0.10 of the synchronous save.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from progressive.checkpoint import load_checkpoint, save_atomic  # noqa: E402
from progressive.saver import to_host  # noqa: E402

CHUNK = 64 * 2**20


def drop_cache(path: Path) -> None:
    """A cold read next: the file's pages out of the page cache (bench_data's `evict`)."""
    from benchmarks.bench_data import evict

    evict(path)


def baseline_write(path: Path, nbytes: int) -> float:
    buf = os.urandom(CHUNK)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(buf[:min(CHUNK, left)])
        os.fsync(fh.fileno())
    return time.perf_counter() - t0


def baseline_read(path: Path) -> float:
    drop_cache(path)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.read(CHUNK):
            pass
    return time.perf_counter() - t0


def make_state(gb: float) -> dict:
    """Weights + AdamW moments of an MLP sized so that the three together are `gb` GB."""
    params = int(gb * 1e9 / 4 / 3)
    width = 4096
    layers = max(1, params // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.5)
    ap.add_argument("--dir", default=str(REPO / "checkpoints" / "bench"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = make_state(args.gb)
    ckpt, base = folder / "state.pt", folder / "baseline.bin"
    rows: dict[str, list[float]] = {k: [] for k in ("write_gbs", "read_gbs", "save_gbs", "load_gbs", "save_s", "copy_s")}
    buffers: list[torch.Tensor] = []
    to_host(state, buffers)  # the trainer's writer keeps its host buffers from one save to the next
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        save_atomic(state, ckpt)
        save_s = time.perf_counter() - t0
        nbytes = ckpt.stat().st_size
        drop_cache(ckpt)
        t0 = time.perf_counter()
        loaded = load_checkpoint(ckpt)
        load_s = time.perf_counter() - t0
        del loaded
        t0 = time.perf_counter()
        copy = to_host(state, buffers)
        copy_s = time.perf_counter() - t0
        del copy
        write_s = baseline_write(base, nbytes)
        read_s = baseline_read(base)
        gb = nbytes / 1e9
        rows["write_gbs"].append(gb / write_s)
        rows["read_gbs"].append(gb / read_s)
        rows["save_gbs"].append(gb / save_s)
        rows["load_gbs"].append(gb / load_s)
        rows["save_s"].append(save_s)
        rows["copy_s"].append(copy_s)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"state {nbytes / 1e9:.2f} GB in {folder}, {args.repeats} repeats (medians)")
    print("| measure | figure | baseline | ratio | goal |")
    print("|---|---:|---:|---:|---|")
    print(f"| save (save_atomic) | {med['save_gbs']:.2f} GB/s | {med['write_gbs']:.2f} GB/s fsync'd write | "
          f"{med['save_gbs'] / med['write_gbs']:.2f} | >= 0.70 |")
    print(f"| load (weights_only, cold) | {med['load_gbs']:.2f} GB/s | {med['read_gbs']:.2f} GB/s cold read | "
          f"{med['load_gbs'] / med['read_gbs']:.2f} | >= 0.70 |")
    print(f"| async block (copy to host) | {med['copy_s']:.2f} s | {med['save_s']:.2f} s synchronous save | "
          f"{med['copy_s'] / med['save_s']:.2f} | <= 0.10 |")
    for p in (ckpt, base):
        p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
