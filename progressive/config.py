"""The stage-graph file (`stages.toml`): Pydantic models, parsing and validation.

Everything here is pure: `load_config(path)` reads one TOML file and returns a
validated `GraphConfig`, or raises `ConfigError` naming the file, the stage and the
key, with a hint. Nothing here imports torch or touches Slurm.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from progressive.errors import ConfigError
from progressive.units import MEM_FORMATS, TIME_FORMATS, parse_duration_min, parse_mem_mb, parse_seconds

# Names become directory names, Slurm job names and run ids: keep them boring.
NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "letters, digits, '-', '_' and '.' only, no leading dot, at most 64 characters"


def validate_name(value: str, what: str = "name") -> str:
    """Return `value` if it is a safe stage/run name, else raise ValueError saying the rule."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"invalid {what} {value!r}: use {NAME_RULE}")
    return value


# Time and memory parsing lives in progressive.units; the models below use it.


def _as_duration(v: Any) -> Any:
    return v if v is None else parse_duration_min(v)


def _as_mem(v: Any) -> Any:
    return v if v is None else parse_mem_mb(v)


def _as_seconds(v: Any) -> Any:
    return v if v is None else parse_seconds(v)


Minutes = Annotated[int, BeforeValidator(_as_duration)]
MegaBytes = Annotated[int, BeforeValidator(_as_mem)]
Seconds = Annotated[int, BeforeValidator(_as_seconds)]
PositiveInt = Annotated[int, Field(gt=0)]



# --------------------------------------------------------------------------- the tables

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RunConfig(_Strict):
    """`[run]`: where things live and the run's identity."""

    name: str = Field("run", description="Run name: the folder under jobs/ and checkpoints/, and the Slurm job-name prefix.")
    seed: int = Field(0, description="Seed for model init, data order and everything random.")
    data: str = Field("data/matrices.h5", description="The bucketed HDF5 dataset (relative to the config file).")
    checkpoints: str = Field("checkpoints", description="Root folder for checkpoints (relative to the config file).")
    jobs: str = Field("jobs", description="Root folder for run records and Slurm logs (relative to the config file).")

    _check_name = field_validator("name")(lambda v: validate_name(v, "run name"))


class SlurmConfig(_Strict):
    """`[slurm]`: the Slurm request; every key may be overridden per stage."""

    partition: Optional[str] = Field(None, description="Slurm partition (cluster default when unset).")
    account: Optional[str] = Field(None, description="Slurm account to charge.")
    qos: Optional[str] = Field(None, description="Slurm quality of service.")
    nodes: PositiveInt = Field(1, description="Nodes per stage job.")
    tasks_per_node: PositiveInt = Field(1, description="Processes per node: DDP ranks (one per GPU on GPU nodes).")
    gpus_per_node: Annotated[int, Field(ge=0)] = Field(0, description="GPUs per node (0 trains on CPU).")
    cpus_per_task: PositiveInt = Field(1, description="CPU cores per task (DataLoader workers + 1).")
    mem: Optional[MegaBytes] = Field(None, description=f"Host memory per node, e.g. {MEM_FORMATS}.")
    time: Minutes = Field(60, description=f"Default time limit per job, e.g. {TIME_FORMATS}.")
    max_requeues: Annotated[int, Field(ge=0)] = Field(3, description="Times a stage may requeue itself after a time-out.")
    # Not TERM: scancel and preemption send it, and a job must tell those apart from its time limit.
    signal: Literal["USR1", "USR2", "INT", "HUP", "URG"] = Field(
        "USR2", description="Signal Slurm sends before the time limit (USR2: NCCL may swallow USR1).")
    signal_delay: Seconds = Field(120, description="Seconds before the time limit that the signal is sent.")
    constraint: Optional[str] = Field(None, description="Slurm --constraint.")
    exclude: Optional[str] = Field(None, description="Slurm --exclude (nodes to avoid).")
    setup: tuple[str, ...] = Field((), description="Shell lines run in the sbatch script before the job (e.g. module load).")
    extra: dict[str, str | int | bool] = Field(default_factory=dict, description="Extra sbatch options, e.g. {mail-type = \"END\"}.")

    @field_validator("extra")
    @classmethod
    def _extra_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                raise ValueError(f"extra sbatch option {key!r} is not an sbatch long option name (e.g. 'mail-type')")
        return v


class TrainConfig(_Strict):
    """`[train]`: optimisation and checkpointing; every key may be overridden per stage."""

    lr: Annotated[float, Field(gt=0)] = Field(1e-3, description="Peak learning rate (AdamW).")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay.")
    warmup_frac: Annotated[float, Field(ge=0, lt=1)] = Field(0.05, description="Share of the stage's steps spent in linear warmup.")
    min_lr_frac: Annotated[float, Field(ge=0, le=1)] = Field(0.1, description="Cosine decay floor as a share of lr.")
    grad_accum: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    clip_grad_norm: Optional[Annotated[float, Field(gt=0)]] = Field(1.0, description="Clip the gradient norm to this (unset: no clipping).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, else fp16 with a GradScaler on GPU, fp32 on CPU. "
                            "A stage keeps the precision it started with across requeues.")
    deterministic: bool = Field(
        False, description="Deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN fixed, "
                           "CUBLAS_WORKSPACE_CONFIG exported): resume is bitwise on a GPU too, at a cost in speed.")
    tf32: bool = Field(False, description="Let fp32 matmuls and convolutions use TF32 on GPUs that have it (faster, ~1e-3 relative error).")
    dist_timeout: Minutes = Field(
        30, description=f"How long a rank waits in a collective (NCCL/gloo) before the job fails, e.g. {TIME_FORMATS}; "
                        "it must cover rank 0's evaluation and checkpoint saves, which the others wait for.")
    checkpoint_every: str | int = Field("30m", description="Periodic checkpoint: a duration (\"30m\") or a number of optimizer steps.")
    keep_checkpoints: PositiveInt = Field(2, description="Periodic checkpoints kept per stage (the final one is kept apart).")
    async_checkpoint: bool = Field(
        False, description="Write periodic checkpoints in the background: training waits only for the copy of the "
                           "state to host memory (stop and end saves stay synchronous).")
    num_workers: Annotated[int, Field(ge=0)] = Field(0, description="DataLoader workers (0 measured fastest on 2 cores).")
    eval_samples: Annotated[int, Field(ge=0)] = Field(16, description="Validation matrices evaluated at the end of the stage (0: none).")
    log_every: PositiveInt = Field(1, description="Write a metrics line every this many optimizer steps.")
    throughput: Optional[Annotated[float, Field(gt=0)]] = Field(
        None, description="Measured samples/s for this stage's bucket; enables plan's time estimate.")
    tensorboard: bool = Field(False, description="Deprecated: use a [tracking.tensorboard] table. Also log to TensorBoard.")

    @field_validator("checkpoint_every")
    @classmethod
    def _ckpt_every(cls, v: str | int) -> str | int:
        if isinstance(v, bool):
            raise ValueError("checkpoint_every must be a duration such as \"30m\" or a number of steps")
        if isinstance(v, int):
            if v <= 0:
                raise ValueError("checkpoint_every must be a positive number of steps")
            return v
        parse_duration_min(v)  # raises with the accepted formats
        return v


class ModelConfig(_Strict):
    """`[model]`: the task (model, data, loss, evaluation) and its options."""

    task: str = Field("progressive.tasks.precond:PreconditionerTask", description="The task object, as \"module:object\".")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options passed to the task.")

    @field_validator("task")
    @classmethod
    def _task_ref(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", v):
            raise ValueError(f"task {v!r} must look like \"package.module:Object\"")
        return v


class WandbConfig(_Strict):
    """`[tracking.wandb]`: one W&B run per stage, grouped by curriculum run (the table's presence turns it on)."""

    project: Optional[str] = Field(None, description="W&B project (default: $WANDB_PROJECT, else the run name).")
    entity: Optional[str] = Field(None, description="W&B entity (team or user; default: $WANDB_ENTITY, else yours).")
    mode: Optional[Literal["online", "offline", "disabled"]] = Field(
        None, description="online, offline (files under the run's folder; `progressive sync RUN` uploads them) or "
                          "disabled (default: $WANDB_MODE, else online).")
    tags: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = Field(
        (), description="Tags on every stage's run (W&B allows 64 characters each).")


class MlflowConfig(_Strict):
    """`[tracking.mlflow]`: a parent MLflow run per curriculum run, a nested child run per stage."""

    tracking_uri: Optional[str] = Field(
        None, description="Where runs go: \"sqlite:///mlflow.db\" (relative to the config file) or a tracking server "
                          "URL (default: $MLFLOW_TRACKING_URI).")
    experiment: Optional[str] = Field(None, description="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else the run name).")
    log_model: bool = Field(False, description="Log each stage's final weights (final.pt) as an artifact.")


class TensorboardConfig(_Strict):
    """`[tracking.tensorboard]`: TensorBoard event files under jobs/<run>/stages/<stage>/tensorboard/."""

    enabled: bool = Field(True, description="Write TensorBoard event files (needs the tensorboard package).")


class TrackingConfig(_Strict):
    """`[tracking]`: where else a run's metrics go. A tracker can never stop or slow training."""

    wandb: Optional[WandbConfig] = Field(None, description="Weights & Biases (pip install \"progressive[wandb]\").")
    mlflow: Optional[MlflowConfig] = Field(None, description="MLflow (pip install \"progressive[mlflow]\").")
    tensorboard: Optional[TensorboardConfig] = Field(None, description="TensorBoard.")


# A stage may override any [slurm] or [train] key: same names, optional, None = inherit.
_OVERRIDES: dict[str, Any] = {}
for _model in (SlurmConfig, TrainConfig):
    for _name, _field in _model.model_fields.items():
        # Keep the field's validators and bounds (Pydantic moves them to `metadata`).
        _typ = Annotated[(_field.annotation, *_field.metadata)] if _field.metadata else _field.annotation
        _table = _model.__name__.removesuffix("Config").lower()
        _OVERRIDES[_name] = (Optional[_typ], Field(None, description=f"Override of [{_table}].{_name}."))

_StageOverrides = create_model("_StageOverrides", __base__=_Strict, **_OVERRIDES)  # type: ignore[call-overload]


class StageConfig(_StageOverrides):  # type: ignore[misc, valid-type]
    """One `[[stage]]`: a bucket trained for some epochs, started from a parent's weights."""

    name: str = Field(description=f"Stage name ({NAME_RULE}).")
    bucket: PositiveInt = Field(description="Matrix size n of the data bucket this stage trains on.")
    batch_size: PositiveInt = Field(description="Matrices per micro-batch per process.")
    epochs: PositiveInt = Field(description="Passes over the bucket's training split.")
    init_from: Optional[str] = Field(
        None, description="Parent stage name, a checkpoint path, or \"none\"; default: the previous stage in the file.")
    gpu_mem: Optional[MegaBytes] = Field(None, description="Measured GPU-memory estimate (shown by plan; not a Slurm request).")

    _check_name = field_validator("name")(lambda v: validate_name(v, "stage name"))


class GraphConfig(_Strict):
    """The whole file."""

    run: RunConfig = Field(default_factory=RunConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    stage: tuple[StageConfig, ...] = Field(description="The stages, as [[stage]] tables.")

    @model_validator(mode="after")
    def _graph(self) -> "GraphConfig":
        if not self.stage:
            raise ValueError("the graph has no stages; add at least one [[stage]] table")
        seen: set[str] = set()
        for i, st in enumerate(self.stage):
            if st.name in seen:
                raise _GraphIssue(i, "name", f"duplicate stage name {st.name!r}", "give every [[stage]] a unique name")
            seen.add(st.name)
        for i, st in enumerate(self.stage):
            ref = st.init_from
            if ref is None or ref.lower() == "none" or ref in seen or _looks_like_path(ref):
                if ref == st.name:
                    raise _GraphIssue(i, "init_from", f"stage {st.name!r} starts from itself", "name an earlier stage, a checkpoint path, or \"none\"")
                continue
            close = difflib.get_close_matches(ref, sorted(seen), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _GraphIssue(i, "init_from", f"init_from {ref!r} names no stage",
                              f"{hint}valid stages: {', '.join(sorted(seen))}; or give a checkpoint path (containing '/') or \"none\"")
        for i, st in enumerate(self.stage):
            # Overrides are built dynamically (_StageOverrides): None means the [slurm] value.
            tasks = getattr(st, "tasks_per_node") or self.slurm.tasks_per_node
            gpus = getattr(st, "gpus_per_node")
            gpus = self.slurm.gpus_per_node if gpus is None else gpus
            if 0 < gpus < tasks:
                # Each rank trains on a GPU of its own; two ranks on one GPU would share its memory and
                # serialise on it, and NCCL refuses two ranks on one device.
                raise _GraphIssue(i, "tasks_per_node", f"stage {st.name!r} runs {tasks} tasks per node on "
                                  f"{gpus} GPU(s) per node: each task needs a GPU of its own",
                                  f"set tasks_per_node = {gpus} (one rank per GPU), or gpus_per_node = {tasks}")
        cycle = find_cycle(parents(self))
        if cycle:
            i = [s.name for s in self.stage].index(cycle[0])
            steps = ", ".join(f"{c} starts from {cycle[(k + 1) % len(cycle)]}" for k, c in enumerate(cycle))
            raise _GraphIssue(i, "init_from", f"the stages form a cycle: {steps}",
                              "init_from must point to a stage that does not (indirectly) start from this one")
        return self


class _GraphIssue(ValueError):
    """A graph-level problem pinned to one stage and key (converted to ConfigError)."""

    def __init__(self, index: int, key: str, msg: str, hint: str) -> None:
        super().__init__(msg)
        self.index, self.key, self.msg, self.hint = index, key, msg, hint


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or ref.endswith((".pt", ".pth"))


def init_parent(cfg: GraphConfig, index: int) -> str | None:
    """The stage name stage `index` starts from, or None (a path, "none", or the first stage)."""
    st = cfg.stage[index]
    if st.init_from is None:
        return cfg.stage[index - 1].name if index > 0 else None
    if st.init_from.lower() == "none" or _looks_like_path(st.init_from):
        return None
    return st.init_from


def parents(cfg: GraphConfig) -> dict[str, str | None]:
    """Map each stage to the stage it starts from (None for roots)."""
    return {st.name: init_parent(cfg, i) for i, st in enumerate(cfg.stage)}


def find_cycle(edges: dict[str, str | None]) -> list[str]:
    """Return one cycle in a child->parent map as a list of names, or [] if it is a DAG."""
    state: dict[str, int] = {}
    for start in edges:
        path: list[str] = []
        node: str | None = start
        while node is not None and state.get(node, 0) == 0:
            state[node] = 1
            path.append(node)
            node = edges.get(node)
        if node is not None and state.get(node) == 1:
            return path[path.index(node):][::-1]
        for n in path:
            state[n] = 2
    return []


def topological_order(cfg: GraphConfig) -> list[str]:
    """Stage names so that every parent comes before its children (file order kept where free)."""
    par = parents(cfg)
    done: list[str] = []
    placed: set[str] = set()
    while len(done) < len(par):
        for st in cfg.stage:
            p = par[st.name]
            if st.name not in placed and (p is None or p in placed):
                done.append(st.name)
                placed.add(st.name)
                break
    return done


def resolved(cfg: GraphConfig, stage: StageConfig) -> tuple[SlurmConfig, TrainConfig]:
    """The stage's [slurm] and [train] with its own overrides applied."""
    def merge(base: BaseModel) -> Any:
        over = {k: getattr(stage, k) for k in type(base).model_fields if getattr(stage, k) is not None}
        return base.model_copy(update=over) if over else base
    return merge(cfg.slurm), merge(cfg.train)


# --------------------------------------------------------------------------- loading

def deprecations(cfg: GraphConfig) -> list[str]:
    """Keys that still work but are on their way out, each with what to write instead."""
    out = []
    if cfg.train.tensorboard or any(getattr(st, "tensorboard") for st in cfg.stage):
        out.append("[train] tensorboard is deprecated: write a [tracking.tensorboard] table instead "
                   "(it is honoured for now)")
    return out


def load_config(path: str | Path) -> GraphConfig:
    """Read and validate a stage-graph TOML file; raise ConfigError with file/stage/key on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", loc=str(path),
                          hint="pass the stage graph with -c PATH, or write a starter one here with "
                               "`progressive init`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", loc=str(path)) from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<config>") -> GraphConfig:
    """Validate TOML text; `source` names it in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", loc=source,
                          hint="fix the line and column above (strings need quotes, tables [name], arrays of tables [[stage]])") from None
    try:
        return GraphConfig.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc, raw, source) from None


def _config_error(exc: ValidationError, raw: dict[str, Any], source: str) -> ConfigError:
    """Turn Pydantic's first error into one message naming file, stage and key, with a fix."""
    # An unknown key usually explains a "missing" one next to it (a typo): report it first.
    err = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")[0]
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _GraphIssue):
        return ConfigError(ctx_err.msg, loc=f"{source}: {_stage_label(raw, ctx_err.index)}.{ctx_err.key}", hint=ctx_err.hint)
    loc = list(err["loc"])
    return table_error(err, f"{source}: {_where(raw, loc)}", _model_at(loc[:-1]))


def table_error(err: ErrorDetails, where: str, table: type[BaseModel] | None) -> ConfigError:
    """One Pydantic error as a ConfigError at `where`: an unknown key with the close match and the
    valid keys of `table`, a missing key, or the message with the value given and a fix."""
    kind, key = err["type"], str(err["loc"][-1]) if err["loc"] else ""
    if kind == "extra_forbidden":
        valid = sorted(table.model_fields) if table else []
        close = difflib.get_close_matches(key, valid, n=1)
        hint = (f"did you mean {close[0]!r}? " if close else "") + f"valid keys: {', '.join(valid)}"
        return ConfigError(f"unknown key {key!r}", loc=where, hint=hint)
    if kind == "missing":
        return ConfigError("required key is missing", loc=where, hint=f"add `{key} = ...` to this table")
    msg = err["msg"].removeprefix("Value error, ")
    if kind in _SHOW_INPUT or kind.endswith(("_type", "_parsing")):
        msg = f"{msg} (got {err.get('input')!r})"
    return ConfigError(msg, loc=where, hint=_hint(kind, msg))


# How to fix each kind of Pydantic error; value errors are told apart by their message.
_SHOW_INPUT = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error"}
_KIND_HINTS = {
    "greater_than": "use a positive number",
    "literal_error": "use one of the values listed above",
}
_VALUE_HINTS = (
    ("duration", "write the time like \"4h\", \"90m\" or \"1-12:00:00\""),
    ("memory", "write memory like \"24G\" or \"512M\""),
    ("invalid", "rename it; names become folder names and Slurm job names"),
)


def _hint(kind: str, msg: str) -> str | None:
    if kind in _KIND_HINTS:
        return _KIND_HINTS[kind]
    if kind.startswith(("greater_than", "less_than")):
        return "change the value to lie in the allowed range"
    if kind.endswith(("_type", "_parsing")):
        return "check the value's type: strings need quotes, numbers must not be quoted"
    if kind == "value_error":
        return next((hint for word, hint in _VALUE_HINTS if word in msg), None)
    return None


def _stage_label(raw: dict[str, Any], index: int) -> str:
    try:
        name = raw["stage"][index].get("name")
    except (KeyError, IndexError, TypeError, AttributeError):
        name = None
    return f"stage {name!r} ([[stage]] #{index + 1})" if isinstance(name, str) else f"[[stage]] #{index + 1}"


def _where(raw: dict[str, Any], loc: list[Any]) -> str:
    if loc and loc[0] == "stage" and len(loc) >= 2 and isinstance(loc[1], int):
        rest = ".".join(str(p) for p in loc[2:])
        return _stage_label(raw, loc[1]) + (f".{rest}" if rest else "")
    if loc and loc[0] == "tracking":  # [tracking.wandb].mode, [tracking].neptune
        table = ".".join(str(p) for p in loc[:2 if len(loc) > 2 else 1])
        rest = ".".join(str(p) for p in loc[2 if len(loc) > 2 else 1:])
        return f"[{table}]" + (f".{rest}" if rest else "")
    if len(loc) == 1 and loc[0] in ("run", "slurm", "train", "model"):
        return f"[{loc[0]}]"
    if loc and loc[0] in ("run", "slurm", "train", "model"):
        return f"[{loc[0]}]." + ".".join(str(p) for p in loc[1:])
    return ".".join(str(p) for p in loc) or "(top level)"


def _model_at(loc: list[Any]) -> type[BaseModel] | None:
    tables: dict[str, type[BaseModel]] = {"run": RunConfig, "slurm": SlurmConfig, "train": TrainConfig, "model": ModelConfig,
                                          "tracking": TrackingConfig}
    trackers: dict[str, type[BaseModel]] = {"wandb": WandbConfig, "mlflow": MlflowConfig, "tensorboard": TensorboardConfig}
    if not loc:
        return GraphConfig
    if loc[0] == "tracking" and len(loc) == 2:
        return trackers.get(str(loc[1]))
    if loc[0] == "stage" and len(loc) == 2:
        return StageConfig
    if len(loc) == 1:
        return tables.get(str(loc[0]))
    return None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the stage-graph file (for editors)."""
    schema = GraphConfig.model_json_schema()
    schema["title"] = "progressive stage graph (stages.toml)"
    return schema
