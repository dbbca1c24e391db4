"""The plan: what would run, as pure data.

`build_plan` resolves a validated `GraphConfig` against the data on disk (sample
counts per bucket) into a `Plan`: stages in dependency order with their resolved
Slurm request, training settings, step counts, parents and paths. `plan --dry-run`
prints it; `submit` writes it into the run record and submits exactly it; each
Slurm job reads its own `StagePlan` back from there. Nothing here writes, submits
or imports torch.
"""

from __future__ import annotations

import json
import os
import math
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict

from progressive.config import (
    GraphConfig,
    ModelConfig,
    SlurmConfig,
    TrainConfig,
    init_parent,
    resolved,
    topological_order,
    validate_name,
)
from progressive.errors import ConfigError, DataError, ProgressiveError
from progressive.layout import RunLayout
from progressive.tracking.settings import TrackingPlan, resolve_tracking

SPLITS = ("train", "val", "test")

# Train settings that do not change what the weights become: a checkpoint written
# under different values of these may still be resumed.
# deterministic/tf32/dist_timeout change how fast, not what, a stage learns (bits aside): a stage may switch them
# between its jobs, and checkpoints written before these keys existed still resume.
_NOT_IN_FINGERPRINT = {"checkpoint_every", "keep_checkpoints", "log_every", "throughput", "tensorboard", "num_workers",
                       "eval_samples", "deterministic", "tf32", "dist_timeout", "async_checkpoint"}


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InitFrom(_Data):
    """Where a stage's initial weights come from."""

    kind: Literal["stage", "path", "none"]
    stage: Optional[str] = None  # kind == "stage": the parent stage
    checkpoint: Optional[str] = None  # the weights file (parent's final checkpoint, or the user's path)


class StagePlan(_Data):
    """One stage, fully resolved: everything its job needs and everything plan shows."""

    name: str
    index: int
    bucket: int
    batch_size: int
    epochs: int
    samples: Optional[dict[str, int]]  # per split; None when the data file is unreadable
    steps_per_epoch: Optional[int]
    total_steps: Optional[int]
    time_limit_min: int
    estimate_min: Optional[float]
    gpu_mem_mb: Optional[int]
    world_size: int
    init_from: InitFrom
    depends_on: tuple[str, ...]  # parents inside this plan: the afterok edges
    checkpoint_dir: str
    final_checkpoint: str
    metrics_path: str
    slurm: SlurmConfig
    train: TrainConfig
    fingerprint: dict[str, Any]  # what must match for a checkpoint of this stage to be resumed


class Plan(_Data):
    """The resolved graph: a run name, shared paths, and stages in dependency order."""

    run_name: str
    config_path: str
    data_path: str
    data_error: Optional[str]  # why sample counts are unknown, if they are
    data_buckets: Optional[tuple[int, ...]] = None  # the buckets the data holds samples of (None: unknown)
    run_dir: str  # jobs/<run>
    checkpoint_root: str  # checkpoints/<run>
    seed: int
    model: ModelConfig
    stages: tuple[StagePlan, ...]
    tracking: TrackingPlan = TrackingPlan()

    @property
    def layout(self) -> RunLayout:
        """Where this run keeps its record, job files and checkpoints."""
        return RunLayout(Path(self.run_dir), Path(self.checkpoint_root))

    def stage(self, name: str) -> StagePlan:
        """The stage called `name`."""
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        """Stage names in dependency order."""
        return [s.name for s in self.stages]


def steps_per_epoch(n_train: int, batch_size: int, world_size: int = 1, grad_accum: int = 1) -> int:
    """Optimizer steps in one epoch: each rank sees ceil(n/world) samples in batches, the last one partial."""
    per_rank = math.ceil(n_train / world_size)
    micro = math.ceil(per_rank / batch_size)
    return math.ceil(micro / grad_accum)


def fingerprint(cfg: GraphConfig, stage_name: str) -> dict[str, Any]:
    """The settings that determine a stage's weights; a checkpoint is resumable only under the same ones."""
    idx = [s.name for s in cfg.stage].index(stage_name)
    st = cfg.stage[idx]
    slurm, train = resolved(cfg, st)
    fp: dict[str, Any] = {
        "bucket": st.bucket,
        "batch_size": st.batch_size,
        "epochs": st.epochs,
        "seed": cfg.run.seed,
        "world_size": slurm.nodes * slurm.tasks_per_node,
        "task": cfg.model.task,
        "model_options": json.loads(json.dumps(cfg.model.options, sort_keys=True, default=str)),
    }
    fp.update({k: v for k, v in train.model_dump().items() if k not in _NOT_IN_FINGERPRINT})
    return fp


def build_plan(
    cfg: GraphConfig,
    config_path: str | Path,
    *,
    run_name: str | None = None,
    select: list[str] | None = None,
    counts: Callable[[Path], Mapping[int, Mapping[str, int]]] | None = None,
) -> Plan:
    """Resolve `cfg` into a Plan.

    Args:
        cfg: the validated graph.
        config_path: the file it came from; relative paths in [run] are taken from its folder.
        run_name: the run (default: [run].name); validated, since it becomes folder and job names.
        select: stage names to keep (default: all); a kept stage whose parent is not kept starts from
            the parent's final checkpoint of this run, which must then exist when submitting.
        counts: reads {bucket: {split: samples}} from the data file; None skips the data (counts unknown).
    """
    config_path = Path(config_path).resolve()
    base = config_path.parent
    run = run_name or cfg.run.name
    try:
        validate_name(run, "run name")
    except ValueError as exc:
        raise ConfigError(str(exc), loc="--run-name", hint="use a name like 'curriculum-2'") from None
    all_names = [s.name for s in cfg.stage]
    if select:
        unknown = [s for s in select if s not in all_names]
        if unknown:
            raise ConfigError(f"no stage named {', '.join(map(repr, unknown))}", loc="--stages",
                              hint=f"valid stages: {', '.join(all_names)}")
    keep = set(select) if select else set(all_names)

    data_path = (base / cfg.run.data).resolve()
    layout = RunLayout.under((base / cfg.run.jobs).resolve(), (base / cfg.run.checkpoints).resolve(), run)
    bucket_counts: Mapping[int, Mapping[str, int]] | None = None
    data_error: str | None = None
    if counts is not None:
        try:
            bucket_counts = counts(data_path)
        except ProgressiveError as exc:
            data_error = str(exc)

    stages: list[StagePlan] = []
    for name in topological_order(cfg):
        if name not in keep:
            continue
        idx = all_names.index(name)
        st = cfg.stage[idx]
        slurm, train = resolved(cfg, st)
        world = slurm.nodes * slurm.tasks_per_node
        samples = None
        if bucket_counts is not None:
            found = bucket_counts.get(st.bucket, {})
            samples = {split: int(found.get(split, 0)) for split in SPLITS}
        spe = steps_per_epoch(samples["train"], st.batch_size, world, train.grad_accum) if samples else None
        total = spe * st.epochs if spe is not None else None
        estimate = None
        if samples and train.throughput:
            estimate = round(samples["train"] * st.epochs / train.throughput / 60, 1)
        stages.append(StagePlan(
            name=name,
            index=idx,
            bucket=st.bucket,
            batch_size=st.batch_size,
            epochs=st.epochs,
            samples=samples,
            steps_per_epoch=spe,
            total_steps=total,
            time_limit_min=slurm.time,
            estimate_min=estimate,
            gpu_mem_mb=st.gpu_mem,
            world_size=world,
            init_from=_init_from(cfg, idx, base, layout),
            depends_on=tuple(p for p in [init_parent(cfg, idx)] if p is not None and p in keep),
            checkpoint_dir=str(layout.stage(name).checkpoint_dir),
            final_checkpoint=str(layout.stage(name).final),
            metrics_path=str(layout.stage(name).metrics),
            slurm=slurm,
            train=train,
            fingerprint=fingerprint(cfg, name),
        ))
    return Plan(
        run_name=run,
        config_path=str(config_path),
        data_path=str(data_path),
        data_error=data_error,
        data_buckets=None if bucket_counts is None else present_buckets(bucket_counts),
        run_dir=str(layout.run_dir),
        checkpoint_root=str(layout.checkpoint_root),
        seed=cfg.run.seed,
        model=cfg.model,
        stages=tuple(stages),
        # Offsets over every stage of the graph, not only the selected ones: `submit --stages a` then
        # `--stages b` must not put both on the same stretch of the global-step axis.
        tracking=resolve_tracking(cfg, base, run, os.environ, _all_totals(cfg, bucket_counts)),
    )


def _all_totals(cfg: GraphConfig, counts: Mapping[int, Mapping[str, int]] | None) -> dict[str, int | None]:
    """Every stage's total optimizer steps, in dependency order (None where the data is unknown)."""
    out: dict[str, int | None] = {}
    for name in topological_order(cfg):
        st = cfg.stage[[s.name for s in cfg.stage].index(name)]
        slurm, train = resolved(cfg, st)
        train_n = int(counts.get(st.bucket, {}).get("train", 0)) if counts is not None else 0
        out[name] = (steps_per_epoch(train_n, st.batch_size, slurm.nodes * slurm.tasks_per_node, train.grad_accum)
                     * st.epochs) if train_n else None
    return out


def _init_from(cfg: GraphConfig, idx: int, base: Path, layout: RunLayout) -> InitFrom:
    parent = init_parent(cfg, idx)
    if parent is not None:
        return InitFrom(kind="stage", stage=parent, checkpoint=str(layout.stage(parent).final))
    ref = cfg.stage[idx].init_from
    if ref is not None and ref.lower() != "none":
        return InitFrom(kind="path", checkpoint=str((base / ref).resolve()))
    return InitFrom(kind="none")


def present_buckets(counts: Mapping[int, Mapping[str, int]]) -> tuple[int, ...]:
    """The buckets that hold at least one sample in some split, ascending."""
    return tuple(sorted(b for b, c in counts.items() if any(int(v) > 0 for v in c.values())))


def bucket_problems(plan: Plan) -> dict[str, str]:
    """{stage: problem} for stages whose bucket the data lacks or holds no training samples of.

    Empty when the counts are unknown. One wording for plan, submit, calibrate and resume:
    `stage 'x': bucket 100 is not in tiny.h5 (present: 64, 128, 256)`.
    """
    name = Path(plan.data_path).name
    present = plan.data_buckets
    problems: dict[str, str] = {}
    for st in plan.stages:
        if st.samples is None:
            continue
        if present is not None and st.bucket not in present:
            listed = ", ".join(map(str, present)) or "none"
            problems[st.name] = f"stage {st.name!r}: bucket {st.bucket} is not in {name} (present: {listed})"
        elif st.samples["train"] == 0:
            problems[st.name] = f"stage {st.name!r}: bucket {st.bucket} has no training samples in {name}"
    return problems


DATA_HINT = ("set each stage's bucket to one the data holds, or add the bucket to the data "
             "(`progressive data generate --sizes ...`, or your own export)")


def data_problems(plan: Plan) -> list[str]:
    """Everything wrong with the plan's data: unreadable or absent, or a bucket it lacks or has empty."""
    return ([plan.data_error] if plan.data_error else []) + list(bucket_problems(plan).values())


def check_data(plan: Plan) -> None:
    """Raise DataError (exit 2) naming every data problem of the plan; the one data check of every command."""
    if plan.data_error:
        raise DataError(plan.data_error, loc=plan.config_path)
    problems = bucket_problems(plan)
    if problems:
        raise DataError("; ".join(problems.values()), loc=plan.config_path, hint=DATA_HINT)


def missing_weights(plan: Plan) -> list[str]:
    """Stages whose initial weights neither exist now nor come from a stage of this plan.

    Parents inside the plan are fine (their job makes the file); a parent outside the selection,
    or a user checkpoint path, must exist on disk now.
    """
    problems: list[str] = []
    inside = set(plan.names)
    for st in plan.stages:
        ref = st.init_from
        if ref.checkpoint and not (ref.kind == "stage" and ref.stage in inside) and not Path(ref.checkpoint).is_file():
            why = (f"its parent {ref.stage!r} is not selected and has no final checkpoint" if ref.kind == "stage"
                   else "init_from names a checkpoint that does not exist")
            problems.append(f"stage {st.name!r}: {why}: {ref.checkpoint}")
    return problems


def missing_inputs(plan: Plan) -> list[str]:
    """Problems that make a plan unsubmittable: its data's (`data_problems`), then absent parent weights."""
    return data_problems(plan) + missing_weights(plan)
