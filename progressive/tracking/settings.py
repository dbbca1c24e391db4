"""What a run's `[tracking]` table resolves to: each tracker's effective settings and their sources.

A key written in stages.toml wins; otherwise the variable the tracker library itself reads
(WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME); otherwise
our default. Resolved once, when the plan is built (on the login node), and stored with the plan,
so every job of a run logs to the same place whatever its compute node's environment says.
Pure: no tracker library is imported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict

from progressive.config import GraphConfig, deprecations
from progressive.errors import ConfigError

__all__ = ["WandbPlan", "MlflowPlan", "TrackingPlan", "resolve_tracking", "sqlite_uri", "describe"]


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WandbPlan(_Data):
    """W&B as the run will use it; `sources` says where each value came from."""

    project: str
    entity: Optional[str]
    mode: str  # online | offline | disabled
    tags: tuple[str, ...]
    sources: dict[str, str]


class MlflowPlan(_Data):
    """MLflow as the run will use it."""

    tracking_uri: Optional[str]  # None: MLflow's own default (./mlruns, a deprecated file store)
    experiment: str
    log_model: bool
    sources: dict[str, str]


class TrackingPlan(_Data):
    """Every tracker of a run, and what its stages share: group, global-step offsets, sweep params."""

    wandb: Optional[WandbPlan] = None
    mlflow: Optional[MlflowPlan] = None
    tensorboard: bool = False
    group: str = ""  # the curriculum run, or for a sweep variant its sweep
    # Global step = offset of the stage + its own step: monotonic over the curriculum's stages.
    step_offsets: dict[str, int] = {}
    params: dict[str, Any] = {}  # a sweep variant's parameters (config and tags)
    notes: tuple[str, ...] = ()  # deprecated keys used, for plan to show

    @property
    def enabled(self) -> bool:
        """Whether any tracker beyond metrics.jsonl is on."""
        return bool(self.wandb and self.wandb.mode != "disabled") or self.mlflow is not None or self.tensorboard


def sqlite_uri(uri: str, base: Path) -> str:
    """A relative `sqlite:///file.db` made absolute against the config's folder (jobs run elsewhere)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((base / uri[len(prefix):]).resolve())
    return uri


def _pick(key: str, written: Any, env: Mapping[str, str], var: str, default: Any) -> tuple[Any, str]:
    if written is not None:
        return written, "stages.toml"
    if env.get(var):
        return env[var], f"${var}"
    return default, "default"


def resolve_tracking(cfg: GraphConfig, base: Path, run: str, env: Mapping[str, str],
                     totals: Mapping[str, Optional[int]]) -> TrackingPlan:
    """The run's TrackingPlan: `totals` is each stage's total steps, in plan order (for the offsets)."""
    t = cfg.tracking
    wandb = mlflow = None
    if t.wandb is not None:
        vals, src = {}, {}
        for key, var, default in (("project", "WANDB_PROJECT", run), ("entity", "WANDB_ENTITY", None),
                                  ("mode", "WANDB_MODE", "online")):
            vals[key], src[key] = _pick(key, getattr(t.wandb, key), env, var, default)
        if vals["mode"] == "dryrun":  # W&B's old name for offline
            vals["mode"] = "offline"
        if vals["mode"] not in ("online", "offline", "disabled"):
            raise ConfigError(f"WANDB_MODE={vals['mode']!r} is not a W&B mode", loc="$WANDB_MODE",
                              hint="use online, offline or disabled, or set [tracking.wandb] mode in stages.toml")
        wandb = WandbPlan(tags=t.wandb.tags, sources=src, **vals)
    if t.mlflow is not None:
        uri, uri_src = _pick("tracking_uri", t.mlflow.tracking_uri, env, "MLFLOW_TRACKING_URI", None)
        exp, exp_src = _pick("experiment", t.mlflow.experiment, env, "MLFLOW_EXPERIMENT_NAME", run)
        mlflow = MlflowPlan(tracking_uri=sqlite_uri(uri, base) if uri else None, experiment=exp,
                            log_model=t.mlflow.log_model,
                            sources={"tracking_uri": uri_src, "experiment": exp_src})
    tensorboard = (t.tensorboard is not None and t.tensorboard.enabled) or cfg.train.tensorboard or any(
        getattr(st, "tensorboard") for st in cfg.stage)
    offsets: dict[str, int] = {}
    done = 0
    for name, total in totals.items():
        offsets[name] = done
        done += total or 0  # unknown (data unreadable): later stages may overlap; plan warns of the data first
    notes = tuple(n for n in deprecations(cfg) if "tensorboard" in n)
    return TrackingPlan(wandb=wandb, mlflow=mlflow, tensorboard=tensorboard, group=run, step_offsets=offsets,
                        notes=notes)


def describe(t: TrackingPlan) -> list[str]:
    """What `plan` says of the trackers: each effective value and where it came from."""
    def show(values: Mapping[str, Any], sources: Mapping[str, str]) -> str:
        return ", ".join(f"{k} = {values[k] if values[k] not in (None, '') else '-'} ({sources[k]})" for k in sources)

    lines = []
    if t.wandb is not None:
        w = t.wandb
        lines.append(f"tracking: W&B {show(w.model_dump(), w.sources)}, group = {t.group}, one run per stage"
                     + (", tags = " + ", ".join(w.tags) if w.tags else ""))
    if t.mlflow is not None:
        m = t.mlflow
        lines.append(f"tracking: MLflow {show(m.model_dump(), m.sources)}, a parent run {t.group!r} with a child per stage"
                     + (", final weights logged" if m.log_model else ""))
    if t.tensorboard:
        lines.append("tracking: TensorBoard event files under each stage's folder (tensorboard/)")
    return lines
