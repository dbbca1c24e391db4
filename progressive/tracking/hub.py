"""Rank 0's trackers for one stage job: the trainer hands over events, a background thread does the rest.

The trainer's MetricsWriter passes every event (start, step, checkpoint, stopped, completed) to
`TrackerHub.event`, which only puts it in a bounded queue: opening a W&B run, an MLflow request
to a server that does not answer, a library that is not installed, all happen on the hub's own
thread. A tracker that fails is switched off for the rest of the job with one warning in the
stage's log and a note that `status` shows; training goes on. A full queue drops events (noted
once) rather than wait.

Steps are logged on the curriculum's global step (the stage's offset + its step), so the x-axis
is monotonic across stages. A job that redoes steps after a crash (it resumed from a checkpoint
older than what it had logged) logs nothing until it passes the last step the stage's
metrics.jsonl already holds: no step reaches a tracker twice, none goes backwards.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from progressive.metrics import read_metrics
from progressive.plan import Plan, StagePlan
from progressive.tracking import files

log = logging.getLogger("progressive.tracking")

__all__ = ["TrackerHub", "open_hub", "logged_high_water"]

STEP_KEYS = ("loss", "lr", "grad_norm", "samples_per_s", "peak_mem_mb")
QUEUE_SIZE = 10_000
# At the end of a job (a time-out stop included, inside signal_delay): what is not sent by then stays unsent.
CLOSE_TIMEOUT_S = 10.0


class Sink(Protocol):
    """One tracker, driven from the hub's thread only."""

    name: str

    def open(self) -> None: ...  # noqa: E704
    def step(self, gstep: int, values: dict[str, float]) -> None: ...  # noqa: E704
    def summary(self, gstep: int, values: dict[str, float]) -> None: ...  # noqa: E704
    def close(self, outcome: str) -> None: ...  # noqa: E704  ("completed", "stopped" or "crashed")


def logged_high_water(metrics_path: str | Path) -> int:
    """The highest step the stage's metrics.jsonl holds (0 for none): steps up to it were already sent."""
    return max((int(e["step"]) for e in read_metrics(metrics_path) if e.get("event") == "step"), default=0)


class TrackerHub:
    """A queue and a thread in front of the sinks; `event` never blocks and never raises."""

    def __init__(self, sinks: list[Sink], stage_dir: Path, offset: int, high_water: int) -> None:
        self.sinks, self.stage_dir, self.offset, self.high_water = sinks, stage_dir, offset, high_water
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._dropped = False
        self._outcome = "crashed"
        self._opened = threading.Event()  # every sink's open() has returned (or failed)
        self._thread = threading.Thread(target=self._run, name="progressive-trackers", daemon=True)
        self._thread.start()

    def event(self, ev: dict[str, Any]) -> None:
        """Take one metrics event (called by MetricsWriter on the training thread)."""
        if ev.get("event") == "step" and int(ev["step"]) <= self.high_water:
            return  # redone after a crash: the tracker has it already
        try:
            self._q.put_nowait(ev)
        except queue.Full:
            if not self._dropped:
                self._dropped = True
                self._note("trackers fell behind: events dropped (a tracker is slow or its server does not answer)")

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Let the thread send what is queued and close the sinks, waiting at most `timeout` seconds."""
        try:
            self._q.put(None, timeout=1.0)
        except queue.Full:
            pass
        if not self._opened.is_set():  # still connecting (a server that does not answer): not worth waiting for
            self._note("a tracker was still connecting when the job ended; its events of this job are lost")
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._note(f"trackers did not finish within {timeout:.0f} s at the end of the job; left behind")

    def _note(self, text: str) -> None:
        log.warning("tracking: %s", text)
        try:
            files.add_note(self.stage_dir, text)
        except Exception:  # a note must not fail either  # noqa: BLE001
            log.exception("could not record the tracking note")

    def _call(self, sink: Sink, what: str, *args: Any) -> None:
        """One sink call; a failure switches that sink off (one note), the others go on."""
        if sink not in self.sinks:
            return
        try:
            getattr(sink, what)(*args)
        except Exception as exc:  # noqa: BLE001  (any tracker error: it must not reach training)
            self.sinks.remove(sink)
            first = str(exc).splitlines()[0] if str(exc) else ""
            self._note(f"{sink.name} switched off for this job: {what} failed: {type(exc).__name__}: {first}"[:500])

    def _run(self) -> None:
        for sink in list(self.sinks):
            self._call(sink, "open")
        self._opened.set()
        while True:
            ev = self._q.get()
            if ev is None:
                break
            self._dispatch(ev)
        for sink in list(self.sinks):
            self._call(sink, "close", self._outcome)

    def _dispatch(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "step":
            values = {f"train/{k}": float(ev[k]) for k in STEP_KEYS if isinstance(ev.get(k), (int, float))}
            values["train/epoch"] = float(ev.get("epoch") or 0)
            for sink in list(self.sinks):
                self._call(sink, "step", self.offset + int(ev["step"]), values)
        elif kind == "completed":
            self._outcome = "completed"
            values = {f"eval/{k}": float(v) for k, v in (ev.get("eval") or {}).items() if isinstance(v, (int, float))}
            values["stage/elapsed_s"] = float(ev.get("elapsed_s") or 0.0)
            for sink in list(self.sinks):
                self._call(sink, "summary", self.offset + int(ev["step"]), values)
        elif kind == "stopped":
            self._outcome = "stopped"


def open_hub(plan: Plan, stage: StagePlan) -> TrackerHub | None:
    """The hub of this stage job's rank 0, or None when no tracker is on (TensorBoard is MetricsWriter's)."""
    t = plan.tracking
    sinks: list[Sink] = []
    stage_dir = Path(stage.metrics_path).parent
    if t.wandb is not None and t.wandb.mode != "disabled":
        from progressive.tracking.wandb_sink import WandbSink

        sinks.append(WandbSink(plan, stage, stage_dir))
    if t.mlflow is not None:
        from progressive.tracking.mlflow_sink import MlflowSink

        sinks.append(MlflowSink(plan, stage))
    if not sinks:
        return None
    t0 = time.perf_counter()
    high = logged_high_water(stage.metrics_path)
    log.info("tracking: %s (steps up to %d already sent; %.2f s to read)", ", ".join(s.name for s in sinks), high,
             time.perf_counter() - t0)
    return TrackerHub(sinks, stage_dir, t.step_offsets.get(stage.name, 0), high)
