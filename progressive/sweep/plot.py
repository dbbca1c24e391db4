"""The sweep's comparison plot: the metric per variant, and the loss curves of the best variants.

matplotlib is optional (the `report` extra); `write_plot` raises ImportError naming the extra
when it is missing. Written atomically to jobs/<sweep>/comparison.png.
"""

from __future__ import annotations

from pathlib import Path

from progressive import atomic, record
from progressive.sweep.record import SweepRecord

PLOT_FILE = "comparison.png"
TOP = 4  # loss curves shown


def write_plot(rec: SweepRecord) -> Path:
    """Draw the comparison plot; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # jobs and login nodes have no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the comparison plot needs matplotlib: pip install 'progressive[report]'") from None
    from progressive.metrics import read_metrics
    from progressive.sweep.summary import rows

    table = rows(rec)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r.name for r in table]
    finals = [r.final_metric if r.final_metric is not None else float("nan") for r in table]
    colours = ["tab:purple" if r.state == "pruned" else "tab:blue" if r.final_metric is not None else "tab:gray" for r in table]
    ax1.bar(names, finals, color=colours)
    for i, r in enumerate(table):
        if r.state == "pruned" and r.pruned_metric_stage() is not None:
            ax1.annotate(f"pruned\n{r.pruned_metric_stage():.3g}", (i, 0), ha="center", va="bottom", fontsize=7)
    ax1.set_title(f"{rec.metric} of each variant ({rec.goal} is best; purple: pruned)")
    ax1.tick_params(axis="x", rotation=60, labelsize=7)
    done = [r for r in table if r.final_metric is not None]
    done.sort(key=lambda r: float(r.final_metric or 0.0) * (1 if rec.goal == "min" else -1))
    for r in done[:TOP]:
        run = record.load(rec.run_dir(r.name))
        xs: list[int] = []
        ys: list[float] = []
        offset = 0
        for st in run.plan.stages:
            steps = [e for e in read_metrics(st.metrics_path) if e.get("event") == "step"]
            xs += [offset + int(e["step"]) for e in steps]
            ys += [float(e["loss"]) for e in steps]
            offset += int(st.total_steps or (steps[-1]["step"] if steps else 0))
        ax2.plot(xs, ys, label=f"{r.name} ({r.final_metric:.3g})")
    ax2.set_title(f"training loss of the top {min(TOP, len(done))} (stages end to end)")
    ax2.set_xlabel("optimizer step")
    ax2.set_yscale("log")
    if done:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    out = Path(rec.sweep_dir) / PLOT_FILE
    with atomic.replacing(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
