"""Status: what each stage of a run is, as `progressive status` shows it.

Truth about a stage comes from three places: its final checkpoint on disk (complete
or not), the backend (Slurm's sacct/squeue, or the local runner's record and pid) for
its current job, and its metrics file for progress. Nothing here imports torch:
status stays fast on a login node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from progressive import requeues
from progressive.backends import Backend, JobInfo, get_backend
from progressive.errors import CheckpointError, RunError
from progressive.layout import array_task_log, is_array_task, is_complete
from progressive.metrics import last_step_metrics
from progressive.plan import StagePlan
from progressive.record import RunRecord
from progressive.states import RESUMABLE, StageState

S = StageState


@dataclass
class StageStatus:
    """What `status` shows for one stage."""

    name: str
    state: StageState
    job_id: Optional[str]
    slurm_state: Optional[str]  # the backend's own word (Slurm's state, or the local runner's record)
    reason: str
    requeues: int
    step: Optional[int]
    total_steps: Optional[int]
    epoch: Optional[int]
    loss: Optional[float]
    elapsed: str
    eta_s: Optional[float]
    checkpoint: Optional[str]
    final_checkpoint: Optional[str]
    fix: Optional[str] = None  # the command that gets it going again
    preemptions: int = 0  # preemptions the current job came back from (they do not count toward max_requeues)
    notes: list[str] = field(default_factory=list)  # facts worth a line under the table (preemptions, torn files, trackers)

    def as_json(self) -> dict[str, Any]:
        """The `status --json` form."""
        out = dict(self.__dict__)
        out["state"] = self.state.value
        return out


def latest_checkpoint_file(stage: StagePlan) -> Optional[str]:
    """The stage's newest intact full-state checkpoint (None if none), by the cheap check and moving nothing:
    status is read-only; the trainer verifies every CRC and moves corrupt files aside when it resumes."""
    from progressive.checkpoint import latest_checkpoint

    try:
        found = latest_checkpoint(stage.checkpoint_dir, resuming=False)
    except CheckpointError:
        return None  # every file torn: the trainer says so when the stage runs; status shows none
    return str(found) if found else None


def stage_statuses(rec: RunRecord, backend: Backend | None = None) -> list[StageStatus]:
    """Every stage's state, progress and checkpoints (one backend query for the whole run)."""
    backend = backend or get_backend(rec.mode)
    infos = backend.query(rec)
    return [stage_status(rec, st, infos.get(st.name)) for st in rec.plan.stages]


def stage_state(rec: RunRecord, stage: StagePlan, info: JobInfo | None) -> StageState:
    """One stage's state: complete on disk wins; then what the backend says of its current job."""
    if is_complete(stage.final_checkpoint):
        return S.COMPLETED
    if info is None:
        return S.NOT_SUBMITTED if rec.stage_record(stage.name).job_id is None else S.UNKNOWN
    if info.state is S.COMPLETED:
        return S.FAILED  # the job ended well but wrote no final weights: it did not finish its stage
    return info.state


def stage_status(rec: RunRecord, st: StagePlan, info: JobInfo | None) -> StageStatus:
    """What status shows for one stage, given what the backend said about its job."""
    srec = rec.stage_record(st.name)
    job_id = srec.job_id or (info.job_id if info and info.job_id else None)
    metrics = last_step_metrics(st.metrics_path) or {}
    state = stage_state(rec, st, info)
    complete = state is S.COMPLETED
    step = metrics.get("step")
    total = st.total_steps
    eta = None
    sps = metrics.get("samples_per_s")
    if state is S.RUNNING and step is not None and total and sps:
        eta = (total - step) * st.batch_size * st.world_size * st.train.grad_accum / float(sps)
    if complete:
        step = total if total is not None else step
    fix = f"progressive resume {rec.run_name}" if state in RESUMABLE and state is not S.NOT_SUBMITTED else None
    reason = info.reason if info else ""
    preempted = requeues.preemptions(rec.layout.stage(st.name).requeues, srec.job_id)
    if state is S.BLOCKED:
        reason = "its parent did not complete (Slurm: DependencyNeverSatisfied)"
    return StageStatus(
        name=st.name, state=state, job_id=job_id, slurm_state=info.native_state if info else None, reason=reason,
        requeues=requeues.count(rec.layout.stage(st.name).requeues, srec.job_id), step=step, total_steps=total,
        epoch=metrics.get("epoch"), loss=metrics.get("loss"), elapsed=info.elapsed if info else "",
        eta_s=eta, checkpoint=latest_checkpoint_file(st), final_checkpoint=st.final_checkpoint if complete else None,
        fix=fix, preemptions=preempted, notes=_notes(rec, st, state, preempted),
    )


def _notes(rec: RunRecord, st: StagePlan, state: StageState, preempted: int) -> list[str]:
    """Lines `status` shows under its table for this stage."""
    notes = []
    if preempted:
        now = "; it is waiting to run again" if state is S.PENDING else ""
        notes.append(f"{st.name} was preempted {preempted} time(s) and requeued itself (time-out requeues "
                     f"unaffected){now}")
    return notes + _checkpoint_notes(st) + _tracking_notes(rec, st)


def _tracking_notes(rec: RunRecord, st: StagePlan) -> list[str]:
    """What went wrong with a tracker in this stage's jobs, and its W&B offline runs not yet uploaded."""
    from progressive.tracking import files

    stage_dir = Path(st.metrics_path).parent
    notes = [f"{st.name}: tracking: {n}" for n in files.read_notes(stage_dir)]
    waiting = files.unsynced_runs(stage_dir)
    if waiting:
        notes.append(f"{st.name}: {len(waiting)} W&B offline run(s) not synced yet: progressive sync {rec.run_name}")
    return notes


def _checkpoint_notes(st: StagePlan) -> list[str]:
    """Corrupt checkpoints of the stage: moved aside at a resume, or torn and still waiting for one."""
    from progressive.checkpoint import corrupt_files, torn_files

    folder = Path(st.checkpoint_dir)
    notes = []
    aside = corrupt_files(folder)
    if aside:
        notes.append(f"{st.name}: {len(aside)} corrupt checkpoint(s) moved aside (kept, not deleted) in {folder}: "
                     + ", ".join(p.name for p in aside))
    torn = [p.name for p in torn_files(folder)]
    if torn:
        notes.append(f"{st.name}: torn checkpoint(s) {', '.join(torn)} in {folder}: the stage resumes from an "
                     "older one and moves them aside")
    return notes


@dataclass
class LogFiles:
    """Where a stage's jobs wrote their output, oldest job first."""

    stdout: list[Path] = field(default_factory=list)
    stderr: list[Path] = field(default_factory=list)


def log_files(rec: RunRecord, stage: str, task: int | None = 0) -> LogFiles:
    """The stage's log files: local.log in local mode; each Slurm job's task logs otherwise.

    `task` is the Slurm task (the DDP rank) whose files to list; None lists every task's
    file that exists, task by task within each job. A sweep's variant (its run folder is
    <jobs>/<sweep>/<variant>) differs: locally its worker's whole output (worker.log, with any
    traceback) is shown; on Slurm each array task writes one file for all its ranks and requeues,
    under <jobs>/<sweep>/slurm/, so there is no other task's file to pick.
    """
    if stage not in rec.plan.names:
        raise RunError(f"no stage named {stage!r} in run {rec.run_name!r}", loc="STAGE",
                       hint=f"valid stages: {', '.join(rec.plan.names)}")
    out = LogFiles()
    layout = rec.layout
    if rec.mode == "local":
        worker = layout.stage(stage).worker_log
        out.stdout.append(worker if worker.is_file() else layout.stage(stage).local_log)
        return out
    for sub in rec.stage_record(stage).submissions:
        if is_array_task(sub.job_id):
            if task not in (0, None):
                raise RunError(f"job {sub.job_id} is a sweep's array task: all its tasks (DDP ranks) write to one file, "
                               f"{array_task_log(layout.run_dir.parent, sub.job_id)}", loc="--task",
                               hint=f"leave out --task {task}: its ranks' lines are in that file")
            out.stdout.append(array_task_log(layout.run_dir.parent, sub.job_id))
            out.stderr.append(array_task_log(layout.run_dir.parent, sub.job_id, err=True))
        elif task is not None:
            out.stdout.append(layout.job_log(sub.job_id, task))
            out.stderr.append(layout.job_log(sub.job_id, task, err=True))
        else:
            out.stdout += layout.job_logs(sub.job_id) or [layout.job_log(sub.job_id, 0)]
            out.stderr += layout.job_logs(sub.job_id, err=True) or [layout.job_log(sub.job_id, 0, err=True)]
    return out
