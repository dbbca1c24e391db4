"""`progressive report`'s transfer matrix into the trackers: each stage's row lands in that stage's run.

The matrix is computed after training, on the login node, so no stage job can log it. The
report sends each stage's row (its final weights evaluated on every bucket) to the stage's own
tracker runs, found by the ids the stage's jobs stored: the W&B run's summary (`transfer/n<bucket>/
<metric>`; in offline mode as one more offline segment, which `progressive sync` uploads) and the
MLflow child run's metrics at the stage's last global step. A tracker that fails is a line in
the report's output, never a failed report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from progressive.plan import Plan
from progressive.tracking import files

__all__ = ["publish_transfer"]


def _rows(cells: dict[tuple[str, int], dict[str, float]], stage: str) -> dict[str, float]:
    return {f"transfer/n{bucket}/{k}": float(v) for (st, bucket), metrics in sorted(cells.items()) if st == stage
            for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def publish_transfer(plan: Plan, cells: dict[tuple[str, int], dict[str, float]]) -> list[str]:
    """Send each stage's transfer row to its W&B and MLflow runs; one line per tracker (what was sent, or why not)."""
    ids = files.ids_path(plan.run_dir)
    if not ids.exists():
        return []
    lines: list[str] = []
    t = plan.tracking
    for name, send in (("W&B", _wandb if t.wandb and t.wandb.mode != "disabled" else None),
                       ("MLflow", _mlflow if t.mlflow else None)):
        if send is None:
            continue
        try:
            count = send(plan, cells)
            lines.append(f"transfer matrix sent to {name} ({count} stage run(s))")
        except Exception as exc:  # noqa: BLE001  (a tracker must not fail the report)
            first = str(exc).splitlines()[0] if str(exc) else ""
            lines.append(f"transfer matrix not sent to {name}: {type(exc).__name__}: {first}"[:400])
    return lines


def _wandb(plan: Plan, cells: dict[tuple[str, int], dict[str, float]]) -> int:
    import wandb

    from progressive.tracking.wandb_sink import job_settings

    w = plan.tracking.wandb
    assert w is not None
    sent = 0
    for st in plan.stages:
        run_id = files.read_id(plan.run_dir, "wandb", st.name)
        values = _rows(cells, st.name)
        if not run_id or not values:
            continue
        run = wandb.init(project=w.project, entity=w.entity, mode=w.mode, id=run_id, resume="allow",  # type: ignore[arg-type]
                         dir=str(Path(st.metrics_path).parent), reinit="create_new",
                         settings=job_settings())
        run.summary.update(values)
        run.finish()
        sent += 1
    return sent


def _mlflow(plan: Plan, cells: dict[tuple[str, int], dict[str, float]]) -> int:
    import time

    from progressive.tracking.mlflow_sink import bound_requests

    bound_requests()

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    m = plan.tracking.mlflow
    assert m is not None
    client: Any = MlflowClient(tracking_uri=m.tracking_uri)
    sent = 0
    for st in plan.stages:
        run_id = files.read_id(plan.run_dir, "mlflow", st.name)
        values = _rows(cells, st.name)
        if not run_id or not values:
            continue
        step = plan.tracking.step_offsets.get(st.name, 0) + (st.total_steps or 0)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i:i + 900])
        sent += 1
    return sent
