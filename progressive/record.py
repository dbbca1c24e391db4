"""The run record: `jobs/<run>/run.json`, what was submitted, when, as which jobs.

The record holds the resolved plan (each job reads its StagePlan from it), the
config text as submitted, and per stage the history of its Slurm job ids. It is
rewritten whole and atomically (temp file, fsync, rename) under a file lock, so a
crash or a concurrent `submit`/`resume` never leaves it torn or half-updated.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from progressive import atomic
from progressive.errors import RunError
from progressive.plan import Plan

RECORD_FILE = "run.json"
LOCK_FILE = ".lock"
RECORD_VERSION = 1
SUBMITIT_DIR = "slurm"  # under the run directory: sbatch scripts, pickles and logs of every job


def now_iso() -> str:
    """Local time, seconds resolution, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class Submission(BaseModel):
    """One job submitted for a stage (a stage may have several: resubmissions by resume)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    submitted_at: str
    dependency: Optional[str] = None
    reason: str = "submit"  # "submit" | "resume"


class StageRecord(BaseModel):
    """A stage's history in this run."""

    model_config = ConfigDict(extra="forbid")

    submissions: list[Submission] = Field(default_factory=list)
    # Local mode has no Slurm to ask: the runner records the state itself.
    local_state: Optional[str] = None

    @property
    def job_id(self) -> str | None:
        """The current (newest) job id."""
        return self.submissions[-1].job_id if self.submissions else None


class RunRecord(BaseModel):
    """Everything `status`, `resume`, `logs` and `cancel` need to know about a run."""

    model_config = ConfigDict(extra="forbid")

    version: int = RECORD_VERSION
    run_name: str
    mode: Literal["slurm", "local"]
    created_at: str
    updated_at: str
    config_path: str
    config_text: str
    plan: Plan
    stages: dict[str, StageRecord] = Field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        """jobs/<run>."""
        return Path(self.plan.run_dir)

    def stage_dir(self, name: str) -> Path:
        """jobs/<run>/stages/<name>: metrics, requeue counter, local logs."""
        return self.run_dir / "stages" / name


def record_path(run_dir: str | Path) -> Path:
    """Where a run's record lives."""
    return Path(run_dir) / RECORD_FILE


def load(run_dir: str | Path) -> RunRecord:
    """Read a run record, or raise RunError saying what is wrong."""
    path = record_path(run_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        root = path.parent.parent
        names = [p.name for p in list_runs(root)]
        hint = (f"runs under {root}: {', '.join(names)}; see one with `progressive status RUN`" if names
                else f"there are no runs under {root}; submit one with `progressive submit`")
        raise RunError("no run record here", loc=str(path), hint=hint) from None
    try:
        return RunRecord.model_validate_json(text)
    except ValidationError as exc:
        raise RunError(f"the run record is unreadable: {exc.errors(include_url=False)[0]['msg']}", loc=str(path),
                       hint="it was written by another version of progressive, or edited by hand") from None


def save(rec: RunRecord) -> None:
    """Write the record atomically; the old one stays valid until the new one is complete."""
    rec.updated_at = now_iso()
    atomic.write_text(record_path(rec.run_dir), rec.model_dump_json(indent=2))


@contextlib.contextmanager
def locked(run_dir: str | Path, timeout: float = 10) -> Iterator[None]:
    """Hold the run's lock: one submit/resume/cancel at a time changes a run."""
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        with lock.acquire(timeout=timeout):
            yield
    except Timeout:
        raise RunError("another progressive command is changing this run right now", loc=str(run_dir),
                       hint="wait for it to finish, then try again") from None


def list_runs(jobs_root: str | Path) -> list[Path]:
    """Run folders (those with a record) under a jobs root, newest first."""
    root = Path(jobs_root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / RECORD_FILE).is_file()]
    return sorted(runs, key=lambda p: (p / RECORD_FILE).stat().st_mtime, reverse=True)


# ------------------------------------------------------------------ per-stage counters

def requeue_count(stage_dir: Path, job_id: str | None) -> int:
    """Time-out requeues used by the stage's job `job_id` (preemptions are not counted).

    The counter names its job, so a new job (from submit or resume) starts with its full
    budget without anyone having to reset a file.
    """
    try:
        data = json.loads((stage_dir / "requeues.json").read_text())
        return int(data["timeouts"]) if str(data["job_id"]) == str(job_id) else 0
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return 0


def set_requeue_count(stage_dir: Path, job_id: str, count: int) -> None:
    """Record the time-out requeues used by job `job_id` (written by the job itself, atomically)."""
    atomic.write_text(stage_dir / "requeues.json", json.dumps({"job_id": str(job_id), "timeouts": count}))


def tail_objects(path: str | Path, max_bytes: int = 65536) -> list[dict[str, Any]]:
    """JSON objects on the last lines of a JSONL file, newest first (reads only its tail: status stays fast)."""
    try:
        with Path(path).open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            tail = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in reversed(tail.splitlines()):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # the first (cut) line, or one being written right now
        if isinstance(obj, dict):
            out.append(obj)
    return out


def last_step_metrics(path: str | Path) -> dict[str, Any] | None:
    """The last metrics line that carries a training step."""
    return next((o for o in tail_objects(path) if "step" in o and "loss" in o), None)
