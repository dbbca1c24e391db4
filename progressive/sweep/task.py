"""What a sweep's jobs run: `python -m progressive.sweep.task stage|prune|finish|local ...`.

- `stage SWEEP_DIR ARRAY`: one array task; SLURM_ARRAY_TASK_ID (the variant's index) picks the
  variant and its stage, then the same job entry as a run (`progressive.job.run_stage_job`).
- `prune SWEEP_DIR STEP`: after a stage's arrays, keep the best share and cancel the others' later tasks.
- `finish SWEEP_DIR`: summary.csv, best/ and the plot.
- `local RUN_DIR STAGE`: one stage of one variant on this machine (the local runner's worker).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

from progressive import record
from progressive.sweep import record as srecord

log = logging.getLogger("progressive.sweep")

EXIT_STOPPED = 3  # the local worker was asked to stop and saved a checkpoint


def run_array_task(sweep_dir: str, key: str) -> None:
    """The array task's variant and stage, trained by the run's own job entry."""
    from progressive.job import run_stage_job

    rec = srecord.load(sweep_dir)
    array = next((a for a in rec.arrays if a.key == key), None)
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    if array is None or task_id not in array.tasks:
        raise SystemExit(f"array {key!r} of sweep {rec.name!r} has no task {task_id!r}")
    variant, stage = array.tasks[task_id]
    if rec.method == "tpe":
        from progressive.sweep.tpe import ensure_drawn

        ensure_drawn(rec, variant)
    result = run_stage_job(str(rec.run_dir(variant)), stage)
    if rec.method == "tpe" and result.get("status") == "completed" and stage == rec.variant(variant).stages[-1]:
        from progressive.sweep.tpe import tell_finished

        tell_finished(rec, variant)


def step_metrics(rec: srecord.SweepRecord, step: int) -> dict[str, Optional[float]]:
    """The sweep's metric after each variant's stage number `step` (None where it has none)."""
    from progressive.sweep.summary import metric_of, stage_eval

    out: dict[str, Optional[float]] = {}
    for v in rec.variants:
        if len(v.stages) <= step or (v.pruned_after and v.stages.index(v.pruned_after) < step):
            continue
        st = record.load(rec.run_dir(v.name)).plan.stage(v.stages[step])
        out[v.name] = metric_of(stage_eval(st.metrics_path), rec.metric)
    return out


def decide_step(sweep_dir: str, step: int) -> list[str]:
    """Make (once) the prune decision after `step`; record it; return the job ids to cancel."""
    from progressive.sweep.prune import decide

    with record.locked(sweep_dir):
        rec = srecord.load(sweep_dir)
        done = next((p for p in rec.prunes if p.step == step and p.decided), None)
        if done is not None:
            return []
        assert rec.prune_keep is not None
        metrics = step_metrics(rec, step)
        kept, dropped = decide(metrics, rec.prune_keep, rec.goal)
        cancel: list[str] = []
        pruned: dict[str, Optional[float]] = {}
        for name, metric in dropped.items():
            v = rec.variant(name)
            # Only a variant with a metric and stages left is pruned: a failed one stays failed
            # (resume may retry it), one whose chain ends here is simply done.
            if metric is None or len(v.stages) <= step + 1:
                continue
            v.pruned_after, v.pruned_metric = v.stages[step], metric
            pruned[name] = metric
            run = record.load(rec.run_dir(name))
            cancel += [run.stages[s].job_id for s in v.stages[step + 1:] if s in run.stages and run.stages[s].job_id]  # type: ignore[misc]
        if rec.method == "tpe" and pruned:
            from progressive.sweep.tpe import tell_pruned

            tell_pruned(rec, list(pruned))
        rec.prunes = [p for p in rec.prunes if p.step != step] + [srecord.PruneRecord(
            step=step, job_id=os.environ.get("SLURM_JOB_ID"), decided=True, kept=kept, pruned=pruned)]
        srecord.save(rec)
    return [c for c in cancel if c]


def run_prune(sweep_dir: str, step: int) -> None:
    """The prune job: decide, then cancel the pruned variants' later array tasks."""
    from progressive.backends.slurm import cancel

    ids = decide_step(sweep_dir, step)
    log.info("prune after step %d: cancelling %s", step, ", ".join(ids) or "nothing")
    cancel(ids)


def run_finish(sweep_dir: str) -> None:
    """The last job: write summary.csv, best/ and (with the `report` extra) the plot."""
    from progressive.sweep.summary import write_outputs

    rec = srecord.load(sweep_dir)
    if rec.method == "tpe":
        # The last chance for a died chain's trial to be told: after this job nothing runs.
        from progressive.sweep.tpe import study, tell_dead

        with record.locked(sweep_dir):
            tell_dead(rec, study(rec))
    summary, best = write_outputs(rec)
    log.info("wrote %s%s", summary, f" and {best}" if best else "")
    try:
        from progressive.sweep.plot import write_plot

        log.info("wrote %s", write_plot(rec))
    except ImportError as exc:  # matplotlib absent: the summary is what matters
        log.warning("no plot: %s", exc)


def run_local_stage(run_dir: str, stage_name: str) -> int:
    """One stage of one variant, here; returns 0 (completed), EXIT_STOPPED, or raises (failed)."""
    from progressive.backends.local import _file_logger, _set_state, this_runner
    from progressive.signals import INTERRUPT_SIGNALS, StopFlag
    from progressive.states import StageState
    from progressive.trainer import train_stage

    sweep = srecord.load(Path(run_dir).parent)
    variant = Path(run_dir).name
    if sweep.method == "tpe":
        from progressive.sweep.tpe import ensure_drawn

        ensure_drawn(sweep, variant)
    rec = record.load(run_dir)
    st = rec.plan.stage(stage_name)
    import torch

    # The runner starts `parallel` of these at once: each keeps to its stage's cpus_per_task.
    torch.set_num_threads(st.slurm.cpus_per_task)
    flag = StopFlag()
    flag.install(*INTERRUPT_SIGNALS)
    _set_state(rec, st.name, StageState.RUNNING, this_runner())
    handler = _file_logger(rec.layout.stage(st.name).local_log)
    try:
        outcome = train_stage(rec.plan, st, stop_requested=flag)
    except BaseException:
        _set_state(rec, st.name, StageState.FAILED, None)
        raise
    finally:
        logging.getLogger().removeHandler(handler)
    state = "completed" if outcome.status == "completed" else "stopped"
    _set_state(rec, st.name, StageState(state), None)
    if sweep.method == "tpe" and state == "completed" and stage_name == rec.plan.stages[-1].name:
        from progressive.sweep.tpe import tell_finished

        tell_finished(sweep, variant)
    return 0 if state == "completed" else EXIT_STOPPED


def main(argv: list[str]) -> int:
    """Dispatch the job kinds (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kind, *args = argv
    if kind == "stage":
        run_array_task(args[0], args[1])
    elif kind == "prune":
        run_prune(args[0], int(args[1]))
    elif kind == "finish":
        run_finish(args[0])
    elif kind == "local":
        return run_local_stage(args[0], args[1])
    else:
        raise SystemExit(f"unknown sweep task {kind!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
