"""The data behind every figure, as plain lists (pure: the tests check these, the figures draw them).

Global step: stages are laid end to end in plan order, each starting where the previous
one's total steps end, so the x axis reads as the curriculum. Wall time: minutes since
the run's first `start` event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from progressive.report.data import RunData, StageData

__all__ = ["Series", "Marker", "CurveData", "curves", "stage_offsets"]


@dataclass
class Series:
    """One stage's curve: x by global step and by wall time (minutes), y the logged value."""

    stage: str
    global_step: list[int] = field(default_factory=list)
    minutes: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    segment: list[int] = field(default_factory=list)  # which segment logged each point (lines break between them)

    def pieces(self) -> list[tuple[int, int]]:
        """[start, end) index ranges of consecutive points from one segment."""
        out, start = [], 0
        for i in range(1, len(self.segment) + 1):
            if i == len(self.segment) or self.segment[i] != self.segment[start]:
                out.append((start, i))
                start = i
        return out


@dataclass(frozen=True)
class Marker:
    """A vertical mark: a stage boundary, a restart (segment start after the first) or a stop."""

    kind: str  # "boundary" | "restart" | "stop"
    stage: str
    global_step: int
    minutes: float
    label: str


@dataclass
class CurveData:
    """Everything the loss and learning-rate figures show."""

    loss: list[Series]
    lr: list[Series]
    val_loss: list[tuple[str, int, float, float]]  # (stage, global step, minutes, value) at each stage's end
    markers: list[Marker]


def stage_offsets(run: RunData) -> dict[str, int]:
    """Global step of each stage's step 0: the sum of the total steps of the stages before it."""
    out: dict[str, int] = {}
    offset = 0
    for st in run.stages:
        out[st.name] = offset
        offset += st.total_steps or (st.steps[-1].step if st.steps else 0)
    return out


def _minutes(run: RunData, t: float) -> float:
    return (t - run.start_time) / 60.0


def _series(run: RunData, st: StageData, offset: int, attr: str) -> Series:
    s = Series(st.name)
    for p in st.steps:
        value = getattr(p, attr)
        if value is None:
            continue
        s.global_step.append(offset + p.step)
        s.minutes.append(_minutes(run, p.time))
        s.values.append(value)
        s.segment.append(p.segment)
    return s


def curves(run: RunData) -> CurveData:
    """Loss and learning-rate series per stage, validation points, boundaries, restarts and stops."""
    offsets = stage_offsets(run)
    data = CurveData([], [], [], [])
    for st in run.stages:
        if not st.segments:
            continue
        off = offsets[st.name]
        data.loss.append(_series(run, st, off, "loss"))
        data.lr.append(_series(run, st, off, "lr"))
        first = st.segments[0]
        data.markers.append(Marker("boundary", st.name, off, _minutes(run, first.start_time), f"{st.name} starts"))
        for seg in st.segments[1:]:
            how = "resumed from a checkpoint" if seg.resumed_from else "restarted"
            data.markers.append(Marker("restart", st.name, off + seg.start_step, _minutes(run, seg.start_time),
                                       f"{st.name}: {how} at step {seg.start_step}"))
        for seg in st.segments:
            if seg.end == "stopped" and seg.stop_time is not None:
                data.markers.append(Marker("stop", st.name, off + seg.last_step, _minutes(run, seg.stop_time),
                                           f"{st.name}: stopped at step {seg.last_step}"))
            elif seg.end == "interrupted":
                data.markers.append(Marker("stop", st.name, off + seg.last_step, _minutes(run, seg.end_time),
                                           f"{st.name}: died after step {seg.last_step}"))
        if "loss" in st.eval and st.segments[-1].end == "completed":
            end = st.segments[-1]
            data.val_loss.append((st.name, off + (st.total_steps or end.last_step), _minutes(run, end.end_time),
                                  st.eval["loss"]))
    return data
