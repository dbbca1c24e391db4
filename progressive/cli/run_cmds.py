"""`progressive submit|status|resume|logs|cancel|demo`: run the graph and watch it."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from progressive.cli.plan_cmds import add_config_args, add_wide_arg, load_plan, rel, show_plan, show_scripts
from progressive.cli.render import Col, console, err_console, print_next, print_table
from progressive.cli.runs_cmd import add_run_args, choose_run
from progressive.errors import DataError, RunError
from progressive.states import StageState

S = StageState

# How `status` colours each state (every StageState has one: a test checks).
STATE_STYLE: dict[StageState, str] = {
    S.COMPLETED: "green", S.RUNNING: "cyan", S.PENDING: "blue", S.SUSPENDED: "yellow", S.BLOCKED: "bold red",
    S.FAILED: "red", S.TIMEOUT: "yellow", S.CANCELLED: "magenta", S.STOPPED: "yellow", S.PRUNED: "dim",
    S.UNKNOWN: "dim", S.NOT_SUBMITTED: "dim", S.NOT_STARTED: "dim",
}


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the run commands."""
    p = sub.add_parser("submit", help="submit the stages as Slurm jobs chained by afterok (or run them here with --local)",
                       description="Submit the selected stages in one go and exit; Slurm runs the chain. "
                       "The run is recorded under jobs/<run>/.")
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="show what would be submitted (same as plan --dry-run)")
    p.add_argument("--local", action="store_true", help="run the stages on this machine, one after another")
    add_wide_arg(p)
    p.add_argument("--force", action="store_true",
                   help="submit even stages the calibration says cannot finish within their requeues or do not fit")
    p.set_defaults(handler=cmd_submit)

    s = sub.add_parser("status", help="per stage: state, job id, requeues, progress, ETA, checkpoints")
    add_run_args(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    add_wide_arg(s)
    s.add_argument("--watch", nargs="?", type=positive_seconds, const=10.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 10) until every stage is final")
    s.set_defaults(handler=cmd_status)

    r = sub.add_parser("resume", help="resubmit stages that failed, timed out or were cancelled, from their last checkpoint")
    add_run_args(r)
    r.add_argument("--dry-run", action="store_true", help="show what would be resubmitted")
    add_wide_arg(r)
    r.set_defaults(handler=cmd_resume)

    lg = sub.add_parser("logs", help="print a stage's job output")
    lg.add_argument("args", nargs="+", metavar="[RUN] STAGE")
    add_run_args(lg, positional=False)
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new output")
    lg.add_argument("--err", action="store_true", help="the job's stderr instead of stdout")
    lg.add_argument("--task", type=_task_arg, default=0, metavar="N|all",
                    help="which task (DDP rank) of a multi-task job: a number (default 0) or `all`")
    lg.set_defaults(handler=cmd_logs)

    c = sub.add_parser("cancel", help="cancel a run's jobs (all, or --stages)")
    add_run_args(c)
    c.add_argument("--stages", metavar="A,B,...", help="only these stages")
    c.set_defaults(handler=cmd_cancel)

    d = sub.add_parser("demo", help="make a tiny dataset and run the tiny curriculum on this machine (minutes)")
    d.add_argument("-c", "--config", default=None, metavar="PATH", help="the graph (default: the built-in tiny curriculum,"
                   " writing data/, jobs/ and checkpoints/ under the current folder)")
    d.add_argument("--run-name", default="demo", metavar="NAME", help="run name (default: demo)")
    add_wide_arg(d)
    d.set_defaults(handler=cmd_demo)


def positive_seconds(text: str) -> float:
    """--watch's SECONDS: a positive number."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _task_arg(text: str) -> int | None:
    """--task: a task number, or None for `all`."""
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a task number (0, 1, ...) or 'all', got {text!r}")
    return int(text)


# ------------------------------------------------------------------ submit

def cmd_submit(args: argparse.Namespace) -> int:
    """Handler of `progressive submit`."""
    from progressive import runs
    from progressive.backends import get_backend

    plan = load_plan(args, ask_task=not args.dry_run)  # data without an index: the task counts it
    if args.dry_run:
        show_plan(plan, wide=args.wide)
        show_scripts(plan)
        return 0
    if not args.force:
        from progressive.calibration import refuse_flagged

        refuse_flagged(plan)
    config_text = Path(args.config).read_text(encoding="utf-8")
    rec = runs.submit(plan, config_text, get_backend("local" if args.local else "slurm"))
    con = console()
    if args.local:
        con.print(f"run [bold]{rec.run_name}[/] on this machine; records in {rel(rec.run_dir)}")
        return _run_local(rec, wide=args.wide)
    subs = [rec.stages[st.name].submissions[-1] for st in plan.stages]
    print_table([Col("stage"), Col("job id"), Col("after", drop=1)],
                [[st.name, sub.job_id, sub.dependency or "-"] for st, sub in zip(plan.stages, subs)],
                title=f"run {rec.run_name}: submitted", wide=args.wide)
    ref = run_ref(rec)
    print_next(f"progressive status {ref} --watch", f"progressive logs {ref} {plan.stages[0].name}",
               f"progressive cancel {ref}")
    return 0


def run_ref(rec: Any) -> str:
    """How a command names this run: `NAME`, plus `--jobs DIR` when its records are not under ./jobs."""
    jobs_root = Path(rec.run_dir).parent
    if jobs_root.resolve() == Path("jobs").resolve():
        return rec.run_name
    return f"{rec.run_name} --jobs {shlex.quote(rel(jobs_root))}"


def _run_local(rec: Any, *, wide: bool = False) -> int:
    """Run a local run with a progress bar per stage; 130 when interrupted (resume continues it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from progressive.backends.local import run_local, unhonoured_requests

    con = console()
    gpus, mem_mb = _machine()
    for warning in unhonoured_requests(rec.plan, gpus=gpus, mem_mb=mem_mb):
        err_console().print(f"warning: {warning}", markup=False, soft_wrap=True)
    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=con,
                  disable=not con.is_terminal) as bar:
        def on_stage(name: str, event: str, outcome: Any) -> None:
            st = rec.plan.stage(name)
            if event == "start":
                tasks[name] = bar.add_task(name, total=st.total_steps or None, info="")
            elif event == "completed":
                ev = getattr(outcome, "eval", None) or {}
                con.print(f"[green]completed[/] {name} at step {outcome.step}"
                          + (f"  eval: {_fmt_eval(ev)}" if ev else ""))
            elif event == "stopped":
                con.print(f"[yellow]stopped[/] {name} at step {outcome.step}/{outcome.total_steps}; "
                          f"checkpoint {rel(outcome.checkpoint)}. Continue with: progressive resume {rec.run_name}")
            elif event == "failed":
                # The error itself is printed once, by `main`, when run_local re-raises it.
                con.print(f"[red]failed[/] {name}; its log: {rel(rec.layout.stage(name).local_log)}")

        def on_progress(name: str, m: dict[str, Any]) -> None:
            if name in tasks and "step" in m:
                loss = _loss_text(m)
                if loss is None:
                    bar.update(tasks[name], completed=m["step"])
                else:
                    bar.update(tasks[name], completed=m["step"], info=loss)

        results = run_local(rec, on_progress=on_progress, on_stage=on_stage)
    if all(v == "completed" for v in results.values()) and len(results) == len(rec.plan.stages):
        show_results(rec, wide=wide)
        ref = run_ref(rec)
        print_next(f"progressive report {ref}", f"progressive status {ref}",
                   f"progressive logs {ref} {rec.plan.stages[-1].name}")
        return 0
    return 130


def _machine() -> tuple[int, int | None]:
    """This machine's GPU count (as torch sees them) and memory in MB (None when unknown)."""
    import os

    import torch  # local mode is about to train: torch is imported either way

    try:
        mem_mb: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        mem_mb = None
    return torch.cuda.device_count(), mem_mb


def _loss_text(m: dict[str, Any]) -> str | None:
    """The bar's loss field for one metrics line: None when the line carries no loss.

    Checkpoint and end-of-stage lines have a step but no loss; keeping the last real one shows
    `80/80 loss 0.091`, not `loss nan`. A loss that is itself NaN (a diverged run) is shown as such.
    """
    loss = m.get("loss")
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return f"loss {loss:.4g}"
    return None


def _fmt_eval(ev: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items())


def show_results(rec: Any, *, wide: bool = False) -> None:
    """The per-stage result table: final training loss and the task's evaluation.

    Iteration counts (keys ending in `_iters`) and ratios go first; other metrics only
    when the task reports no iteration counts (a custom task's own numbers).
    """

    from progressive.metrics import tail_objects

    rows = []
    keys: list[str] = []
    for st in rec.plan.stages:
        tail = tail_objects(st.metrics_path)
        done = next((o for o in tail if o.get("event") == "completed"), {})
        ev = done.get("eval") or {}
        last = next((o for o in tail if o.get("event") == "step"), {})
        keys += [k for k in ev if k not in keys]
        rows.append((st, done, last, ev))
    shown = [k for k in keys if k.endswith("_iters") or k.startswith("iters_vs")] or keys
    if "loss" in keys:
        shown = ["loss", *[k for k in shown if k != "loss"]]
    # Narrow terminals get two-line headers first. At 80 columns the last iteration counts then go;
    # the validation loss and the ratios (the learned preconditioner against a baseline) stay.
    metric_cols = [Col("val loss" if k == "loss" else k.replace("_iters", " iters").replace("_", " "), "right",
                       drop=len(shown) + 1 - i + (100 if k == "loss" or k.startswith("iters_vs") else 0), fold=True)
                   for i, k in enumerate(shown)]
    cols = [Col("stage"), Col("n", "right"), Col("steps", "right", drop=1),
            Col("train loss", "right", len(shown) + 2, fold=True), *metric_cols]
    table = [[st.name, str(st.bucket), str(done.get("step", "-")), _num(last.get("loss")),
              *[_num(ev.get(k)) for k in shown]] for st, done, last, ev in rows]
    print_table(cols, table, title=f"run {rec.run_name}: results (evaluation on held-out data)", wide=wide)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.4g}"
    return "-" if v is None else str(v)


# ------------------------------------------------------------------ status

def cmd_status(args: argparse.Namespace) -> int:
    """Handler of `progressive status`."""
    from progressive import record
    from progressive.states import FINAL
    from progressive.status import stage_statuses

    rec = choose_run(args, verb="status")
    while True:
        rec = record.load(rec.run_dir)  # a resume in between changes the job ids
        statuses = stage_statuses(rec)
        if args.json:
            print(json.dumps({"run": rec.run_name, "mode": rec.mode, "stages": [s.as_json() for s in statuses]}, indent=2))
        else:
            _show_status(rec, statuses, wide=args.wide)
        if not args.watch or all(s.state in FINAL for s in statuses):
            return 0
        time.sleep(args.watch)


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# At 80 columns the stage, its state and its progress stay; the checkpoint path goes first.
STATUS_COLUMNS = (
    Col("stage"), Col("state"), Col("job", drop=6), Col("requeues", "right", 4), Col("step", "right", 9),
    Col("epoch", "right", 2), Col("loss", "right", 8), Col("elapsed", drop=5), Col("eta", drop=7),
    Col("checkpoint", drop=1),
)


def _show_status(rec: Any, statuses: list[Any], *, wide: bool = False) -> None:
    rows = []
    for s in statuses:
        style = STATE_STYLE[s.state]
        progress = f"{s.step if s.step is not None else '-'}/{s.total_steps if s.total_steps is not None else '?'}"
        ckpt = s.final_checkpoint or s.checkpoint
        rows.append([s.name, f"[{style}]{s.state}[/]" if style else str(s.state), s.job_id or "-", str(s.requeues),
                     progress, str(s.epoch) if s.epoch is not None else "-",
                     f"{s.loss:.4g}" if s.loss is not None else "-", s.elapsed or "-", _fmt_s(s.eta_s),
                     rel(ckpt) if ckpt else "-"])
    print_table(STATUS_COLUMNS, rows, title=f"run {rec.run_name} ({rec.mode})", wide=wide)
    con = console()
    for s in statuses:
        for note in s.notes:
            con.print(note, markup=False, soft_wrap=True)
        if s.state is S.BLOCKED:
            con.print(f"[red]{s.name} is blocked[/]: {s.reason}. Fix: [bold]{s.fix}[/]")
        elif s.fix:
            con.print(f"{s.name} is {s.state}{': ' + s.reason if s.reason and s.reason != 'None' else ''}. "
                      f"Continue with: [bold]{s.fix}[/]")


# ------------------------------------------------------------------ resume, cancel, logs

def cmd_resume(args: argparse.Namespace) -> int:
    """Handler of `progressive resume`."""
    from progressive import runs
    from progressive.backends import get_backend

    rec = choose_run(args, verb="resume")
    backend = get_backend(rec.mode)
    actions = runs.resume(rec, backend=backend, dry_run=args.dry_run)
    con = console()
    if not any(a.action.endswith("submit") for a in actions):
        con.print(_nothing_left(rec.run_name, actions), markup=False, soft_wrap=True)
        if all(a.action.startswith("skip") for a in actions):
            con.print(f"next: progressive report {rec.run_name}", markup=False)
        return 0
    if backend.runs_in_process:
        for a in actions:
            if a.action.endswith("submit"):
                con.print(f"{'would resume' if args.dry_run else 'resuming'} {resume_origin(a)}")
        return 0 if args.dry_run else _run_local(rec, wide=args.wide)
    cols = [Col("stage"), Col("action"), Col("old job", drop=3), Col("new job", drop=4), Col("after", drop=2),
            Col("from checkpoint", drop=1)]
    print_table(cols, [[a.stage, a.action, a.old_job or "-", a.new_job or "-", a.dependency or "-",
                        rel(a.from_checkpoint) if a.from_checkpoint else "-"] for a in actions],
                title=f"run {rec.run_name}: resume{' (dry run)' if args.dry_run else ''}", wide=args.wide)
    for a in actions:
        if a.new_job:
            con.print(f"resubmitted {resume_origin(a)} as job {a.new_job}")
    return 0


def _nothing_left(run: str, actions: list[Any]) -> str:
    """Why resume has nothing to do: every stage complete, or the rest still queued or running."""
    done = sum(a.action.startswith("skip") for a in actions)
    if done == len(actions):
        return f"nothing to resume: run {run} is complete ({done} of {done} stages)"
    live = [a.stage for a in actions if a.action.startswith("keep")]
    return f"nothing to resubmit: every stage is complete or live ({', '.join(live)} queued or running)"


def resume_origin(action: Any) -> str:
    """Where a resumed stage starts: `small_512 from step 112`, or from the start (and whose weights)."""
    from progressive.layout import STEP_RE

    ckpt = action.from_checkpoint
    match = STEP_RE.match(Path(ckpt).name) if ckpt else None
    if match:
        return f"{action.stage} from step {int(match.group(1))}"
    if ckpt:
        return f"{action.stage} from the start, initialised from {rel(ckpt)}"
    return f"{action.stage} from the start"


def cmd_cancel(args: argparse.Namespace) -> int:
    """Handler of `progressive cancel`."""
    from progressive import runs
    from progressive.cli.plan_cmds import split_stages

    rec = choose_run(args, verb="cancel")
    ids = runs.cancel(rec, split_stages(args.stages))
    console().print(f"cancelled {', '.join(ids) if ids else 'nothing'} in run {rec.run_name}; "
                    f"continue later with: progressive resume {rec.run_name}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """Handler of `progressive logs [RUN] STAGE`."""
    from progressive.status import log_files

    if len(args.args) > 2:
        raise RunError("expected [RUN] STAGE", loc="logs", hint="e.g. `progressive logs tiny tiny_128`")
    run, stage = (args.args if len(args.args) == 2 else (None, args.args[0]))
    rec = choose_run(args, verb="logs", run=run)
    files = log_files(rec, stage, task=args.task)
    paths = files.stderr if args.err else files.stdout
    existing = [p for p in paths if p.is_file()]
    if not existing:
        which = "stderr" if args.err else "output"
        raise RunError(f"stage {stage!r} has no {which}{'' if args.task is None else f' of task {args.task}'} yet",
                       loc=str(rec.run_dir), hint=f"check `progressive status {run_ref(rec)}`: the job may still be "
                                                  "pending" + ("" if args.task in (0, None) else
                                                               ", or the job has fewer tasks (try --task all)"))
    import sys

    def header(p: Path) -> None:
        # With every task's files in one stream, say whose lines follow.
        if args.task is None:
            sys.stdout.write(f"==> {p.name} <==\n")

    for p in existing[:-1]:
        header(p)
        sys.stdout.write(p.read_text(errors="replace"))
    last = existing[-1]
    header(last)
    with last.open("r", errors="replace") as f:
        sys.stdout.write(f.read())
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(1)
    return 0


# ------------------------------------------------------------------ demo

def cmd_demo(args: argparse.Namespace) -> int:
    """Handler of `progressive demo`: tiny data, tiny curriculum, locally, then the result table."""
    from progressive import runs
    from progressive.backends import get_backend
    from progressive.config import load_config
    from progressive.data.counts import plan_counts
    from progressive.data.generate import generate
    from progressive.plan import build_plan

    if args.config:  # the user's graph: its relative paths are taken from its folder, as everywhere
        config = Path(args.config)
        cfg = load_config(config)
        config_text = config.read_text(encoding="utf-8")
    else:  # the packaged graph: data/, jobs/ and checkpoints/ go under the current folder
        from progressive.demo import builtin_graph, builtin_graph_path

        config = builtin_graph_path()
        cfg, config_text = builtin_graph(Path.cwd())
    con = console()
    data = (config.parent / cfg.run.data).resolve()
    buckets = sorted({st.bucket for st in cfg.stage})
    if not data.exists():
        con.print(f"making the tiny dataset {rel(data)} (buckets {', '.join(map(str, buckets))})")
        data.parent.mkdir(parents=True, exist_ok=True)
        if cfg.model.task == "progressive.tasks.seqlm:SequenceLMTask":
            from progressive.data.seqgen import generate_sequences

            generate_sequences(data, lengths=buckets, counts=[640 // 2 ** i for i in range(len(buckets))], seed=cfg.run.seed)
        elif cfg.model.task == "progressive.tasks.precond:PreconditionerTask":
            generate(data, sizes=buckets, counts=[max(24, 96 // (i + 1)) for i in range(len(buckets))], seed=cfg.run.seed)
        else:
            raise DataError(f"{rel(data)} does not exist, and demo makes data only for the built-in tasks",
                            loc=str(config), hint="make your task's data first, then `progressive submit --local`")
    plan = build_plan(cfg, config, run_name=args.run_name, counts=lambda p: plan_counts(
        p, buckets=buckets, task=cfg.model.task, options=cfg.model.options, config=config))
    if plan.layout.record.is_file():
        rec = runs.find_run(Path(plan.run_dir).parent, plan.run_name, verb="demo")
        con.print(f"continuing the demo run {plan.run_name!r} (delete {rel(plan.run_dir)} and {rel(plan.checkpoint_root)} to start over)")
    else:
        show_plan(plan, wide=args.wide)
        rec = runs.submit(plan, config_text, get_backend("local"))
    return _run_local(rec, wide=args.wide)
