"""The on-disk layout of a run: every folder and file name, in one place.

    <jobs>/<run>/run.json                      the run record (progressive.record)
    <jobs>/<run>/.lock                         held while a command changes the record
    <jobs>/<run>/slurm/<jobid>/                submitit's script, pickles and logs of each job:
        <jobid>_submission.sh, <jobid>_<task>_log.out, <jobid>_<task>_log.err
    <jobs>/<run>/stages/<stage>/metrics.jsonl  one line per optimizer step, and events
    <jobs>/<run>/stages/<stage>/requeues.json  time-out requeues used by the stage's current job
    <jobs>/<run>/stages/<stage>/local.log      local mode's log
    <jobs>/<run>/stages/<stage>/worker.log     a local sweep's worker process: all its output, tracebacks too
    <jobs>/<run>/stages/<stage>/tensorboard/   optional TensorBoard events
    <jobs>/<run>/report/                       `progressive report`: index.md, figures, transfer.json
    <jobs>/<run>/calibration.json              `progressive calibrate`'s measurements, one entry per stage
    <jobs>/<run>/calibration/<jobid>/          submitit's files of the calibration jobs
    <jobs>/<sweep>/<variant>/                  a sweep's variant: a run like any other, but its Slurm output is
    <jobs>/<sweep>/slurm/<array>_<task>.out    its array task's file (.err beside it): every DDP rank and
                                               every requeue of the task appended to the one file
    <checkpoints>/<run>/<stage>/step_<N>.pt    full trainer state after optimizer step N
    <checkpoints>/<run>/<stage>/final.pt       final weights: a stage is complete once it exists

The plan stores the three paths a job needs (checkpoint folder, final checkpoint,
metrics file) as strings, computed here; everything else is derived from the run folder.
Nothing here touches the disk except `is_complete`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RECORD_FILE = "run.json"
LOCK_FILE = ".lock"
SUBMITIT_DIR = "slurm"
STAGES_DIR = "stages"
METRICS_FILE = "metrics.jsonl"
REQUEUES_FILE = "requeues.json"
LOCAL_LOG = "local.log"
WORKER_LOG = "worker.log"
SWEEP_SLURM_DIR = "slurm"
ARRAY_TASK_LOG = "%A_%a"  # sbatch's file name pattern: <array job id>_<task id>
TENSORBOARD_DIR = "tensorboard"
REPORT_DIR = "report"
CALIBRATION_FILE = "calibration.json"
CALIBRATION_JOBS_DIR = "calibration"
FINAL_NAME = "final.pt"
STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def step_path(checkpoint_dir: str | Path, step: int) -> Path:
    """The full-state checkpoint file of `step` (zero-padded so names sort by step)."""
    return Path(checkpoint_dir) / f"step_{step:08d}.pt"


def is_complete(final_checkpoint: str | Path) -> bool:
    """A stage is complete once its final checkpoint exists (written atomically, last)."""
    return Path(final_checkpoint).is_file()


@dataclass(frozen=True)
class StageLayout:
    """Where one stage of a run keeps its files."""

    dir: Path  # <jobs>/<run>/stages/<stage>
    checkpoint_dir: Path  # <checkpoints>/<run>/<stage>

    @property
    def metrics(self) -> Path:
        """One JSON line per optimizer step, and events."""
        return self.dir / METRICS_FILE

    @property
    def requeues(self) -> Path:
        """The time-out requeue counter of the stage's current job."""
        return self.dir / REQUEUES_FILE

    @property
    def local_log(self) -> Path:
        """Local mode's log of the stage (what `progressive logs` shows)."""
        return self.dir / LOCAL_LOG

    @property
    def worker_log(self) -> Path:
        """A local sweep's worker process of the stage: its stdout and stderr (what `progressive logs` shows)."""
        return self.dir / WORKER_LOG

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files, when enabled."""
        return self.dir / TENSORBOARD_DIR

    @property
    def final(self) -> Path:
        """The stage's final weights."""
        return self.checkpoint_dir / FINAL_NAME

    def step(self, step: int) -> Path:
        """The full-state checkpoint after optimizer step `step`."""
        return step_path(self.checkpoint_dir, step)


@dataclass(frozen=True)
class RunLayout:
    """Where one run keeps its record, job files and checkpoints."""

    run_dir: Path  # <jobs>/<run>
    checkpoint_root: Path  # <checkpoints>/<run>

    @classmethod
    def under(cls, jobs_root: str | Path, checkpoints_root: str | Path, run: str) -> "RunLayout":
        """The layout of run `run` below the two roots (the run name must be validated first)."""
        return cls(Path(jobs_root) / run, Path(checkpoints_root) / run)

    @property
    def record(self) -> Path:
        """The run record."""
        return self.run_dir / RECORD_FILE

    @property
    def lock(self) -> Path:
        """The lock held while the record changes."""
        return self.run_dir / LOCK_FILE

    @property
    def submitit_folder(self) -> Path:
        """submitit's folder pattern (`%j` becomes each job's id)."""
        return self.run_dir / SUBMITIT_DIR / "%j"

    def job_dir(self, job_id: str) -> Path:
        """submitit's folder of one job."""
        return self.run_dir / SUBMITIT_DIR / job_id

    def job_log(self, job_id: str, task: int = 0, *, err: bool = False) -> Path:
        """The stdout (or stderr) of one task of one job."""
        return self.job_dir(job_id) / f"{job_id}_{task}_log.{'err' if err else 'out'}"

    def job_logs(self, job_id: str, *, err: bool = False) -> list[Path]:
        """Every task's log of one job that exists on disk, task 0 first."""
        suffix = "err" if err else "out"
        found = []
        for p in self.job_dir(job_id).glob(f"{job_id}_*_log.{suffix}"):
            task = p.name[len(job_id) + 1:].split("_", 1)[0]
            if task.isdigit():
                found.append((int(task), p))
        return [p for _, p in sorted(found)]

    def submission_script(self, job_id: str) -> Path:
        """The sbatch script submitit wrote for a job."""
        return self.job_dir(job_id) / f"{job_id}_submission.sh"

    @property
    def report(self) -> Path:
        """Where `progressive report` writes."""
        return self.run_dir / REPORT_DIR

    @property
    def calibration(self) -> Path:
        """`progressive calibrate`'s measurements of this run's stages."""
        return self.run_dir / CALIBRATION_FILE

    @property
    def calibration_jobs(self) -> Path:
        """submitit's folder pattern for the calibration jobs (`%j` becomes each job's id)."""
        return self.run_dir / CALIBRATION_JOBS_DIR / "%j"

    def calibration_job_dir(self, job_id: str) -> Path:
        """submitit's folder of one calibration job."""
        return self.run_dir / CALIBRATION_JOBS_DIR / job_id

    def stage(self, name: str) -> StageLayout:
        """The files of stage `name`."""
        return StageLayout(self.run_dir / STAGES_DIR / name, self.checkpoint_root / name)


def is_array_task(job_id: str) -> bool:
    """Whether a job id names a task of a Slurm array ("123_4", as a sweep records it), not a plain job."""
    array, sep, task = job_id.partition("_")
    return bool(sep) and array.isdigit() and task.isdigit()


def array_task_log(sweep_dir: str | Path, job_id: str, *, err: bool = False) -> Path:
    """The stdout (or stderr) of array task `job_id` ("ARRAY_TASK") of the sweep in `sweep_dir`."""
    return Path(sweep_dir) / SWEEP_SLURM_DIR / f"{job_id}.{'err' if err else 'out'}"


def record_path(run_dir: str | Path) -> Path:
    """Where the record of the run in `run_dir` lives."""
    return Path(run_dir) / RECORD_FILE


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of the run in `run_dir`."""
    return Path(run_dir) / LOCK_FILE
