"""`progressive runs`, and how every command that acts on a run finds it (RUN, `-c`, or the newest).

status, resume, cancel, logs and report take the run by name, or from `-c FILE` (the graph's
[run].name and [run].jobs); with neither they take the most recent run under the jobs folder
and say so on stderr, so that a `--json` reader's stdout stays clean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from progressive.cli.render import console, err_console
from progressive.errors import RunError

if TYPE_CHECKING:
    from progressive.record import RunRecord

DEFAULT_JOBS = "jobs"


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `runs`."""
    p = sub.add_parser("runs", help="list the runs under a jobs folder: mode, state, stages done, last change",
                       description="The runs recorded under the jobs folder, most recently changed first.")
    add_jobs_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_runs)


def add_jobs_arg(p: argparse.ArgumentParser) -> None:
    """--jobs DIR (default: ./jobs, or the graph's [run].jobs with -c)."""
    p.add_argument("--jobs", default=None, metavar="DIR",
                   help=f"the jobs folder holding run records (default: {DEFAULT_JOBS}, or the graph's with -c)")


def add_run_args(p: argparse.ArgumentParser, *, positional: bool = True) -> None:
    """RUN (optional), -c and --jobs: how status, resume, cancel and report find a run."""
    if positional:
        p.add_argument("run", nargs="?", metavar="RUN",
                       help="run name (default: the run of -c, else the most recent run under the jobs folder)")
    p.add_argument("-c", "--config", default=None, metavar="PATH",
                   help="take the run name and jobs folder from this graph file ([run].name, [run].jobs)")
    add_jobs_arg(p)


def run_target(args: argparse.Namespace, run: str | None, *, verb: str) -> tuple[Path, str | None]:
    """(jobs folder, run name or None for the newest) from RUN, -c and --jobs."""
    config = getattr(args, "config", None)
    if config is None:
        return Path(args.jobs or DEFAULT_JOBS), run
    if run:
        raise RunError(f"both a run name ({run!r}) and -c {config} given", loc=verb,
                       hint=f"name the run, or let -c name it: `progressive {verb} -c {config}`")
    from progressive.config import load_config

    cfg = load_config(config)
    jobs = Path(args.jobs) if args.jobs else (Path(config).resolve().parent / cfg.run.jobs).resolve()
    return jobs, cfg.run.name


def choose_run(args: argparse.Namespace, *, verb: str, run: str | None = None) -> "RunRecord":
    """The run a command acts on; says on stderr which one when the user named none."""
    from progressive import record, runs

    jobs, name = run_target(args, run if run is not None else getattr(args, "run", None), verb=verb)
    if name:
        return runs.find_run(jobs, name, verb=verb)
    found = record.list_runs(jobs)
    rec = runs.find_run(jobs, None, verb=verb)  # raises "no runs under ..." when there are none
    say_chosen(rec.run_name, jobs, len(found), what="run")
    return rec


def say_chosen(name: str, jobs: Path, count: int, *, what: str) -> None:
    """The one line that says which run (or sweep) a command chose by itself."""
    from progressive.cli.plan_cmds import rel

    why = f"the only {what} under {rel(jobs)}" if count <= 1 else f"the most recent of {count} under {rel(jobs)}"
    err_console().print(f"{what} {name} ({why}; name one with RUN or -c FILE)", markup=False, soft_wrap=True)


def cmd_runs(args: argparse.Namespace) -> int:
    """Handler of `progressive runs`."""
    from progressive.runs import summarize_runs

    jobs = Path(args.jobs or DEFAULT_JOBS)
    rows = summarize_runs(jobs)
    if args.json:
        print(json.dumps({"jobs": str(jobs), "runs": [r.as_json() for r in rows]}, indent=2))
        return 0
    if not rows:
        console().print(f"no runs under {jobs}; start one with `progressive submit --local` or `progressive demo`",
                        markup=False, soft_wrap=True)
        return 0
    from rich.table import Table

    from progressive.cli.run_cmds import STATE_STYLE
    from progressive.states import StageState

    t = Table(header_style="bold", title=f"runs under {jobs}")
    t.add_column("run", no_wrap=True)
    for col in ("mode", "state", "stages done", "last change"):
        t.add_column(col, no_wrap=True, justify="right" if col == "stages done" else "left")
    for r in rows:
        style = STATE_STYLE[StageState(r.state)]
        t.add_row(r.name, r.mode, f"[{style}]{r.state}[/]", f"{r.stages_done}/{r.stages}", r.last_change[:16].replace("T", " "))
    con = console()
    con.print(t)
    for r in rows:
        if r.note:
            con.print(f"{r.name}: state unknown: {r.note}", markup=False)
    return 0
