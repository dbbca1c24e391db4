"""Local mode: run a graph's stages on this machine, one after another, with no Slurm.

Same trainer, checkpoints and run record as on Slurm. Ctrl-C (SIGINT) or SIGTERM
asks the trainer to stop after its current optimizer step; it saves a checkpoint and
the stage is recorded as "stopped", so `progressive resume` continues from there.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Callable, Optional

from progressive import record
from progressive.errors import RunError
from progressive.job import StopFlag
from progressive.orchestrate import is_complete
from progressive.record import RunRecord

Progress = Callable[[str, dict[str, Any]], None]


def run_local(rec: RunRecord, *, on_progress: Optional[Progress] = None,
              on_stage: Optional[Callable[[str, str, Any], None]] = None) -> dict[str, str]:
    """Run every incomplete stage of a local run in dependency order; return {stage: final state}.

    Stops at the first stage that is interrupted or fails (its dependents cannot start).
    `on_progress(stage, metrics)` gets each optimizer step's metrics; `on_stage(stage, event, outcome)`
    gets "start", "completed", "stopped" and "failed" events.
    """
    from progressive.trainer import train_stage

    if rec.mode != "local":
        raise RunError(f"run {rec.run_name!r} was submitted to Slurm", loc="--local",
                       hint=f"use `progressive resume {rec.run_name}` without --local")
    flag = StopFlag()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    flag.install(signal.SIGINT, signal.SIGTERM)
    results: dict[str, str] = {}
    try:
        for st in rec.plan.stages:
            if is_complete(st):
                results[st.name] = "completed"
                continue
            _set_state(rec, st.name, "running")
            if on_stage:
                on_stage(st.name, "start", None)
            handler = _file_logger(rec.stage_dir(st.name) / "local.log")
            try:
                outcome = train_stage(rec.plan, st, stop_requested=flag,
                                      on_progress=(lambda m, n=st.name: on_progress(n, m)) if on_progress else None)
            except Exception as exc:  # a ProgressiveError or a bug in the task: recorded, then re-raised
                _set_state(rec, st.name, "failed")
                if on_stage:
                    on_stage(st.name, "failed", exc)
                raise
            finally:
                logging.getLogger().removeHandler(handler)
                handler.close()
            state = "completed" if outcome.status == "completed" else "stopped"
            _set_state(rec, st.name, state)
            results[st.name] = state
            if on_stage:
                on_stage(st.name, state, outcome)
            if state != "completed":
                break
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return results


def _set_state(rec: RunRecord, stage: str, state: str) -> None:
    with record.locked(rec.run_dir):
        fresh = record.load(rec.run_dir)
        fresh.stages.setdefault(stage, record.StageRecord()).local_state = state
        record.save(fresh)
    rec.stages.setdefault(stage, record.StageRecord()).local_state = state


def _file_logger(path: Path) -> logging.Handler:
    """Send the trainer's log lines to the stage's local.log (what `progressive logs` shows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler
