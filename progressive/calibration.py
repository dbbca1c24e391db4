"""The calibration file and what `plan` derives from it. Pure and torch-free.

`progressive calibrate` measures each stage on its own resources (`progressive.calibrate`,
the torch side) and stores one entry per stage in `jobs/<run>/calibration.json`. Each
entry carries a *key*: everything the measurement depends on (task, model options,
bucket, batch size, grad_accum, world size, threads, device kind, precision, the data's
sample count and file size). `plan` recomputes the key from the stage as planned now;
an entry whose key differs is stale and is reported, never used silently.

From a fresh entry `estimate` derives the stage's wall time, the job segments it needs
(`ceil(work / (time - signal_delay - start-up))`, against `max_requeues + 1`) and its
peak memory against the request. A hand-typed `throughput` is the fallback: a fresh
calibration wins, because it was measured on the stage's own resources and also counts
start-up, evaluation and checkpoint costs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from progressive import atomic
from progressive.layout import CALIBRATION_FILE
from progressive.units import parse_duration_min
from progressive.errors import ProgressiveError
from progressive.plan import Plan, StagePlan

__all__ = ["CalibrationError", "CALIBRATION_FILE", "FORMAT", "calibration_path", "stage_key", "key_diff",
           "load_calibration", "store_entries", "StageEstimate", "estimate", "estimates", "checkpoint_saves",
           "refuse_flagged"]

FORMAT = 1
HOST_MEM_WARN = 0.9  # a peak above this share of the request is shown in yellow: little headroom


class CalibrationError(ProgressiveError):
    """The calibration file is unreadable or malformed, or a measurement could not be made."""

    exit_code = 2


def calibration_path(plan: Plan) -> Path:
    """Where the run's calibration lives: next to its record, `jobs/<run>/calibration.json`."""
    return plan.layout.calibration


def planned_device(stage: StagePlan) -> str:
    """The device kind a stage trains on: "cuda" when it asks for GPUs, else "cpu"."""
    return "cuda" if stage.slurm.gpus_per_node else "cpu"


def data_fingerprint(plan: Plan, stage: StagePlan) -> dict[str, Any]:
    """Cheap facts about the stage's data: its training sample count and the file's size.

    Not the mtime: a copy of the same file to a cluster's scratch must not make a calibration stale.
    """
    try:
        size: Optional[int] = os.stat(plan.data_path).st_size
    except OSError:
        size = None
    return {"train_samples": stage.samples["train"] if stage.samples else None, "file_bytes": size}


def stage_key(plan: Plan, stage: StagePlan, device: str | None = None) -> dict[str, Any]:
    """What a stage's measurement depends on; `device` is the measured device kind (default: planned)."""
    return {
        "task": plan.model.task,
        "model_options": json.loads(json.dumps(plan.model.options, sort_keys=True, default=str)),
        "bucket": stage.bucket,
        "batch_size": stage.batch_size,
        "grad_accum": stage.train.grad_accum,
        "world_size": stage.world_size,
        "cpus_per_task": stage.slurm.cpus_per_task,
        "device": device or planned_device(stage),
        "precision": stage.train.precision,
        "data": data_fingerprint(plan, stage),
    }


def key_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys that differ, as "name old -> new" (empty: the entry is fresh)."""
    out = []
    for k in sorted(set(stored) | set(current)):
        a, b = stored.get(k), current.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{d}" for d in key_diff(a, b)]
        else:
            out.append(f"{k} {json.dumps(a, sort_keys=True)} -> {json.dumps(b, sort_keys=True)}")
    return out


# --------------------------------------------------------------------------- the file

_REQUIRED: dict[str, type | tuple[type, ...]] = {"key": dict, "step_s": dict, "peak_rss_mb": (int, float), "startup_s": (int, float),
             "eval_s": (int, float), "checkpoint_s": (int, float), "samples_per_s": (int, float)}


def load_calibration(path: str | Path) -> dict[str, dict[str, Any]] | None:
    """{stage: entry} from a calibration file; None when there is none.

    Raises:
        CalibrationError: the file is not JSON, not ours, or an entry lacks a measurement.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CalibrationError(f"cannot read the calibration file: {exc.strerror}", loc=str(path)) from None
    hint = "delete it and run `progressive calibrate` again"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"not valid JSON (line {exc.lineno}: {exc.msg})", loc=str(path), hint=hint) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("stages"), dict):
        raise CalibrationError(f"not a calibration file of format {FORMAT}", loc=str(path), hint=hint)
    for name, entry in doc["stages"].items():
        bad = [k for k, t in _REQUIRED.items() if not isinstance(entry, dict) or not isinstance(entry.get(k), t)]
        if not bad and not isinstance(entry["step_s"].get("median"), (int, float)):
            bad = ["step_s.median"]
        if bad:
            raise CalibrationError(f"stage {name!r}: missing or malformed {', '.join(bad)}", loc=str(path), hint=hint)
    return dict(doc["stages"])


def store_entries(path: str | Path, entries: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge `entries` ({stage: entry}) into the calibration file (atomic; an unreadable old file is replaced)."""
    from progressive import record

    path = Path(path)
    with record.locked(path.parent):  # two calibrate commands must not drop each other's entries
        try:
            old = load_calibration(path) or {}
        except CalibrationError:
            old = {}  # a corrupt file is superseded by fresh measurements
        old.update({k: dict(v) for k, v in entries.items()})
        atomic.write_text(path, json.dumps({"format": FORMAT, "stages": old}, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- estimates


@dataclass
class StageEstimate:
    """What plan shows about a stage's time and memory (every field JSON-able).

    `source` is "calibration", "throughput" or None (unknown). `flags` holds the reasons the
    stage is flagged (red in plan; `submit` refuses it without --force); `notes` the rest.
    """

    source: Optional[str] = None
    calibration: str = "missing"  # "fresh", "stale", "missing"
    estimate_min: Optional[float] = None
    step_s: Optional[float] = None
    startup_s: Optional[float] = None
    exit_s: Optional[float] = None  # each job's end after its last step (interpreter teardown); None: not measured
    segments: Optional[int] = None
    max_segments: int = 1
    peak_mem_mb: Optional[float] = None  # host, per node (ranks on a node add up)
    mem_request_mb: Optional[int] = None
    gpu_peak_mb: Optional[float] = None  # device used, as nvidia-smi shows it
    gpu_total_mb: Optional[float] = None
    suggested_batch_size: Optional[int] = None
    suggested_is_bucket: bool = False  # the search stopped at the whole bucket, not at the memory
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The fields for `plan --json`."""
        return asdict(self)


def checkpoint_saves(total_steps: int, every: str | int, train_s: float) -> int:
    """Full-state saves a straight run makes: periodic ones, the end-of-stage one and final.pt."""
    if isinstance(every, int):
        periodic = max(0, (total_steps - 1) // every)
    else:
        periodic = int(train_s // max(1.0, parse_duration_min(every) * 60.0))
    return periodic + 2


def estimate(plan: Plan, stage: StagePlan, entry: Mapping[str, Any] | None) -> StageEstimate:
    """Time, segments and memory of one stage from its calibration entry (or its `throughput`)."""
    est = StageEstimate(max_segments=stage.slurm.max_requeues + 1, mem_request_mb=stage.slurm.mem)
    if entry is not None:
        diff = key_diff(entry.get("key", {}), stage_key(plan, stage))
        if diff:
            est.calibration = "stale"
            est.notes.append(f"stale calibration ({'; '.join(diff)}): re-run progressive calibrate")
            entry = None
        else:
            est.calibration = "fresh"
    usable_s = stage.time_limit_min * 60.0 - stage.slurm.signal_delay
    if entry is not None and stage.total_steps:
        est.source = "calibration"
        # The mean, not the median: the rare slow step is a cost every epoch pays.
        est.step_s = float(entry["step_s"].get("mean", entry["step_s"]["median"]))
        est.startup_s = float(entry["startup_s"])
        if isinstance(entry.get("exit_s"), (int, float)):
            est.exit_s = float(entry["exit_s"])
        else:
            est.notes.append("each job's exit (interpreter teardown, ~1 s with torch) was not measured: "
                             "re-run progressive calibrate")
        train_s = stage.total_steps * est.step_s
        eval_s = float(entry["eval_s"]) if stage.train.eval_samples > 0 else 0.0
        ckpt_s = float(entry["checkpoint_s"])
        work = train_s + eval_s + ckpt_s * checkpoint_saves(stage.total_steps, stage.train.checkpoint_every, train_s)
        usable_s -= est.startup_s
        if usable_s <= 0:
            est.flags.append(f"the time limit leaves no time to train after start-up ({est.startup_s:.0f} s) "
                             f"and signal_delay ({stage.slurm.signal_delay} s)")
        else:
            segs = max(1, math.ceil(work / usable_s))
            work += (segs - 1) * ckpt_s  # each time-out saves once more
            est.segments = max(1, math.ceil(work / usable_s))
            # Start-up and exit are paid once per job; the exit comes after the time-out's save, inside
            # signal_delay, so it lengthens the run but not a segment's training time.
            est.estimate_min = round((work + est.segments * (est.startup_s + (est.exit_s or 0.0))) / 60.0, 2)
        _check_signal_delay(est, stage, entry, ckpt_s)
        est.peak_mem_mb = round(float(entry["peak_rss_mb"]) * stage.slurm.tasks_per_node, 1)
        gpu = entry.get("gpu") or {}
        if isinstance(gpu.get("device_used_mb"), (int, float)):
            est.gpu_peak_mb = float(gpu["device_used_mb"])
            est.gpu_total_mb = float(gpu.get("device_total_mb") or 0) or None
        if isinstance(entry.get("suggested_batch_size"), int):
            est.suggested_batch_size = entry["suggested_batch_size"]
            est.suggested_is_bucket = est.suggested_batch_size == (entry.get("batch_search") or {}).get("cap")
    elif stage.estimate_min is not None:  # the hand-typed throughput
        est.source = "throughput"
        est.estimate_min = stage.estimate_min
        if usable_s > 0:
            est.segments = max(1, math.ceil(stage.estimate_min * 60.0 / usable_s))
    if est.segments is not None and est.segments > est.max_segments:
        est.flags.append(f"needs {est.segments} job segments but max_requeues = {stage.slurm.max_requeues} "
                         f"allows {est.max_segments}: raise time or max_requeues")
    if est.peak_mem_mb is not None and est.mem_request_mb:
        if est.peak_mem_mb > est.mem_request_mb:
            est.flags.append(f"peak host memory {est.peak_mem_mb:.0f} MB exceeds mem = {est.mem_request_mb} MB")
        elif est.peak_mem_mb > HOST_MEM_WARN * est.mem_request_mb:
            est.notes.append(f"peak host memory {est.peak_mem_mb:.0f} MB is within 10% of mem = {est.mem_request_mb} MB")
    if est.gpu_peak_mb is not None and est.gpu_total_mb and est.gpu_peak_mb > HOST_MEM_WARN * est.gpu_total_mb:
        est.flags.append(f"GPU memory {est.gpu_peak_mb:.0f} MB of {est.gpu_total_mb:.0f} MB: no safety margin left")
    return est


def stop_cost_s(entry: Mapping[str, Any], ckpt_s: float) -> float:
    """What the pre-timeout signal must leave time for: the step in flight (the slowest measured),
    the checkpoint save, and the job's exit."""
    worst = (entry.get("worst_step_s") or {}).get("max") or entry["step_s"].get("max") or entry["step_s"]["median"]
    return float(worst) + ckpt_s + float(entry.get("exit_s") or 0.0)


def _check_signal_delay(est: StageEstimate, stage: StagePlan, entry: Mapping[str, Any], ckpt_s: float) -> None:
    """Flag a signal_delay too short for the measured stop: Slurm would kill the job mid-save."""
    need = stop_cost_s(entry, ckpt_s)
    if stage.slurm.signal_delay < need:
        est.flags.append(f"signal_delay = {stage.slurm.signal_delay} s is shorter than a step, the checkpoint save and "
                         f"the exit ({need:.0f} s measured): raise signal_delay to at least {math.ceil(need * 2)} s")


def estimates(plan: Plan, path: str | Path | None = None) -> tuple[dict[str, StageEstimate], str | None]:
    """Every stage's estimate, and a message when the calibration file is unusable (then none is used)."""
    problem = None
    try:
        entries = load_calibration(path or calibration_path(plan)) or {}
    except CalibrationError as exc:
        entries, problem = {}, str(exc)
    return {st.name: estimate(plan, st, entries.get(st.name)) for st in plan.stages}, problem


def refuse_flagged(plan: Plan) -> None:
    """Raise when the calibration flags a stage (cannot finish within its requeues, does not fit).

    `submit` calls it (unless --force): a stage that would time out for good two days from
    now is better refused now. No calibration, or a stale one, refuses nothing.
    """
    ests, _ = estimates(plan)
    flagged = [f"{name}: {'; '.join(e.flags)}" for name, e in ests.items() if e.flags]
    if flagged:
        raise CalibrationError("the calibration says these stages cannot run as planned: " + " | ".join(flagged),
                               loc=str(calibration_path(plan)),
                               hint="raise time, max_requeues or mem (see `progressive plan`), "
                                    "or submit anyway with --force")
