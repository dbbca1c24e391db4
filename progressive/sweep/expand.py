"""Variants: the sweep's parameter sets (grid or random draws), and each variant's own stage graph.

A variant is a run: `apply_params` writes its parameters into a copy of the graph's raw
TOML data, the same Pydantic models validate it (a bad value gets the message it would
get in stages.toml), and `build_plan` resolves it with its folders under jobs/<sweep>/
and checkpoints/<sweep>/. Pure: nothing is written, nothing imports torch.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from progressive.config import GraphConfig, _config_error, _looks_like_path
from progressive.errors import ConfigError
from progressive.plan import Plan, build_plan
from progressive.sweep.config import Range, SweepTable
from progressive.sweep.record import path as sweep_record_path

from pydantic import ValidationError


@dataclass(frozen=True)
class Variant:
    """One point of the sweep: its name (a run name), index (its array task id) and parameters.

    `params` is None for a tpe trial before its first job draws them.
    """

    name: str
    index: int
    params: Optional[dict[str, Any]]


def variant_name(index: int) -> str:
    """v000, v001, ...: valid run names, sorted in index order."""
    return f"v{index:03d}"


def expand(sweep: SweepTable) -> list[Variant]:
    """The sweep's variants: the grid's product (in key order), or `trials` seeded random draws, or tpe placeholders."""
    keys = list(sweep.params)
    if sweep.method == "grid":
        lists = [sweep.params[k] for k in keys]
        combos = itertools.product(*lists)  # type: ignore[arg-type]
        return [Variant(variant_name(i), i, dict(zip(keys, c))) for i, c in enumerate(combos)]
    assert sweep.trials is not None  # the model requires it for random and tpe
    if sweep.method == "tpe":
        return [Variant(variant_name(i), i, None) for i in range(sweep.trials)]
    rng = random.Random(sweep.seed)
    return [Variant(variant_name(i), i, {k: draw(sweep.params[k], rng) for k in keys}) for i in range(sweep.trials)]


def draw(spec: list[Any] | Range, rng: random.Random) -> Any:
    """One value of a parameter: a choice of the list, or a (log-)uniform draw from the range."""
    if isinstance(spec, list):
        return spec[rng.randrange(len(spec))]
    if spec.type == "int":
        if spec.log:
            return min(int(spec.high), max(int(spec.low), round(math.exp(rng.uniform(math.log(spec.low), math.log(spec.high))))))
        return rng.randint(int(spec.low), int(spec.high))
    if spec.log:
        return math.exp(rng.uniform(math.log(spec.low), math.log(spec.high)))
    return rng.uniform(spec.low, spec.high)


def apply_params(raw: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the graph's raw TOML data with `params` set (names as in check_params)."""
    out: dict[str, Any] = copy.deepcopy(dict(raw))
    stages = out.get("stage")
    if "stages" in params and isinstance(stages, list):
        out["stage"] = select_stages(stages, params["stages"])
    for key, value in params.items():
        if key == "stages":
            continue
        parts = key.split(".")
        if parts[0] == "stage":
            for st in out.get("stage", []):
                if isinstance(st, dict) and parts[1] in ("*", st.get("name")):
                    st[parts[2]] = value
            continue  # a stage this variant does not run: nothing to set
        table = out
        for p in parts[:-1]:
            table = table.setdefault(p, {})
        table[parts[-1]] = value
    return out


def select_stages(stages: list[Any], names: list[str]) -> list[dict[str, Any]]:
    """Only these stages, in this order, each starting from the previous one; the first keeps a path or none."""
    by_name = {st.get("name"): st for st in stages if isinstance(st, dict)}
    out = []
    for i, name in enumerate(names):
        st = dict(by_name[name])
        if i > 0:
            st["init_from"] = names[i - 1]
        else:
            ref = st.get("init_from")
            # A parent stage this variant does not run cannot give weights: start from scratch.
            keep = isinstance(ref, str) and (ref.lower() == "none" or _looks_like_path(ref))
            st["init_from"] = ref if keep else "none"
        out.append(st)
    return out


@dataclass(frozen=True)
class SweepPaths:
    """Where a sweep lives: jobs/<sweep>/ and checkpoints/<sweep>/, and the data its variants train on."""

    config_path: Path
    sweep_dir: Path
    checkpoint_dir: Path
    data: Path  # the graph's data file, or the sweep's subset of it
    source_data: Path

    @property
    def record(self) -> Path:
        """jobs/<sweep>/sweep.json."""
        return sweep_record_path(self.sweep_dir)


def sweep_paths(cfg: GraphConfig, config_path: str | Path, sweep: SweepTable) -> SweepPaths:
    """The sweep's folders, resolved as the graph resolves its own ([run].jobs, [run].checkpoints)."""
    config_path = Path(config_path).resolve()
    base = config_path.parent
    sweep_dir = (base / cfg.run.jobs / sweep.name).resolve()
    source = (base / cfg.run.data).resolve()
    data = sweep_dir / "data" / "subset.h5" if sweep.subset else source
    return SweepPaths(config_path, sweep_dir, (base / cfg.run.checkpoints / sweep.name).resolve(), data, source)


def variant_config(raw: Mapping[str, Any], params: Mapping[str, Any], *, name: str, paths: SweepPaths,
                   source: str) -> GraphConfig:
    """The variant's graph: params applied, its run named `name` under the sweep's folders, validated."""
    data = apply_params(raw, params)
    run = data.setdefault("run", {})
    if not isinstance(run, dict):
        run = data["run"] = {}
    run.update(name=name, jobs=str(paths.sweep_dir), checkpoints=str(paths.checkpoint_dir), data=str(paths.data))
    try:
        return GraphConfig.model_validate(data)
    except ValidationError as exc:
        err = _config_error(exc, data, "stages.toml")
        shown = ", ".join(f"{k} = {v!r}" for k, v in params.items())
        raise ConfigError(f"{err.loc}: {err.msg}" if err.loc else err.msg, loc=f"{source}: variant {name} ({shown})",
                          hint=err.hint) from None


def check_values(sweep: SweepTable, raw: Mapping[str, Any], paths: SweepPaths, source: str) -> None:
    """Each value of each parameter, set alone, must make a valid graph: the error names the sweep key and value."""
    for key, spec in sweep.params.items():
        values = spec if isinstance(spec, list) else _range_ends(spec)
        for value in values:
            try:
                variant_config(raw, {key: value}, name="check", paths=paths, source=source)
            except ConfigError as exc:
                raise ConfigError(exc.msg.split(": ", 1)[-1] if ": " in exc.msg else exc.msg,
                                  loc=f"{source}: [sweep.params].\"{key}\" = {value!r}", hint=exc.hint) from None


def _range_ends(spec: Range) -> list[Any]:
    if spec.type == "int":
        return [int(spec.low), int(spec.high)]
    return [spec.low, spec.high]


@dataclass
class VariantPlan:
    """A variant and its resolved plan (None for a tpe trial: its plan is made when it starts)."""

    variant: Variant
    plan: Plan
    drawn_at_start: bool = False
    stages: list[str] = field(default_factory=list)


def plan_variants(sweep: SweepTable, cfg_text: str, config_path: str | Path, sweep_source: str,
                  counts: Callable[[Path], Mapping[int, Mapping[str, int]]] | None) -> tuple[SweepPaths, list[VariantPlan]]:
    """Every variant's plan. For tpe, each trial is planned with the graph as written (its draws change
    training values only; `stages` and slurm.* are refused for tpe, so the jobs are known at submit)."""
    from progressive.config import parse_config

    from progressive.sweep.config import check_params

    cfg = parse_config(cfg_text, source=str(config_path))
    check_params(sweep, cfg, sweep_source)
    if sweep.method == "tpe":
        fixed = [k for k in sweep.params if k == "stages" or k.startswith("slurm.")]
        if fixed:
            raise ConfigError(f"method \"tpe\" draws a trial's parameters when its job starts; {fixed[0]!r} decides "
                              "which jobs are submitted and must be known before", loc=f"{sweep_source}: [sweep.params].\"{fixed[0]}\"",
                              hint="use method = \"grid\" or \"random\" to sweep stages or Slurm resources")
    raw = tomllib.loads(cfg_text)
    paths = sweep_paths(cfg, config_path, sweep)
    check_values(sweep, raw, paths, sweep_source)
    out = []
    for v in expand(sweep):
        vcfg = variant_config(raw, v.params or {}, name=v.name, paths=paths, source=sweep_source)
        plan = build_plan(vcfg, config_path, run_name=v.name, counts=counts)
        # Trackers group a variant's stage runs under the sweep, with the variant's parameters as config and tags.
        tracking = plan.tracking.model_copy(update={"group": paths.sweep_dir.name, "params": dict(v.params or {})})
        plan = plan.model_copy(update={"tracking": tracking})
        out.append(VariantPlan(v, plan, drawn_at_start=v.params is None, stages=plan.names))
    return paths, out
