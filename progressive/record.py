"""The run record: `jobs/<run>/run.json`, what was submitted, when, as which jobs.

The record holds the resolved plan (each job reads its StagePlan from it), the
config text as submitted, and per stage the history of its job ids (Slurm) or who
runs it (local mode). It is rewritten whole and atomically (temp file, fsync, rename)
under a file lock, so a crash or a concurrent `submit`/`resume` never leaves it torn
or half-updated. Where its files live is `progressive.layout`'s business.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from progressive import atomic
from progressive.errors import RunError
from progressive.layout import RECORD_FILE, RunLayout, lock_path, record_path
from progressive.plan import Plan
from progressive.units import now_iso

RECORD_VERSION = 1


class Submission(BaseModel):
    """One job submitted for a stage (a stage may have several: resubmissions by resume)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    submitted_at: str
    dependency: Optional[str] = None
    reason: str = "submit"  # "submit" | "resume"


class Runner(BaseModel):
    """The process running a local stage: enough to tell later whether it is still alive."""

    model_config = ConfigDict(extra="forbid")

    pid: int
    host: str
    started_at: str
    # The process's start time in clock ticks since boot (/proc/<pid>/stat field 22) and the boot id:
    # a pid reused by another process, or a reboot, does not pass for the runner.
    start_ticks: Optional[int] = None
    boot_id: Optional[str] = None


class StageRecord(BaseModel):
    """A stage's history in this run."""

    model_config = ConfigDict(extra="forbid")

    submissions: list[Submission] = Field(default_factory=list)
    # Local mode has no Slurm to ask: the runner records the state itself, and who it is, so that
    # a runner that died without a word (SIGKILL, OOM, reboot) is seen as stopped, not running.
    local_state: Optional[str] = None
    runner: Optional[Runner] = None

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

    @property
    def layout(self) -> RunLayout:
        """Every path of this run."""
        return self.plan.layout

    def stage_record(self, name: str) -> StageRecord:
        """The stage's history (an empty one if it has none yet)."""
        return self.stages.get(name) or StageRecord()


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
    lock = FileLock(str(lock_path(run_dir)))
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
