"""Slurm benchmarks on the real test cluster (scripts/slurm-up.sh), each next to a baseline from the same run.

1. Submit latency: `progressive submit` of the six-stage stages.toml (fresh process, as a
   user runs it) vs six bare `sbatch` calls of the same scripts chained by
   `--dependency=afterok` (six processes, timed together). The first stage is held in both
   (`extra = {hold = true}` / `sbatch --hold`) so nothing runs; everything is cancelled.
   Interleaved, medians; goal <= 1.5x.
2. Optimizer steps redone per time-out: one small stage in 1-minute jobs that requeue
   themselves on the pre-timeout signal (tests.tasks:SlowTask); redone steps are step
   numbers logged twice in metrics.jsonl. Baseline from the same metrics: what a
   periodic-checkpoint-only scheme would redo at the same interruptions.
3. Dependency delay: a parent job's End -> its dependent's Start (sacct) for a 3-stage
   progressive chain, next to a bare `sbatch --dependency=afterok` chain of `sleep 1` jobs.

Writes benchmarks/results/slurm.md and prints it.

    .venv/bin/python benchmarks/bench_slurm.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "slurm.md"
PY = REPO / ".venv" / "bin" / "python"
CLI = REPO / ".venv" / "bin" / "progressive"
PREFIX = f"bsl{os.getpid()}"  # every run/job name of ours starts with this (cleanup by id, found by name)
SUBMITTED: set[str] = set()  # every job id this script submitted
FINAL = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


class BenchError(RuntimeError):
    pass


# ------------------------------------------------------------------ helpers

def sh(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and proc.returncode != 0:
        raise BenchError(f"`{' '.join(map(str, cmd))}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def cluster_problem() -> str | None:
    """None when the test cluster answers sinfo with a usable node and sacct works; else what is wrong."""
    for tool in ("sinfo", "sbatch", "sacct", "squeue", "scancel", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s (slurmctld down?)"
    states = out.stdout.split()
    if out.returncode != 0 or not states:
        return f"sinfo: {out.stderr.strip() or 'no nodes'}"
    if not any(s.startswith(("idle", "mixed", "alloc")) for s in states):
        return f"no usable node (node state {states})"
    return None


def wait_sacct(timeout: float = 120) -> None:
    """Accounting must answer (another engineer's test may switch it off for a while)."""
    deadline = time.monotonic() + timeout
    while True:
        if subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError("sacct does not answer: Slurm accounting is off or slurmdbd is down "
                             "(`bash scripts/slurm-accounting.sh on`, or restart with `bash scripts/slurm-up.sh`)")
        time.sleep(3)


def cancel(ids: list[str] | set[str]) -> None:
    ids = sorted(set(ids), key=int)
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def cleanup() -> None:
    """Cancel every job of ours still in the queue: ids we recorded, and any job named with our prefix."""
    ours = set(SUBMITTED)
    out = subprocess.run(["squeue", "-h", "-o", "%i|%j"], capture_output=True, text=True, timeout=30)
    for line in out.stdout.splitlines():
        jid, _, name = line.partition("|")
        if name.startswith(PREFIX):
            ours.add(jid.split("_")[0])
    live = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout.split()
    cancel([j for j in ours if j in live])


def run_ids(jobs: Path, run: str) -> list[str]:
    rec = json.loads((jobs / run / "run.json").read_text())
    return [s["submissions"][-1]["job_id"] for s in rec["stages"].values() if s["submissions"]]


def slurm_states(ids: list[str]) -> dict[str, tuple[str, str]]:
    out = sh(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"], check=False).stdout
    res = {}
    for line in out.splitlines():
        jid, st, reason = (line.split("|") + ["", ""])[:3]
        res[jid] = (st, reason)
    return res


def wait_final(ids: list[str], timeout: float, what: str) -> dict[str, str]:
    """Poll squeue (cheap; MinJobAge keeps finished jobs visible) until every job is in a final state."""
    deadline = time.monotonic() + timeout
    while True:
        st = slurm_states(ids)
        if len(st) == len(ids) and all(s in FINAL for s, _ in st.values()):
            return {j: s for j, (s, _) in st.items()}
        if any("DependencyNeverSatisfied" in r for _, r in st.values()):
            raise BenchError(f"{what}: a dependency can never be satisfied: {st}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}; squeue says {st}")
        time.sleep(1.0)


def config_value(config: str, key: str) -> str:
    """A value of `scontrol show config` ("KillWait = 5 sec" -> "5 sec"); "?" when absent."""
    return next((ln.split("=", 1)[1].strip() for ln in config.splitlines() if ln.split("=", 1)[0].strip() == key), "?")


def eligible_note(auth_info: str) -> str:
    """When a requeued job may start again: cred_expire + 1 s after the requeue (Slurm's default cred_expire: 120)."""
    m = re.search(r"cred_expire=(\d+)", auth_info)
    return f"cred_expire={m.group(1) if m else 120}: {int(m.group(1)) + 1 if m else 121} s after the requeue"


def sacct_times(ids: list[str]) -> dict[str, tuple[datetime | None, datetime | None]]:
    out = sh(["sacct", "-j", ",".join(ids), "-X", "-P", "-n", "--format", "JobID,Start,End"]).stdout

    def parse(s: str) -> datetime | None:
        try:
            return datetime.fromisoformat(s)
        except ValueError:
            return None

    res = {}
    for line in out.splitlines():
        jid, start, end = (line.split("|") + ["", ""])[:3]
        res[jid] = (parse(start), parse(end))
    return res


def edge_delays(ids: list[str], timeout: float = 300) -> list[float]:
    """Seconds from each job's End to the next job's Start (ids in chain order); waits for sacct to catch up."""
    deadline = time.monotonic() + timeout
    while True:
        t = sacct_times(ids)
        if all(t.get(j, (None, None))[0] and t.get(j, (None, None))[1] for j in ids):
            return [(t[c][0] - t[p][1]).total_seconds() for p, c in zip(ids, ids[1:])]
        if time.monotonic() > deadline:
            raise BenchError(f"sacct has no Start/End for all of {ids}: {t}")
        time.sleep(2)


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------ 1. submit latency

def bench_submit(work: Path, runs: int) -> dict[str, Any]:
    data = work / "m.h5"
    sh([CLI, "data", "generate", "-o", data, "--sizes", "512,1024,1536,2048,3072,4096",
        "--counts", "6,4,3,2,2,2"], timeout=300)
    text = (REPO / "stages.toml").read_text()
    text = text.replace('data = "data/matrices.h5"', f'data = "{data}"')
    text = re.sub(r'(?m)^partition = .*$', 'partition = "debug"', text)
    text = re.sub(r'(?m)^gpus_per_node = .*$', 'gpus_per_node = 1', text)
    # The test node has 2 cores and 22 GB: a 4-core / 32-64 GB request would be refused by sbatch.
    text = re.sub(r'(?m)^cpus_per_task = \d+', 'cpus_per_task = 1', text)
    text = re.sub(r'(?m)^mem = "[^"]*"', 'mem = "1G"', text)
    # Hold the first stage (a user-level sbatch option): the other five wait on it, nothing runs.
    text = text.replace('init_from = "none"', 'init_from = "none"\nextra = {hold = true}', 1)
    cfg = work / "stages.toml"
    cfg.write_text(text)
    jobs = work / "jobs"

    # The baseline's scripts: exactly what submit sends (plan --dry-run renders through the same executor),
    # minus the symbolic dependency and the hold, which the sbatch command lines give instead.
    plan = json.loads(sh([CLI, "plan", "-c", cfg, "--dry-run", "--json", "--run-name", f"{PREFIX}-base"]).stdout)
    scripts = []
    for i, st in enumerate(plan["stages"]):
        path = work / f"baseline_{i}.sh"
        path.write_text(re.sub(r"(?m)^#SBATCH --(hold|dependency=.*)\n", "", st["sbatch"]))
        scripts.append(path)
    assert len(scripts) == 6, f"expected 6 stages, plan has {len(scripts)}"

    def progressive(r: int) -> float:
        run = f"{PREFIX}-sub{r}"
        t0 = time.perf_counter()
        proc = subprocess.run([str(CLI), "submit", "-c", str(cfg), "--run-name", run], cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        dt = time.perf_counter() - t0
        if (jobs / run / "run.json").is_file():
            ids = run_ids(jobs, run)
            SUBMITTED.update(ids)
            cancel(ids)
        if proc.returncode != 0:
            raise BenchError(f"progressive submit exited {proc.returncode}: {proc.stderr}")
        return dt

    def bare() -> float:
        ids: list[str] = []
        t0 = time.perf_counter()
        for i, script in enumerate(scripts):
            opt = "--hold" if i == 0 else f"--dependency=afterok:{ids[-1]}"
            proc = subprocess.run(["sbatch", "--parsable", opt, str(script)], capture_output=True, text=True)
            if proc.returncode != 0:
                cancel(ids)
                raise BenchError(f"sbatch {opt} {script} exited {proc.returncode}: {proc.stderr}")
            ids.append(proc.stdout.strip().split(";")[0])
            SUBMITTED.add(ids[-1])
        dt = time.perf_counter() - t0
        cancel(ids)
        return dt

    def help_() -> float:  # the same CLI's start-up alone: the floor any `progressive ...` pays
        t0 = time.perf_counter()
        subprocess.run([str(CLI), "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0

    def plan_() -> float:  # the same file resolved against the data, nothing submitted: config + plan cost
        t0 = time.perf_counter()
        subprocess.run([str(CLI), "plan", "-c", str(cfg)], cwd=work, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0

    def submitit_import() -> float:  # any submitit-based submitter pays at least this
        t0 = time.perf_counter()
        subprocess.run([str(PY), "-c", "import submitit"], check=True)
        return time.perf_counter() - t0

    progressive(-1), bare(), help_(), plan_(), submitit_import()  # warm the page cache and bytecode
    t_prog, t_bare, t_help, t_plan, t_sub = [], [], [], [], []
    for r in range(runs):
        order = [lambda: t_prog.append(progressive(r)), lambda: t_bare.append(bare()),
                 lambda: t_help.append(help_()), lambda: t_plan.append(plan_()),
                 lambda: t_sub.append(submitit_import())]
        for f in (order if r % 2 == 0 else order[::-1]):  # interleaved, alternating order
            f()
    return {"prog": t_prog, "bare": t_bare, "help": t_help, "plan": t_plan, "submitit": t_sub, "runs": runs}


# ------------------------------------------------------------------ 2. steps redone per time-out

GRAPH_HEAD = """[run]
name = "{run}"
data = "{data}"
seed = 3
checkpoints = "{work}/checkpoints"
jobs = "{work}/jobs"
[slurm]
cpus_per_task = 1
mem = "1G"
time = "{time}"
signal_delay = "20s"
# 20: on a loaded machine a 1-minute segment may do few steps (start-up eats most of it)
max_requeues = 20
[train]
lr = 0.003
checkpoint_every = {every}
eval_samples = 1
[model]
task = "{task}"
[model.options]
hidden = 8
layers = 1
{options}
"""


def stage_toml(name: str, bucket: int, batch: int, epochs: int, extra: str = "") -> str:
    return f'\n[[stage]]\nname = "{name}"\nbucket = {bucket}\nbatch_size = {batch}\nepochs = {epochs}\n{extra}\n'


def tiny_data(work: Path) -> Path:
    data = work / "tiny.h5"
    sh([CLI, "data", "generate", "-o", data, "--sizes", "16,32,64", "--counts", "30,12,6", "--family", "mix",
        "--seed", "0", "--workers", "1"], timeout=300)
    return data


def bench_requeue(work: Path, data: Path, every: int) -> dict[str, Any]:
    run = f"{PREFIX}-requeue"
    cfg = work / "requeue.toml"
    cfg.write_text(GRAPH_HEAD.format(run=run, data=data, work=work, time="1m", every=every,
                                     task="tests.tasks:SlowTask", options="step_sleep = 0.4")
                   + stage_toml("long", 16, 2, 12, 'init_from = "none"'))
    env = {"PYTHONPATH": str(REPO)}  # the job imports tests.tasks; sbatch exports the submitting environment
    t0 = time.monotonic()
    sh([CLI, "submit", "-c", cfg], env=env, cwd=work)
    jobs = work / "jobs"
    ids = run_ids(jobs, run)
    SUBMITTED.update(ids)
    # No early release of the requeued job (scontrol update StartTime=now): before cred_expire has passed,
    # Slurm kills it ("Job credential revoked"). It becomes eligible cred_expire + 1 s after each requeue.
    final = wait_final(ids, 1500, "the 1-minute-job stage to finish")
    wall = time.monotonic() - t0
    st = {s["name"]: s for s in json.loads(sh([CLI, "status", run, "--jobs", jobs, "--json"]).stdout)["stages"]}["long"]
    ev = events(jobs / run / "stages" / "long" / "metrics.jsonl")
    steps = [e["step"] for e in ev if e.get("event") == "step"]
    starts = [e for e in ev if e.get("event") == "start"]
    stops = [e for e in ev if e.get("event") == "stopped"]
    periodic = [e["step"] for e in ev if e.get("event") == "checkpoint" and e.get("reason") == "periodic"]
    stop_ckpt_s = [e["seconds"] for e in ev if e.get("event") == "checkpoint" and e.get("reason") == "stop"]
    redone = len(steps) - len(set(steps))
    # Segment i runs from starts[i]["step"]; it stopped where segment i+1 started (the stop checkpoint's step).
    seg_start = [s["step"] for s in starts]
    seg_stop = seg_start[1:]
    step_times = [e["time"] for e in ev if e.get("event") == "step"]
    step_s = med([b - a for a, b in zip(step_times, step_times[1:]) if 0 < b - a < 5])
    # Where a requeue's wall time goes: stop checkpoint -> Slurm ends the segment -> next segment starts
    # -> the trainer's next start event (job start-up: python, torch, submitit, data).
    segs = []
    for line in sh(["sacct", "-j", ids[0], "-D", "-X", "-P", "-n", "--format", "State,Start,End"]).stdout.splitlines():
        state, start, end = line.split("|")[:3]
        try:
            segs.append((datetime.fromisoformat(start).timestamp(), datetime.fromisoformat(end).timestamp()))
        except ValueError:  # the last segment's End may lag in sacct; it is not needed below
            segs.append((datetime.fromisoformat(start).timestamp(), float("nan")))
    segs.sort()
    stop_t = [e["time"] for e in stops]
    start_t = [e["time"] for e in starts]
    breakdown = []
    for i, t_stop in enumerate(stop_t):
        if i + 1 < len(segs) and i + 1 < len(start_t):
            breakdown.append({"stop_to_end": segs[i][1] - t_stop, "end_to_start": segs[i + 1][0] - segs[i][1],
                              "startup": start_t[i + 1] - segs[i + 1][0], "total": start_t[i + 1] - t_stop,
                              "seg_len": segs[i][1] - segs[i][0]})
    # How the last segment ended, step by step (a stage can finish and still be recorded as failed).
    exits = sh(["sacct", "-j", ids[0], "-P", "-n", "--format", "JobID,State,ExitCode"]).stdout.split()
    base_k = [s - (s // every) * every for s in seg_stop]  # periodic every `every` steps, nothing at the stop
    base_wall = [b - a for a, b in zip(seg_start, seg_stop)]  # "30m" interval: no save inside a 1-minute job
    return {
        "job": ids[0], "slurm_state": final[ids[0]], "state": st["state"], "requeues": st["requeues"],
        "segments": len(starts), "stops": [e["step"] for e in stops], "seg_start": seg_start, "seg_stop": seg_stop,
        "total": st["total_steps"], "steps_logged": len(steps), "redone": redone, "periodic": periodic,
        "every": every, "base_k": base_k, "base_wall": base_wall, "step_s": step_s, "wall": wall,
        "stop_ckpt_s": stop_ckpt_s, "breakdown": breakdown, "exits": exits, "first_startup": start_t[0] - segs[0][0] if segs else None,
    }


# ------------------------------------------------------------------ 3. dependency delay

def bench_chain(work: Path, data: Path, n_sleep: int, rounds: int) -> dict[str, Any]:
    res: dict[str, Any] = {"ids": [], "base": [], "prog": [], "bare": [], "work_gap": []}
    for r in range(rounds):
        one = chain_round(work, data, n_sleep, r)
        for k in res:
            res[k] += one[k]
    return res


def chain_round(work: Path, data: Path, n_sleep: int, r: int) -> dict[str, Any]:
    run = f"{PREFIX}-chain{r}"
    cfg = work / f"chain{r}.toml"
    cfg.write_text(GRAPH_HEAD.format(run=run, data=data, work=work, time="5m", every=20,
                                     task="progressive.tasks.precond:PreconditionerTask", options="")
                   + stage_toml("s16", 16, 4, 1, 'init_from = "none"') + stage_toml("s32", 32, 2, 1)
                   + stage_toml("s64", 64, 2, 1))
    # The baseline chain, submitted right after so both see the same scheduler (2 cores: one job of each at a time).
    sh([CLI, "submit", "-c", cfg], cwd=work)
    jobs = work / "jobs"
    ids = run_ids(jobs, run)
    SUBMITTED.update(ids)
    base: list[str] = []
    for i in range(n_sleep):
        dep = [f"--dependency=afterok:{base[-1]}"] if base else []
        out = sh(["sbatch", "--parsable", "-p", "debug", "-c", "1", "--mem", "100M", "-t", "5",
                  "-J", f"{PREFIX}-sleep{r}-{i}", "-o", "/dev/null", *dep, "--wrap", "sleep 1"]).stdout
        base.append(out.strip().split(";")[0])
        SUBMITTED.add(base[-1])
    final = wait_final(ids + base, 900, "the 3-stage chain and the sleep chain")
    bad = {j: s for j, s in final.items() if s != "COMPLETED"}
    if bad:
        raise BenchError(f"chain jobs did not complete: {bad} (logs under {jobs / run})")
    d_prog, d_base = edge_delays(ids), edge_delays(base)
    # Work-to-work gap as the user sees it: parent's final weights written -> child's training start event.
    names = ["s16", "s32", "s64"]
    ev = {n: events(jobs / run / "stages" / n / "metrics.jsonl") for n in names}
    gap = [next(e["time"] for e in ev[c] if e.get("event") == "start")
           - next(e["time"] for e in ev[p] if e.get("event") == "completed") for p, c in zip(names, names[1:])]
    return {"ids": ids, "base": base, "prog": d_prog, "bare": d_base, "work_gap": gap}


# ------------------------------------------------------------------ report

def other_jobs() -> int:
    out = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
    return sum(1 for n in out if not n.startswith(PREFIX))


def report(sub: dict[str, Any], rq: dict[str, Any], ch: dict[str, Any], meta: dict[str, Any]) -> str:
    p, b, h = med(sub["prog"]), med(sub["bare"]), med(sub["help"])
    ratio = p / b
    L = [
        "## Slurm: submit latency, steps redone per time-out, dependency delay",
        "",
        f"Reproduce: `{meta['cmd']}` (needs the test cluster: `bash scripts/slurm-up.sh`; total {meta['total']:.1f} min).",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, {meta['slurm']}, single-node test "
        f"cluster; {meta['date']}. Jobs of other users in the queue: {meta['others_start']} at start, "
        f"{meta['others_end']} at end; load average at start {meta['load_start']}, at end {meta['load_end']}.",
        "",
        "### 1. Submit latency (six-stage stages.toml)",
        "",
        f"`progressive submit -c stages.toml` (a copy: data = a real 6-bucket dataset of 19 matrices, partition "
        f"`debug`, `gpus_per_node = 1`, 1 CPU and 1G per stage so the 2-core test node accepts it, first stage held "
        f"with `extra = {{hold = true}}`) as a fresh process, vs the same six scripts (rendered by `plan --dry-run`) "
        f"sent by six `sbatch --parsable` processes, the first `--hold`, each next `--dependency=afterok:<previous>`. "
        f"Median of {sub['runs']} interleaved rounds; every job cancelled right after. Goal <= 1.5x.",
        "",
        "| what | median (ms) | min (ms) | ratio to baseline | goal met |",
        "|---|---:|---:|---:|---|",
        f"| baseline: 6 x `sbatch` chained by afterok | {b * 1000:.0f} | {min(sub['bare']) * 1000:.0f} | 1.00x | baseline |",
        f"| `progressive submit` (6 stages) | {p * 1000:.0f} | {min(sub['prog']) * 1000:.0f} | {ratio:.2f}x | "
        f"{'yes' if ratio <= 1.5 else 'no'} |",
        f"| for reference: `progressive --help` (CLI start-up alone) | {h * 1000:.0f} | {min(sub['help']) * 1000:.0f} | "
        f"{h / b:.2f}x | - |",
        f"| for reference: `progressive plan` of the same file (config + data + plan, nothing submitted) | "
        f"{med(sub['plan']) * 1000:.0f} | {min(sub['plan']) * 1000:.0f} | {med(sub['plan']) / b:.2f}x | - |",
        f"| for reference: `python -c 'import submitit'` | {med(sub['submitit']) * 1000:.0f} | "
        f"{min(sub['submitit']) * 1000:.0f} | {med(sub['submitit']) / b:.2f}x | - |",
        "",
        f"`submit` minus `plan` of the same file: {(p - med(sub['plan'])) * 1000:.0f} ms (importing submitit, the "
        f"run record, six submissions through submitit), against {b * 1000:.0f} ms for the six bare `sbatch` calls.",
        "",
        "### 2. Optimizer steps redone per time-out",
        "",
        f"One stage (tests.tasks:SlowTask, bucket 16, batch 2, 12 epochs = {rq['total']} steps of ~{rq['step_s']:.2f} s) "
        f"in 1-minute jobs, pre-timeout signal 20 s before the limit, `checkpoint_every = {rq['every']}` steps; "
        f"requeued jobs start again when Slurm makes them eligible ({meta['eligible']}). Job {rq['job']} ended "
        f"{rq['slurm_state']} (status: {rq['state']}) after {rq['wall']:.0f} s, {rq['requeues']} time-out requeues, "
        f"{rq['segments']} job segments starting at steps {rq['seg_start']}. Redone = step numbers logged more than "
        f"once in metrics.jsonl ({rq['steps_logged']} step lines for {rq['total']} steps).",
        "",
        "Baselines from the same segments, assuming the job is stopped at the same steps and resumes from its "
        "last periodic checkpoint instead of a checkpoint written at the signal: "
        f"(a) periodic every {rq['every']} steps: redo = stop step - last multiple of {rq['every']}; "
        "(b) the default `checkpoint_every = \"30m\"` (wall time): no periodic save falls inside a 1-minute job, so "
        "every step of the segment is redone (and such a stage would never finish).",
        "",
        "| scheme | interruptions | steps redone (per interruption) | redone per time-out | redone seconds |",
        "|---|---:|---|---:|---:|",
    ]
    n_int = max(len(rq["seg_stop"]), 1)
    rows = [
        ("progressive: checkpoint at the pre-timeout signal", rq["redone"], "-"),
        (f"baseline (a): periodic only, every {rq['every']} steps", sum(rq["base_k"]), rq["base_k"]),
        ('baseline (b): periodic only, "30m"', sum(rq["base_wall"]), rq["base_wall"]),
    ]
    for name, total, per in rows:
        L.append(f"| {name} | {len(rq['seg_stop'])} | {total} ({per if per != '-' else 'none'}) | "
                 f"{total / n_int:.1f} | {total * rq['step_s']:.1f} |")
    ck = rq["stop_ckpt_s"]
    if rq["slurm_state"] != "COMPLETED":
        L += ["", f"**Note:** Slurm recorded job {rq['job']} as {rq['slurm_state']} although the stage completed "
                  f"(its final weights were written; `status` says {rq['state']}). sacct of the last segment: "
                  f"`{'  '.join(rq['exits'])}` (State, ExitCode = return code:signal). An `afterok` dependent of "
                  "this stage would never start (DependencyNeverSatisfied) until `progressive resume`."]
    L += [
        "",
        f"Goal 0 redone per time-out: {'met' if rq['redone'] == 0 else 'NOT met'}. Stop checkpoints took "
        f"{', '.join(f'{s * 1000:.0f}' for s in ck) or '-'} ms (tiny model).",
        "",
        "Wall time of a requeue (medians over the interruptions; sacct times have 1 s resolution): "
        "training stopped (stop checkpoint written) -> Slurm ends the segment (sacct End) -> the requeued "
        "job starts again (sacct Start) -> the trainer's next `start` event (job start-up). sacct's End of a "
        "requeued segment is the requeue request; Slurm then signals the job and kills it after "
        f"`KillWait` ({meta['killwait']}; the job's SIGTERM handler only sets its stop flag, so the task waits to "
        "be SIGKILLed), which falls in End -> next Start, as does the wait until the requeued job is eligible "
        f"again ({meta['eligible']}). Segments are shorter than the 40 s the limit and signal "
        "delay suggest: Slurm sends `--signal` on its own timer, up to 60 s early (sbatch(1)).",
        "",
        "| stop -> End (s) | End -> next Start (s) | Start -> training (s) | stop -> training again (s) | "
        "segment length (s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    bd = rq["breakdown"]
    if bd:
        L.append("| " + " | ".join(f"{med([x[k] for x in bd]):.1f}" for k in
                                   ("stop_to_end", "end_to_start", "startup", "total", "seg_len")) + " |")
    L += [
        "",
        "### 3. Delay from a stage's end to its dependent's start",
        "",
        f"sacct End of a parent job -> Start of its afterok child. Progressive: a 3-stage chain (buckets 16/32/64, "
        f"1 epoch each); baseline: a bare `sbatch --dependency=afterok` chain of {meta['sleep_jobs']} `sleep 1` jobs "
        "submitted right after it, running alongside (one job of each chain at a time on the 2-core node); "
        f"{meta['chain_rounds']} rounds (jobs {', '.join(ch['ids'])} and {', '.join(ch['base'])}). sacct times have "
        "1 s resolution; the test cluster schedules every 2 s (`sched_interval=2`).",
        "",
        "| chain | edges | median (s) | max (s) | median minus baseline median (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    mb, mp = med(ch["bare"]), med(ch["prog"])
    L.append(f"| baseline: `sleep 1` jobs | {len(ch['bare'])} | {mb:.1f} | {max(ch['bare']):.1f} | baseline |")
    L.append(f"| progressive stages | {len(ch['prog'])} | {mp:.1f} | {max(ch['prog']):.1f} | {mp - mb:+.1f} |")
    L += [
        "",
        f"For reference, the work-to-work gap inside the progressive chain (parent's `completed` event, after its "
        f"final weights are written -> child's `start` event, after job start-up, torch import and data open): "
        f"median {med(ch['work_gap']):.1f} s, max {max(ch['work_gap']):.1f} s.",
        "",
    ]
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds of the submit-latency benchmark")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="periodic checkpoint interval (steps) in part 2")
    ap.add_argument("--sleep-jobs", type=int, default=5, help="length of the baseline sleep chain in part 3")
    ap.add_argument("--chain-rounds", type=int, default=2, help="rounds of the two chains in part 3")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = ap.parse_args()
    t_start = time.monotonic()

    problem = cluster_problem()
    if problem:
        print(f"error: the Slurm test cluster is not running ({problem}).\n"
              "hint: start it with `sudo bash scripts/slurm-up.sh` (see README.md), then run this again.",
              file=sys.stderr)
        return 2
    if not CLI.is_file():
        print(f"error: {CLI} not found; set up the venv first (`bash scripts/setup.sh`)", file=sys.stderr)
        return 2
    try:
        wait_sacct(30)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below cancels our jobs
    work = Path(tempfile.mkdtemp(prefix="bench_slurm_"))
    config = sh(["scontrol", "show", "config"]).stdout
    meta = {
        "cmd": " ".join([".venv/bin/python benchmarks/bench_slurm.py"]
                        + (["--runs", str(args.runs)] if args.runs != 5 else [])
                        + (["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every != 50 else [])
                        + (["--sleep-jobs", str(args.sleep_jobs)] if args.sleep_jobs != 5 else [])
                        + (["--chain-rounds", str(args.chain_rounds)] if args.chain_rounds != 2 else [])),
        "slurm": sh(["sbatch", "--version"]).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "killwait": config_value(config, "KillWait"),
        "eligible": eligible_note(config_value(config, "AuthInfo")),
        "sleep_jobs": args.sleep_jobs, "chain_rounds": args.chain_rounds,
        "others_start": other_jobs(),
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    try:
        print(f"[1/3] submit latency ({args.runs} rounds) ...", flush=True)
        sub = bench_submit(work, args.runs)
        print(f"      progressive submit {med(sub['prog']) * 1000:.0f} ms, 6 x sbatch {med(sub['bare']) * 1000:.0f} ms",
              flush=True)
        data = tiny_data(work)
        print("[2/3] time-limit requeues (a few minutes) ...", flush=True)
        rq = bench_requeue(work, data, args.checkpoint_every)
        print(f"      {rq['requeues']} requeues, {rq['redone']} steps redone", flush=True)
        wait_sacct()
        print("[3/3] dependency delay ...", flush=True)
        ch = bench_chain(work, data, args.sleep_jobs, args.chain_rounds)
        meta.update(others_end=other_jobs(), load_end=" ".join(f"{x:.2f}" for x in os.getloadavg()),
                    total=(time.monotonic() - t_start) / 60)
        text = report(sub, rq, ch, meta)
    except BenchError as exc:
        print(f"error: {exc}\n(temporary files kept in {work})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        cleanup()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
