"""Build one run's report under `jobs/<run>/report/`: read, account, draw, evaluate, write index.md.

Writes only inside the report folder (each file atomically, index.md last); the run's
record, metrics and checkpoints are only read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from progressive import atomic
from progressive.record import RunRecord
from progressive.report import figures, markdown
from progressive.report.accounting import Accounting, account_run, query_attempts
from progressive.report.data import RunData, read_run
from progressive.report.series import CurveData, curves
from progressive.report.transfer import Progress, TransferResult

__all__ = ["Report", "build_report", "collect"]

FIGURES = ("loss_step.png", "loss_time.png", "lr.png", "time.png", "transfer.png")


@dataclass
class Report:
    """What was reported, and where."""

    dir: Path
    index: Path
    run: RunData
    accounting: Accounting
    curves: CurveData
    transfer: TransferResult | None
    figures: dict[str, Path]


def collect(rec: RunRecord) -> tuple[RunData, Accounting]:
    """The run's data and time account (sacct for Slurm runs), without drawing or writing anything."""
    run = read_run(rec)
    attempts = None
    if rec.mode == "slurm":
        attempts = query_attempts([j for st in run.stages for j in st.job_ids])
    return run, account_run(run, attempts)


def default_transfer_samples(rec: RunRecord) -> int:
    """The largest `eval_samples` of the run's stages (16 if every stage has 0)."""
    return max((st.train.eval_samples for st in rec.plan.stages), default=0) or 16


def build_report(rec: RunRecord, *, transfer: bool = True, transfer_samples: int | None = None,
                 on_progress: Progress | None = None) -> Report:
    """Write `jobs/<run>/report/index.md` and its figures; return what was reported.

    Raises:
        RunError: the run has no metrics yet.
        MissingDependencyError: matplotlib is not installed (checked before anything is evaluated).
        DataError: the transfer matrix needs the run's data file and it is gone.
    """
    figures.require_matplotlib()
    run, acc = collect(rec)
    out = rec.layout.report
    out.mkdir(parents=True, exist_ok=True)
    tr: TransferResult | None = None
    if transfer:
        from progressive.report.transfer import evaluate_transfer

        tr = evaluate_transfer(rec, out, max_samples=transfer_samples or default_transfer_samples(rec),
                               on_progress=on_progress)
    data = curves(run)
    made: dict[str, Path] = {}
    made.update(figures.loss_figures(data, out))
    made["lr.png"] = figures.lr_figure(data, out)
    made["time.png"] = figures.time_figure(acc, out)
    if tr is not None and tr.cells:
        made["transfer.png"] = figures.transfer_figure(tr, out)
    for name in FIGURES:  # a figure this report did not draw (e.g. --no-transfer now) must not linger
        if name not in made:
            (out / name).unlink(missing_ok=True)
    index = out / "index.md"
    atomic.write_text(index, markdown.render(run, acc, {k: v.name for k, v in made.items()}, tr))
    return Report(out, index, run, acc, data, tr, made)
