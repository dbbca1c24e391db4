"""Test-only tasks, plugged in through stages.toml like any user's task (`task = "tests.tasks:SlowTask"`).

They change how long a step takes or whether a stage fails, never the numbers: a stage
trained with SlowTask ends with the same weights as with PreconditionerTask.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from progressive.tasks.precond import PreconditionerTask
from progressive.tasks.seqlm import SequenceLMTask


class SlowTask(PreconditionerTask):
    """The reference task with a pause in every loss call, so a tiny stage outlasts a short time limit."""

    def __init__(self, step_sleep: float = 0.1, **options: Any) -> None:
        super().__init__(**options)
        self.step_sleep = step_sleep

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        time.sleep(self.step_sleep)
        return super().loss(model, batch, generator)


class FlakyTask(SlowTask):
    """Fails (raises) on a bucket while the file `fail_marker.format(n=bucket)` exists.

    The test switches the failure off by deleting the file, then resumes.
    """

    def __init__(self, fail_marker: str = "", **options: Any) -> None:
        super().__init__(**options)
        self.fail_marker = fail_marker

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        marker = Path(self.fail_marker.format(n=batch.sizes[0])) if self.fail_marker else None
        if marker is not None and marker.exists():
            raise RuntimeError(f"injected failure: {marker} exists")
        return super().loss(model, batch, generator)


class SlowSequenceLMTask(SequenceLMTask):
    """The sequence task with a pause in every loss call (same weights as SequenceLMTask)."""

    def __init__(self, step_sleep: float = 0.1, **options: Any) -> None:
        super().__init__(**options)
        self.step_sleep = step_sleep

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        time.sleep(self.step_sleep)
        return super().loss(model, batch, generator)


class RankFailTask(SlowTask):
    """Rank `fail_rank` alone raises at its `fail_at`-th loss call while the file `fail_marker` exists.

    Models one process of a multi-node job dying (the other ranks are healthy and sit in
    the next collective); the test deletes the file, then resumes.
    """

    def __init__(self, fail_marker: str = "", fail_rank: int = 1, fail_at: int = 1, **options: Any) -> None:
        super().__init__(**options)
        self.fail_marker = fail_marker
        self.fail_rank = fail_rank
        self.fail_at = fail_at
        self.calls = 0

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        rank = int(os.environ.get("RANK", "0"))
        if rank == self.fail_rank and self.calls >= self.fail_at and self.fail_marker and Path(self.fail_marker).exists():
            raise RuntimeError(f"injected failure on rank {rank} at loss call {self.calls}: {self.fail_marker} exists")
        return super().loss(model, batch, generator)
