"""Successive halving at a stage boundary: which variants go on. Pure; the jobs and the local runner call it."""

from __future__ import annotations

import math
from typing import Mapping, Optional


def decide(metrics: Mapping[str, Optional[float]], keep: float, goal: str) -> tuple[list[str], dict[str, Optional[float]]]:
    """Keep the best ceil(keep * n) of the n variants that ran the stage (at least one); prune the rest.

    A variant without a metric (its stage failed or was cancelled) is never kept. Ties are broken
    by name, so the decision is reproducible. Returns (kept names, {pruned name: its metric}).
    """
    n_keep = max(1, math.ceil(keep * len(metrics) - 1e-9))
    scored = sorted(((m, name) for name, m in metrics.items() if m is not None and math.isfinite(m)),
                    key=lambda t: (t[0] if goal == "min" else -t[0], t[1]))
    kept = [name for _, name in scored[:n_keep]]
    return kept, {name: m for name, m in sorted(metrics.items()) if name not in kept}
