"""The trainer's pure helpers: learning-rate schedule, micro-batch accounting, data position, intervals."""

from __future__ import annotations

import math

import pytest

from progressive.plan import steps_per_epoch
from progressive.trainer import checkpoint_interval, data_position, get_lr, micro_batch_sizes


def test_get_lr_warmup_then_cosine_to_the_floor() -> None:
    total, lr, floor = 100, 1e-3, 0.1
    lrs = [get_lr(s, total, 0.1, lr, floor) for s in range(total)]
    assert lrs[0] == pytest.approx(lr / 11) and lrs[9] == pytest.approx(lr * 10 / 11)  # 10 warmup steps
    assert lrs[10] == pytest.approx(lr)  # the peak right after warmup
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(lr * (floor + (1 - floor) * 0.5))  # half way through the cosine
    assert lrs[-1] > lr * floor and get_lr(total, total, 0.1, lr, floor) == pytest.approx(lr * floor)


def test_get_lr_without_warmup_and_tiny_stages() -> None:
    assert get_lr(0, 10, 0.0, 1.0, 0.0) == 1.0
    assert get_lr(0, 1, 0.05, 1.0, 0.5) == 1.0  # one step: no warmup step, starts at the peak
    assert math.isfinite(get_lr(5, 1, 0.0, 1.0, 0.0))


@pytest.mark.parametrize("n,world,bs,ga", [(19, 1, 4, 2), (19, 2, 4, 1), (100, 3, 7, 3), (5, 1, 8, 4), (8, 2, 2, 2)])
def test_micro_batches_cover_each_rank_exactly_once_in_plan_steps(n: int, world: int, bs: int, ga: int) -> None:
    per_rank = math.ceil(n / world)
    spe = steps_per_epoch(n, bs, world, ga)
    steps = [micro_batch_sizes(per_rank, bs, ga, s) for s in range(spe)]
    assert sum(map(sum, steps)) == per_rank
    assert all(len(s) == ga and all(x == bs for x in s) for s in steps[:-1])  # only the last step is short
    assert all(0 < x <= bs for s in steps for x in s)
    with pytest.raises(ValueError):
        micro_batch_sizes(per_rank, bs, ga, spe)
    # The data position after k steps is where the sampler must restart.
    for k in range(spe):
        assert data_position(k, spe, bs, ga) == (0, sum(map(sum, steps[:k])))
    assert data_position(spe, spe, bs, ga) == (1, 0)


def test_checkpoint_interval_steps_or_duration() -> None:
    assert checkpoint_interval(50) == ("steps", 50.0)
    assert checkpoint_interval("30m") == ("seconds", 1800.0)
    assert checkpoint_interval("1h30m") == ("seconds", 5400.0)
