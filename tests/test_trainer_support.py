"""Shared helpers for the trainer, checkpoint and task tests (no tests here).

Real objects only: datasets come from the data module's generator, plans from
`parse_config` + `build_plan` with the real `bucket_counts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Iterator

import pytest
import torch

from progressive.config import parse_config
from progressive.data.format import bucket_counts
from progressive.data.generate import generate
from progressive.plan import Plan, build_plan
from progressive.tasks.precond import PreconditionerTask


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run the test with one intra-op thread (import it into a test module to apply it there)."""
    # Tiny matrices gain nothing from intra-op threads, and on a shared 2-core box OpenMP spinning
    # made steps 5-20x slower in a measurement.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_MODEL = "hidden = 8\nlayers = 2\nsketch = 4"


def make_data(path: Path, sizes: tuple[int, ...] = (16, 36), counts: tuple[int, ...] = (24, 15), seed: int = 0) -> Path:
    """A tiny Poisson dataset (2D grids) made by the real generator; reused if it exists."""
    if not path.exists():
        generate(path, sizes=list(sizes), counts=list(counts), seed=seed, workers=1)
    return path


def make_plan(folder: Path, data: Path, stages: str, *, train: str = "", model: str = TINY_MODEL,
              task: str | None = None, slurm: str = "", run: str = "", run_name: str | None = None) -> Plan:
    """A Plan from a stages.toml assembled from table bodies (written to folder/x.toml's folder)."""
    text = f'[run]\ndata = "{data}"\n{run}\n[slurm]\n{slurm}\n[train]\n{train}\n[model]\n'
    if task:
        text += f'task = "{task}"\n'
    text += f"[model.options]\n{model}\n{stages}"
    cfg = parse_config(text, source=str(folder / "x.toml"))
    return build_plan(cfg, folder / "x.toml", counts=bucket_counts, run_name=run_name)


def stage_toml(name: str, bucket: int = 16, batch_size: int = 4, epochs: int = 2, **extra: Any) -> str:
    """One [[stage]] table."""
    text = f'[[stage]]\nname = "{name}"\nbucket = {bucket}\nbatch_size = {batch_size}\nepochs = {epochs}\n'
    for key, val in extra.items():
        text += f'{key} = "{val}"\n' if isinstance(val, str) else f"{key} = {val}\n"
    return text


class StopAfter:
    """A stop_requested callable that says yes from its `k`-th poll on (polls happen after each step)."""

    def __init__(self, k: int) -> None:
        self.k, self.calls = k, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.k


class Crash(RuntimeError):
    """Raised from on_progress to simulate a job killed without a chance to checkpoint."""


def crash_at(step: int) -> Any:
    """An on_progress callback that raises Crash right after optimizer step `step` is logged."""
    def cb(event: dict[str, Any]) -> None:
        if event.get("event") == "step" and event["step"] == step:
            raise Crash(f"killed after step {step}")
    return cb


def final_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict of a final.pt."""
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise equality of every tensor (names listed on failure)."""
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ: {differ}"


class RecordingTask(PreconditionerTask):
    """The reference task, also remembering the model it trains and its weights at the first loss call."""

    first_weights: ClassVar[dict[str, torch.Tensor] | None] = None
    model: ClassVar[torch.nn.Module | None] = None
    loss_calls: ClassVar[int] = 0

    @classmethod
    def reset(cls) -> None:
        """Forget what the previous run recorded."""
        cls.first_weights, cls.model, cls.loss_calls = None, None, 0

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        cls = type(self)
        inner = getattr(model, "module", model)  # unwrap DDP
        if cls.first_weights is None:
            cls.first_weights = {k: v.detach().clone() for k, v in inner.state_dict().items()}
        cls.model = inner
        cls.loss_calls += 1
        return super().loss(model, batch, generator)


RECORDING = "tests.test_trainer_support:RecordingTask"
