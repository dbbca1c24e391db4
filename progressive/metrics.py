"""The per-stage metrics stream: JSON lines appended to `StagePlan.metrics_path` (and TensorBoard if asked).

One line per logged optimizer step (`"event": "step"`), plus `start`, `checkpoint`,
`stopped` and `completed` events. The file is opened in append mode so a requeued job
continues it; `status` reads its last lines. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

if TYPE_CHECKING:
    import torch

# torch is imported where a GPU is measured: the readers serve `status` and `report`, which stay torch-free.

__all__ = ["MetricsWriter", "peak_memory_mb", "read_metrics", "tail_objects", "last_step_metrics"]


def peak_memory_mb(device: "torch.device") -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        # VmHWM belongs to this process image; getrusage's maxrss survives exec, so a job started by a
        # fork of a large process would report that process's size.
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS reports bytes, Linux KiB


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write null rather than an invalid line that breaks every reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Appends events to a JSONL file, mirrors scalars to TensorBoard, and forwards them to a callback."""

    def __init__(self, path: str | Path | None, *, tensorboard_dir: str | Path | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.path = Path(path) if path else None
        self._fh: TextIO | None = None
        self._tb: Any = None
        self.on_event = on_event
        self.on_close = on_close  # the trackers' hub: it sends what is queued, then closes its runs
        self.notes: list[str] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.notes.append("tensorboard = true but the tensorboard package is not installed; "
                                  "logging to the JSONL file only (pip install tensorboard)")
            else:
                self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, event: dict[str, Any]) -> None:
        """Record one event: a JSON line, TensorBoard scalars for steps, then the callback."""
        event = _clean(event)
        if self._fh is not None:
            self._fh.write(json.dumps(event, sort_keys=False) + "\n")
            self._fh.flush()  # status reads the file while we train: no half-buffered lines
        if self._tb is not None and event.get("event") == "step":
            for key in ("loss", "lr", "grad_norm", "samples_per_s", "peak_mem_mb"):
                if isinstance(event.get(key), (int, float)):
                    self._tb.add_scalar(f"train/{key}", event[key], event["step"])
        if self._tb is not None and event.get("event") == "completed":
            for key, val in (event.get("eval") or {}).items():
                if isinstance(val, (int, float)):
                    self._tb.add_scalar(f"eval/{key}", val, event["step"])
        if self.on_event is not None:
            self.on_event(event)

    def close(self) -> None:
        """Flush and close the file and TensorBoard writer."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.on_close is not None:
            closer, self.on_close = self.on_close, None
            closer()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All events of a metrics file (a torn last line, from a kill mid-write, is skipped)."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def tail_objects(path: str | Path, max_bytes: int = 65536) -> list[dict[str, Any]]:
    """JSON objects on the last lines of a JSONL file, newest first (reads only its tail: status stays fast)."""
    try:
        with Path(path).open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            tail = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in reversed(tail.splitlines()):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # the first (cut) line, or one being written right now
        if isinstance(obj, dict):
            out.append(obj)
    return out


def last_step_metrics(path: str | Path) -> dict[str, Any] | None:
    """The last metrics line that carries a training step."""
    return next((o for o in tail_objects(path) if "step" in o and "loss" in o), None)
