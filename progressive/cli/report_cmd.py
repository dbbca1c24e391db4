"""`progressive report [RUN]`: figures, tables and the time account of a run, in jobs/<run>/report/."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from progressive.cli.plan_cmds import rel
from progressive.cli.render import console, err_console
from progressive.cli.runs_cmd import add_run_args, run_target, say_chosen


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the report command."""
    p = sub.add_parser("report", help="write jobs/<run>/report/index.md: loss, evaluation, transfer matrix, where the time "
                       "went (for a sweep: its variants compared)",
                       description="Build a report of a run (local or Slurm, finished or not) from its own records: "
                       "loss and learning-rate figures with every restart marked, the per-stage evaluation, the "
                       "transfer matrix (each stage's final weights on every bucket) and the time account. "
                       "For a sweep, jobs/<sweep>/report/index.md compares its variants (the summary.csv rows, the "
                       "best variant, the metric per variant, the top variants' loss curves) and links each "
                       "variant's own report, built here without the transfer matrix unless --transfer. "
                       "Re-running refreshes it; the run or sweep itself is never changed.")
    p.add_argument("run", nargs="?", metavar="RUN",
                   help="run or sweep name (default: the run of -c, else the most recent run or sweep under the jobs "
                   "folder)")
    add_run_args(p, positional=False)
    p.add_argument("--no-transfer", dest="transfer", action="store_const", const=False, default=None,
                   help="skip the transfer matrix (it evaluates every stage's weights on every bucket)")
    p.add_argument("--transfer", dest="transfer", action="store_const", const=True,
                   help="evaluate the transfer matrix: the default for a run; for a sweep, off unless given "
                   "(it is one matrix per variant)")
    p.add_argument("--transfer-samples", type=_positive_int, default=None, metavar="N",
                   help="validation matrices per bucket for the transfer matrix (default: the run's largest eval_samples)")
    p.set_defaults(handler=cmd_report)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _entries(jobs: Path) -> int:
    """Runs and sweeps under a jobs folder (what report chooses among)."""
    from progressive import record
    from progressive.sweep.record import SWEEP_FILE

    return len(record.list_runs(jobs)) + (len(list(jobs.glob(f"*/{SWEEP_FILE}"))) if jobs.is_dir() else 0)


def cmd_report(args: argparse.Namespace) -> int:
    """Handler of `progressive report`."""
    from progressive.report.build import build_report
    from progressive.report.sweep import build_sweep_report, find_target
    from progressive.record import RunRecord
    from progressive.sweep.record import SweepRecord

    jobs, name = run_target(args, args.run, verb="report")
    rec = find_target(jobs, name, verb="report")
    if name is None:
        say_chosen(rec.run_name if isinstance(rec, RunRecord) else rec.name, jobs, _entries(jobs), what=(
            "run" if isinstance(rec, RunRecord) else "sweep"))
    con = err_console()
    progress: Any = None
    task: Any = None

    def on_progress(done: int, total: int, what: str) -> None:
        # Progress goes to stderr: stdout keeps only the report's location.
        nonlocal progress, task
        if progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            progress = Progress(TextColumn("transfer matrix"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[what]}"), TimeElapsedColumn(), console=con, transient=True)
            progress.start()
            task = progress.add_task("transfer", total=total, what=what)
        progress.update(task, completed=done, total=total, what=what)

    if isinstance(rec, SweepRecord):
        def on_variant(done: int, total: int, variant: str) -> None:
            if variant:
                con.print(f"variant {done + 1}/{total}: {variant}")

        try:
            srep = build_sweep_report(rec, transfer=bool(args.transfer), transfer_samples=args.transfer_samples,
                                      on_progress=on_progress, on_variant=on_variant)
        finally:
            if progress is not None:
                progress.stop()
        out = console()
        out.print(f"best variant: {srep.best.name}" if srep.best is not None else "best variant: - (none completed)")
        out.print(f"variant reports: {len(srep.variants)} of {len(srep.table)}")
        out.print(f"report: {rel(srep.index)}")
        return 0
    try:
        rep = build_report(rec, transfer=args.transfer is not False, transfer_samples=args.transfer_samples,
                           on_progress=on_progress)
    finally:
        if progress is not None:
            progress.stop()
    ratio = rep.accounting.total.ratio
    out = console()
    if rep.transfer is not None:
        out.print(f"transfer matrix: {rep.transfer.evaluated} cell(s) evaluated, "
                  f"{len(rep.transfer.cells) - rep.transfer.evaluated} from the cache")
        if rep.transfer.cells and (rec.plan.tracking.wandb or rec.plan.tracking.mlflow):
            from progressive.tracking.publish import publish_transfer

            for line in publish_transfer(rec.plan, rep.transfer.cells):
                out.print(line, markup=False, soft_wrap=True)
    out.print(f"effective training time ratio: {ratio:.3f}" if ratio is not None else "effective training time ratio: -")
    out.print(f"report: {rel(rep.index)}")
    return 0
