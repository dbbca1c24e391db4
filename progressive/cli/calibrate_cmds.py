"""`progressive calibrate`: measure each stage's speed and memory on its own resources."""

from __future__ import annotations

import argparse
import json
from typing import Any, Mapping, Optional

from progressive.cli.plan_cmds import add_config_args, load_plan, rel
from progressive.cli.render import console


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1 (e.g. 0.1), got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number of seconds, got {text!r}")
    return value


def _minutes(text: str) -> int:
    from progressive.units import parse_duration_min

    try:
        value = parse_duration_min(text if not text.isdigit() else int(text))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least one minute, got {text!r}")
    return int(value)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `calibrate`."""
    p = sub.add_parser("calibrate", help="measure each stage's step time, memory, eval/checkpoint/start-up costs",
                       description="Measure each selected stage on its own resources (one short Slurm job per "
                       "stage, or here with --local) and store the results in jobs/<run>/calibration.json; "
                       "`progressive plan` then shows wall-time estimates, job segments and peak memory.")
    add_config_args(p)
    p.add_argument("--local", action="store_true", help="measure here, one process per stage, instead of on Slurm")
    p.add_argument("--find-batch-size", action="store_true",
                   help="also search the largest micro-batch that fits the memory (GPU memory, or mem on CPU)")
    p.add_argument("--steps", type=_positive_int, default=10, metavar="N", help="timed optimizer steps (default 10)")
    p.add_argument("--warmup", type=_positive_int, default=3, metavar="N", help="untimed warm-up steps (default 3)")
    p.add_argument("--min-seconds", type=_seconds, default=3.0, metavar="S",
                   help="time steps for at least this long (default 3; short steps need many to average)")
    p.add_argument("--margin", type=_margin, default=0.1, metavar="SHARE",
                   help="memory kept free by --find-batch-size (default 0.1 = 10%%)")
    p.add_argument("--time-limit", type=_minutes, default=15, metavar="TIME",
                   help="time limit of each Slurm calibration job (default 15m, at most the stage's)")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")
    p.set_defaults(handler=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Handler of `progressive calibrate`."""
    from progressive.calibration import calibration_path
    from progressive.calibration_jobs import calibrate_local, calibrate_slurm
    from progressive.plan import check_data

    plan = load_plan(args)
    check_data(plan)  # the same words and exit code as plan, submit and resume
    options = {"steps": args.steps, "warmup": args.warmup, "min_seconds": args.min_seconds, "find_batch": args.find_batch_size, "margin": args.margin}
    con = console()
    quiet = args.json
    seen: dict[str, str] = {}

    def on_event(stage: str, what: str, info: Optional[Mapping[str, Any]]) -> None:
        if quiet:
            return
        if what == "start":
            con.print(f"measuring [bold]{stage}[/] here ...")
        elif what == "submitted" and info:
            con.print(f"[bold]{stage}[/]: calibration job {info['job_id']} submitted")
        elif what == "state" and info and seen.get(stage) != info["state"]:
            seen[stage] = info["state"]
            con.print(f"[bold]{stage}[/]: job {info['job_id']} {info['state']}")
        elif what == "done" and info:
            con.print(f"[bold]{stage}[/]: {info['step_s']['mean']:.3g} s/step, peak {info['peak_rss_mb']:.0f} MB RSS")

    if not quiet:
        where = "here" if args.local else "on Slurm, one job per stage"
        con.print(f"calibrating run [bold]{plan.run_name}[/] ({len(plan.stages)} stage(s), {where}); "
                  f"results to {rel(calibration_path(plan))}")
    if args.local:
        entries = calibrate_local(plan, list(plan.stages), options, on_event=on_event)
    else:
        entries = calibrate_slurm(plan, list(plan.stages), options, time_limit_min=args.time_limit, on_event=on_event)
    if args.json:
        print(json.dumps({"path": str(calibration_path(plan)), "stages": entries}, indent=2))
        return 0
    show_entries(entries)
    con.print(f"written {rel(calibration_path(plan))}; `progressive plan` now shows estimates, segments and memory")
    return 0


def _mb(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else (f"{v / 1024:.2f}G" if v >= 1024 else f"{v:.0f}M")


def show_entries(entries: Mapping[str, Mapping[str, Any]]) -> None:
    """The measurements as a table."""
    from progressive.cli.render import Col, print_table

    # At 80 columns the stage, its step time and its peak memory stay; the spreads and costs go first.
    drops = {"stage": 0, "device": 6, "s/step mean": 0, "median (p10-p90)": 2, "worst s/step": 3, "samples/s": 8,
             "peak RSS": 9, "GPU used": 7, "eval": 4, "checkpoint": 5, "start-up": 10, "exit": 1, "batch fits": 11}
    cols = [Col(h, "left" if h in ("stage", "device") else "right", d) for h, d in drops.items()]
    rows = []
    for name, e in entries.items():
        s, w = e["step_s"], e["worst_step_s"]
        gpu = e.get("gpu") or {}
        search = e.get("batch_search") or {}
        fits = "-" if not search else (str(search.get("batch_size") or "none")
                                       + (" = bucket" if search.get("batch_size") == search.get("cap") else "")
                                       + f" (<= {_mb(search.get('budget_mb'))})")
        rows.append([name, str(e.get("device_name", e.get("device"))),
                     f"{s['mean']:.3g}", f"{s['median']:.3g} ({s['p10']:.3g}-{s['p90']:.3g})", f"{w['median']:.3g}",
                     f"{e['samples_per_s']:.1f}", _mb(e["peak_rss_mb"]), _mb(gpu.get("device_used_mb")),
                     f"{e['eval_s']:.2f}s", f"{e['checkpoint_s']:.2f}s", f"{e['startup_s']:.1f}s",
                     f"{e['exit_s']:.1f}s" if isinstance(e.get("exit_s"), (int, float)) else "-", fits])
    print_table(cols, rows, wide_flag="--json")  # calibration.json holds every number
