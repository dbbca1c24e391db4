"""Runs: submit a plan as a chain of Slurm jobs, read its state, resume it, cancel it.

The library side of `submit`, `status`, `resume` and `cancel` (the CLI prints).
Truth about a stage comes from three places: its final checkpoint on disk (complete
or not), Slurm (sacct, or squeue/scontrol without accounting) for its current job,
and its metrics file for progress. Nothing here imports torch: status stays fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from progressive import record
from progressive.errors import CheckpointError, RunError
from progressive.plan import Plan, StagePlan, missing_inputs
from progressive.record import SUBMITIT_DIR, RunRecord, Submission, now_iso

JobFn = Callable[[str, str], Any]


@dataclass
class StageStatus:
    """What `status` shows for one stage."""

    name: str
    state: str  # completed | running | pending | blocked | failed | timeout | cancelled | stopped | not submitted | unknown
    job_id: Optional[str]
    slurm_state: Optional[str]
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

    def as_json(self) -> dict[str, Any]:
        """The `status --json` form."""
        return dict(self.__dict__)


@dataclass
class ResumeAction:
    """One thing resume does (or would do, with --dry-run) for a stage."""

    stage: str
    action: str  # "skip (completed)" | "keep (live)" | "submit" | "cancel+submit"
    old_job: Optional[str] = None
    new_job: Optional[str] = None
    dependency: Optional[str] = None
    from_checkpoint: Optional[str] = None


def latest_checkpoint_file(stage: StagePlan) -> Optional[str]:
    """The stage's newest intact full-state checkpoint, as the trainer would resume it (None if none)."""
    from progressive.checkpoint import latest_checkpoint

    try:
        found = latest_checkpoint(stage.checkpoint_dir)
    except CheckpointError:
        return None  # every file torn: the trainer says so when the stage runs; status shows none
    return str(found) if found else None


def is_complete(stage: StagePlan) -> bool:
    """A stage is complete once its final checkpoint exists (written atomically, last)."""
    return Path(stage.final_checkpoint).is_file()


# ------------------------------------------------------------------ submit

def submit(plan: Plan, config_text: str, *, job_fn: JobFn, local: bool = False) -> RunRecord:
    """Record the run and submit every stage of `plan` chained by afterok (Slurm), or prepare a local run.

    Refuses (RunError, nothing submitted) when inputs are missing, when the run has live
    jobs, or when a selected stage is already complete in this run. If any sbatch fails,
    the jobs this call submitted are cancelled and the record is left as it was.
    """
    from progressive import slurm

    problems = missing_inputs(plan)
    if problems:
        raise RunError("cannot submit: " + "; ".join(problems), loc=plan.config_path,
                       hint="generate the data (`progressive data generate`), or run the parent stages first")
    wide = [st for st in plan.stages if st.world_size > 1]
    if local and wide:
        raise RunError(f"stage(s) {', '.join(st.name for st in wide)} ask for {wide[0].world_size} processes", loc="--local",
                       hint="local mode runs one process per stage: set tasks_per_node = 1 and nodes = 1")
    if not local and not slurm.slurm_available():
        raise RunError("Slurm is not available on this machine (no sbatch/srun on PATH)", loc="submit",
                       hint="run the graph here with `progressive submit --local`")
    done = [st.name for st in plan.stages if is_complete(st)]
    if done:
        raise RunError(f"stage(s) {', '.join(done)} already completed in run {plan.run_name!r}", loc="submit",
                       hint="submit under a new name with --run-name NAME, or select other stages with --stages")
    with record.locked(plan.run_dir):
        old = _load_or_none(plan.run_dir)
        if old is not None:
            live = [s.name for s in stage_statuses(old) if s.state in ("pending", "running", "blocked", "suspended")]
            if live:
                raise RunError(f"run {plan.run_name!r} still has live jobs: {', '.join(live)}", loc="submit",
                               hint="watch it with `progressive status`, cancel it with `progressive cancel`, "
                                    "or start a separate run with --run-name NAME")
        rec = _new_record(plan, config_text, local, old)
        if local:
            record.save(rec)
        else:
            # Parents outside the selection are complete (checked above): no dependency on them.
            _submit_chain(rec, list(plan.stages), lambda parent: None, job_fn, reason="submit")
        return rec


def _submit_chain(rec: RunRecord, stages: list[StagePlan], live_parent_job: Callable[[str], str | None],
                  job_fn: JobFn, *, reason: str) -> dict[str, Submission]:
    """Submit `stages` in order, each afterok its parents' jobs, record them and save the record.

    A parent submitted in this call is depended on through its new job; any other parent
    through `live_parent_job(name)` (None: nothing to wait for). If any sbatch fails, every job
    this call submitted is cancelled and the record is not saved: no half-submitted chain.
    """
    from progressive import slurm

    new: dict[str, Submission] = {}
    try:
        for st in stages:
            parents = [new[p].job_id if p in new else live_parent_job(p) for p in st.depends_on]
            dep = _afterok([j for j in parents if j])
            job_id = slurm.submit_stage(rec.plan, st, dep, job_fn, rec.plan.run_dir, st.name)
            new[st.name] = Submission(job_id=job_id, submitted_at=now_iso(), dependency=dep, reason=reason)
            rec.stages.setdefault(st.name, record.StageRecord()).submissions.append(new[st.name])
        record.save(rec)
    except BaseException:
        slurm.cancel([sub.job_id for sub in new.values()])
        raise
    return new


def _new_record(plan: Plan, config_text: str, local: bool, old: RunRecord | None) -> RunRecord:
    stages = dict(old.stages) if old else {}
    for st in plan.stages:
        stages[st.name] = stages.get(st.name) or record.StageRecord()
        if local:
            stages[st.name].local_state = "not started"
    # Stages not selected this time keep their plan entries from the earlier submission.
    merged = plan
    if old is not None:
        keep = [s for s in old.plan.stages if s.name not in plan.names]
        order = {s.name: s.index for s in [*keep, *plan.stages]}
        merged = plan.model_copy(update={"stages": tuple(sorted([*keep, *plan.stages], key=lambda s: order[s.name]))})
    return RunRecord(run_name=plan.run_name, mode="local" if local else "slurm",
                     created_at=old.created_at if old else now_iso(), updated_at=now_iso(),
                     config_path=plan.config_path, config_text=config_text, plan=merged, stages=stages)


def _load_or_none(run_dir: str) -> RunRecord | None:
    return record.load(run_dir) if record.record_path(run_dir).is_file() else None


def _afterok(ids: list[str]) -> str | None:
    return "afterok:" + ":".join(ids) if ids else None


# ------------------------------------------------------------------ status

def stage_statuses(rec: RunRecord) -> list[StageStatus]:
    """Every stage's state, progress and checkpoints (one sacct call for the whole run)."""
    infos: dict[str, Any] = {}
    if rec.mode == "slurm":
        from progressive import slurm

        ids = [s.job_id for s in rec.stages.values() if s.job_id]
        infos = slurm.query(ids) if slurm.slurm_available() else {}
    return [_stage_status(rec, st, infos) for st in rec.plan.stages]


def _stage_status(rec: RunRecord, st: StagePlan, infos: dict[str, Any]) -> StageStatus:
    srec = rec.stages.get(st.name, record.StageRecord())
    job_id = srec.job_id
    info = infos.get(job_id) if job_id else None
    metrics = record.last_step_metrics(st.metrics_path) or {}
    complete = is_complete(st)
    if complete:
        state = "completed"
    elif rec.mode == "local":
        state = srec.local_state or "not submitted"
    elif job_id is None:
        state = "not submitted"
    elif info is None:
        state = "unknown"
    else:
        state = info.state
        if state == "completed":  # Slurm says done but no final weights: the job did not finish its stage
            state = "failed"
    step = metrics.get("step")
    total = st.total_steps
    eta = None
    sps = metrics.get("samples_per_s")
    if state == "running" and step is not None and total and sps:
        eta = (total - step) * st.batch_size * st.world_size * st.train.grad_accum / float(sps)
    if complete:
        step = total if total is not None else step
    fix = None
    if state == "blocked":
        fix = f"progressive resume {rec.run_name}"
    elif state in ("failed", "timeout", "cancelled", "stopped", "unknown"):
        fix = f"progressive resume {rec.run_name}"
    reason = info.reason if info else ""
    if state == "blocked":
        reason = "its parent did not complete (Slurm: DependencyNeverSatisfied)"
    return StageStatus(
        name=st.name, state=state, job_id=job_id, slurm_state=info.slurm_state if info else None, reason=reason,
        requeues=record.requeue_count(rec.stage_dir(st.name), job_id), step=step, total_steps=total,
        epoch=metrics.get("epoch"), loss=metrics.get("loss"), elapsed=info.elapsed if info else "",
        eta_s=eta, checkpoint=latest_checkpoint_file(st), final_checkpoint=st.final_checkpoint if complete else None,
        fix=fix,
    )


# ------------------------------------------------------------------ resume and cancel

def plan_resume(rec: RunRecord, statuses: list[StageStatus] | None = None) -> list[ResumeAction]:
    """What resume would do: complete stages stay, live ones stay, the rest are (re)submitted behind their parents."""
    statuses = statuses or stage_statuses(rec)
    by_name = {s.name: s for s in statuses}
    resubmitted: set[str] = set()
    actions: list[ResumeAction] = []
    for st in rec.plan.stages:
        s = by_name[st.name]
        parent_redone = any(p in resubmitted for p in st.depends_on)
        if s.state == "completed":
            actions.append(ResumeAction(st.name, "skip (completed)", old_job=s.job_id))
        elif s.state in ("pending", "running", "suspended") and not parent_redone:
            actions.append(ResumeAction(st.name, "keep (live)", old_job=s.job_id))
        else:
            live_old = s.state in ("pending", "running", "suspended", "blocked")
            actions.append(ResumeAction(st.name, "cancel+submit" if live_old else "submit", old_job=s.job_id,
                                        from_checkpoint=s.checkpoint or (st.init_from.checkpoint if st.init_from.kind != "none" else None)))
            resubmitted.add(st.name)
    return actions


def resume(rec: RunRecord, *, job_fn: JobFn, dry_run: bool = False) -> list[ResumeAction]:
    """Resubmit every stage that is not complete and not live; re-chain its dependents behind it."""
    from progressive import slurm

    with record.locked(rec.run_dir):
        rec = record.load(rec.run_dir)  # re-read under the lock
        actions = plan_resume(rec)
        if dry_run or rec.mode == "local":
            return actions
        if not slurm.slurm_available():
            raise RunError("Slurm is not available on this machine", loc="resume",
                           hint="this run was submitted to Slurm; resume it where Slurm is")
        redo = [a for a in actions if a.action.endswith("submit")]
        # Stale jobs first: blocked ones, and live ones whose parent is being resubmitted.
        slurm.cancel([a.old_job for a in redo if a.action == "cancel+submit" and a.old_job])

        def live_parent_job(name: str) -> str | None:
            # A parent kept running (not resubmitted, not complete): wait for its current job.
            return None if is_complete(rec.plan.stage(name)) else rec.stages.get(name, record.StageRecord()).job_id

        new = _submit_chain(rec, [rec.plan.stage(a.stage) for a in redo], live_parent_job, job_fn, reason="resume")
        for a in redo:
            a.new_job, a.dependency = new[a.stage].job_id, new[a.stage].dependency
        return actions


def cancel(rec: RunRecord, stages: list[str] | None = None) -> list[str]:
    """scancel the current jobs of these stages (default: all); return the ids cancelled."""
    from progressive import slurm

    names = stages or [s.name for s in rec.plan.stages]
    unknown = [n for n in names if n not in rec.plan.names]
    if unknown:
        raise RunError(f"no stage named {', '.join(unknown)} in run {rec.run_name!r}", loc="--stages",
                       hint=f"valid stages: {', '.join(rec.plan.names)}")
    ids = [rec.stages[n].job_id for n in names if n in rec.stages and rec.stages[n].job_id]
    ids = [i for i in ids if i]
    if rec.mode == "slurm" and ids:
        slurm.cancel(ids)
    return ids


def find_run(jobs_root: Path, run: str | None) -> RunRecord:
    """The named run, or the most recently updated one under jobs_root."""
    if run:
        from progressive.config import validate_name

        try:
            validate_name(run, "run name")
        except ValueError as exc:
            raise RunError(str(exc), loc="RUN") from None
        return record.load(jobs_root / run)
    runs = record.list_runs(jobs_root)
    if not runs:
        raise RunError(f"no runs under {jobs_root}", loc="status",
                       hint="submit one with `progressive submit` (or `progressive submit --local`)")
    return record.load(runs[0])


@dataclass
class LogFiles:
    """Where a stage's job wrote its output."""

    stdout: list[Path] = field(default_factory=list)
    stderr: list[Path] = field(default_factory=list)


def log_files(rec: RunRecord, stage: str, task: int | None = 0) -> LogFiles:
    """The stage's log files, oldest job first (submitit writes jobs/<run>/slurm/<id>/<id>_<task>_log.out).

    `task` is the Slurm task (the DDP rank) whose files to list; None lists every task's
    file that exists, task by task within each job.
    """
    if stage not in rec.plan.names:
        raise RunError(f"no stage named {stage!r} in run {rec.run_name!r}", loc="STAGE",
                       hint=f"valid stages: {', '.join(rec.plan.names)}")
    out = LogFiles()
    if rec.mode == "local":
        p = rec.stage_dir(stage) / "local.log"
        out.stdout.append(p)
        return out
    for sub in rec.stages.get(stage, record.StageRecord()).submissions:
        d = rec.run_dir / SUBMITIT_DIR / sub.job_id
        for t in [task] if task is not None else _task_numbers(d, sub.job_id):
            out.stdout.append(d / f"{sub.job_id}_{t}_log.out")
            out.stderr.append(d / f"{sub.job_id}_{t}_log.err")
    return out


def _task_numbers(folder: Path, job_id: str) -> list[int]:
    """The task numbers that have a log file in a job's submitit folder ([0] when none has yet)."""
    found = {int(m.group(1)) for p in folder.glob(f"{job_id}_*_log.*")
             if (m := re.fullmatch(rf"{re.escape(job_id)}_(\d+)_log\.(?:out|err)", p.name))}
    return sorted(found) or [0]
