"""Rank 0's trackers for one stage job: the trainer hands over events, a background thread does the rest.

The trainer's MetricsWriter passes every event (start, step, checkpoint, stopped, completed) to
`TrackerHub.event`, which only puts it in a bounded queue: opening a W&B run, an MLflow request
to a server that does not answer, a library that is not installed, all happen on the hub's own
thread. A tracker that fails is switched off for the rest of the job with one warning in the
stage's log and a note that `status` shows; training goes on. A full queue drops events (noted
once) rather than wait.

Steps are logged on the curriculum's global step (the stage's offset + its step), so the x-axis
is monotonic across stages. Each step is recorded as handed to a tracker (tracking-sent.json)
just before it is: a job that redoes steps after a crash (it resumed from a checkpoint older than
what it had logged) sends a tracker nothing until it passes what that tracker already has, so no
step reaches a tracker twice and none goes backwards. The price: a step a tracker had taken but
not yet delivered when the process was killed is lost to it (MLflow batches up to a second of
steps; a stopped job flushes them in its 3 s). Steps an earlier job logged to metrics.jsonl
but never got to a tracker (killed while its tracker was still connecting, or behind) are sent by
the next job first, from metrics.jsonl, up to the step it resumed from; the steps after that it
trains again itself. So a stage's tracker history ends up whole and in order.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any, Protocol

from progressive.metrics import read_metrics
from progressive.plan import Plan, StagePlan
from progressive.tracking import files

log = logging.getLogger("progressive.tracking")

__all__ = ["TrackerHub", "open_hub"]

STEP_KEYS = ("loss", "lr", "grad_norm", "samples_per_s", "peak_mem_mb")
QUEUE_SIZE = 10_000
# When a stage completes, the trackers get this long to connect, if they are still at it, and send what is
# queued. A stopped job (the pre-timeout signal, a preemption) is inside signal_delay or GraceTime and gets
# only STOP_CLOSE_TIMEOUT_S: what is not sent by then, the stage's next job sends from metrics.jsonl.
CLOSE_TIMEOUT_S = 20.0
STOP_CLOSE_TIMEOUT_S = 3.0


class Sink(Protocol):
    """One tracker, driven from the hub's thread only."""

    name: str

    def open(self) -> None: ...  # noqa: E704
    def step(self, gstep: int, values: dict[str, float]) -> None: ...  # noqa: E704
    def summary(self, gstep: int, values: dict[str, float]) -> None: ...  # noqa: E704
    def close(self, outcome: str) -> None: ...  # noqa: E704  ("completed", "stopped" or "crashed")


class TrackerHub:
    """A queue and a thread in front of the sinks; `event` never blocks and never raises."""

    def __init__(self, sinks: list[Sink], stage_dir: Path, offset: int, metrics_path: Path, resumed_at: int) -> None:
        self.sinks, self.stage_dir, self.offset = sinks, stage_dir, offset
        self.metrics_path, self.resumed_at = metrics_path, resumed_at
        self.sent = files.read_sent(stage_dir)  # per tracker, the last global step handed to it
        self.high_water = min(self.sent.get(s.name, 0) for s in sinks) - offset  # stage steps every tracker has
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._dropped = self._dropped_noted = False
        self._completed = False  # seen on the training thread: how long close() may wait
        self._outcome = "crashed"
        self._opened = threading.Event()  # every sink's open() has returned (or failed)
        self._thread = threading.Thread(target=self._run, name="progressive-trackers", daemon=True)
        self._thread.start()

    def event(self, ev: dict[str, Any]) -> None:
        """Take one metrics event (called by MetricsWriter on the training thread)."""
        if ev.get("event") == "step" and int(ev["step"]) <= self.high_water:
            return  # redone after a crash: the tracker has it already
        self._completed = self._completed or ev.get("event") == "completed"
        try:
            self._q.put_nowait(ev)
        except queue.Full:
            self._dropped = True  # noted by the hub's thread: writing a note here could block training

    def close(self, timeout: float | None = None) -> None:
        """Let the thread send what is queued and close the sinks, waiting at most `timeout` seconds
        (default: CLOSE_TIMEOUT_S when the stage completed, else STOP_CLOSE_TIMEOUT_S)."""
        timeout = timeout if timeout is not None else CLOSE_TIMEOUT_S if self._completed else STOP_CLOSE_TIMEOUT_S
        try:
            self._q.put(None, timeout=1.0)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            what = "finish sending" if self._opened.is_set() else "connect"
            later = "" if self._completed else "; the stage's next job sends what it missed"
            self._note(f"a tracker did not {what} within {timeout:.0f} s of the job's end{later}")

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
        try:
            self._work()
        except Exception as exc:  # noqa: BLE001  (the thread must say why it stopped, never raise into nothing)
            self.sinks.clear()
            self._note(f"trackers stopped for this job: {type(exc).__name__}: {exc}"[:500])

    def _work(self) -> None:
        for sink in list(self.sinks):
            self._call(sink, "open")
        self._opened.set()
        self._catch_up()
        while True:
            ev = self._q.get()
            if self._dropped and not self._dropped_noted:
                self._dropped_noted = True
                self._note("trackers fell behind: events dropped (a tracker is slow or its server does not answer)")
            if ev is None:
                break
            self._dispatch(ev)
        for sink in list(self.sinks):
            self._call(sink, "close", self._outcome)

    def _catch_up(self) -> None:
        """Send what earlier jobs logged up to this job's resume step and a tracker does not have yet."""
        if not self.sinks or self.resumed_at <= self.high_water:
            return
        latest: dict[int, dict[str, Any]] = {}
        for ev in read_metrics(self.metrics_path):  # oldest first: a step's last line is what training kept
            if ev.get("event") == "step" and self.high_water < int(ev["step"]) <= self.resumed_at:
                latest[int(ev["step"])] = ev
        for step in sorted(latest):
            self._dispatch(latest[step])

    def _dispatch(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "step":
            values = {f"train/{k}": float(ev[k]) for k in STEP_KEYS if isinstance(ev.get(k), (int, float))}
            values["train/epoch"] = float(ev.get("epoch") or 0)
            gstep = self.offset + int(ev["step"])
            fresh = [s for s in self.sinks if gstep > self.sent.get(s.name, 0)]
            if not fresh:
                return
            # Recorded before it is sent: killed in between, a tracker misses what it had not delivered (this step,
            # or MLflow's unflushed batch) rather than get anything twice.
            self.sent.update({s.name: gstep for s in fresh})
            try:
                files.write_sent(self.stage_dir, self.sent)
            except OSError as exc:
                self._note(f"cannot record the steps sent ({exc}); tracking stops for this job")
                self.sinks.clear()
                return
            for sink in fresh:
                self._call(sink, "step", gstep, values)
        elif kind == "completed":
            self._outcome = "completed"
            values = {f"eval/{k}": float(v) for k, v in (ev.get("eval") or {}).items() if isinstance(v, (int, float))}
            values["stage/elapsed_s"] = float(ev.get("elapsed_s") or 0.0)
            for sink in list(self.sinks):
                self._call(sink, "summary", self.offset + int(ev["step"]), values)
        elif kind == "stopped":
            self._outcome = "stopped"


def open_hub(plan: Plan, stage: StagePlan, resumed_at: int) -> TrackerHub | None:
    """The hub of this stage job's rank 0 (which resumed after step `resumed_at`), or None when no tracker
    is on (TensorBoard is MetricsWriter's)."""
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
    hub = TrackerHub(sinks, stage_dir, t.step_offsets.get(stage.name, 0), Path(stage.metrics_path), resumed_at)
    log.info("tracking: %s (already sent: %s)", ", ".join(s.name for s in sinks), hub.sent or "nothing")
    return hub
