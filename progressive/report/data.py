"""A run's records as plain data: stages, their job segments, logged steps and evaluation.

Reads only what the run wrote (run.json through `progressive.record`, each stage's
metrics.jsonl through `progressive.metrics.read_metrics`, the final checkpoint's
existence); never writes, never imports torch.

A *segment* is one life of a stage's training process: it opens with a `start` event
and ends with `stopped` (a checkpoint on the pre-timeout signal, Ctrl-C, cancel),
`completed`, or nothing at all (the process died; the next `start` resumes from the
last checkpoint and redoes the steps logged after it). Step times come from the
trainer's cumulative `elapsed_s`, which a resumed job restores from its checkpoint, so
work that is redone after a crash is visible as steps logged twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from progressive.errors import RunError
from progressive.metrics import read_metrics
from progressive.record import RunRecord

SegmentEnd = Literal["completed", "stopped", "interrupted", "open"]

__all__ = ["StepPoint", "Segment", "StageData", "RunData", "read_run"]


@dataclass(frozen=True)
class StepPoint:
    """One logged optimizer step."""

    step: int
    loss: float | None
    lr: float | None
    time: float  # epoch seconds when it was logged (after the step)
    segment: int  # index of the segment that logged it
    redone: bool  # an earlier segment had logged this step already


@dataclass
class Segment:
    """One life of a stage's training process, from its `start` event to its last event.

    Attributes:
        index: 0-based position among the stage's segments.
        start_time: the `start` event (after the trainer's set-up: task, data, model, checkpoint load).
        setup_s: that set-up's duration (0 in metrics written before the trainer recorded it).
        start_step: the step it started from (0, or its checkpoint's).
        resumed_from: the checkpoint it resumed, None for a fresh start.
        end: "completed", "stopped" (saved and left), "interrupted" (died: a later segment took over),
            "open" (the last segment, still running or died).
        end_time: time of its last event.
        first_step_time: when its first optimizer step began (None: no step logged).
        last_step: the last step it logged (start_step if none).
        steps_logged / redone_steps: steps it logged / of those, steps an earlier segment had logged.
        train_s / redone_s: optimizer-step time in it / of that, time spent on redone steps.
        checkpoint_s: time writing step checkpoints; final_save_s: writing final.pt; eval_s: evaluation.
        stop_time: its `stopped` event, if any.
    """

    index: int
    start_time: float
    start_step: int
    resumed_from: str | None
    setup_s: float = 0.0  # the trainer's set-up before its `start` event (task, data, model, checkpoint load)
    end: SegmentEnd = "open"
    end_time: float = 0.0
    first_step_time: float | None = None
    last_step: int = 0
    steps_logged: int = 0
    redone_steps: int = 0
    train_s: float = 0.0
    redone_s: float = 0.0
    checkpoint_s: float = 0.0
    checkpoints: int = 0
    final_save_s: float = 0.0
    eval_s: float = 0.0
    stop_time: float | None = None

    @property
    def useful_s(self) -> float:
        """Optimizer-step time that was not redone."""
        return max(0.0, self.train_s - self.redone_s)


@dataclass
class StageData:
    """A stage as the report sees it."""

    name: str
    index: int
    bucket: int
    total_steps: int | None
    complete: bool  # final.pt exists
    steps: list[StepPoint] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)  # the `completed` event's evaluation
    job_ids: list[str] = field(default_factory=list)  # Slurm jobs submitted for it, oldest first

    @property
    def restarts(self) -> int:
        """Segments after the first: requeues, resumes after a stop or a crash."""
        return max(0, len(self.segments) - 1)

    @property
    def last_loss(self) -> float | None:
        """The training loss of the last logged step."""
        return next((p.loss for p in reversed(self.steps) if p.loss is not None), None)


@dataclass
class RunData:
    """Every stage of a run, in plan order."""

    run_name: str
    mode: str  # "slurm" | "local"
    run_dir: Path
    stages: list[StageData]

    @property
    def start_time(self) -> float:
        """The first `start` event of the run (time zero of the wall-time figures)."""
        return min(seg.start_time for st in self.stages for seg in st.segments)


def read_run(rec: RunRecord) -> RunData:
    """Read every stage's metrics of a run.

    Raises:
        RunError: no stage has logged anything yet (nothing to report).
    """
    stages = []
    for st in rec.plan.stages:
        data = StageData(name=st.name, index=st.index, bucket=st.bucket, total_steps=st.total_steps,
                         complete=Path(st.final_checkpoint).is_file(),
                         job_ids=[s.job_id for s in rec.stages[st.name].submissions] if st.name in rec.stages else [])
        fill_stage(data, read_metrics(st.metrics_path))
        stages.append(data)
    if not any(s.segments for s in stages):
        raise RunError(f"run {rec.run_name!r} has no metrics yet: no stage has started training", loc=str(rec.run_dir),
                       hint=f"wait for its first job to start (`progressive status {rec.run_name}`), then run report again")
    return RunData(rec.run_name, rec.mode, rec.run_dir, stages)


def fill_stage(stage: StageData, events: list[dict[str, Any]]) -> None:
    """Split a stage's events into segments and steps (events before the first `start` are ignored)."""
    seen: dict[int, float] = {}  # step -> elapsed_s, over earlier segments: where a resume restarts the clock
    max_seen = 0
    seg: Segment | None = None
    base = 0.0  # elapsed_s at the segment's start step
    last_elapsed: float | None = None
    for ev in events:
        kind = ev.get("event")
        t = _num(ev.get("time"))
        if kind == "start":
            if seg is not None:
                _close(seg, base, last_elapsed, "interrupted")
                max_seen = max(max_seen, seg.last_step)
            step0 = int(ev.get("step") or 0)
            seg = Segment(index=len(stage.segments), start_time=t or 0.0, start_step=step0,
                          resumed_from=ev.get("resumed_from"), setup_s=_num(ev.get("setup_s")) or 0.0,
                          end_time=t or 0.0, last_step=step0)
            stage.segments.append(seg)
            # The checkpoint's step was logged by an earlier segment (unless log_every > 1: then the
            # nearest earlier logged step, which counts a few steps' time twice at most).
            base = seen.get(step0, max((v for s, v in seen.items() if s <= step0), default=0.0))
            last_elapsed = None
            continue
        if seg is None:
            continue
        if t is not None:
            seg.end_time = max(seg.end_time, t)
        if kind == "step":
            step = int(ev["step"])
            elapsed = _num(ev.get("elapsed_s"))
            if elapsed is not None:
                if seg.first_step_time is None and t is not None:
                    seg.first_step_time = t - max(0.0, elapsed - base)
                if step <= max_seen:
                    seg.redone_steps += 1
                    seg.redone_s = elapsed - base
                last_elapsed = elapsed
                seen[step] = elapsed
            elif seg.first_step_time is None:
                seg.first_step_time = t
            seg.steps_logged += 1
            seg.last_step = step
            stage.steps.append(StepPoint(step, _num(ev.get("loss")), _num(ev.get("lr")), t or seg.end_time,
                                         seg.index, step <= max_seen))
        elif kind == "checkpoint":
            seg.checkpoint_s += _num(ev.get("seconds")) or 0.0
            seg.checkpoints += 1
        elif kind == "stopped":
            seg.stop_time = t
            seg.end = "stopped"
        elif kind == "completed":
            seg.end = "completed"
            stage.eval = {k: float(v) for k, v in (ev.get("eval") or {}).items() if isinstance(v, (int, float))}
            seg.final_save_s = _num(ev.get("final_save_s")) or 0.0
            eval_s = _num(ev.get("eval_s"))
            if eval_s is None:  # metrics written before the trainer timed evaluation: all of the tail
                last_ck = seg.end_time if t is None else t
                eval_s = max(0.0, last_ck - (seg.stop_time or _last_checkpoint_time(events, ev) or last_ck))
            seg.eval_s = eval_s
    if seg is not None:
        _close(seg, base, last_elapsed, seg.end)


def _close(seg: Segment, base: float, last_elapsed: float | None, end: SegmentEnd) -> None:
    if seg.end not in ("completed", "stopped"):
        seg.end = end
    if last_elapsed is not None:
        seg.train_s = max(0.0, last_elapsed - base)
        seg.redone_s = min(seg.redone_s, seg.train_s)


def _last_checkpoint_time(events: list[dict[str, Any]], upto: dict[str, Any]) -> float | None:
    last = None
    for ev in events:
        if ev is upto:
            break
        if ev.get("event") == "checkpoint":
            last = _num(ev.get("time"))
    return last


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
