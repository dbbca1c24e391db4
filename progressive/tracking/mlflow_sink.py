"""The MLflow sink: a parent run per curriculum run, a nested child run per stage (imported only by a job that uses it).

Both ids are stored in the run's tracking.json when first made; every later job of a stage logs
to the same child run. Metrics carry the curriculum's global step. Requests are batched (one
`log_batch` per second at most) and bounded by MLflow's own HTTP timeout and retries, set low
here so that a server that does not answer is given up on in seconds, not minutes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from progressive.plan import Plan, StagePlan
from progressive.tracking import files
from progressive.tracking.wandb_sink import stage_config

FLUSH_EVERY_S = 1.0
SQLITE = "sqlite:///"


def bound_requests() -> None:
    """Before mlflow is imported (it reads them then): give up on a server in seconds, not MLflow's minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


def _create_sqlite_store(uri: str) -> None:
    """Make a new sqlite store whole or not at all: MLflow builds its schema in many steps (~2 s), and a job
    that ends meanwhile (a stop, a kill) would leave a store every later job fails to open. So it is built
    in a temp file and renamed into place, under a lock so that two stages starting together make one."""
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    path = Path(uri[len(SQLITE):])
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=120):
        if path.exists():
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        MlflowClient(tracking_uri=SQLITE + str(tmp)).search_experiments()  # creates and migrates the schema
        os.replace(tmp, path)


def _flat(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:500]  # MLflow caps a param's value
    return out


class MlflowSink:
    """Drives one MLflow child run (from the hub's thread)."""

    name = "mlflow"

    def __init__(self, plan: Plan, stage: StagePlan) -> None:
        self.plan, self.stage = plan, stage
        self.client: Any = None
        self.run_id = ""
        self.pending: list[Any] = []
        self.last_flush = time.monotonic()

    def open(self) -> None:
        bound_requests()
        from mlflow.tracking import MlflowClient

        m = self.plan.tracking.mlflow
        assert m is not None
        if m.tracking_uri and m.tracking_uri.startswith(SQLITE):
            _create_sqlite_store(m.tracking_uri)
        self.client = client = MlflowClient(tracking_uri=m.tracking_uri)

        def experiment() -> str:
            found = client.get_experiment_by_name(m.experiment)
            return str(found.experiment_id if found else client.create_experiment(m.experiment))

        exp = files.get_or_create_id(self.plan.run_dir, "mlflow", "experiment", experiment)
        group = self.plan.tracking.group or self.plan.run_name
        parent = files.get_or_create_id(self.plan.run_dir, "mlflow", "parent", lambda: str(client.create_run(
            exp, run_name=self.plan.run_name, tags={"progressive.run": self.plan.run_name,
                                                    "progressive.group": group}).info.run_id))
        created = []

        def child() -> str:
            run = client.create_run(exp, run_name=f"{self.plan.run_name}.{self.stage.name}", tags={
                "mlflow.parentRunId": parent, "progressive.run": self.plan.run_name,
                "progressive.stage": self.stage.name, "progressive.group": group})
            created.append(run.info.run_id)
            return str(run.info.run_id)

        self.run_id = files.get_or_create_id(self.plan.run_dir, "mlflow", self.stage.name, child)
        if created:  # params are write-once in MLflow: only the job that made the run logs them
            from mlflow.entities import Param

            params = _flat("", stage_config(self.plan, self.stage), {})
            items = [Param(k, v) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i:i + 100])
        client.update_run(self.run_id, status="RUNNING")
        client.set_tag(self.run_id, "progressive.state", "running")

    def step(self, gstep: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, v, now, gstep) for k, v in values.items())
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S or len(self.pending) >= 900:
            self._flush()

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        self.last_flush = time.monotonic()
        for i in range(0, len(batch), 900):  # under MLflow's 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 900])

    def summary(self, gstep: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, v, now, gstep) for k, v in values.items())
        self._flush()
        m = self.plan.tracking.mlflow
        if m is not None and m.log_model and Path(self.stage.final_checkpoint).is_file():
            self.client.log_artifact(self.run_id, self.stage.final_checkpoint, artifact_path="weights")

    def close(self, outcome: str) -> None:
        self._flush()
        state = {"completed": "completed", "stopped": "requeued"}.get(outcome, "crashed")
        self.client.set_tag(self.run_id, "progressive.state", state)
        # A stopped stage comes back (its next job sets RUNNING again); FINISHED only when it completed.
        self.client.set_terminated(self.run_id, status={"completed": "FINISHED", "stopped": "KILLED"}.get(outcome, "FAILED"))
        if outcome == "completed" and all(Path(s.final_checkpoint).is_file() for s in self.plan.stages):
            parent = files.get_or_create_id(self.plan.run_dir, "mlflow", "parent")
            self.client.set_terminated(parent, status="FINISHED")
