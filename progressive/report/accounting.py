"""Where a run's time went: Slurm's job attempts (sacct -D) matched to the trainer's segments.

Allocated time is what the cluster charged: on Slurm the Elapsed of every attempt of
every job of the stage, requeued attempts included (`sacct --duplicates` lists them);
locally the wall time of each segment from the start of the trainer's set-up (the
process's imports before it are not seen). Inside it:

- useful: optimizer steps that count (not redone);
- start-up: allocation start -> first step begins (srun, imports, data, checkpoint load);
- checkpoint writes (step checkpoints and final.pt) and evaluation;
- redone: steps logged a second time after a crash (their first run was lost);
- shut-down: last event -> allocation end (stop -> requeue -> exit, or exit after completion);
- other: the rest (logging between steps; a crashed process's last moments).

Outside it, shown apart: time given up before the limit when the pre-timeout signal stops
a job (Slurm does not charge it, but the segment was that much shorter), and the wait
in the queue between a stage's segments. The effective training time ratio is useful /
allocated.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Sequence

from progressive.report.data import RunData, Segment, StageData

__all__ = ["Attempt", "TimeAccount", "Accounting", "parse_sacct", "query_attempts", "account_run", "SACCT_FORMAT"]

SACCT_FORMAT = "JobID,State,Submit,Eligible,Start,End,ElapsedRaw,AllocCPUS,AllocTRES,TimelimitRaw"
_GPU_RE = re.compile(r"gres/gpu(?::[^=,]*)?=(\d+)")


@dataclass(frozen=True)
class Attempt:
    """One run of a Slurm job (a requeued job has several under one id)."""

    job_id: str
    state: str
    submit: float | None
    start: float | None  # None: never started
    end: float | None  # None: still running
    elapsed_s: float
    cpus: int
    gpus: int
    time_limit_s: float | None


@dataclass
class TimeAccount:
    """Seconds per category, for a stage or the whole run."""

    allocated_s: float = 0.0
    useful_s: float = 0.0
    startup_s: float = 0.0
    checkpoint_s: float = 0.0
    eval_s: float = 0.0
    redone_s: float = 0.0
    shutdown_s: float = 0.0
    other_s: float = 0.0
    # outside the allocation
    before_limit_s: float = 0.0
    queue_wait_s: float = 0.0
    # counts and resources
    segments: int = 0
    redone_steps: int = 0
    cpu_s: float = 0.0
    gpu_s: float = 0.0

    @property
    def ratio(self) -> float | None:
        """The effective training time ratio: useful / allocated."""
        return self.useful_s / self.allocated_s if self.allocated_s > 0 else None

    def add(self, other: "TimeAccount") -> None:
        """Add another account's numbers to this one."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Accounting:
    """Per-stage accounts, their total, and where the numbers came from."""

    stages: dict[str, TimeAccount]
    total: TimeAccount
    source: str  # "sacct" | "metrics"
    attempts: dict[str, list[Attempt]] = field(default_factory=dict)  # per stage, by start time
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ sacct

def _when(text: str) -> float | None:
    """sacct's local ISO time as epoch seconds; None for Unknown/None."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def parse_sacct(text: str) -> list[Attempt]:
    """Attempts from `sacct -D -X -n -P --format SACCT_FORMAT` output (unparseable lines skipped)."""
    out = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 10:
            continue
        jid, state, submit, _eligible, start, end, elapsed, cpus, tres, limit = parts[:10]
        gpus = _GPU_RE.search(tres)
        out.append(Attempt(job_id=jid, state=state.split()[0] if state else "", submit=_when(submit), start=_when(start),
                           end=_when(end), elapsed_s=float(elapsed) if elapsed.isdigit() else 0.0,
                           cpus=int(cpus) if cpus.isdigit() else 0, gpus=int(gpus.group(1)) if gpus else 0,
                           time_limit_s=float(limit) * 60 if limit.isdigit() else None))
    return out


def query_attempts(job_ids: Sequence[str]) -> list[Attempt] | None:
    """Every attempt of these jobs (requeues included) from sacct; None when accounting is unavailable."""
    from progressive.backends import slurm
    from progressive.errors import SlurmError

    ids = [j for j in job_ids if j]
    if not ids or not slurm.slurm_available():
        return None
    try:
        text = slurm.run(["sacct", "-D", "-X", "-n", "-P", "-j", ",".join(ids), "--format", SACCT_FORMAT], timeout=30)
    except SlurmError:
        return None
    return [a for a in parse_sacct(text) if a.job_id in ids]


# ------------------------------------------------------------------ accounts

def _segment_parts(seg: Segment, acc: TimeAccount) -> None:
    acc.useful_s += seg.useful_s
    acc.redone_s += seg.redone_s
    acc.redone_steps += seg.redone_steps
    acc.checkpoint_s += seg.checkpoint_s + seg.final_save_s
    acc.eval_s += seg.eval_s
    acc.segments += 1


def _from_events(seg: Segment, acc: TimeAccount) -> None:
    """A segment seen only through its events: from the trainer's set-up to its last event."""
    acc.allocated_s += seg.setup_s + max(0.0, seg.end_time - seg.start_time)
    acc.startup_s += seg.setup_s + max(0.0, (seg.first_step_time or seg.end_time) - seg.start_time)
    _segment_parts(seg, acc)


def account_local(stage: StageData) -> TimeAccount:
    """A local stage: each segment's wall time from the trainer's set-up to its last event."""
    acc = TimeAccount()
    prev_end: float | None = None
    for seg in stage.segments:
        _from_events(seg, acc)
        if prev_end is not None:
            acc.queue_wait_s += max(0.0, seg.start_time - seg.setup_s - prev_end)  # until someone ran `resume`
        prev_end = seg.end_time
    _close(acc)
    return acc


def match_segments(stage: StageData, attempts: list[Attempt]) -> dict[int, Segment]:
    """Which segment ran in which attempt (index into `attempts`): its `start` lies in the attempt's window."""
    matched: dict[int, Segment] = {}
    free = list(stage.segments)
    for i, a in enumerate(attempts):
        if a.start is None:
            continue
        end = a.end if a.end is not None else float("inf")
        # sacct has whole seconds; events have sub-second times.
        seg = next((s for s in free if a.start - 1 <= s.start_time <= end + 1), None)
        if seg is not None:
            matched[i] = seg
            free.remove(seg)
    return matched


def account_slurm(stage: StageData, attempts: list[Attempt], now: float) -> TimeAccount:
    """A Slurm stage: allocated = Elapsed of every attempt; the parts from its matching segment."""
    acc = TimeAccount()
    started = sorted((a for a in attempts if a.start is not None), key=lambda a: a.start or 0.0)
    matched = match_segments(stage, started)
    prev_end: float | None = None
    for i, a in enumerate(started):
        assert a.start is not None
        end = a.end if a.end is not None else now
        elapsed = a.elapsed_s if a.end is not None else max(a.elapsed_s, now - a.start)  # still running
        acc.allocated_s += elapsed
        acc.cpu_s += elapsed * a.cpus
        acc.gpu_s += elapsed * a.gpus
        seg = matched.get(i)
        if seg is None:
            acc.startup_s += elapsed  # the job never reached the trainer's first event
        else:
            acc.startup_s += max(0.0, min(seg.first_step_time or seg.end_time, end) - a.start)
            _segment_parts(seg, acc)
            if a.end is not None:
                acc.shutdown_s += max(0.0, a.end - seg.end_time)
            if seg.end == "stopped" and a.end is not None and a.time_limit_s:
                acc.before_limit_s += max(0.0, a.start + a.time_limit_s - a.end)
        if prev_end is not None:
            acc.queue_wait_s += max(0.0, a.start - prev_end)
        prev_end = end
    seen = {id(seg) for seg in matched.values()}
    for seg in stage.segments:
        if id(seg) not in seen:  # sacct has not recorded its attempt (yet): count what its events show
            _from_events(seg, acc)
    _close(acc)
    return acc


def _close(acc: TimeAccount) -> None:
    inside = acc.useful_s + acc.startup_s + acc.checkpoint_s + acc.eval_s + acc.redone_s + acc.shutdown_s
    acc.other_s = max(0.0, acc.allocated_s - inside)
    # sacct's whole seconds can make the parts exceed the allocation by a second: keep the sum exact.
    acc.allocated_s = max(acc.allocated_s, inside)


def account_run(run: RunData, attempts: list[Attempt] | None = None, *, now: float | None = None) -> Accounting:
    """Where each stage's time went, and the total.

    `attempts` (Slurm runs): every attempt of the run's jobs, from `query_attempts`; None
    (local runs, or sacct unavailable) accounts from the metrics alone.
    """
    now = time.time() if now is None else now
    per: dict[str, TimeAccount] = {}
    by_stage: dict[str, list[Attempt]] = {}
    notes = []
    use_sacct = run.mode == "slurm" and attempts is not None
    if run.mode == "slurm" and attempts is None:
        notes.append("sacct was not available: allocated time is the wall time of the trainer's segments "
                     "(job start-up before the trainer's first event and queue waits are not seen)")
    total = TimeAccount()
    for st in run.stages:
        if use_sacct:
            assert attempts is not None
            mine = sorted((a for a in attempts if a.job_id in st.job_ids), key=lambda a: (a.start or float("inf")))
            by_stage[st.name] = mine
            per[st.name] = account_slurm(st, mine, now)
        else:
            per[st.name] = account_local(st)
        total.add(per[st.name])
    return Accounting(per, total, "sacct" if use_sacct else "metrics", by_stage, notes)
