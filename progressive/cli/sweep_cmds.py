"""`progressive sweep plan|submit|status|resume|cancel`: many variants of the curriculum, each its own run."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from progressive.cli.plan_cmds import DEFAULT_CONFIG, add_wide_arg, rel
from progressive.cli.render import Col, console, print_next, print_table
from progressive.cli.run_cmds import positive_seconds

if TYPE_CHECKING:
    from progressive.sweep.config import SweepTable
    from progressive.sweep.expand import SweepPaths, VariantPlan

DEFAULT_SWEEP = "sweep.toml"


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `sweep` and its subcommands."""
    p = sub.add_parser("sweep", help="search over the curriculum: grid, random or tpe variants, each its own run",
                       description="Sweeps: every variant of the graph is its own run under jobs/<sweep>/; on Slurm each "
                       "stage of the sweep is one job array chained by aftercorr.")
    acts = p.add_subparsers(dest="sweep_command", metavar="ACTION")

    pl = acts.add_parser("plan", help="every variant, its parameters and its jobs; writes nothing")
    _files(pl)
    pl.add_argument("--json", action="store_true", help="machine-readable output (includes the array scripts)")
    pl.add_argument("--dry-run", action="store_true", help="also print each array's exact sbatch script")
    add_wide_arg(pl)
    pl.set_defaults(handler=cmd_plan)

    s = acts.add_parser("submit", help="submit every variant (job arrays) and exit; or run them here with --local")
    _files(s)
    s.add_argument("--local", action="store_true", help="run the variants on this machine, `parallel` at once")
    s.set_defaults(handler=cmd_submit)

    st = acts.add_parser("status", help="variants x stages: state, metric, pruned, best so far")
    _sweep_arg(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    add_wide_arg(st)
    st.add_argument("--watch", nargs="?", type=positive_seconds, const=10.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 10), in place on a terminal, until the sweep ends (every "
                    "variant final; a local sweep's runner gone); piped, a table each time it changes")
    st.set_defaults(handler=cmd_status)

    r = acts.add_parser("resume", help="resubmit failed, cancelled or timed-out variants from their checkpoints")
    _sweep_arg(r)
    r.add_argument("--dry-run", action="store_true", help="show what would be resubmitted")
    r.set_defaults(handler=cmd_resume)

    c = acts.add_parser("cancel", help="cancel a sweep's jobs (all, or --variants)")
    _sweep_arg(c)
    c.add_argument("--variants", metavar="V,W,...", help="only these variants")
    c.set_defaults(handler=cmd_cancel)
    def usage(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(handler=usage)


def _files(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="PATH", help=f"the stage graph (default: {DEFAULT_CONFIG})")
    p.add_argument("-s", "--sweep", default=DEFAULT_SWEEP, metavar="PATH", help=f"the sweep file (default: {DEFAULT_SWEEP})")


def _sweep_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="SWEEP", help="sweep name (default: the most recent under the jobs folder)")
    p.add_argument("--jobs", default="jobs", metavar="DIR", help="the jobs folder (default: jobs)")


def _load(args: argparse.Namespace) -> tuple["SweepTable", str, str, "SweepPaths", list["VariantPlan"], Any]:
    """Both files -> (sweep, graph text, sweep text, paths, variant plans, replan)."""
    from progressive.config import parse_config
    from progressive.data.counts import plan_counts
    from progressive.errors import ConfigError
    from progressive.sweep.config import load_sweep
    from progressive.sweep.expand import plan_variants

    sweep_file, sweep_text = load_sweep(args.sweep)
    sweep = sweep_file.sweep
    try:
        config_text = Path(args.config).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", loc=args.config, hint="pass the stage graph with -c PATH") from None

    def data_counts(path: Path) -> Any:
        # As `plan` counts (progressive.data.counts): the graph's count index, an array folder, or the HDF5
        # file; no torch. The index is the one `data index` wrote for the graph as written, not per variant.
        cfg = parse_config(config_text, args.config)
        return plan_counts(path, buckets=[st.bucket for st in cfg.stage], task=cfg.model.task,
                           options=cfg.model.options, config=args.config)

    def counts(path: Path) -> Any:
        if sweep.subset and not path.is_file():
            from progressive.sweep.expand import sweep_paths
            from progressive.sweep.runner import subset_counts

            source = sweep_paths(parse_config(config_text, args.config), args.config, sweep).source_data
            return subset_counts(data_counts(source), sweep.subset.max_samples)
        return data_counts(path)

    def replan() -> list["VariantPlan"]:
        return plan_variants(sweep, config_text, args.config, args.sweep, counts)[1]

    paths, vplans = plan_variants(sweep, config_text, args.config, args.sweep, counts)
    return sweep, config_text, sweep_text, paths, vplans, replan


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "+".join(map(str, v))
    return str(v)


def cmd_plan(args: argparse.Namespace) -> int:
    """Handler of `sweep plan`: writes nothing, submits nothing."""
    from progressive.sweep.runner import plan_layout

    sweep, _, _, paths, vplans, _ = _load(args)
    layout = plan_layout(sweep, paths, vplans)
    if args.json:
        print(json.dumps({
            "sweep": sweep.model_dump(mode="json"), "sweep_dir": str(paths.sweep_dir), "data": str(paths.data),
            "variants": [{"name": vp.variant.name, "index": vp.variant.index, "params": vp.variant.params,
                          "drawn_at_start": vp.drawn_at_start, "stages": vp.stages,
                          "steps": [st.total_steps for st in vp.plan.stages]} for vp in vplans],
            "arrays": [{"key": a.key, "step": a.step, "tasks": {str(i): list(t) for i, t in a.tasks.items()},
                        "dependency": layout.dependencies[a.key], "sbatch": layout.scripts[a.key]} for a in layout.arrays],
        }, indent=2))
        return 0
    con = console()
    extra = f"   subset {sweep.subset.max_samples} samples (seed {sweep.subset.seed})" if sweep.subset else ""
    prune = f"   prune keep {sweep.prune.keep:g} after each stage" if sweep.prune else ""
    con.print(f"[bold]sweep[/] {sweep.name}   [bold]method[/] {sweep.method}   [bold]metric[/] {sweep.metric} ({sweep.goal})"
              f"   [bold]parallel[/] {sweep.parallel}{extra}{prune}   [bold]records[/] {rel(paths.sweep_dir)}")
    keys = list(sweep.params)
    rows = []
    for vp in vplans:
        p = vp.variant.params
        cells = [_fmt(p[k]) if p is not None else "[dim]drawn at start[/]" for k in keys]
        chain = " -> ".join(f"{st.name} ({st.total_steps if st.total_steps is not None else '?'})" for st in vp.plan.stages)
        rows.append([vp.variant.name, *cells, chain])
    # At 80 columns the variant and its parameters stay; the stage chain goes first.
    print_table([Col("variant"), *[Col(k, drop=10 + i) for i, k in enumerate(keys)], Col("stages (steps)", drop=1)],
                rows, wide=args.wide)
    arrays = [[spec.key, str(spec.step), ", ".join(f"{i}:{v}.{s}" for i, (v, s) in sorted(spec.tasks.items())),
               layout.dependencies[spec.key] or "-"] for spec in layout.arrays]
    print_table([Col("array"), Col("step", "right"), Col("tasks", drop=1), Col("after", drop=2)], arrays,
                title="job arrays (task id = variant index)", wide=args.wide)
    n_jobs = sum(len(s.tasks) for s in layout.arrays)
    con.print(f"{len(vplans)} variants, {n_jobs} stage jobs in {len(layout.arrays)} arrays "
              f"({len(layout.arrays) + (max(s.step for s in layout.arrays) if sweep.prune else 0) + 1} sbatch calls)")
    if args.dry_run:
        from rich.rule import Rule

        for spec in layout.arrays:
            con.print(Rule(f"sbatch script: {spec.key}"))
            con.print(layout.scripts[spec.key], markup=False, highlight=False, soft_wrap=True)
        con.print("[dim]dry run: nothing written, nothing submitted[/]")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Handler of `sweep submit`."""
    from progressive.sweep import runner

    sweep, config_text, sweep_text, paths, vplans, replan = _load(args)
    rec = runner.submit(sweep, paths, vplans, config_text=config_text, sweep_text=sweep_text, sweep_path=args.sweep,
                        local=args.local, replan=replan)
    con = console()
    if args.local:
        con.print(f"sweep [bold]{rec.name}[/]: {len(rec.variants)} variants on this machine, {rec.parallel} at once; "
                  f"records in {rel(rec.sweep_dir)}")
        return _run_local(rec)
    con.print(f"sweep [bold]{rec.name}[/]: {len(rec.variants)} variants submitted as {len(rec.arrays)} job arrays "
              f"({', '.join(f'{a.key}={a.job_id}' for a in rec.arrays)}); summary job {rec.final_job}")
    print_next(f"progressive sweep status {rec.name}", f"progressive sweep cancel {rec.name}",
               f"progressive report {rec.name}")
    return 0


def _run_local(rec: Any) -> int:
    from progressive.sweep.local_runner import run_local_sweep

    con = console()

    def on_event(variant: str, stage: str, event: str) -> None:
        style = {"completed": "green", "failed": "red", "stopped": "yellow", "pruned": "magenta"}.get(event, "cyan")
        con.print(f"[{style}]{event}[/] {variant} {stage}")

    ok = run_local_sweep(rec, on_event)
    from progressive.sweep import record as srecord

    _show_status(srecord.load(rec.sweep_dir))
    if not ok:
        con.print(f"interrupted; continue with: progressive sweep resume {rec.name}")
        return 130
    print_next(f"progressive report {rec.name}", f"progressive sweep status {rec.name}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Handler of `sweep status`."""
    from progressive.sweep import record as srecord
    from progressive.sweep.summary import best, ended, rows

    rec = srecord.find(Path(args.jobs), args.name)
    if args.watch and not args.json:
        return _watch(rec.sweep_dir, args.watch, wide=args.wide)
    while True:
        table = rows(rec)
        if args.json:
            top = best(rec, table)
            print(json.dumps({"sweep": rec.name, "mode": rec.mode, "metric": rec.metric, "goal": rec.goal,
                              "best": top.name if top else None,
                              "variants": [r.__dict__ for r in table]}, indent=2, default=str), flush=True)
        else:
            _show_status(rec, table, wide=args.wide)
        if not args.watch or ended(rec, table):
            return 0
        time.sleep(args.watch)
        rec = srecord.load(rec.sweep_dir)


def _watch(sweep_dir: str, seconds: float, *, wide: bool) -> int:
    """`sweep status --watch`: the table every `seconds` until the sweep ends.

    On a terminal it is redrawn in place (rich Live). Piped (a file, a test), the table is printed
    whole, without control codes, each time its text changes, the last one included.
    """
    import io
    import sys

    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from progressive.sweep import record as srecord
    from progressive.sweep.summary import ended, rows

    con = console()

    def snapshot() -> tuple[str, bool]:
        rec = srecord.load(sweep_dir)  # a resume in between changes the record
        table = rows(rec)
        out = io.StringIO()
        _show_status(rec, table, wide=wide, con=Console(file=out, width=con.width, force_terminal=con.is_terminal,
                                                         color_system="truecolor" if con.is_terminal else None,
                                                         highlight=False))
        return out.getvalue(), ended(rec, table)

    if con.is_terminal:
        with Live(console=con, auto_refresh=False) as live:
            while True:
                text, done = snapshot()
                live.update(Text.from_ansi(text.rstrip("\n")), refresh=True)
                if done:
                    return 0
                time.sleep(seconds)
    last = None
    while True:
        text, done = snapshot()
        if text != last:
            sys.stdout.write(text)
            sys.stdout.flush()
            last = text
        if done:
            return 0
        time.sleep(seconds)


def _show_status(rec: Any, table: Any = None, *, wide: bool = False, con: Any = None) -> None:
    from progressive.cli.run_cmds import STATE_STYLE
    from progressive.sweep.summary import best, rows

    table = rows(rec) if table is None else table
    con = con or console()
    top = best(rec, table)
    stage_names = list(dict.fromkeys(s for r in table for s in r.stages))
    keys = list(dict.fromkeys(k for r in table for k in r.params))
    # At 80 columns the CPU hours go first, then the earlier stages' metrics; the variant, its
    # parameters, its state and its final metric stay.
    n = len(stage_names)
    cols = [Col("variant"), *[Col(k, drop=100 + i) for i, k in enumerate(keys)], Col("state", drop=200),
            *[Col(s, "right", drop=2 + i) for i, s in enumerate(stage_names)], Col("final", "right", drop=2 + n),
            Col("cpu h", "right", drop=1)]
    out = []
    for r in table:
        style = next((v for k, v in STATE_STYLE.items() if k.value == r.state), "")
        cells = []
        for s in stage_names:
            if s not in r.stages:
                cells.append("")
                continue
            m = r.stage_metrics.get(s)
            cells.append(f"{m:.4g}" if m is not None else r.stages[s])
        name = f"[bold]{r.name} *[/]" if top is not None and r.name == top.name else r.name
        out.append([name, *[_fmt(r.params.get(k, "")) for k in keys], f"[{style}]{r.state}[/]" if style else r.state,
                    *cells, f"{r.final_metric:.4g}" if r.final_metric is not None else "-", f"{r.cpu_hours:.3f}"])
    print_table(cols, out, title=f"sweep {rec.name} ({rec.mode}, {rec.method}): {rec.metric}, {rec.goal} is best",
                wide=wide, con=con)
    for r in table:  # where to look first: the stage that failed (or ran out of time) and its output
        stage = next((s for s, state in r.stages.items() if state in ("failed", "timeout")), None)
        if stage is not None:
            con.print(f"{r.name} {r.stages[stage]} in {stage}; its log: progressive logs {r.name} {stage} "
                      f"--jobs {shlex.quote(rel(rec.sweep_dir))}", markup=False, soft_wrap=True)
    if top is not None:
        con.print(f"best so far: {top.name} ({rec.metric} {top.final_metric:.4g})")


def cmd_resume(args: argparse.Namespace) -> int:
    """Handler of `sweep resume`."""
    from progressive.sweep import record as srecord
    from progressive.sweep import runner

    rec = srecord.find(Path(args.jobs), args.name)
    redo = runner.resume(rec, dry_run=args.dry_run)
    con = console()
    if rec.mode == "local" and not args.dry_run:
        return _run_local(rec)
    for r in redo:
        con.print(f"{r.variant} {r.stage}: {'would resubmit' if args.dry_run else 'resubmitted'}"
                  + (f" (was {r.old_job})" if r.old_job else ""))
    if not redo:
        con.print("nothing to resubmit: every variant is complete, pruned or live")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Handler of `sweep cancel`."""
    from progressive.cli.plan_cmds import split_stages
    from progressive.sweep import record as srecord
    from progressive.sweep import runner

    rec = srecord.find(Path(args.jobs), args.name)
    ids = runner.cancel(rec, split_stages(args.variants))
    console().print(f"cancelled {', '.join(ids) if ids else 'nothing'} in sweep {rec.name}; "
                    f"continue later with: progressive sweep resume {rec.name}")
    return 0
