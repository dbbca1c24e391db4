"""The report's PNG figures (matplotlib, the `report` extra, Agg backend: no display needed).

Each function draws data prepared elsewhere (`series`, `accounting`, `transfer`) and
writes one PNG atomically; nothing here computes a number the report relies on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from progressive import atomic
from progressive.errors import MissingDependencyError

if TYPE_CHECKING:
    from progressive.report.accounting import Accounting
    from progressive.report.series import CurveData, Series
    from progressive.report.transfer import TransferResult
    from progressive.sweep.summary import VariantRow

__all__ = ["require_matplotlib", "loss_figures", "lr_figure", "time_figure", "transfer_figure", "sweep_metric_figure",
           "sweep_loss_figure", "sweep_loss_points"]

MARK_STYLE = {"boundary": ("black", "--"), "restart": ("red", ":"), "stop": ("orange", "-.")}


def require_matplotlib() -> Any:
    """pyplot on the Agg backend, or MissingDependencyError naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("the report's figures need matplotlib, which is not installed", loc="report",
                                     hint="pip install 'progressive[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    fig.clear()
    require_matplotlib().close(fig)
    return path


def _colours(names: list[str]) -> dict[str, Any]:
    plt = require_matplotlib()
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _marks(ax: Any, data: "CurveData", x: str) -> None:
    seen: set[str] = set()
    for m in data.markers:
        colour, style = MARK_STYLE[m.kind]
        label = {"boundary": "stage start", "restart": "restart / requeue", "stop": "stop (checkpoint) / crash"}[m.kind]
        ax.axvline(getattr(m, x), color=colour, linestyle=style, linewidth=0.9, alpha=0.7,
                   label=None if m.kind in seen else label)
        seen.add(m.kind)


def _plot_pieces(ax: Any, s: "Series", x: str, colour: Any, label: str) -> None:
    # One line per segment: no line drawn across a queue wait, nor back over redone steps.
    xs = getattr(s, x)
    for k, (a, b) in enumerate(s.pieces()):
        ax.plot(xs[a:b], s.values[a:b], color=colour, linewidth=1.1, label=label if k == 0 else None)


def loss_figures(data: "CurveData", out: Path) -> dict[str, Path]:
    """loss_step.png and loss_time.png: training loss (log scale), validation loss at each stage's end."""
    plt = require_matplotlib()
    colours = _colours([s.stage for s in data.loss])
    paths = {}
    for x, name, xlabel in (("global_step", "loss_step.png", "global optimizer step"),
                            ("minutes", "loss_time.png", "wall time since the run started (minutes)")):
        fig, ax = plt.subplots(figsize=(9, 4.8))
        for s in data.loss:
            _plot_pieces(ax, s, x, colours[s.stage], f"{s.stage} (train)")
        for stage, step, minutes, value in data.val_loss:
            ax.plot([step if x == "global_step" else minutes], [value], marker="D", markersize=7, linestyle="none",
                    color=colours.get(stage, "k"), markeredgecolor="black", label=f"{stage} (validation)")
        _marks(ax, data, x)
        values = [v for s in data.loss for v in s.values] + [v for *_, v in data.val_loss]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.set_title("Loss across the curriculum")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths[name] = _save(fig, out / name)
    return paths


def lr_figure(data: "CurveData", out: Path) -> Path:
    """lr.png: the learning rate each logged step ran with."""
    plt = require_matplotlib()
    colours = _colours([s.stage for s in data.lr])
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for s in data.lr:
        _plot_pieces(ax, s, "global_step", colours[s.stage], s.stage)
    _marks(ax, data, "global_step")
    ax.set_xlabel("global optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate schedule as it ran")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out / "lr.png")


TIME_PARTS = [("useful_s", "useful steps", "#2ca02c"), ("startup_s", "start-up", "#1f77b4"),
              ("checkpoint_s", "checkpoint writes", "#9467bd"), ("eval_s", "evaluation", "#17becf"),
              ("redone_s", "redone steps", "#d62728"), ("shutdown_s", "shut-down", "#8c564b"),
              ("other_s", "other", "#7f7f7f")]


def time_figure(acc: "Accounting", out: Path) -> Path:
    """time.png: each stage's allocated time split into its parts (stacked bars, minutes)."""
    plt = require_matplotlib()
    names = list(acc.stages)
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.6))
    left = [0.0] * len(names)
    unit, div = ("minutes", 60.0) if max((a.allocated_s for a in acc.stages.values()), default=0) > 120 else ("seconds", 1.0)
    for attr, label, colour in TIME_PARTS:
        widths = [getattr(acc.stages[n], attr) / div for n in names]
        ax.barh(names, widths, left=left, color=colour, label=label)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel(f"allocated {unit}")
    ratio = acc.total.ratio
    ax.set_title("Where the time went" + (f" (effective training time ratio {ratio:.2f})" if ratio is not None else ""))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out / "time.png")


def transfer_figure(result: "TransferResult", out: Path) -> Path:
    """transfer.png: heat map, rows = stage weights, columns = bucket evaluated on.

    Cells show the primary metric; colours compare it within its column (1 = the best
    weights for that bucket), since raw values mostly grow with n and would hide that.
    """
    plt = require_matplotlib()
    grid = [[result.value(s, b) for b in result.buckets] for s in result.stages]
    rel: list[list[float]] = [[math.nan] * len(result.buckets) for _ in result.stages]
    for j in range(len(result.buckets)):
        col = [v for row in grid if (v := row[j]) is not None]
        best = (min(col) if result.lower_is_better else max(col)) if col else None
        for i, row in enumerate(grid):
            v = row[j]
            if v is not None and best:
                rel[i][j] = v / best if result.lower_is_better else best / v
    fig, ax = plt.subplots(figsize=(1.4 * len(result.buckets) + 3, 0.6 * len(result.stages) + 1.8))
    im = ax.imshow(rel, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(result.buckets)), [f"n={b}" for b in result.buckets])
    ax.set_yticks(range(len(result.stages)), result.stages)
    finite = [r for row in rel for r in row if math.isfinite(r)]
    middle = (min(finite) + max(finite)) / 2 if finite else 1.0
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            dark = math.isfinite(rel[i][j]) and rel[i][j] > middle
            ax.text(j, i, "-" if v is None else f"{v:.3g}", ha="center", va="center",
                    color="white" if dark else "black", fontsize=8)
    ax.set_xlabel("evaluated on the validation split of bucket")
    ax.set_ylabel("final weights of stage")
    ax.set_title(f"Transfer matrix: {result.metric}")
    fig.colorbar(im, ax=ax, label="relative to the best weights for the bucket (1 = best)")
    return _save(fig, out / "transfer.png")


def sweep_metric_figure(table: "list[VariantRow]", metric: str, goal: str, out: Path) -> Path:
    """sweep_metric.png: each variant's metric after every stage (pruned variants stop where they were pruned)."""
    plt = require_matplotlib()
    stages = list(dict.fromkeys(s for r in table for s in r.stage_metrics))
    colours = _colours(stages)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(table) + 3), 4.2))
    width = 0.8 / max(1, len(stages))
    for j, st in enumerate(stages):
        xs = [i + (j - (len(stages) - 1) / 2) * width for i in range(len(table))]
        ys = [r.stage_metrics.get(st) for r in table]
        ax.bar(xs, [math.nan if y is None else y for y in ys], width=width, color=colours[st], label=f"after {st}")
    for i, r in enumerate(table):
        if r.state != "completed":
            ax.annotate(r.state, (i, 0), ha="center", va="bottom", fontsize=7, rotation=90, color="dimgray")
    ax.set_xticks(range(len(table)), [r.name for r in table], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of each variant after each stage ({goal} is best)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out / "sweep_metric.png")


def sweep_loss_points(data: "CurveData") -> tuple[list[int], list[float]]:
    """A variant's training loss across the curriculum: (global step, loss), stages end to end."""
    xs = [x for s in data.loss for x in s.global_step]
    ys = [y for s in data.loss for y in s.values]
    return xs, ys


def sweep_loss_figure(curves: "dict[str, CurveData]", out: Path) -> Path:
    """sweep_loss.png: the training loss of the given variants (best first) against the global step."""
    plt = require_matplotlib()
    colours = _colours(list(curves))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    values: list[float] = []
    for name, data in curves.items():
        for k, s in enumerate(data.loss):
            _plot_pieces(ax, s, "global_step", colours[name], name if k == 0 else "_nolegend_")
            values += s.values
    if curves:  # stage starts, from the best variant (other variants may differ when their steps do)
        for m in next(iter(curves.values())).markers:
            if m.kind == "boundary" and m.global_step:
                ax.axvline(m.global_step, color="black", linestyle="--", linewidth=0.8, alpha=0.5)
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("global optimizer step (stages end to end)")
    ax.set_ylabel("training loss")
    ax.set_title(f"Training loss of the top {len(curves)} variant(s) across the curriculum")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out / "sweep_loss.png")
