"""Runs: submit a plan to a backend, resume it, cancel it, find it.

The library side of `submit`, `resume` and `cancel` (the CLI prints). A run is a plan
recorded in `jobs/<run>/run.json` plus, per stage, the jobs a backend ran for it. The
plan is data and submitting is its side effect: each stage's script is rendered once,
by the same function `plan --dry-run` shows, and handed to the backend as it is, only
its dependency bound to real job ids. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from progressive import record
from progressive.backends import Backend, get_backend
from progressive.errors import RunError
from progressive.layout import is_complete
from progressive.plan import SPLITS, Plan, StagePlan, check_data, missing_weights, present_buckets
from progressive.record import RunRecord, Submission
from progressive.states import LIVE, RUNNING_OR_QUEUED, StageState
from progressive.status import StageStatus, stage_statuses
from progressive.units import now_iso

S = StageState


@dataclass
class ResumeAction:
    """One thing resume does (or would do, with --dry-run) for a stage."""

    stage: str
    action: str  # "skip (completed)" | "keep (live)" | "submit" | "cancel+submit"
    old_job: Optional[str] = None
    new_job: Optional[str] = None
    dependency: Optional[str] = None
    from_checkpoint: Optional[str] = None


# ------------------------------------------------------------------ submit

def submit(plan: Plan, config_text: str, backend: Backend) -> RunRecord:
    """Record the run and submit every stage of `plan` chained by afterok (or, in-process, only record it).

    Refuses (nothing submitted) when the data is absent or lacks a bucket (DataError), when parent
    weights are missing, when the backend cannot run the plan, when the run has live jobs, or
    when a selected stage is already complete in this run. If any submission fails, the jobs this call submitted are cancelled and the
    record is left as it was. An in-process backend (local) runs the stages afterwards.
    """
    check_data(plan)
    problems = missing_weights(plan)
    if problems:
        raise RunError("cannot submit: " + "; ".join(problems), loc=plan.config_path,
                       hint="run the parent stages first (or select them with --stages)")
    backend.check_plan(plan)
    backend.ensure_available()
    done = [st.name for st in plan.stages if is_complete(st.final_checkpoint)]
    if done:
        raise RunError(f"stage(s) {', '.join(done)} already completed in run {plan.run_name!r}", loc="submit",
                       hint="submit under a new name with --run-name NAME, or select other stages with --stages")
    with record.locked(plan.run_dir):
        old = _load_or_none(plan.run_dir)
        if old is not None:
            same = backend if backend.name == old.mode else get_backend(old.mode)  # who ran it before
            live = [s.name for s in stage_statuses(old, same) if s.state in LIVE]
            if live:
                raise RunError(f"run {plan.run_name!r} still has live jobs: {', '.join(live)}", loc="submit",
                               hint="watch it with `progressive status`, cancel it with `progressive cancel`, "
                                    "or start a separate run with --run-name NAME")
        rec = _new_record(plan, config_text, backend, old)
        if backend.runs_in_process:
            record.save(rec)
        else:
            # Parents outside the selection are complete (checked above): no dependency on them.
            _submit_chain(rec, backend, list(plan.stages), lambda parent: None, reason="submit")
        return rec


def _submit_chain(rec: RunRecord, backend: Backend, stages: list[StagePlan],
                  live_parent_job: Callable[[str], str | None], *, reason: str) -> dict[str, Submission]:
    """Submit `stages` in order, each afterok its parents' jobs, record them and save the record.

    A parent submitted in this call is depended on through its new job; any other parent
    through `live_parent_job(name)` (None: nothing to wait for). If any submission fails, every
    job this call submitted is cancelled and the record is not saved: no half-submitted chain.
    """
    scripts = {st.name: backend.render(rec.plan, st) for st in stages}  # rendered once, sent as is
    new: dict[str, Submission] = {}
    try:
        for st in stages:
            parents = [new[p].job_id if p in new else live_parent_job(p) for p in st.depends_on]
            dep = afterok([j for j in parents if j])
            job_id = backend.submit(rec.plan, st, scripts[st.name], dep)
            new[st.name] = Submission(job_id=job_id, submitted_at=now_iso(), dependency=dep, reason=reason)
            rec.stages.setdefault(st.name, record.StageRecord()).submissions.append(new[st.name])
        record.save(rec)
    except BaseException:
        # Each stage's current job in `rec` (in memory; the file is untouched) is the one this call made.
        backend.cancel(rec, list(new))
        raise
    return new


def _new_record(plan: Plan, config_text: str, backend: Backend, old: RunRecord | None) -> RunRecord:
    stages = dict(old.stages) if old else {}
    for st in plan.stages:
        stages[st.name] = stages.get(st.name) or record.StageRecord()
        if backend.runs_in_process:
            stages[st.name].local_state = S.NOT_STARTED.value
            stages[st.name].runner = None
    # Stages not selected this time keep their plan entries from the earlier submission.
    merged = plan
    if old is not None:
        keep = [s for s in old.plan.stages if s.name not in plan.names]
        order = {s.name: s.index for s in [*keep, *plan.stages]}
        merged = plan.model_copy(update={"stages": tuple(sorted([*keep, *plan.stages], key=lambda s: order[s.name]))})
    return RunRecord(run_name=plan.run_name, mode=backend.name,  # type: ignore[arg-type]
                     created_at=old.created_at if old else now_iso(), updated_at=now_iso(),
                     config_path=plan.config_path, config_text=config_text, plan=merged, stages=stages)


def _load_or_none(run_dir: str) -> RunRecord | None:
    return record.load(run_dir) if record.record_path(run_dir).is_file() else None


def afterok(ids: list[str]) -> str | None:
    """Slurm's dependency on every job of `ids` completing (None for none)."""
    return "afterok:" + ":".join(ids) if ids else None


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
        if s.state is S.COMPLETED:
            actions.append(ResumeAction(st.name, "skip (completed)", old_job=s.job_id))
        elif s.state in RUNNING_OR_QUEUED and not parent_redone:
            actions.append(ResumeAction(st.name, "keep (live)", old_job=s.job_id))
        else:
            actions.append(ResumeAction(st.name, "cancel+submit" if s.state in LIVE else "submit", old_job=s.job_id,
                                        from_checkpoint=s.checkpoint or (st.init_from.checkpoint if st.init_from.kind != "none" else None)))
            resubmitted.add(st.name)
    return actions


def resume(rec: RunRecord, *, backend: Backend | None = None, dry_run: bool = False) -> list[ResumeAction]:
    """Resubmit every stage that is not complete and not live; re-chain its dependents behind it.

    An in-process backend only checks that nobody runs the stages now; the caller runs them.
    """
    backend = backend or get_backend(rec.mode)
    with record.locked(rec.run_dir):
        rec = record.load(rec.run_dir)  # re-read under the lock
        statuses = stage_statuses(rec, backend)
        actions = plan_resume(rec, statuses)
        recheck_data(rec.plan, [a.stage for a in actions if a.action.endswith("submit")])
        if dry_run:
            return actions
        if backend.runs_in_process:
            running = [s for s in statuses if s.state in RUNNING_OR_QUEUED]
            if running:
                raise RunError(f"run {rec.run_name!r} is running right now ({running[0].name}, {running[0].job_id})",
                               loc="resume", hint=f"stop it with `progressive cancel {rec.run_name}` (it checkpoints), "
                                                  "then resume")
            return actions
        backend.ensure_available()
        redo = [a for a in actions if a.action.endswith("submit")]
        # Stale jobs first: blocked ones, and live ones whose parent is being resubmitted.
        backend.cancel(rec, [a.stage for a in redo if a.action == "cancel+submit" and a.old_job])

        def live_parent_job(name: str) -> str | None:
            # A parent kept running (not resubmitted, not complete): wait for its current job.
            return None if is_complete(rec.plan.stage(name).final_checkpoint) else rec.stage_record(name).job_id

        new = _submit_chain(rec, backend, [rec.plan.stage(a.stage) for a in redo], live_parent_job, reason="resume")
        for a in redo:
            a.new_job, a.dependency = new[a.stage].job_id, new[a.stage].dependency
        return actions


def recheck_data(plan: Plan, stages: list[str]) -> None:
    """`submit`'s data check for these stages against the data as it is now (it may have changed since).

    Counted without torch, as `plan` counts; data that only the task can count is left to the
    stage itself, which says what it lacks when it reads it.
    """
    if not stages:
        return
    from progressive.data.counts import CountsUnknown, plan_counts

    chosen = [st for st in plan.stages if st.name in stages]
    try:
        counts = plan_counts(plan.data_path, buckets=[st.bucket for st in chosen], task=plan.model.task,
                             options=plan.model.options, config=plan.config_path)
    except CountsUnknown:
        return
    now = [st.model_copy(update={"samples": {split: int(counts.get(st.bucket, {}).get(split, 0)) for split in SPLITS}})
           for st in chosen]
    check_data(plan.model_copy(update={"stages": tuple(now), "data_buckets": present_buckets(counts),
                                       "data_error": None}))


def cancel(rec: RunRecord, stages: list[str] | None = None, *, backend: Backend | None = None) -> list[str]:
    """Stop the current jobs of these stages (default: all); return what was cancelled."""
    names = stages or [s.name for s in rec.plan.stages]
    unknown = [n for n in names if n not in rec.plan.names]
    if unknown:
        raise RunError(f"no stage named {', '.join(unknown)} in run {rec.run_name!r}", loc="--stages",
                       hint=f"valid stages: {', '.join(rec.plan.names)}")
    return (backend or get_backend(rec.mode)).cancel(rec, names)


def find_run(jobs_root: Path, run: str | None, *, verb: str = "status") -> RunRecord:
    """The named run, or the most recently updated one under jobs_root (`verb` names the command in errors)."""
    if run:
        from progressive.config import validate_name

        try:
            validate_name(run, "run name")
        except ValueError as exc:
            raise RunError(str(exc), loc="RUN") from None
        return record.load(jobs_root / run)
    runs = record.list_runs(jobs_root)
    if not runs:
        raise RunError(f"no runs under {jobs_root}", loc=verb,
                       hint="submit one with `progressive submit` (or `progressive submit --local`)")
    return record.load(runs[0])


# ------------------------------------------------------------------ listing runs

@dataclass
class RunSummary:
    """One line of `progressive runs`: a run, its mode, where it stands and when it last changed."""

    name: str
    mode: str
    state: str
    stages_done: int
    stages: int
    last_change: str  # ISO time of the newest write to its record or any stage's metrics
    note: str = ""  # why the state is unknown (Slurm did not answer), if it is

    def as_json(self) -> dict[str, object]:
        """The `runs --json` form."""
        return dict(self.__dict__)


# The run's state is its most telling stage's: a failure outranks progress, progress outranks waiting.
_RUN_STATE_ORDER = (S.BLOCKED, S.FAILED, S.TIMEOUT, S.CANCELLED, S.STOPPED, S.UNKNOWN, S.RUNNING, S.SUSPENDED,
                    S.PENDING, S.NOT_STARTED, S.NOT_SUBMITTED, S.PRUNED, S.COMPLETED)


def run_state(states: list[StageState]) -> StageState:
    """One word for a run from its stages' states: `completed` only when every stage is."""
    if states and all(s is S.COMPLETED for s in states):
        return S.COMPLETED
    return next((s for s in _RUN_STATE_ORDER if s in states), S.UNKNOWN)


def summarize_runs(jobs_root: Path) -> list[RunSummary]:
    """Every run under jobs_root, newest first (one backend query per run that is not complete)."""
    from progressive.errors import ProgressiveError

    out: list[RunSummary] = []
    for run_dir in record.list_runs(jobs_root):
        rec = record.load(run_dir)
        done = sum(is_complete(st.final_checkpoint) for st in rec.plan.stages)
        note = ""
        if done == len(rec.plan.stages):
            state = S.COMPLETED
        else:
            try:
                state = run_state([s.state for s in stage_statuses(rec)])
            except ProgressiveError as exc:  # Slurm unreachable from here: list the run anyway
                state, note = S.UNKNOWN, exc.msg.splitlines()[0]
        out.append(RunSummary(rec.run_name, rec.mode, state.value, done, len(rec.plan.stages),
                              _last_change(rec), note))
    return out


def _last_change(rec: RunRecord) -> str:
    """When the run last changed: its record, or a stage's metrics (a running stage writes only those)."""
    import time

    paths = [record.record_path(rec.run_dir), *(Path(st.metrics_path) for st in rec.plan.stages)]
    mtimes = [p.stat().st_mtime for p in paths if p.is_file()]
    # The same form as the record's own times (`units.now_iso`).
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(max(mtimes))) if mtimes else rec.updated_at
