"""`progressive plan` and `progressive schema`: show what would run; write and submit nothing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

from typing import TYPE_CHECKING

from progressive.cli.render import Col, console, print_table

if TYPE_CHECKING:
    from progressive.calibration import StageEstimate
    from progressive.plan import Plan, StagePlan

# config/plan (pydantic) are imported inside the handlers: `--help` must not pay for them.

DEFAULT_CONFIG = "stages.toml"


def add_config_args(p: argparse.ArgumentParser, *, stages: bool = True) -> None:
    """The options shared by plan and submit."""
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="PATH",
                   help=f"the stage graph file (default: {DEFAULT_CONFIG})")
    if stages:
        p.add_argument("--stages", metavar="A,B,...", help="only these stages (default: all)")
    p.add_argument("--run-name", metavar="NAME", help="run name (default: [run].name of the file)")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `plan` and `schema`."""
    p = sub.add_parser("plan", help="show every stage: bucket, samples, steps, budget, parents, Slurm request",
                       description="Resolve the stage graph against the data on disk and show what would run. "
                       "Writes nothing, submits nothing.")
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="also print each stage's exact sbatch script")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (includes the sbatch scripts)")
    add_wide_arg(p)
    p.add_argument("--check", action="store_true",
                   help="exit non-zero on any problem: data, parent weights, calibration, stages that cannot finish "
                   "or do not fit (for CI)")
    p.set_defaults(handler=cmd_plan)

    s = sub.add_parser("schema", help="print the JSON Schema of stages.toml (for editors)")
    s.set_defaults(handler=cmd_schema)


def add_wide_arg(p: argparse.ArgumentParser) -> None:
    """--wide: every column of the tables, even past the terminal's edge."""
    p.add_argument("--wide", action="store_true", help="show every column, even when the table is wider than the terminal")


def split_stages(text: str | None) -> list[str] | None:
    """Parse --stages a,b,c."""
    if not text:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def load_plan(args: argparse.Namespace, *, ask_task: bool = False) -> "Plan":
    """Config file + options -> Plan (raises ConfigError on a bad file or option).

    Counts come from `progressive.data.counts.plan_counts` (no torch). With `ask_task` (submit),
    data that only the task can count is counted by the task (this imports it, and torch).
    """
    from progressive.config import load_config
    from progressive.data.counts import CountsUnknown, counts_from_task, plan_counts
    from progressive.plan import build_plan

    cfg = load_config(args.config)
    buckets = [st.bucket for st in cfg.stage]

    def counts(path: Path) -> Mapping[int, Mapping[str, int]]:
        try:
            return plan_counts(path, buckets=buckets, task=cfg.model.task, options=cfg.model.options,
                               config=args.config)
        except CountsUnknown:
            if not ask_task:
                raise
            from progressive.task import load_task

            return counts_from_task(load_task(cfg.model.task, cfg.model.options), path, buckets)

    return build_plan(cfg, args.config, run_name=args.run_name, select=split_stages(getattr(args, "stages", None)),
                      counts=counts)


def cmd_plan(args: argparse.Namespace) -> int:
    """Handler of `progressive plan`."""
    from progressive.plan import bucket_problems, check_data

    plan = load_plan(args)
    if args.json:
        print(json.dumps(plan_json(plan), indent=2))
    else:
        show_plan(plan, wide=args.wide)
        if args.dry_run:
            show_scripts(plan)
    if bucket_problems(plan) or (args.check and plan.data_error):
        check_data(plan)  # raises: the same words and exit code as submit, calibrate and resume
    if args.check:
        return _check(plan)
    return 0


CHECK_FAILED = 1  # plan --check: the plan itself resolved, but something in it would fail


def _check(plan: "Plan") -> int:
    """`plan --check` after the data check: parent weights, calibration, and the stages it flags."""
    from progressive.calibration import estimates
    from progressive.cli.render import err_console
    from progressive.plan import missing_weights

    ests, problem = estimates(plan)
    found = missing_weights(plan) + ([f"calibration: {problem}"] if problem else [])
    found += [f"stage {st.name!r}: {flag}" for st in plan.stages for flag in ests[st.name].flags]
    for line in found:
        err_console().print(f"check: {line}", markup=False, soft_wrap=True)
    if found:
        err_console().print(f"plan --check: {len(found)} problem(s)", markup=False)
        return CHECK_FAILED
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Handler of `progressive schema`."""
    from progressive.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def plan_json(plan: "Plan") -> dict[str, Any]:
    """The plan as JSON-able data, with each stage's sbatch script and its time/memory estimate."""
    from progressive.calibration import calibration_path, estimates
    from progressive.backends.slurm import render_script

    ests, problem = estimates(plan)
    out = plan.model_dump(mode="json", exclude={"stages"})
    out["calibration_file"] = str(calibration_path(plan))
    out["calibration_error"] = problem
    out["stages"] = []
    for st in plan.stages:
        d = st.model_dump(mode="json")
        est = ests[st.name].as_json()
        est["estimate_source"] = est.pop("source")
        d.update(est)  # estimate_min is the calibrated one when there is a fresh calibration
        d["time_limit_min"] = st.time_limit_min
        d["init_from"] = st.init_from.stage or st.init_from.checkpoint or "none"
        d["init_checkpoint"] = st.init_from.checkpoint
        d["sbatch"] = render_script(plan, st)
        out["stages"].append(d)
    return out


def rel(path: str | Path) -> str:
    """A path relative to the working directory when it lies below it (shorter tables)."""
    p = Path(path)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _fmt_min(minutes: float | None) -> str:
    if minutes is None:
        return "unknown"
    m = int(round(minutes))
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{minutes:g}m"


def _fmt_mb(mb: int | None) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:g}G" if mb >= 1024 else f"{mb}M"


def _resources(st: "StagePlan") -> str:
    """Compact Slurm request: nodes x tasks, cpus/task, gpus/node, mem, partition."""
    s = st.slurm
    parts = [f"{s.nodes}x{s.tasks_per_node}", f"{s.cpus_per_task}c"]
    if s.gpus_per_node:
        parts.append(f"{s.gpus_per_node}g")
    parts.append(_fmt_mb(s.mem))
    if s.partition:
        parts.append(s.partition)
    return " ".join(parts)


def _fmt_segments(est: "StageEstimate") -> str:
    if est.segments is None:
        return "-"
    text = f"{est.segments}/{est.max_segments}"
    return f"[bold red]{text}[/]" if est.segments > est.max_segments else text


def _fmt_peak(est: "StageEstimate") -> str:
    if est.peak_mem_mb is None:
        return "-"
    text = _fmt_mb(int(round(est.peak_mem_mb))) + (f"/{_fmt_mb(est.mem_request_mb)}" if est.mem_request_mb else "")
    if est.mem_request_mb and est.peak_mem_mb > est.mem_request_mb:
        return f"[bold red]{text}[/]"
    from progressive.calibration import HOST_MEM_WARN

    return f"[yellow]{text}[/]" if est.mem_request_mb and est.peak_mem_mb > HOST_MEM_WARN * est.mem_request_mb else text


# At 80 columns the stage and its size stay; the Slurm request goes first, the estimate last.
PLAN_COLUMNS = (
    Col("stage"), Col("n", "right"), Col("batch", "right", 5), Col("epochs", "right", 6), Col("train/val", drop=10),
    Col("steps/ep", "right", 3), Col("steps", "right", 11), Col("budget", drop=9), Col("estimate", drop=12),
    Col("segments", "right", 8), Col("peak mem", drop=7), Col("init from", drop=4), Col("gpu mem", drop=2),
    Col("slurm (nodes x tasks, cpus, gpus, mem)", drop=1),
)


def show_plan(plan: "Plan", *, wide: bool = False) -> None:
    """Print the plan table, with time, segments and memory from the run's calibration when there is one."""
    from progressive.calibration import calibration_path, estimates

    ests, problem = estimates(plan)
    con = console()
    con.print(f"[bold]run[/] {plan.run_name}   [bold]config[/] {rel(plan.config_path)}   [bold]data[/] {rel(plan.data_path)}"
              f"   [bold]records[/] {rel(plan.run_dir)}")
    if plan.data_error:
        con.print(f"[red]data: {plan.data_error}[/]")
    rows: list[list[str]] = []
    for st in plan.stages:
        if st.samples is None:
            samples = "[red]unknown[/]"
        elif st.samples["train"] == 0:
            samples = "[red]missing[/]"
        else:
            samples = f"{st.samples['train']}/{st.samples['val']}"
        est = ests[st.name]
        estimate = _fmt_min(est.estimate_min)
        if est.estimate_min is not None and est.estimate_min < 1:
            estimate = f"{est.estimate_min * 60:.0f}s"  # calibrated tiny stages: seconds read better
        if est.source == "throughput":
            estimate += " (throughput)"
        if est.segments is not None and est.segments > est.max_segments:
            estimate = f"[bold red]{estimate}[/]"
        elif est.estimate_min is not None and est.estimate_min > st.time_limit_min:
            estimate = f"[yellow]{estimate} (requeues)[/]"
        gpu = _fmt_mb(int(est.gpu_peak_mb)) if est.gpu_peak_mb is not None else _fmt_mb(st.gpu_mem_mb)
        init = st.init_from.stage or (Path(st.init_from.checkpoint).name if st.init_from.checkpoint else "-")
        has_steps = st.total_steps is not None and st.total_steps > 0
        rows.append([st.name, str(st.bucket), str(st.batch_size), str(st.epochs), samples,
                     str(st.steps_per_epoch) if has_steps else "-",
                     str(st.total_steps) if has_steps else "-",
                     _fmt_min(st.time_limit_min), estimate, _fmt_segments(est), _fmt_peak(est), init, gpu,
                     _resources(st)])
    print_table(PLAN_COLUMNS, rows, wide=wide)
    from rich.markup import escape

    if problem:
        con.print(f"[red]calibration: {escape(problem)}[/]")
    _stage_notes(plan, ests)
    if not problem and all(e.calibration == "missing" for e in ests.values()):
        con.print(f"[dim]no calibration in {rel(calibration_path(plan))}: `progressive calibrate` measures step time "
                  "and memory so plan can estimate wall time, segments and peak memory[/]")
    for st in plan.stages:
        init = f"   init from {rel(st.init_from.checkpoint)}" if st.init_from.checkpoint else ""
        con.print(f"[dim]{st.name}: checkpoints {rel(st.checkpoint_dir)}/, final {rel(st.final_checkpoint)}{init}[/]")
    from progressive.tracking.settings import describe

    for line in describe(plan.tracking):
        con.print(f"[dim]{escape(line)}[/]")
    for note in plan.tracking.notes:
        con.print(f"[yellow]warning: {escape(note)}[/]")


def _stage_notes(plan: "Plan", ests: Mapping[str, "StageEstimate"]) -> None:
    """Each stage's calibration flags and notes, and the batch size that would fit."""
    from rich.markup import escape

    from progressive.plan import bucket_problems

    con = console()
    # A stage whose bucket the data lacks gets the data error (after the table), not calibration advice.
    lacking = bucket_problems(plan)
    for st in plan.stages:
        est = ests[st.name]
        if st.name in lacking:
            continue
        for flag in est.flags:
            con.print(f"[bold red]{st.name}: {escape(flag)}[/]")
        for note in est.notes:
            con.print(f"[yellow]{st.name}: {escape(note)}[/]")
        if est.suggested_batch_size is not None and est.suggested_batch_size != st.batch_size:
            what = ("the whole bucket fits the memory in one batch" if est.suggested_is_bucket
                    else "the largest batch that fits the memory is")
            con.print(f"[dim]{st.name}: {what} ({est.suggested_batch_size} per process)[/]")


def show_scripts(plan: "Plan") -> None:
    """Print every stage's sbatch script (dependencies shown as afterok:<parent>)."""
    from rich.rule import Rule

    from progressive.backends.slurm import render_script

    con = console()
    for st in plan.stages:
        con.print(Rule(f"sbatch script: {st.name}"))
        # soft_wrap: the script is shown exactly, never re-wrapped to the terminal width.
        con.print(render_script(plan, st), markup=False, highlight=False, soft_wrap=True)
    con.print("[dim]dry run: nothing written, nothing submitted[/]")
