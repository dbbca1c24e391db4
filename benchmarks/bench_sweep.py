"""Sweep benchmarks on the real test cluster (scripts/slurm-up.sh); hold the shared lock:

    flock /tmp/progressive-slurm.lock .venv/bin/python benchmarks/bench_sweep.py [--variants 16] [--rounds 3]

1. Submitting a 16-variant, 3-stage sweep (`progressive sweep submit`, a fresh process as a user
   runs it): sbatch calls made (counted by an `sbatch` shim first on PATH that logs and runs the
   real one) and wall time, next to 48 bare `sbatch --hold` calls (one per stage job, as a sweep
   of 16 separate chains would make) in the same run. The sweep's first array is held
   (`slurm.extra.hold`) and everything is cancelled at once: nothing trains.
2. CPU-hours of the same sweep (tiny curriculum, 16/32/64 buckets) run to the end with
   `prune.keep = 0.5` and without pruning: the allocated CPU-hours sacct reports, summed from
   summary.csv. Appends both to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / ".venv" / "bin" / "progressive"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
COMMAND = "flock /tmp/progressive-slurm.lock .venv/bin/python benchmarks/bench_sweep.py"


def sh(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(map(str, cmd))}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def graph(data: Path, hold: bool) -> str:
    extra = "extra = { hold = true }\n" if hold else ""
    return (f'[run]\nname = "b"\ndata = "{data}"\nseed = 0\n'
            f'[slurm]\ncpus_per_task = 1\nmem = "1G"\ntime = "5m"\nsignal_delay = "20s"\n{extra}'
            '[train]\nlr = 0.003\ncheckpoint_every = 50\neval_samples = 2\n'
            '[model.options]\nhidden = 4\nlayers = 1\n'
            '[[stage]]\nname = "s16"\nbucket = 16\nbatch_size = 4\nepochs = 1\ninit_from = "none"\n'
            '[[stage]]\nname = "s32"\nbucket = 32\nbatch_size = 4\nepochs = 1\n'
            '[[stage]]\nname = "s64"\nbucket = 64\nbatch_size = 2\nepochs = 1\n')


def sweep_file(name: str, variants: int, prune: bool) -> str:
    lrs = ", ".join(f"{1e-3 * (1 + i):.4g}" for i in range(variants))
    p = "[sweep.prune]\nkeep = 0.5\n" if prune else ""
    return f'[sweep]\nname = "{name}"\nmetric = "learned_iters"\nparallel = 2\n{p}[sweep.params]\n"train.lr" = [{lrs}]\n'


def shim(folder: Path, log: Path) -> Path:
    real = subprocess.run(["which", "sbatch"], capture_output=True, text=True, check=True).stdout.strip()
    folder.mkdir(parents=True, exist_ok=True)
    s = folder / "sbatch"
    s.write_text(f'#!/bin/sh\necho call >> "{log}"\nexec "{real}" "$@"\n')
    s.chmod(0o755)
    return folder


def submit_round(tmp: Path, data: Path, variants: int, k: int) -> tuple[float, int, float]:
    """One round: (sweep submit seconds, its sbatch calls, seconds of 3*variants bare held sbatch calls)."""
    work = tmp / f"r{k}"
    work.mkdir()
    (work / "stages.toml").write_text(graph(data, hold=True))
    (work / "sweep.toml").write_text(sweep_file(f"sub{k}", variants, prune=False))
    log = work / "sbatch.log"
    path = f"{shim(work / 'bin', log)}:{os.environ['PATH']}"
    t0 = time.perf_counter()
    sh([CLI, "sweep", "submit"], cwd=work, env={"PATH": path})
    t_sweep = time.perf_counter() - t0
    calls = len(log.read_text().splitlines())
    sh([CLI, "sweep", "cancel", f"sub{k}", "--jobs", str(work / "jobs")])
    ids = []
    t0 = time.perf_counter()
    for _ in range(3 * variants):
        ids.append(sh(["sbatch", "--parsable", "--hold", "--job-name=bare", "--time=1", "--wrap", "true"]).strip())
    t_bare = time.perf_counter() - t0
    sh(["scancel", *ids])
    return t_sweep, calls, t_bare


def wait_settled(jobs: Path, name: str, timeout: float = 3600) -> dict[str, dict[str, str]]:
    rec_path = jobs / name / "sweep.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = json.loads(rec_path.read_text())
        ids = [a["job_id"] for a in rec["arrays"]] + [p["job_id"] for p in rec["prunes"] if p["job_id"]] + [rec["final_job"]]
        out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True)
        if not out.stdout.strip() and (jobs / name / "summary.csv").is_file():
            with (jobs / name / "summary.csv").open() as f:
                return {r["variant"]: r for r in csv.DictReader(f)}
        time.sleep(5)
    raise SystemExit(f"sweep {name} did not settle in {timeout} s")


def cpu_hours(tmp: Path, data: Path, variants: int, prune: bool) -> tuple[float, dict[str, int], float]:
    work = tmp / ("prune" if prune else "full")
    work.mkdir()
    (work / "stages.toml").write_text(graph(data, hold=False))
    name = "pruned" if prune else "full"
    (work / "sweep.toml").write_text(sweep_file(name, variants, prune))
    t0 = time.perf_counter()
    sh([CLI, "sweep", "submit"], cwd=work)
    rows = wait_settled(work / "jobs", name)
    wall = time.perf_counter() - t0
    states: dict[str, int] = {}
    for r in rows.values():
        states[r["state"]] = states.get(r["state"], 0) + 1
    return sum(float(r["cpu_hours"]) for r in rows.values()), states, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-run", action="store_true", help="only the submission measurement")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as d:
        tmp = Path(d)
        data = tmp / "tiny.h5"
        sh([CLI, "data", "generate", "-o", data, "--sizes", "16,32,64", "--counts", "30,12,6", "--workers", "1"])
        rounds = [submit_round(tmp, data, args.variants, k) for k in range(args.rounds)]
        lines = [f"\n## Sweeps ({datetime.now():%Y-%m-%d %H:%M}, `{COMMAND}`)\n",
                 f"### Submitting a {args.variants}-variant, 3-stage sweep\n",
                 f"`progressive sweep submit` (fresh process; arrays of {args.variants} tasks chained by aftercorr, "
                 f"plus the summary job) next to {3 * args.variants} bare `sbatch --hold --wrap true` calls (one per stage "
                 f"job of {args.variants} separate chains), {args.rounds} rounds, medians; sbatch calls counted by a "
                 "logging `sbatch` shim on PATH.\n",
                 "| what | sbatch calls | seconds (median) | all rounds (s) |", "|---|---:|---:|---|",
                 f"| sweep submit | {rounds[0][1]} | {statistics.median(r[0] for r in rounds):.2f} | "
                 f"{', '.join(f'{r[0]:.2f}' for r in rounds)} |",
                 f"| {3 * args.variants} bare sbatch | {3 * args.variants} | {statistics.median(r[2] for r in rounds):.2f} | "
                 f"{', '.join(f'{r[2]:.2f}' for r in rounds)} |"]
        if not args.skip_run:
            full, full_states, full_wall = cpu_hours(tmp, data, args.variants, prune=False)
            pruned, pruned_states, pruned_wall = cpu_hours(tmp, data, args.variants, prune=True)
            lines += [f"\n### CPU-hours saved by pruning ({args.variants} variants x 3 stages, tiny curriculum, parallel 2)\n",
                      "Allocated CPU-hours as sacct reports them (ElapsedRaw x AllocCPUS over every attempt), summed "
                      "over summary.csv; wall time from submit to the summary job's end.\n",
                      "| sweep | variants by state | CPU-hours | wall (s) |", "|---|---|---:|---:|",
                      f"| no pruning | {full_states} | {full:.4f} | {full_wall:.0f} |",
                      f"| prune.keep = 0.5 | {pruned_states} | {pruned:.4f} | {pruned_wall:.0f} |",
                      f"\nPruning saved {full - pruned:.4f} CPU-hours ({100 * (full - pruned) / full:.0f}%)."]
        text = "\n".join(lines) + "\n"
        print(text)
        with RESULTS.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
