"""The transfer matrix: each stage's final weights evaluated on the validation split of every bucket.

This is the curriculum's premise made visible: does training at n=512 help at n=4096?
Each cell is the task's own `evaluate()` (for the reference task: PCG iterations with the
learned preconditioner, next to CG, Jacobi and IC(0) on the same matrices). This is the
only part of `report` that imports torch. Cells are cached in `report/transfer.json`,
keyed by the weights file (path, size, mtime), the data file and the sample count, so a
re-run only evaluates what changed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from progressive import atomic
from progressive.errors import DataError
from progressive.record import RunRecord

__all__ = ["TransferResult", "evaluate_transfer", "primary_metric", "CACHE_FILE"]

CACHE_FILE = "transfer.json"
Progress = Callable[[int, int, str], None]  # (done, total, what is being evaluated now)


@dataclass
class TransferResult:
    """cells[(stage, bucket)] = the task's metrics; stages without final weights have no cells."""

    stages: list[str]
    buckets: list[int]
    samples: int
    cells: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    evaluated: int = 0  # cells computed in this call (the rest came from the cache)
    notes: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        """The metric the table and heat map show."""
        return primary_metric([k for m in self.cells.values() for k in m])

    @property
    def lower_is_better(self) -> bool:
        """Iterations, losses and seconds: lower is better (the heat map's colours follow)."""
        return not self.metric.endswith(("_converged", "accuracy", "acc"))

    def value(self, stage: str, bucket: int, key: str | None = None) -> float | None:
        """One cell's value of `key` (default: the primary metric), None if absent or not finite."""
        v = self.cells.get((stage, bucket), {}).get(key or self.metric)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def primary_metric(keys: list[str]) -> str:
    """learned_iters (the reference task), else loss, else the first key in sorted order."""
    for k in ("learned_iters", "loss"):
        if k in keys:
            return k
    return sorted(keys)[0] if keys else "loss"


def _stat(path: Path) -> list[int]:
    s = path.stat()
    return [s.st_size, s.st_mtime_ns]


def _key(stage: str, bucket: int, weights: Path, data: Path, samples: int, task: str, options: dict[str, Any]) -> str:
    return json.dumps([stage, bucket, str(weights), _stat(weights), str(data), _stat(data), samples, task, options],
                      sort_keys=True, default=str)


def evaluate_transfer(rec: RunRecord, cache_dir: Path, *, max_samples: int,
                      on_progress: Progress | None = None) -> TransferResult:
    """Evaluate every completed stage's final weights on every bucket of the run.

    Raises:
        DataError: the run's data file is gone (use --no-transfer to skip this section).
    """
    plan = rec.plan
    data = Path(plan.data_path)
    if not data.exists():  # a file (HDF5) or a folder (the dense-array layout)
        raise DataError("the run's data file is missing: the transfer matrix needs its validation splits",
                        loc=str(data), hint="restore the file, or skip the transfer matrix with --no-transfer")
    buckets = sorted({st.bucket for st in plan.stages})
    result = TransferResult([st.name for st in plan.stages], buckets, max_samples)
    done = [st for st in plan.stages if Path(st.final_checkpoint).is_file()]
    missing = [st.name for st in plan.stages if st not in done]
    if missing:
        result.notes.append(f"no final weights yet for {', '.join(missing)}: their rows are empty")
    cache_path = cache_dir / CACHE_FILE
    try:
        cache: dict[str, dict[str, float]] = json.loads(cache_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        cache = {}
    todo = []
    keys = []
    for st in done:
        for b in buckets:
            key = _key(st.name, b, Path(st.final_checkpoint), data, max_samples, plan.model.task, plan.model.options)
            keys.append(key)
            if key in cache:
                result.cells[(st.name, b)] = cache[key]
            else:
                todo.append((st, b, key))
    fresh: dict[str, dict[str, float]] = {}
    if todo:
        fresh = _evaluate(rec, todo, max_samples, on_progress)
        for st, b, key in todo:
            result.cells[(st.name, b)] = fresh[key]
        result.evaluated = len(todo)
    # Keep exactly the cells of this report: a new final.pt (or data file) replaces its old cells.
    current = {key: cache[key] for key in keys if key in cache} | fresh
    if current != cache:
        atomic.write_text(cache_path, json.dumps(current, indent=1, sort_keys=True))
    return result


def _evaluate(rec: RunRecord, todo: list[Any], max_samples: int,
              on_progress: Progress | None) -> dict[str, dict[str, float]]:
    import torch

    from progressive.checkpoint import load_weights
    from progressive.task import load_task

    plan = rec.plan
    task = load_task(plan.model.task, plan.model.options)
    device = torch.device("cpu")  # a report runs on a login node: the evaluation must not need a GPU
    datasets: dict[int, Any] = {}
    out: dict[str, dict[str, float]] = {}
    model = None
    loaded = None
    for i, (st, bucket, key) in enumerate(todo):
        if on_progress:
            on_progress(i, len(todo), f"{st.name} on n={bucket}")
        if loaded != st.name:
            torch.manual_seed(plan.seed)
            model = task.build_model()
            model.load_state_dict(load_weights(st.final_checkpoint))
            model.eval()
            loaded = st.name
        if bucket not in datasets:
            datasets[bucket] = task.dataset(plan.data_path, bucket, "val")
        assert model is not None
        ds = datasets[bucket]
        if len(ds) == 0:
            out[key] = {"samples": 0.0}
            continue
        metrics = task.evaluate(model, ds, device=device, max_samples=max_samples)
        out[key] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if on_progress:
        on_progress(len(todo), len(todo), "done")
    return out
