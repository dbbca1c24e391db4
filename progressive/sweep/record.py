"""The sweep record: `jobs/<sweep>/sweep.json`, the variants, their arrays and jobs, the pruning decisions.

Each variant keeps its own run record (`jobs/<sweep>/<variant>/run.json`); this one ties them
together. Rewritten whole and atomically under the sweep folder's lock (progressive.record.locked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from progressive import atomic
from progressive.errors import RunError
from progressive.record import Runner
from progressive.units import now_iso

SWEEP_FILE = "sweep.json"


class _Rec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantRecord(_Rec):
    """One variant: its parameters (None until a tpe trial draws them) and the stages it runs."""

    name: str
    index: int
    params: Optional[dict[str, Any]]
    stages: list[str]
    pruned_after: Optional[str] = None  # the stage after which it was stopped
    pruned_metric: Optional[float] = None
    trial: Optional[int] = None  # tpe: the Optuna trial number, once drawn


class ArrayRecord(_Rec):
    """One submitted array: its tasks (variant index -> [variant, stage]) and the array it follows."""

    key: str
    step: int
    tasks: dict[str, list[str]]
    parent_job: Optional[str] = None
    job_id: Optional[str] = None
    dependency: Optional[str] = None
    script: str = ""
    reason: str = "submit"


class PruneRecord(_Rec):
    """A stage-boundary decision: the step, its job, and (once decided) who went on and who stopped."""

    step: int
    job_id: Optional[str] = None
    decided: bool = False
    kept: list[str] = Field(default_factory=list)
    pruned: dict[str, Optional[float]] = Field(default_factory=dict)


class SweepRecord(_Rec):
    """Everything `sweep status|resume|cancel` and the sweep's own jobs need."""

    version: int = 1
    name: str
    mode: Literal["slurm", "local"]
    method: str
    metric: str
    goal: Literal["min", "max"]
    parallel: int
    seed: int = 0
    prune_keep: Optional[float] = None
    created_at: str
    updated_at: str
    sweep_dir: str
    config_path: str
    sweep_path: str
    sweep_text: str
    variants: list[VariantRecord]
    arrays: list[ArrayRecord] = Field(default_factory=list)
    prunes: list[PruneRecord] = Field(default_factory=list)
    final_job: Optional[str] = None
    # Local mode: the process running the variants (`sweep submit|resume --local`), while it runs;
    # `sweep status --watch` waits for it, since a variant between two stages looks not started.
    runner: Optional[Runner] = None

    def variant(self, name: str) -> VariantRecord:
        """The variant called `name`."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def run_dir(self, variant: str) -> Path:
        """jobs/<sweep>/<variant>: the variant's own run."""
        return Path(self.sweep_dir) / variant


def path(sweep_dir: str | Path) -> Path:
    """Where the sweep record lives."""
    return Path(sweep_dir) / SWEEP_FILE


def load(sweep_dir: str | Path) -> SweepRecord:
    """Read the sweep record, or raise RunError."""
    p = path(sweep_dir)
    try:
        return SweepRecord.model_validate_json(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError("no sweep record here", loc=str(p), hint="submit a sweep with `progressive sweep submit`") from None
    except ValidationError as exc:
        raise RunError(f"the sweep record is unreadable: {exc.errors(include_url=False)[0]['msg']}", loc=str(p)) from None


def save(rec: SweepRecord) -> None:
    """Write the record atomically."""
    rec.updated_at = now_iso()
    atomic.write_text(path(rec.sweep_dir), rec.model_dump_json(indent=2))


def find(jobs_root: Path, name: str | None) -> SweepRecord:
    """The named sweep, or the most recently updated one under jobs_root."""
    if name:
        from progressive.config import validate_name

        try:
            validate_name(name, "sweep name")
        except ValueError as exc:
            raise RunError(str(exc), loc="SWEEP") from None
        return load(jobs_root / name)
    found = sorted((p for p in jobs_root.glob(f"*/{SWEEP_FILE}")), key=lambda p: p.stat().st_mtime, reverse=True) \
        if jobs_root.is_dir() else []
    if not found:
        raise RunError(f"no sweeps under {jobs_root}", loc="sweep",
                       hint="submit one with `progressive sweep submit -c stages.toml -s sweep.toml`")
    return load(found[0].parent)
