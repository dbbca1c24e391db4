"""Where calibration runs: one subprocess per stage here (`--local`), or one short Slurm job per stage.

Both return {stage: entry} and merge each entry into `jobs/<run>/calibration.json` as
soon as it arrives, so an interrupted calibration keeps the stages it finished. A Slurm
calibration job asks for the stage's own resources (partition, nodes, tasks, GPUs, CPUs,
memory) with a shorter time limit, no requeue, and its logs under
`jobs/<run>/calibration/<jobid>/`; `calibrate` waits for the jobs (it is an interactive
measurement, unlike `submit`) and cancels them on Ctrl-C or on any error.
This module imports neither torch nor submitit at import time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from progressive.calibration import CalibrationError, calibration_path, store_entries
from progressive.plan import Plan, StagePlan
from progressive.states import StageState

__all__ = ["calibrate_local", "calibrate_slurm"]

# How long a calibration job may stay unknown to Slurm before calibrate gives up on it.
LOST_AFTER_S = 120.0

Event = Callable[[str, str, Optional[Mapping[str, Any]]], None]  # (stage, what, entry-or-info)


def check_options(stages: list[StagePlan], options: Mapping[str, Any]) -> None:
    """Refuse what the measurement cannot do, before anything runs or is submitted."""
    wide = [st.name for st in stages if st.world_size > 1]
    if options.get("find_batch") and wide:
        # The search's decisions are per process; ranks deciding apart would deadlock their all-reduces.
        raise CalibrationError(f"--find-batch-size measures one process, but stage(s) {', '.join(wide)} run several",
                               loc="--find-batch-size",
                               hint="calibrate those stages without it (--stages), or search with tasks_per_node = 1 "
                                    "and nodes = 1: the micro-batch per process is what it finds")


def _entry_or_raise(stage: StagePlan, entry: Any) -> dict[str, Any]:
    if isinstance(entry, dict) and isinstance(entry.get("error"), dict):
        err = entry["error"]
        raise CalibrationError(str(err.get("msg")), loc=err.get("loc") or f"stage {stage.name!r}", hint=err.get("hint"))
    if not isinstance(entry, dict) or "step_s" not in entry:
        raise CalibrationError("the measurement returned nothing", loc=f"stage {stage.name!r}")
    return entry


def calibrate_local(plan: Plan, stages: list[StagePlan], options: Mapping[str, Any], *,
                    on_event: Event | None = None, timeout_s: float = 3600) -> dict[str, dict[str, Any]]:
    """Measure each stage in its own Python process on this machine, one after another."""
    check_options(stages, options)
    wide = [st.name for st in stages if st.world_size > 1]
    if wide:
        raise CalibrationError(f"stage(s) {', '.join(wide)} run several processes", loc="--local",
                               hint="calibrate them on Slurm (without --local), where each gets its allocation")
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="progressive-calibrate-") as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(plan.model_dump_json(), encoding="utf-8")
        for st in stages:
            if on_event:
                on_event(st.name, "start", None)
            result = Path(tmp) / f"{st.name}.json"
            cmd = [sys.executable, "-m", "progressive.calibrate", "--plan", str(plan_file), "--stage", st.name,
                   "--out", str(result), "--options", json.dumps(dict(options))]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                      env={**os.environ, "PYDANTIC_DISABLE_PLUGINS": "__all__"})
            except subprocess.TimeoutExpired:
                raise CalibrationError(f"the measurement took more than {timeout_s:.0f} s", loc=f"stage {st.name!r}",
                                       hint="use fewer --steps, or calibrate on Slurm") from None
            if proc.returncode != 0 or not result.is_file():
                tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
                raise CalibrationError(f"the measurement failed (exit {proc.returncode}):\n    {tail}",
                                       loc=f"stage {st.name!r}")
            entry = _entry_or_raise(st, json.loads(result.read_text(encoding="utf-8")))
            store_entries(calibration_path(plan), {st.name: entry})
            out[st.name] = entry
            if on_event:
                on_event(st.name, "done", entry)
    return out


def _calibration_job(plan_json: str, stage_name: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """What a calibration job runs (pickled by reference: torch is imported in the job, not here)."""
    from progressive.calibrate import calibration_job

    return calibration_job(plan_json, stage_name, options)


def calibration_time_min(stage: StagePlan, limit_min: int) -> int:
    """A calibration job's time limit: `limit_min`, never more than the stage's own."""
    return max(1, min(limit_min, stage.time_limit_min))


def calibrate_slurm(plan: Plan, stages: list[StagePlan], options: Mapping[str, Any], *, time_limit_min: int = 15,
                    on_event: Event | None = None, poll_s: float = 3.0) -> dict[str, dict[str, Any]]:
    """Submit one calibration job per stage with the stage's resources, wait for all, collect the entries.

    On Ctrl-C or any error every job still in Slurm's queue is cancelled.
    """
    from progressive.backends import slurm

    check_options(stages, options)
    if not slurm.slurm_available():
        raise CalibrationError("Slurm is not available on this machine (no sbatch/srun on PATH)", loc="calibrate",
                               hint="measure here with `progressive calibrate --local`")
    jobs: dict[str, Any] = {}
    # The ends a calibration job can reach; anything else is still on its way, unless Slurm stops knowing it.
    final = {StageState.COMPLETED, StageState.FAILED, StageState.TIMEOUT, StageState.CANCELLED}
    unseen: dict[str, float] = {}  # stage -> when Slurm first had no word (or "unknown") for its job
    out: dict[str, dict[str, Any]] = {}
    try:
        plan_json = plan.model_dump_json()
        for st in stages:
            ex = slurm._executor_class()(folder=plan.layout.calibration_jobs, max_num_timeout=0)
            params = slurm.sbatch_parameters(plan, st, None)
            params.update(time=calibration_time_min(st, time_limit_min), job_name=f"{plan.run_name}.{st.name}.calibrate",
                          additional_parameters=dict(st.slurm.extra))  # no requeue, no pre-timeout signal
            ex.update_parameters(**params)
            try:
                jobs[st.name] = ex.submit(_calibration_job, plan_json, st.name, dict(options))
            except Exception as exc:  # submitit's FailedJobError carries sbatch's words
                raise CalibrationError(f"sbatch refused the calibration job: {exc}", loc=f"stage {st.name!r}") from None
            if on_event:
                on_event(st.name, "submitted", {"job_id": str(jobs[st.name].job_id)})
        pending = dict(jobs)
        while pending:
            infos = slurm.query([str(j.job_id) for j in pending.values()])
            for name, job in list(pending.items()):
                info = infos.get(str(job.job_id))
                if on_event and info is not None:
                    on_event(name, "state", {"job_id": str(job.job_id), "state": info.state})
                if info is None or info.state is StageState.UNKNOWN:
                    # sacct may lag a moment behind sbatch; a job Slurm forgets for good must not hang us.
                    first = unseen.setdefault(name, time.monotonic())
                    if time.monotonic() - first > LOST_AFTER_S:
                        raise CalibrationError(f"Slurm has no state for calibration job {job.job_id} "
                                               f"({info.native_state if info else 'not found'})", loc=f"stage {name!r}",
                                               hint=f"check `sacct -j {job.job_id}` and run calibrate again")
                    continue
                unseen.pop(name, None)
                if info.state not in final:
                    continue
                del pending[name]
                logs = f"its output: {plan.layout.calibration_job_dir(str(job.job_id))}"
                if info.state in (StageState.TIMEOUT, StageState.CANCELLED):
                    raise CalibrationError(f"calibration job {job.job_id} ended {info.native_state}", loc=f"stage {name!r}",
                                           hint=f"give it more time with --time-limit, or fewer --steps; {logs}")
                try:
                    entry = _entry_or_raise(plan.stage(name), job.result())
                except CalibrationError:
                    raise
                except Exception as exc:  # the job's own exception, re-raised by submitit with its traceback
                    last = str(exc).strip().splitlines()[-1:] or ["?"]
                    raise CalibrationError(f"calibration job {job.job_id} ended {info.native_state}: {last[0]}",
                                           loc=f"stage {name!r}", hint=logs) from None
                store_entries(calibration_path(plan), {name: entry})
                out[name] = entry
                if on_event:
                    on_event(name, "done", entry)
            if pending:
                time.sleep(poll_s)  # polling Slurm's own states, not a synchronisation guess
    except BaseException:
        left = [str(j.job_id) for n, j in jobs.items() if n not in out]
        slurm.cancel(left)
        raise
    return out
