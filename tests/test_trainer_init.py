"""Curriculum init: a stage starts from its parent's final weights (fresh optimizer), or a file, or a seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from progressive.checkpoint import load_checkpoint
from progressive.errors import CheckpointError
from progressive.tasks.precond import PrecondGNN
from progressive.trainer import get_lr, train_stage
from tests.test_trainer_support import (
    RECORDING,
    RecordingTask,
    StopAfter,
    assert_same_weights,
    final_weights,
    make_data,
    make_plan,
    one_thread,  # noqa: F401  (autouse fixture)
    stage_toml,
)

TRAIN = 'checkpoint_every = "30m"\neval_samples = 1\nwarmup_frac = 0.3'


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "m.h5")


def test_child_starts_from_parent_final_weights_with_fresh_optimizer(data: Path, tmp_path: Path) -> None:
    stages = stage_toml("small", bucket=16, epochs=1) + stage_toml("big", bucket=36, batch_size=3, epochs=2)
    plan = make_plan(tmp_path, data, stages, train=TRAIN, task=RECORDING)
    small, big = plan.stages
    assert big.init_from.kind == "stage" and big.init_from.checkpoint == small.final_checkpoint
    RecordingTask.reset()
    assert train_stage(plan, small).status == "completed"
    parent = final_weights(small.final_checkpoint)
    RecordingTask.reset()
    out = train_stage(plan, big, stop_requested=StopAfter(1))
    assert RecordingTask.first_weights is not None
    assert_same_weights(RecordingTask.first_weights, parent)  # bitwise the parent's weights
    state = load_checkpoint(out.checkpoint)
    # A fresh AdamW (one step of moments, not the parent's) and the schedule restarted at its step 0.
    assert all(int(s["step"]) == 1 for s in state["optimizer"]["state"].values())
    lr0 = get_lr(0, big.total_steps, 0.3, 1e-3, 0.1)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr0) and lr0 < 1e-3


def test_root_stage_init_is_seeded(data: Path, tmp_path: Path) -> None:
    weights = []
    for run in ("r1", "r2"):
        RecordingTask.reset()
        plan = make_plan(tmp_path, data, stage_toml("a", epochs=1), train=TRAIN, task=RECORDING, run_name=run)
        train_stage(plan, plan.stages[0], stop_requested=StopAfter(1))
        weights.append(RecordingTask.first_weights)
    assert_same_weights(weights[0], weights[1])


def test_init_from_a_checkpoint_path(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    mine = PrecondGNN(hidden=8, layers=2)
    torch.save(mine.state_dict(), tmp_path / "mine.pt")  # a user's plain state_dict
    plan = make_plan(tmp_path, data, stage_toml("a", epochs=1, init_from="mine.pt"), train=TRAIN, task=RECORDING)
    assert plan.stages[0].init_from.kind == "path"
    RecordingTask.reset()
    train_stage(plan, plan.stages[0], stop_requested=StopAfter(1))
    assert_same_weights(RecordingTask.first_weights or {}, mine.state_dict())


def test_missing_parent_weights_is_a_clear_error(data: Path, tmp_path: Path) -> None:
    stages = stage_toml("small", epochs=1) + stage_toml("big", bucket=36, batch_size=3, epochs=1)
    plan = make_plan(tmp_path, data, stages, train=TRAIN)
    with pytest.raises(CheckpointError, match="parent stage 'small' has no final checkpoint") as err:
        train_stage(plan, plan.stages[1])
    assert "run the parent stage to completion first" in str(err.value)
    missing = make_plan(tmp_path, data, stage_toml("a", init_from="gone/w.pt"), train=TRAIN)
    with pytest.raises(CheckpointError, match="init_from file not found"):
        train_stage(missing, missing.stages[0])


def test_shape_mismatch_names_the_tensors(data: Path, tmp_path: Path) -> None:
    torch.save(PrecondGNN(hidden=16, layers=3).state_dict(), tmp_path / "wide.pt")
    plan = make_plan(tmp_path, data, stage_toml("a", init_from="wide.pt"), train=TRAIN)  # hidden 8, 2 layers
    with pytest.raises(CheckpointError) as err:
        train_stage(plan, plan.stages[0])
    text = str(err.value)
    assert "encode.weight: checkpoint (16, 4) vs model (8, 4)" in text
    assert "not in the model: nb_lin.2.weight, self_lin.2.bias, self_lin.2.weight" in text
    assert "wide.pt" in text and "[model.options]" in text
