"""The W&B sink: one W&B run per stage for the stage's whole life (imported only by a job that uses it).

The run's id is stored in the run's tracking.json by the stage's first job; every later job
(after a time-out requeue, a preemption, a node failure, `resume`) opens the same run with
resume="allow". Its group is the curriculum run (a sweep variant's: the sweep), its job_type the
stage, its config the stage's resolved settings; `_step` is the curriculum's global step. In
offline mode each job writes its own offline-run folder under the stage's folder, and
`progressive sync RUN` uploads them oldest first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from progressive.plan import Plan, StagePlan
from progressive.tracking import files

# W&B's own default is 90 s; an init still pending when the job ends delays the process's exit by what is left.
INIT_TIMEOUT_S = 30.0


def stage_config(plan: Plan, stage: StagePlan) -> dict[str, Any]:
    """What a tracker shows as the stage's configuration: its fingerprint, resources and the sweep's params."""
    return {"run": plan.run_name, "stage": stage.name, "bucket": stage.bucket, "batch_size": stage.batch_size,
            "epochs": stage.epochs, "total_steps": stage.total_steps, "world_size": stage.world_size,
            "task": plan.model.task, "model": dict(plan.model.options), "train": stage.train.model_dump(),
            "slurm": {k: v for k, v in stage.slurm.model_dump().items() if k not in ("setup", "extra")},
            "init_from": stage.init_from.stage or stage.init_from.checkpoint, **(
                {"sweep_params": dict(plan.tracking.params)} if plan.tracking.params else {})}


def job_settings() -> Any:
    """The W&B settings of every init from a job or from `report`: bounded init, no console capture, no git."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.Settings(init_timeout=INIT_TIMEOUT_S, console="off", disable_git=True, silent=True, x_disable_stats=True)


class WandbSink:
    """Drives one W&B run (from the hub's thread)."""

    name = "wandb"

    def __init__(self, plan: Plan, stage: StagePlan, stage_dir: Path) -> None:
        self.plan, self.stage, self.stage_dir = plan, stage, stage_dir
        self.run: Any = None

    def open(self) -> None:
        import wandb

        w = self.plan.tracking.wandb
        assert w is not None
        run_id = files.get_or_create_id(self.plan.run_dir, "wandb", self.stage.name)
        # W&B refuses tags over 64 characters (a sweep's "stages" parameter makes long ones): cut, not refused.
        tags = [t[:64] for t in (*w.tags, *(f"{k}={v}" for k, v in self.plan.tracking.params.items()))]
        self.run = wandb.init(
            project=w.project, entity=w.entity, mode=w.mode, id=run_id, resume="allow",  # type: ignore[arg-type]
            name=f"{self.plan.run_name}.{self.stage.name}", group=self.plan.tracking.group or self.plan.run_name,
            job_type=self.stage.name, config=stage_config(self.plan, self.stage), tags=tags[:64],
            dir=str(self.stage_dir), reinit="create_new",
            settings=job_settings())
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def step(self, gstep: int, values: dict[str, float]) -> None:
        self.run.log({**values, "global_step": gstep}, step=gstep)

    def summary(self, gstep: int, values: dict[str, float]) -> None:
        self.run.summary.update({**values, "global_step": gstep})

    def close(self, outcome: str) -> None:
        if outcome == "stopped":
            self.run.mark_preempting()  # W&B shows it preempted, and the next job resumes it
        self.run.finish(exit_code=0 if outcome != "crashed" else 1)
