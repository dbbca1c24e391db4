"""Exact resume: a stage stopped or killed at arbitrary steps ends bitwise identical to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from progressive.checkpoint import latest_checkpoint
from progressive.errors import CheckpointError, ConfigError
from progressive.metrics import read_metrics
from progressive.trainer import train_stage
from tests.test_checkpoint import flip_a_tensor_byte
from tests.test_trainer_support import (
    Crash,
    StopAfter,
    assert_same_weights,
    crash_at,
    final_weights,
    make_data,
    make_plan,
    one_thread,  # noqa: F401  (autouse fixture)
    stage_toml,
)

# 19 training matrices of n=16, batches of 4, 2 micro-batches per step: steps of 2, 2 and 1
# micro-batches per epoch (the last one partial), 9 optimizer steps over 3 epochs.
TRAIN = 'grad_accum = 2\nwarmup_frac = 0.2\ncheckpoint_every = "30m"\neval_samples = 2'
STAGE = stage_toml("a", bucket=16, batch_size=4, epochs=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "m.h5")


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of the stage run without interruption (one thread, like the tests it is compared to)."""
    plan = make_plan(tmp_path_factory.mktemp("ref"), data, STAGE, train=TRAIN)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train_stage(plan, plan.stages[0])
    finally:
        torch.set_num_threads(before)
    assert out.status == "completed" and out.step == out.total_steps == 9
    return final_weights(out.checkpoint)


def step_events(path: str) -> list[int]:
    return [e["step"] for e in read_metrics(path) if e.get("event") == "step"]


def test_stopped_and_resumed_four_times_is_bitwise_identical(data: Path, tmp_path: Path,
                                                             reference: dict[str, torch.Tensor]) -> None:
    plan = make_plan(tmp_path, data, STAGE, train=TRAIN)
    stage = plan.stages[0]
    assert stage.total_steps == 9 and stage.steps_per_epoch == 3
    # Stops after steps 2 (mid epoch 0), 4 (mid epoch 1), 5 (end of epoch 1) and 8 (mid epoch 2).
    for stop_at_poll, expect in [(2, 2), (2, 4), (1, 5), (3, 8)]:
        out = train_stage(plan, stage, stop_requested=StopAfter(stop_at_poll))
        assert (out.status, out.step, out.total_steps) == ("stopped", expect, 9)
        assert out.checkpoint and Path(out.checkpoint).name == f"step_{expect:08d}.pt"
    out = train_stage(plan, stage)
    assert out.status == "completed" and out.resumed_from and out.resumed_from.endswith("step_00000008.pt")
    assert_same_weights(final_weights(out.checkpoint), reference)
    # Zero optimizer steps redone: every step was logged exactly once over the five jobs.
    assert step_events(stage.metrics_path) == list(range(1, 10))
    events = [e["event"] for e in read_metrics(stage.metrics_path)]
    assert events.count("start") == 5 and events.count("stopped") == 4 and events[-1] == "completed"


def test_killed_without_warning_resumes_from_periodic_checkpoint(data: Path, tmp_path: Path,
                                                                 reference: dict[str, torch.Tensor]) -> None:
    # Periodic saves every 2 steps, only the newest kept, a DataLoader worker prefetching ahead.
    train = TRAIN.replace('"30m"', "2") + "\nkeep_checkpoints = 1\nnum_workers = 1"
    plan = make_plan(tmp_path, data, STAGE, train=train)
    stage = plan.stages[0]
    for kill_after in (3, 7):
        with pytest.raises(Crash):
            train_stage(plan, stage, on_progress=crash_at(kill_after))
        saved = latest_checkpoint(stage.checkpoint_dir)
        assert saved is not None and saved.name == f"step_{kill_after - 1:08d}.pt"
    out = train_stage(plan, stage)
    assert out.status == "completed"
    assert_same_weights(final_weights(out.checkpoint), reference)
    assert sorted(p.name for p in Path(stage.checkpoint_dir).glob("*.pt")) == ["final.pt", "step_00000009.pt"]


def test_corrupt_newest_checkpoint_is_moved_aside_and_resume_is_bitwise(
        data: Path, tmp_path: Path, reference: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture) -> None:
    """A bad block in the newest checkpoint (its zip directory intact: torch.load alone would load wrong
    weights): resume moves it aside with a warning, starts from the older one, and ends bitwise identical."""
    plan = make_plan(tmp_path, data, STAGE, train=TRAIN)
    stage = plan.stages[0]
    for stop_at_poll in (2, 2):
        train_stage(plan, stage, stop_requested=StopAfter(stop_at_poll))
    raw = flip_a_tensor_byte(Path(stage.checkpoint_dir) / "step_00000004.pt")
    with caplog.at_level("WARNING", "progressive.checkpoint"):
        out = train_stage(plan, stage)
    assert out.status == "completed" and out.resumed_from and out.resumed_from.endswith("step_00000002.pt")
    assert_same_weights(final_weights(out.checkpoint), reference)
    assert "step_00000004.pt is corrupt" in caplog.text and "moved aside to step_00000004.pt.corrupt" in caplog.text
    assert (Path(stage.checkpoint_dir) / "step_00000004.pt.corrupt").read_bytes() == raw  # kept as it was
    assert step_events(stage.metrics_path) == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9]  # the 2 steps of the lost file, redone


def test_completed_stage_is_not_trained_again(data: Path, tmp_path: Path) -> None:
    plan = make_plan(tmp_path, data, stage_toml("a", epochs=1), train=TRAIN)
    stage = plan.stages[0]
    first = train_stage(plan, stage)
    lines = len(read_metrics(stage.metrics_path))
    again = train_stage(plan, stage)
    assert again.status == "completed" and again.step == first.step and again.metrics == first.metrics
    assert len(read_metrics(stage.metrics_path)) == lines


def test_resume_under_changed_settings_is_refused_naming_the_keys(data: Path, tmp_path: Path) -> None:
    plan = make_plan(tmp_path, data, STAGE, train=TRAIN)
    train_stage(plan, plan.stages[0], stop_requested=StopAfter(1))
    changed = make_plan(tmp_path, data, STAGE, train=TRAIN.replace("grad_accum = 2", "grad_accum = 1") + "\nlr = 0.002")
    with pytest.raises(CheckpointError) as err:
        train_stage(changed, changed.stages[0])
    text = str(err.value)
    assert "different stage settings" in text and "step_00000001.pt" in text
    assert "grad_accum: 2 -> 1" in text and "lr: 0.001 -> 0.002" in text
    assert "batch_size" not in text  # only what differs
    # Settings outside the fingerprint (how often to save, log) do not block a resume.
    relaxed = make_plan(tmp_path, data, STAGE, train=TRAIN.replace('"30m"', '"10m"') + "\nlog_every = 2")
    assert train_stage(relaxed, relaxed.stages[0]).status == "completed"


def test_world_size_unlike_the_plan_is_refused(data: Path, tmp_path: Path) -> None:
    plan = make_plan(tmp_path, data, STAGE, train=TRAIN, slurm="tasks_per_node = 2")
    with pytest.raises(ConfigError, match=r"planned for 2 process\(es\) but runs with 1"):
        train_stage(plan, plan.stages[0])


def test_metrics_lines_carry_what_status_reads(data: Path, tmp_path: Path) -> None:
    seen: list[dict] = []
    plan = make_plan(tmp_path, data, stage_toml("a", epochs=1), train=TRAIN)
    out = train_stage(plan, plan.stages[0], on_progress=seen.append)
    events = read_metrics(plan.stages[0].metrics_path)
    assert [e["event"] for e in seen] == [e["event"] for e in events]
    step = next(e for e in events if e["event"] == "step")
    assert {"step", "total_steps", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "peak_mem_mb", "time"} <= set(step)
    done = events[-1]
    assert done["event"] == "completed" and done["eval"] == out.metrics
    assert {"learned_iters", "jacobi_iters", "cg_iters", "ic0_iters", "learned_solve_s"} <= set(out.metrics or {})


def test_time_based_checkpoints_and_tensorboard_note(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import progressive.trainer as trainer

    # A zero-second interval: the duration path saves after every step (the real one is whole minutes).
    monkeypatch.setattr(trainer, "checkpoint_interval", lambda value: ("seconds", 0.0))
    plan = make_plan(tmp_path, data, stage_toml("a", epochs=1), train=TRAIN + "\ntensorboard = true\nkeep_checkpoints = 3")
    out = train_stage(plan, plan.stages[0])
    events = read_metrics(plan.stages[0].metrics_path)
    saves = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in saves] == [1, 2, 3] and saves[-1]["reason"] == "end" and out.status == "completed"
    start = events[0]
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert any("tensorboard" in note for note in start["notes"])  # said, not silently dropped
    else:
        assert (Path(plan.stages[0].metrics_path).parent / "tensorboard").is_dir()
