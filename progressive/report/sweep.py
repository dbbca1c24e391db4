"""A sweep's report under `jobs/<sweep>/report/`: its variants compared, each variant's own report linked.

The variants table is `progressive.sweep.summary.rows` (the same rows as summary.csv), the
best variant `summary.best`; each variant that has started gets its single-run report
(`build_report`, transfer matrix off unless asked), and the top variants' loss curves come
from those reports' own series. Writes only inside report folders (the sweep's and each
variant's); the sweep record, summary.csv, best/ and comparison.png are left as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from progressive import atomic, record
from progressive.errors import RunError
from progressive.layout import RECORD_FILE, REPORT_DIR
from progressive.record import RunRecord
from progressive.report import figures, markdown
from progressive.report.build import Report, build_report
from progressive.report.data import read_run
from progressive.report.series import CurveData
from progressive.report.transfer import Progress
from progressive.sweep import record as srecord
from progressive.sweep.record import SweepRecord
from progressive.sweep.summary import VariantRow, best, rows

__all__ = ["SweepReport", "build_sweep_report", "find_target", "is_sweep", "ranked", "report_dir", "TOP"]

TOP = 4  # variants whose loss curves are drawn
SWEEP_FIGURES = ("sweep_metric.png", "sweep_loss.png")

VariantProgress = Callable[[int, int, str], None]  # (done, total, variant)


@dataclass
class SweepReport:
    """What was reported for a sweep, and where."""

    dir: Path
    index: Path
    sweep: SweepRecord
    table: list[VariantRow]
    best: Optional[VariantRow]
    variants: dict[str, Report]  # the variants that have started: their own reports
    top: list[str]  # variants whose loss curves are drawn, best first
    figures: dict[str, Path] = field(default_factory=dict)


def is_sweep(path: str | Path) -> bool:
    """Whether `path` is a sweep's folder (it holds a sweep record)."""
    return srecord.path(path).is_file()


def report_dir(rec: SweepRecord) -> Path:
    """jobs/<sweep>/report: where the sweep's report goes (the same folder name as a run's)."""
    return Path(rec.sweep_dir) / REPORT_DIR


def find_target(jobs_root: Path, name: str | None, *, verb: str = "report") -> RunRecord | SweepRecord:
    """The named run or sweep, or the newest entry under jobs_root (a run's run.json or a sweep's sweep.json)."""
    from progressive import runs

    if name:
        if is_sweep(jobs_root / name):
            return srecord.find(jobs_root, name)
        return runs.find_run(jobs_root, name, verb=verb)
    candidates = [(p / RECORD_FILE).stat().st_mtime for p in record.list_runs(jobs_root)[:1]]
    sweeps = sorted((p for p in jobs_root.glob(f"*/{srecord.SWEEP_FILE}")), key=lambda p: p.stat().st_mtime,
                    reverse=True) if jobs_root.is_dir() else []
    if sweeps and (not candidates or sweeps[0].stat().st_mtime >= candidates[0]):
        return srecord.load(sweeps[0].parent)
    return runs.find_run(jobs_root, None, verb=verb)


def ranked(rec: SweepRecord, table: list[VariantRow]) -> list[VariantRow]:
    """Variants with a final metric, best first (ties: by name), as `summary.best` orders them."""
    sign = 1.0 if rec.goal == "min" else -1.0
    return sorted((r for r in table if r.final_metric is not None), key=lambda r: (sign * float(r.final_metric or 0.0), r.name))


def build_sweep_report(rec: SweepRecord, *, transfer: bool = False, transfer_samples: int | None = None,
                       on_progress: Progress | None = None, on_variant: VariantProgress | None = None) -> SweepReport:
    """Write every started variant's report and `jobs/<sweep>/report/index.md` comparing them.

    Raises:
        RunError: no variant has started training yet.
        MissingDependencyError: matplotlib is not installed (checked before anything is written).
    """
    figures.require_matplotlib()
    table = rows(rec)
    started: list[RunRecord] = []
    for v in rec.variants:
        run = record.load(rec.run_dir(v.name))
        try:
            read_run(run)
        except RunError:
            continue  # not started yet: it has no report of its own
        started.append(run)
    if not started:
        raise RunError(f"sweep {rec.name!r} has no variant that started training yet: nothing to report",
                       loc=rec.sweep_dir, hint=f"see where it is with `progressive sweep status {rec.name}`, "
                       "then run report again once a variant has logged a step")
    reports: dict[str, Report] = {}
    for i, run in enumerate(started):
        if on_variant:
            on_variant(i, len(started), run.run_name)
        reports[run.run_name] = build_report(run, transfer=transfer, transfer_samples=transfer_samples,
                                             on_progress=on_progress)
    if on_variant:
        on_variant(len(started), len(started), "")
    out = report_dir(rec)
    out.mkdir(parents=True, exist_ok=True)
    top = [r.name for r in ranked(rec, table) if r.name in reports][:TOP]
    made: dict[str, Path] = {"sweep_metric.png": figures.sweep_metric_figure(table, rec.metric, rec.goal, out)}
    curves: dict[str, CurveData] = {name: reports[name].curves for name in top}
    if curves:
        made["sweep_loss.png"] = figures.sweep_loss_figure(curves, out)
    for name in SWEEP_FIGURES:  # a figure this report did not draw must not linger
        if name not in made:
            (out / name).unlink(missing_ok=True)
    links = {name: Path(os.path.relpath(rep.index, out)).as_posix() for name, rep in reports.items()}
    top_row = best(rec, table)
    index = out / "index.md"
    atomic.write_text(index, markdown.render_sweep(rec, table, top_row, links, {k: v.name for k, v in made.items()},
                                                   top, transfer=transfer))
    return SweepReport(out, index, rec, table, top_row, reports, top, made)
