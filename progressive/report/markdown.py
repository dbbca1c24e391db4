"""index.md: the report's text, tables and links to its figures (pure: data in, a string out)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from progressive.report.accounting import Accounting, TimeAccount
from progressive.report.data import RunData
from progressive.report.transfer import TransferResult

if TYPE_CHECKING:
    from progressive.sweep.record import SweepRecord
    from progressive.sweep.summary import VariantRow

__all__ = ["render", "render_sweep", "fmt_s"]

BASELINES = ("cg", "jacobi", "ic0")  # the reference task's non-learned preconditioners


def fmt_s(seconds: float) -> str:
    """Seconds as 0:01:05 (or 12.3 s under a minute)."""
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], right_from: int = 1) -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i < right_from else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(c if isinstance(c, str) else _num(c) for c in row) + " |" for row in rows]
    return out + [""]


def _state(st: Any) -> str:
    if st.complete:
        return "completed"
    if not st.segments:
        return "not started"
    return {"stopped": "stopped", "interrupted": "died", "open": "running or died"}.get(st.segments[-1].end, "?")


def render(run: RunData, acc: Accounting, figures: dict[str, str], transfer: TransferResult | None,
           transfer_note: str | None = None) -> str:
    """The whole index.md. `figures` maps figure file names to their paths relative to index.md."""
    lines = [f"# Report: run `{run.run_name}`", "",
             f"{run.mode} run, {len(run.stages)} stage(s); generated {time.strftime('%Y-%m-%d %H:%M:%S')} "
             "by `progressive report` from the run's own records (run.json, metrics.jsonl, checkpoints"
             f"{', sacct' if acc.source == 'sacct' else ''}). Re-run it to refresh; it never changes the run.", ""]
    ratio = acc.total.ratio
    lines += [f"**Effective training time ratio: {ratio:.3f}** (useful training-step time / allocated time, "
              "all stages)." if ratio is not None else "**Effective training time ratio: -** (nothing allocated yet).", ""]
    lines += _stages(run)
    lines += ["## Loss across the curriculum", "",
              "Training loss per logged optimizer step, one colour per stage; diamonds: validation loss of the "
              "stage's final weights. Dashed black: a stage starts; dotted red: a restart (requeue, resume); "
              "dash-dot orange: a stop with a checkpoint (pre-timeout signal, Ctrl-C, cancel) or a crash.", ""]
    for name in ("loss_step.png", "loss_time.png"):
        if name in figures:
            lines += [f"![{name}]({figures[name]})", ""]
    lines += ["## Learning rate", ""]
    if "lr.png" in figures:
        lines += [f"![learning rate]({figures['lr.png']})", ""]
    lines += _evaluation(run)
    lines += _transfer(transfer, figures, transfer_note)
    lines += _time(acc, figures)
    lines += _segments(run, acc)
    return "\n".join(lines).rstrip() + "\n"


def _stages(run: RunData) -> list[str]:
    rows = []
    for st in run.stages:
        steps = f"{st.steps[-1].step if st.steps else 0}/{st.total_steps if st.total_steps is not None else '?'}"
        rows.append([st.name, str(st.bucket), _state(st), steps, str(len(st.segments)), str(st.restarts),
                     st.last_loss, st.eval.get("loss")])
    return ["## Stages", ""] + _table(["stage", "bucket", "state", "step", "segments", "restarts", "last train loss",
                                       "val loss"], rows, right_from=3)


def _evaluation(run: RunData) -> list[str]:
    lines = ["## Evaluation per stage", "",
             "The task's `evaluate()` at the end of each stage, on its own bucket's validation split "
             "(the `completed` event of its metrics).", ""]
    keys: list[str] = []
    for st in run.stages:
        keys += [k for k in st.eval if k not in keys]
    if not keys:
        return lines + ["No stage has completed yet.", ""]
    # Iteration counts and ratios first (the reference task has 17 keys); every key when there are none.
    shown = [k for k in keys if k in ("samples", "loss") or k.endswith("_iters") or k.startswith("iters_vs")]
    shown = shown if any(k.endswith("_iters") for k in shown) else keys
    rows = [[st.name, str(st.bucket), *[st.eval.get(k) for k in shown]] for st in run.stages]
    lines += _table(["stage", "bucket", *shown], rows, right_from=1)
    if len(shown) < len(keys):
        lines += [f"Also recorded (the `eval` of each stage's `completed` event): {', '.join(k for k in keys if k not in shown)}.", ""]
    return lines


def _transfer(tr: TransferResult | None, figures: dict[str, str], note: str | None) -> list[str]:
    lines = ["## Transfer matrix", ""]
    if tr is None:
        return lines + [note or "Not evaluated (`--no-transfer`).", ""]
    if not tr.cells:
        return lines + ["No stage has final weights yet.", *tr.notes, ""]
    lines += [f"Each stage's final weights evaluated on the validation split of every bucket of the run "
              f"(up to {tr.samples} matrices each). Rows: weights; columns: bucket. Shown: `{tr.metric}` "
              f"({'lower' if tr.lower_is_better else 'higher'} is better).", ""]
    rows = [[s, *[tr.value(s, b) for b in tr.buckets]] for s in tr.stages]
    lines += _table(["weights \\ bucket", *[f"n={b}" for b in tr.buckets]], rows)
    if any(tr.value(s, b, "learned_solve_s") is not None for s in tr.stages for b in tr.buckets):
        lines += ["PCG solve time with the learned preconditioner (seconds per matrix):", ""]
        rows = [[s, *[tr.value(s, b, "learned_solve_s") for b in tr.buckets]] for s in tr.stages]
        lines += _table(["weights \\ bucket", *[f"n={b}" for b in tr.buckets]], rows)
    base = [b for b in BASELINES if any(tr.value(s, n, f"{b}_iters") is not None for s in tr.stages for n in tr.buckets)]
    if base:
        lines += ["Baselines on the same matrices (they do not depend on the weights): PCG iterations "
                  "(and solve seconds), next to the best learned result in each bucket:", ""]
        rows = []
        for n in tr.buckets:
            first = next((s for s in tr.stages if (s, n) in tr.cells), None)
            learned = [v for s in tr.stages if (v := tr.value(s, n)) is not None]
            cells = [f"{_num(tr.value(first, n, f'{b}_iters'))} ({_num(tr.value(first, n, f'{b}_solve_s'))} s)"
                     if first else "-" for b in base]
            rows.append([f"n={n}", *cells, min(learned) if learned else None])
        lines += _table(["bucket", *base, f"best {tr.metric}"], rows)
    if "transfer.png" in figures:
        lines += [f"![transfer matrix]({figures['transfer.png']})", ""]
    return lines + [*tr.notes, ""] if tr.notes else lines


TIME_ROWS = [("allocated_s", "allocated"), ("useful_s", "useful training steps"), ("startup_s", "start-up"),
             ("checkpoint_s", "checkpoint writes"), ("eval_s", "evaluation"), ("redone_s", "steps redone after a crash"),
             ("shutdown_s", "stop/finish -> job end"), ("other_s", "other"),
             ("before_limit_s", "given up before the limit (not allocated)"),
             ("queue_wait_s", "waiting between segments (not allocated)")]


def _time(acc: Accounting, figures: dict[str, str]) -> list[str]:
    lines = ["## Where the time went", "",
             ("Allocated time is Slurm's Elapsed of every attempt of every job (requeued attempts included, "
              "`sacct --duplicates`)" if acc.source == "sacct" else
              "Allocated time is the wall time of each training segment, from the start of the trainer's set-up "
              "(task, data, model, checkpoint; the process's imports before it are not seen)")
             + "; useful is the optimizer-step time that counts; start-up runs from the allocation's start to the "
               "first step; redone steps were logged twice (their first run was lost to a crash). The last two rows "
               "are outside the allocation: the time before the limit that a job stopped by the pre-timeout signal "
               "gave up, and the wait between a stage's segments (queue, or until `resume` for a local run).", ""]
    names = list(acc.stages)
    rows = []
    for attr, label in TIME_ROWS:
        rows.append([label, *[fmt_s(getattr(acc.stages[n], attr)) for n in names], fmt_s(getattr(acc.total, attr))])
    rows.append(["segments", *[str(acc.stages[n].segments) for n in names], str(acc.total.segments)])
    rows.append(["steps redone", *[str(acc.stages[n].redone_steps) for n in names], str(acc.total.redone_steps)])
    if acc.source == "sacct":
        rows.append(["CPU-hours", *[f"{acc.stages[n].cpu_s / 3600:.3f}" for n in names], f"{acc.total.cpu_s / 3600:.3f}"])
        if acc.total.gpu_s:
            rows.append(["GPU-hours", *[f"{acc.stages[n].gpu_s / 3600:.3f}" for n in names],
                         f"{acc.total.gpu_s / 3600:.3f}"])
    rows.append(["effective ratio", *[_ratio(acc.stages[n]) for n in names], _ratio(acc.total)])
    lines += _table(["", *names, "total"], rows)
    if "time.png" in figures:
        lines += [f"![where the time went]({figures['time.png']})", ""]
    return lines + [*acc.notes, ""] if acc.notes else lines


def _ratio(t: TimeAccount) -> str:
    return "-" if t.ratio is None else f"{t.ratio:.3f}"


def _segments(run: RunData, acc: Accounting) -> list[str]:
    lines = ["## Segments", "", "Every life of every stage's training process: where it started, how it ended.", ""]
    rows = []
    t0 = run.start_time
    for st in run.stages:
        attempts = acc.attempts.get(st.name, [])
        for seg in st.segments:
            job = next((a for a in attempts if a.start is not None and a.start - 1 <= seg.start_time
                        <= (a.end if a.end is not None else math.inf) + 1), None)
            rows.append([st.name, str(seg.index), f"{job.job_id} ({job.state})" if job else "-",
                         fmt_s(seg.start_time - t0), f"{seg.start_step} -> {seg.last_step}",
                         "fresh" if not seg.resumed_from else "checkpoint", seg.end, str(seg.redone_steps),
                         fmt_s(seg.useful_s)])
    return lines + _table(["stage", "#", "job (state)", "started at", "steps", "from", "ended", "redone", "useful"],
                          rows, right_from=3)


def _param(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def render_sweep(rec: "SweepRecord", table: "list[VariantRow]", top: "Optional[VariantRow]", links: dict[str, str],
                 figures: dict[str, str], curves_of: list[str], *, transfer: bool) -> str:
    """The sweep's index.md: the variants table (summary.csv's rows), the best variant, figures, variant links.

    `links` maps the variants that have a report to its index.md relative to this one.
    """
    params = list(dict.fromkeys(k for r in table for k in r.params))
    stages = list(dict.fromkeys(s for r in table for s in r.stages))
    lines = [f"# Report: sweep `{rec.name}`", "",
             f"{rec.mode} sweep, method {rec.method}, {len(table)} variant(s); metric `{rec.metric}` "
             f"({rec.goal} is best). Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `progressive report` from the "
             "sweep's own records (sweep.json, the same rows as summary.csv, each variant's run). Re-run it to "
             "refresh; it never changes the sweep.", ""]
    if top is not None:
        link = f" ([report]({links[top.name]}))" if top.name in links else ""
        lines += [f"**Best variant: `{top.name}`**, final {rec.metric} {_num(top.final_metric)}" + link
                  + (" with " + ", ".join(f"`{k}` = {_param(v)}" for k, v in top.params.items()) if top.params else "")
                  + ".", ""]
    else:
        lines += ["**Best variant: -** (no variant has completed every stage yet).", ""]
    lines += ["## Variants", ""]
    header = ["variant", *[f"`{k}`" for k in params], "state", *[f"{s} {rec.metric}" for s in stages],
              f"final {rec.metric}", "wall time", "CPU hours", "GPU hours", "report"]
    body = []
    for r in table:
        state = f"pruned after {r.pruned_after}" if r.pruned_after else r.state
        name = f"**{r.name}**" if top is not None and r.name == top.name else r.name
        body.append([name, *[_param(r.params.get(k)) for k in params], state,
                     *[_num(r.stage_metrics.get(s)) for s in stages], _num(r.final_metric), fmt_s(r.wall_s),
                     f"{r.cpu_hours:.3g}", f"{r.gpu_hours:.3g}",
                     f"[report]({links[r.name]})" if r.name in links else "not started"])
    lines += _table(header, body, right_from=1 + len(params) + 1)
    lines += ["## Comparison", ""]
    if "sweep_metric.png" in figures:
        lines += [f"![{rec.metric} per variant]({figures['sweep_metric.png']})", ""]
    if "sweep_loss.png" in figures:
        lines += [f"Training loss of the top {len(curves_of)} completed variant(s) ({', '.join(curves_of)}), stages "
                  "end to end:", "", f"![loss of the top variants]({figures['sweep_loss.png']})", ""]
    else:
        lines += ["No variant has completed yet: no loss comparison.", ""]
    lines += ["## Each variant's report", ""]
    lines += [f"- [{name}]({link})" for name, link in links.items()]
    lines += ["", "Transfer matrices: " + ("evaluated for each variant (`--transfer`)." if transfer else
                                            "skipped (the default for a sweep; `progressive report SWEEP --transfer` "
                                            "evaluates one per variant)."), ""]
    return "\n".join(lines).rstrip() + "\n"
