"""The sweep file (`sweep.toml`): Pydantic models, parsing, and the checks against a stage graph.

`load_sweep(path)` reads one TOML file and returns a validated `SweepFile`, or raises
`ConfigError` naming the file and the key, with the valid choices. `check_params`
then checks every parameter name against the graph it will modify (`train.*`,
`slurm.*`, `model.options.*`, `stage.<name>.<key>`, `stage.*.<key>`, `stages`).
Pure: no torch, no Slurm, nothing written.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from progressive.config import (GraphConfig, ModelConfig, RunConfig, SlurmConfig, StageConfig, TrainConfig, table_error,
                                validate_name)
from progressive.errors import ConfigError

METHODS = ("grid", "random", "tpe")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    """A parameter drawn from an interval (random and tpe): `{ low = 1e-4, high = 1e-2, log = true }`."""

    low: float = Field(description="Lower bound (inclusive).")
    high: float = Field(description="Upper bound (inclusive).")
    type: Literal["float", "int"] = Field("float", description="float, or int (whole numbers).")
    log: bool = Field(False, description="Draw uniformly in log space (low must be > 0).")

    @model_validator(mode="after")
    def _bounds(self) -> "Range":
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"a range needs low < high, got low = {self.low!r}, high = {self.high!r}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low = {self.low!r}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an int range needs whole bounds, got {self.low!r}..{self.high!r}")
        return self


ParamSpec = Union[list[Any], Range]


class Subset(_Strict):
    """`[sweep.subset]`: every variant trains on one reproducible subset of the data file."""

    max_samples: int = Field(gt=0, description="Samples kept in the whole file; every (bucket, split) keeps its share "
                                               "(as `progressive data subset`).")
    seed: int = Field(0, description="Which samples are kept.")


class Prune(_Strict):
    """`[sweep.prune]`: successive halving at stage boundaries."""

    keep: float = Field(gt=0, lt=1, description="Share of the variants (by that stage's metric) that goes on after each stage.")


class SweepTable(_Strict):
    """`[sweep]`."""

    name: str = Field(description="Sweep name: the folder jobs/<name>/ and checkpoints/<name>/.")
    method: Literal["grid", "random", "tpe"] = Field("grid", description="grid | random | tpe.")
    trials: Optional[int] = Field(None, gt=0, description="Variants to draw (random, tpe); grid: the size of the product.")
    seed: int = Field(0, description="Seed of the draws (random, tpe).")
    metric: str = Field(description="A key of the task's evaluate() result, of the last stage a variant runs.")
    goal: Literal["min", "max"] = Field("min", description="min | max.")
    parallel: int = Field(4, gt=0, description="Variants running at once (the array's % throttle on Slurm).")
    subset: Optional[Subset] = None
    prune: Optional[Prune] = None
    params: dict[str, ParamSpec] = Field(description="Parameter name -> list of choices, or a range table.")

    _check_name = field_validator("name")(lambda v: validate_name(v, "sweep name"))

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not v:
            raise ValueError("the sweep has no parameters; add at least one to [sweep.params]")
        for key, spec in v.items():
            if isinstance(spec, list) and not spec:
                raise ValueError(f"parameter {key!r} has an empty list of choices")
        return v

    @model_validator(mode="after")
    def _method(self) -> "SweepTable":
        ranges = [k for k, s in self.params.items() if isinstance(s, Range)]
        if self.method == "grid" and ranges:
            raise _SweepIssue(f"params.{ranges[0]}", f"a grid needs a list of values, {ranges[0]!r} is a range",
                              "give a list of values, or use method = \"random\" or \"tpe\"")
        if self.method == "grid" and self.trials is not None and self.trials != grid_size(self.params):
            raise _SweepIssue("trials", f"a grid has {grid_size(self.params)} variants (the product of the lists), "
                              f"trials says {self.trials}", "drop trials for a grid")
        if self.method != "grid" and self.trials is None:
            raise _SweepIssue("trials", f"method {self.method!r} needs the number of trials",
                              "add `trials = 8` (say) to [sweep]")
        return self


class SweepFile(_Strict):
    """The whole file: one `[sweep]` table."""

    sweep: SweepTable


def grid_size(params: dict[str, ParamSpec]) -> int:
    """The number of grid variants: the product of the list lengths."""
    return math.prod(len(s) for s in params.values() if isinstance(s, list))


class _SweepIssue(ValueError):
    """A problem pinned to one key of [sweep] (converted to ConfigError)."""

    def __init__(self, key: str, msg: str, hint: str) -> None:
        super().__init__(msg)
        self.key, self.msg, self.hint = key, msg, hint


# ------------------------------------------------------------------ loading

def load_sweep(path: str | Path) -> tuple[SweepFile, str]:
    """Read and validate a sweep file; return it and its text. ConfigError names the file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", loc=str(path),
                          hint="pass the sweep file with -s PATH, or write a starter one here with "
                               "`progressive init --sweep`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", loc=str(path)) from None
    return parse_sweep(text, source=str(path)), text


def parse_sweep(text: str, source: str = "<sweep>") -> SweepFile:
    """Validate sweep TOML text; `source` names it in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", loc=source,
                          hint="fix the line and column above (strings need quotes, keys with dots need quotes)") from None
    try:
        return SweepFile.model_validate(raw)
    except ValidationError as exc:
        raise _sweep_error(exc, source) from None


_TABLES: dict[tuple[str, ...], type[BaseModel]] = {
    (): SweepFile, ("sweep",): SweepTable, ("sweep", "subset"): Subset, ("sweep", "prune"): Prune,
}


def _sweep_error(exc: ValidationError, source: str) -> ConfigError:
    errors = exc.errors(include_url=False)
    err = sorted(errors, key=lambda e: e["type"] != "extra_forbidden")[0]
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _SweepIssue):
        return ConfigError(ctx_err.msg, loc=f"{source}: [sweep].{ctx_err.key}", hint=ctx_err.hint)
    loc = [str(p) for p in err["loc"]]
    # A param is a list or a Range: pydantic reports both branches; keep the one matching the input's form.
    if len(loc) >= 3 and loc[:2] == ["sweep", "params"]:
        key = loc[2]
        mine = [e for e in errors if [str(p) for p in e["loc"][:3]] == loc[:3]]
        ranges = [e for e in mine if len(e["loc"]) > 3 and "Range" in str(e["loc"][3])]
        first_input = mine[0].get("input") if mine else None
        if ranges and not isinstance(first_input, list):
            err = sorted(ranges, key=lambda e: e["type"] != "extra_forbidden")[0]
            loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if len(loc) == 4 and "Range" in loc[3] and err["type"] not in ("extra_forbidden", "value_error", "missing"):
            msg = f"expected a list of values or a range table, got {err.get('input')!r}"
        elif err["type"] == "list_type":
            msg = f"expected a list of values or a range table, got {err.get('input')!r}"
        elif err["type"] == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r} in the range of {key!r}"
        elif err["type"] == "missing":
            msg = f"the range of {key!r} lacks {loc[-1]!r}"
        return ConfigError(msg, loc=f"{source}: [sweep.params].\"{key}\"",
                           hint="a parameter is a list of choices, e.g. [1e-3, 3e-3], or a range "
                                "{ low = 2, high = 8, type = \"int\" } (keys: low, high, type, log)")
    where = "[" + ".".join(loc[:-1]) + "]." + loc[-1] if len(loc) > 1 else (f"[{loc[0]}]" if loc else "(top level)")
    return table_error(err, f"{source}: {where}", _TABLES.get(tuple(loc[:-1])))


# ------------------------------------------------------------------ parameter names against the graph

_GRAPH_TABLES: dict[str, type[BaseModel]] = {"train": TrainConfig, "slurm": SlurmConfig, "run": RunConfig}
# Keys a parameter may not set: they are the sweep's to decide (paths, names) or the graph's shape.
_RUN_KEYS = ("seed",)
_STAGE_KEYS = tuple(k for k in StageConfig.model_fields if k not in ("name", "init_from"))
_MODEL_KEYS = tuple(k for k in ModelConfig.model_fields if k != "options")


def valid_param_names(cfg: GraphConfig) -> list[str]:
    """The parameter name patterns a sweep over `cfg` accepts (for hints)."""
    return ["stages", *[f"train.{k}" for k in TrainConfig.model_fields], *[f"slurm.{k}" for k in SlurmConfig.model_fields],
            "run.seed", "model.task", "model.options.<key>", *[f"stage.<name>.{k}" for k in _STAGE_KEYS],
            *[f"stage.*.{k}" for k in _STAGE_KEYS]]


def check_params(sweep: SweepTable, cfg: GraphConfig, source: str) -> None:
    """Every parameter name must name a key of `cfg`; `stages` must list existing stages. ConfigError otherwise."""
    stage_names = [s.name for s in cfg.stage]
    for key, spec in sweep.params.items():
        loc = f"{source}: [sweep.params].\"{key}\""
        parts = key.split(".")
        if key == "stages":
            _check_stages(spec, stage_names, loc)
            continue
        head = parts[0]
        if head in _GRAPH_TABLES and len(parts) == 2:
            allowed = _RUN_KEYS if head == "run" else tuple(_GRAPH_TABLES[head].model_fields)
            if parts[1] in allowed:
                continue
            _unknown(key, [f"{head}.{k}" for k in allowed], loc)
        if head == "model":
            if len(parts) == 3 and parts[1] == "options" and parts[2]:
                continue
            if len(parts) == 2 and parts[1] in _MODEL_KEYS:
                continue
            _unknown(key, ["model.task", "model.options.<key>"], loc)
        if head == "stage" and len(parts) == 3:
            name, sub = parts[1], parts[2]
            if name != "*" and name not in stage_names:
                close = difflib.get_close_matches(name, stage_names, n=1)
                raise ConfigError(f"no stage named {name!r}", loc=loc,
                                  hint=(f"did you mean {close[0]!r}? " if close else "")
                                  + f"valid stages: {', '.join(stage_names)} (or * for every stage)")
            if sub in _STAGE_KEYS:
                continue
            _unknown(key, [f"stage.{name}.{k}" for k in _STAGE_KEYS], loc)
        _unknown(key, valid_param_names(cfg), loc)


def _unknown(key: str, valid: list[str], loc: str) -> None:
    close = difflib.get_close_matches(key, valid, n=1)
    raise ConfigError(f"{key!r} names no key of the stage graph", loc=loc,
                      hint=(f"did you mean {close[0]!r}? " if close else "") + f"valid keys: {', '.join(valid)}")


def _check_stages(spec: ParamSpec, stage_names: list[str], loc: str) -> None:
    if not isinstance(spec, list):
        raise ConfigError("stages must be a list of stage lists, e.g. [[\"a\", \"b\"], [\"b\"]]", loc=loc,
                          hint=f"valid stages: {', '.join(stage_names)}")
    for choice in spec:
        if not isinstance(choice, list) or not choice or not all(isinstance(s, str) for s in choice):
            raise ConfigError(f"each choice of stages must be a non-empty list of stage names, got {choice!r}", loc=loc,
                              hint=f"valid stages: {', '.join(stage_names)}")
        unknown = [s for s in choice if s not in stage_names]
        if unknown:
            raise ConfigError(f"no stage named {unknown[0]!r}", loc=loc, hint=f"valid stages: {', '.join(stage_names)}")
        if len(set(choice)) != len(choice):
            raise ConfigError(f"a stage appears twice in {choice!r}", loc=loc, hint="list each stage once")
