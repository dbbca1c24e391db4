"""Sweeps, the read side: each variant's state per stage, its metrics, summary.csv and best/.

States come from the same places as a run's: the final checkpoint on disk (complete), the
sweep record (pruned), Slurm for array tasks (one sacct + one squeue for the whole sweep) or
the variant's record in local mode. Metrics come from each stage's `completed` event (its
evaluation). No torch: `sweep status` stays fast.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from progressive import atomic, record
from progressive.errors import RunError
from progressive.backends.local import LocalBackend
from progressive.layout import FINAL_NAME, is_complete
from progressive.metrics import read_metrics, tail_objects
from progressive.record import RunRecord
from progressive.report.accounting import account_local
from progressive.report.data import StageData, fill_stage
from progressive.status import stage_state
from progressive.sweep.record import SweepRecord

SUMMARY_FILE = "summary.csv"
BEST_DIR = "best"


def stage_eval(metrics_path: str) -> Optional[dict[str, Any]]:
    """The stage's evaluation (its `completed` event), or None before it completes."""
    done = next((o for o in tail_objects(metrics_path) if o.get("event") == "completed"), None)
    return dict(done.get("eval") or {}, elapsed_s=done.get("elapsed_s")) if done else None


def metric_of(ev: Optional[dict[str, Any]], metric: str) -> Optional[float]:
    """The named metric of an evaluation, as a float (None when absent or not a number)."""
    if not ev or metric not in ev:
        return None
    try:
        value = float(ev[metric])
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _runs(rec: SweepRecord) -> dict[str, RunRecord]:
    return {v.name: record.load(rec.run_dir(v.name)) for v in rec.variants}


def stage_states(rec: SweepRecord, runs: dict[str, RunRecord] | None = None) -> dict[str, dict[str, tuple[str, Optional[str]]]]:
    """{variant: {stage: (state, current job id)}} for the whole sweep (one Slurm query)."""
    runs = runs or _runs(rec)
    infos: dict[str, Any] = {}
    if rec.mode == "slurm":
        from progressive.backends.slurm import slurm_available
        from progressive.sweep.slurm_array import query_tasks

        if slurm_available():
            arrays = sorted({s.job_id.split("_")[0] for r in runs.values() for s in r.stages.values() if s.job_id})
            infos = query_tasks(arrays)
    out: dict[str, dict[str, tuple[str, Optional[str]]]] = {}
    for v in rec.variants:
        run = runs[v.name]
        # The local backend sees a runner that died without a word as stopped, not running.
        local = LocalBackend().query(run) if rec.mode == "local" else {}
        out[v.name] = {}
        for st in run.plan.stages:
            srec = run.stages.get(st.name)
            job = srec.job_id if srec else None
            info = local.get(st.name) if rec.mode == "local" else (infos.get(job) if job else None)
            if v.pruned_after and not is_complete(st.final_checkpoint):
                state = "pruned"
            elif rec.mode == "slurm" and job and info is None and "_" in job \
                    and any(k.startswith(job.split("_")[0] + "_") for k in infos) \
                    and not is_complete(st.final_checkpoint):
                # Slurm keeps no record of a pending array task cancelled before it was split off
                # from its array; if Slurm knows the array but not the task, the task never ran. A task
                # that has just ended may be missing too (gone from squeue, not yet in sacct): its final
                # weights say it completed.
                state = "cancelled"
            else:
                state = stage_state(run, st, info).value  # the one reading of a stage's state, as `status`
            out[v.name][st.name] = (state, job)
    return out


@dataclass
class VariantRow:
    """One variant in `sweep status` and summary.csv."""

    name: str
    params: dict[str, Any]
    state: str
    stages: dict[str, str]  # stage -> state
    stage_metrics: dict[str, Optional[float]]  # stage -> the sweep's metric after that stage
    final_metric: Optional[float]
    wall_s: float
    cpu_hours: float
    gpu_hours: float
    pruned_after: Optional[str] = None
    final_checkpoint: Optional[str] = None
    evals: dict[str, Any] = field(default_factory=dict)

    def pruned_metric_stage(self) -> Optional[float]:
        """The metric at the stage after which the variant was pruned."""
        return self.stage_metrics.get(self.pruned_after) if self.pruned_after else None


def _variant_state(stages: dict[str, str], pruned: bool) -> str:
    states = list(stages.values())
    if pruned:
        return "pruned"
    if all(s == "completed" for s in states):
        return "completed"
    for s in states:
        if s != "completed":
            return s
    return "unknown"


def rows(rec: SweepRecord) -> list[VariantRow]:
    """Every variant's row: states, metrics, time and allocated hours."""
    runs = _runs(rec)
    states = stage_states(rec, runs)
    usage: dict[str, tuple[float, float, float]] = {}
    if rec.mode == "slurm":
        from progressive.sweep.slurm_array import usage as slurm_usage

        usage = slurm_usage(sorted({a.job_id for a in rec.arrays if a.job_id}))
    out = []
    for v in rec.variants:
        run = runs[v.name]
        metrics: dict[str, Optional[float]] = {}
        evals: dict[str, Any] = {}
        wall = cpu_h = gpu_h = 0.0
        for st in run.plan.stages:
            ev = stage_eval(st.metrics_path)
            metrics[st.name] = metric_of(ev, rec.metric)
            if ev:
                evals[st.name] = ev
            if rec.mode == "local":
                # Each process's life, as `report` counts it: set-up, steps, evaluation and saves, not only steps.
                data = StageData(name=st.name, index=st.index, bucket=st.bucket, total_steps=st.total_steps, complete=False)
                fill_stage(data, read_metrics(st.metrics_path))
                secs = account_local(data).allocated_s
                wall += secs
                cpu_h += secs * st.slurm.cpus_per_task * st.world_size / 3600
            else:
                for sub in run.stages.get(st.name, record.StageRecord()).submissions:
                    e, c, g = usage.get(sub.job_id, (0.0, 0.0, 0.0))
                    wall, cpu_h, gpu_h = wall + e, cpu_h + c, gpu_h + g
        stage_state = {name: s for name, (s, _) in states[v.name].items()}
        state = _variant_state(stage_state, v.pruned_after is not None)
        last = run.plan.stages[-1]
        final = metrics.get(last.name) if state == "completed" else None
        out.append(VariantRow(v.name, v.params or {}, state, stage_state, metrics, final, wall, cpu_h, gpu_h,
                              v.pruned_after, last.final_checkpoint if state == "completed" else None, evals))
    return out


def ended(rec: SweepRecord, table: list[VariantRow]) -> bool:
    """Whether nothing more happens to the sweep by itself: every variant in a final state and, for a
    local sweep, the process running it gone (between two stages a variant looks not started)."""
    from progressive.backends.local import runner_alive
    from progressive.states import FINAL

    final = {s.value for s in FINAL}
    if any(r.state not in final for r in table):
        return False
    # On another host (None) it cannot be checked from here: it counts as running.
    return rec.mode != "local" or rec.runner is None or runner_alive(rec.runner) is False


def best(rec: SweepRecord, table: list[VariantRow]) -> Optional[VariantRow]:
    """The completed variant with the best final metric (ties: the first by name)."""
    done = [r for r in table if r.final_metric is not None]
    if not done:
        return None
    sign = 1.0 if rec.goal == "min" else -1.0
    return sorted(done, key=lambda r: (sign * float(r.final_metric or 0.0), r.name))[0]


def summary_csv(rec: SweepRecord, table: list[VariantRow]) -> str:
    """summary.csv's text: a row per variant."""
    params = [k for r in table for k in r.params]
    params = list(dict.fromkeys(params))
    stage_names = list(dict.fromkeys(s for r in table for s in r.stages))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", *params, "state", "pruned_after", *[f"{s}.{rec.metric}" for s in stage_names],
                f"final.{rec.metric}", "wall_s", "cpu_hours", "gpu_hours"])
    for r in table:
        w.writerow([r.name, *[json.dumps(r.params[k]) if isinstance(r.params.get(k), list) else r.params.get(k, "")
                              for k in params],
                    r.state, r.pruned_after or "", *[_cell(r.stage_metrics.get(s)) for s in stage_names],
                    _cell(r.final_metric), f"{r.wall_s:.1f}", f"{r.cpu_hours:.5f}", f"{r.gpu_hours:.5f}"])
    return buf.getvalue()


def _cell(v: Optional[float]) -> str:
    return "" if v is None else repr(v)


def write_outputs(rec: SweepRecord) -> tuple[Path, Optional[Path]]:
    """Write jobs/<sweep>/summary.csv and, once a variant completed, best/ (its final weights and best.json)."""
    table = rows(rec)
    sweep_dir = Path(rec.sweep_dir)
    summary = sweep_dir / SUMMARY_FILE
    atomic.write_text(summary, summary_csv(rec, table))
    top = best(rec, table)
    if top is None or top.final_checkpoint is None:
        return summary, None
    best_dir = sweep_dir / BEST_DIR
    src = Path(top.final_checkpoint)
    if not src.is_file():
        raise RunError("the best variant's final checkpoint is missing", loc=str(src))
    with atomic.replacing(best_dir / FINAL_NAME) as tmp:
        shutil.copyfile(src, tmp)
    info = {"sweep": rec.name, "variant": top.name, "params": top.params, "metric": rec.metric, "goal": rec.goal,
            "final_metric": top.final_metric, "stage_metrics": top.stage_metrics, "evaluations": top.evals,
            "stages": list(top.stages), "source_checkpoint": str(src), "wall_s": top.wall_s,
            "cpu_hours": top.cpu_hours, "gpu_hours": top.gpu_hours}
    atomic.write_text(best_dir / "best.json", json.dumps(info, indent=2, default=str))
    return summary, best_dir
