"""Slurm job arrays for sweeps: lay the variants' stages out as arrays, render, submit, query.

A stage of a sweep is one array: task id = the variant's index, so `aftercorr` chains task
i of one array to task i of the next and each variant moves on by itself. Variants whose
stage asks for different resources (or follows a different array) go to separate arrays.
We render the sbatch script ourselves (submitit's `map_array` numbers tasks 0..n-1 and
cannot take the sparse task lists a pruned or resumed sweep needs); the script written for
`sweep plan --dry-run` is byte for byte the file submit hands to sbatch. Commands are run as
argument lists, never through a shell.
"""

from __future__ import annotations

import re
import shlex
import sys
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from progressive.layout import ARRAY_TASK_LOG, SWEEP_SLURM_DIR
from progressive.plan import StagePlan
from progressive.backends.base import JobInfo
from progressive.backends.slurm import parse_rows, run

# The small jobs (prune decisions, the final summary) ask for little and finish in seconds.
SMALL_JOB_MIN = 10


@dataclass
class ArraySpec:
    """One array: tasks (variant index -> (variant, stage)), the array it follows, its sbatch options."""

    key: str
    step: int
    options: tuple[tuple[str, str], ...]
    setup: tuple[str, ...]
    parent: Optional[str]
    tasks: dict[int, tuple[str, str]] = field(default_factory=dict)


def sbatch_options(stage: StagePlan) -> tuple[tuple[str, str], ...]:
    """The resource options of one stage's task (the array's grouping key)."""
    s = stage.slurm
    opts: list[tuple[str, str]] = [("time", str(stage.time_limit_min)), ("nodes", str(s.nodes)),
                                   ("ntasks-per-node", str(s.tasks_per_node)), ("cpus-per-task", str(s.cpus_per_task))]
    if s.gpus_per_node:
        opts.append(("gpus-per-node", str(s.gpus_per_node)))
    if s.mem:
        opts.append(("mem", f"{s.mem}M"))
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(s, key):
            opts.append((key, str(getattr(s, key))))
    opts.append(("signal", f"{s.signal}@{s.signal_delay}"))
    for key, value in s.extra.items():
        opts.append((key, "" if value is True else str(value)))
    return tuple(opts)


def layout(chains: Iterable[tuple[str, int, Sequence[StagePlan]]]) -> list[ArraySpec]:
    """Arrays for these variant chains (name, index, stages in order); a stage's parent is its depends_on."""
    arrays: dict[tuple[object, ...], ArraySpec] = {}
    for name, index, stages in chains:
        where: dict[str, str] = {}  # stage -> array key, for this variant
        for step, st in enumerate(stages):
            parent = where.get(st.depends_on[0]) if st.depends_on else None
            group = (step, sbatch_options(st), tuple(st.slurm.setup), parent)
            spec = arrays.get(group)
            if spec is None:
                spec = arrays[group] = ArraySpec(f"a{len(arrays)}", step, group[1], tuple(st.slurm.setup), parent)
            spec.tasks[index] = (name, st.name)
            where[st.name] = spec.key
    return list(arrays.values())


def task_list(ids: Iterable[int], parallel: int) -> str:
    """Slurm's --array value: "0-3,6%2" (ranges folded)."""
    ids = sorted(set(ids))
    parts: list[str] = []
    start = prev = ids[0]
    for i in ids[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) + f"%{parallel}"


SLURM_DIR = SWEEP_SLURM_DIR  # jobs/<sweep>/slurm/: the arrays' and helper jobs' scripts and logs


def slurm_dir(sweep_dir: str | Path) -> Path:
    """Where a sweep's sbatch scripts and job logs go."""
    return Path(sweep_dir) / SLURM_DIR


def render(sweep_name: str, sweep_dir: Path, spec: ArraySpec, tasks: Iterable[int], parallel: int,
           entry: Sequence[str]) -> str:
    """The sbatch script of an array (its dependency goes on sbatch's command line, known only at submit)."""
    logs = slurm_dir(sweep_dir)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={sweep_name}.{spec.key}", f"#SBATCH --array={task_list(tasks, parallel)}",
             f"#SBATCH --output={logs}/{ARRAY_TASK_LOG}.out",
             f"#SBATCH --error={logs}/{ARRAY_TASK_LOG}.err", "#SBATCH --open-mode=append",
             "#SBATCH --requeue"]
    lines += [f"#SBATCH --{k}={v}" if v else f"#SBATCH --{k}" for k, v in spec.options]
    lines += ["", "# submitit's JobEnvironment (rank, world size, hosts) reads this", "export SUBMITIT_EXECUTOR=slurm"]
    lines += list(spec.setup)
    lines += ["", "srun --unbuffered " + " ".join(shlex.quote(a) for a in entry), ""]
    return "\n".join(lines)


def render_small(sweep_name: str, sweep_dir: Path, what: str, options: Sequence[tuple[str, str]], entry: Sequence[str]) -> str:
    """The script of a one-task helper job (prune decision, final summary)."""
    logs = slurm_dir(sweep_dir)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={sweep_name}.{what}", f"#SBATCH --output={logs}/{what}-%j.out",
             f"#SBATCH --time={SMALL_JOB_MIN}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=1"]
    lines += [f"#SBATCH --{k}={v}" for k, v in options if k in ("partition", "account", "qos")]
    lines += ["", " ".join(shlex.quote(a) for a in entry), ""]
    return "\n".join(lines)


def entry(*args: str) -> list[str]:
    """The command a job runs: this Python, our task module."""
    return [sys.executable, "-u", "-m", "progressive.sweep.task", *args]


def sbatch(script: Path, dependency: str | None) -> str:
    """Submit a rendered script file; return the job (array) id."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency={dependency}")
    out = run([*cmd, str(script)], timeout=60)
    return out.strip().split(";")[0]


def queued_arrays() -> set[str]:
    """Array (and plain job) ids with something still in Slurm's queue."""
    out = run(["squeue", "-h", "-r", "-o", "%F"], timeout=30, check=False)
    return {line.strip() for line in out.splitlines() if line.strip()}


_TASK_RE = re.compile(r"^(\d+)_(\d+)$")
_PACKED_RE = re.compile(r"^(\d+)_\[([0-9,\-]+)(?:%\d+)?\]$")


def _expand(packed: str) -> list[int]:
    out: list[int] = []
    for part in packed.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def query_tasks(array_ids: Sequence[str]) -> dict[str, JobInfo]:
    """State of every task of these arrays, keyed "ARRAY_TASK" (sacct, then squeue for what sacct lacks)."""
    ids = [a for a in array_ids if a]
    if not ids:
        return {}
    infos: dict[str, JobInfo] = {}
    try:
        out = run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "--format", "JobID,State,Reason,Elapsed"], timeout=30)
    except Exception:  # accounting down: squeue alone
        out = ""
    _parse_rows(out, infos, "sacct")
    try:
        out = run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%r|%M"], timeout=30, check=False)
    except Exception:
        out = ""
    # squeue knows live tasks best (sacct lags behind a requeue): its word wins for those.
    _parse_rows(out, infos, "squeue")
    return infos


def _parse_rows(out: str, infos: dict[str, JobInfo], source: str) -> None:
    for info in parse_rows(out, source):
        if _TASK_RE.match(info.job_id):
            infos[info.job_id] = info
        elif m := _PACKED_RE.match(info.job_id):  # "123_[4-7]": pending tasks not yet split out
            for t in _expand(m.group(2)):
                infos[f"{m.group(1)}_{t}"] = dataclasses.replace(info, job_id=f"{m.group(1)}_{t}")


def usage(array_ids: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """Per task "ARRAY_TASK": (elapsed s, allocated CPU-hours, allocated GPU-hours), summed over its requeues."""
    ids = [a for a in array_ids if a]
    if not ids:
        return {}
    try:
        out = run(["sacct", "-X", "-D", "-n", "-P", "-j", ",".join(ids), "--format", "JobID,ElapsedRaw,AllocCPUS,AllocTRES"],
                  timeout=30)
    except Exception:
        return {}
    acc: dict[str, tuple[float, float, float]] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 4 or not _TASK_RE.match(parts[0]):
            continue
        secs = float(parts[1] or 0)
        cpus = float(parts[2] or 0)
        gpus = 0.0
        g = re.search(r"gres/gpu=(\d+)", parts[3])
        if g:
            gpus = float(g.group(1))
        e, c, gg = acc.get(parts[0], (0.0, 0.0, 0.0))
        acc[parts[0]] = (e + secs, c + secs * cpus / 3600, gg + secs * gpus / 3600)
    return acc
