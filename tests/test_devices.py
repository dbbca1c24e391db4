"""Devices, precision and numerics: the rules that decide where and how a rank trains (issue 19).

The rules are pure functions of what they decide on (the plan's request, the GPUs Slurm made
visible, the checkpoint's precision), so they are tested here without a GPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from progressive.config import parse_config
from progressive.devices import keep_precision, pick_device, resolve_precision
from progressive.errors import CheckpointError, ConfigError

STAGE = '[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = 1\n'


# --------------------------------------------------------------------------- which device


def test_a_cpu_stage_trains_on_the_cpu_even_where_gpus_are_visible() -> None:
    assert pick_device(0, 1, 0, visible=8) == "cpu"
    assert pick_device(0, 4, 3, visible=8, require_gpu=True) == "cpu"


def test_one_gpu_bound_per_task_is_device_zero_for_every_rank() -> None:
    # --gpus-per-task=1 / --gpu-bind=single:1: each task sees one GPU, whatever its local rank.
    assert [pick_device(4, 4, rank, visible=1) for rank in range(4)] == ["cuda:0"] * 4


def test_all_gpus_visible_each_rank_takes_its_local_index() -> None:
    assert [pick_device(4, 4, rank, visible=4) for rank in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_fewer_gpus_visible_than_ranks_is_one_clear_error() -> None:
    with pytest.raises(ConfigError) as exc:
        pick_device(4, 4, 3, visible=2)
    assert "local rank 3 sees 2 GPUs, fewer than the 4 tasks on its node" in exc.value.msg
    assert "gpus_per_node = tasks_per_node" in (exc.value.hint or "")


def test_a_gpu_stage_without_a_gpu_fails_in_a_slurm_job_and_warns_locally(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError) as exc:
        pick_device(2, 2, 0, visible=0, require_gpu=True)
    assert exc.value.msg == "the stage asks for 2 GPU(s) per node but this task sees none"
    assert "progressive doctor --gpu" in (exc.value.hint or "")
    with caplog.at_level("WARNING"):
        assert pick_device(2, 2, 0, visible=0) == "cpu"
    assert "none is visible: training on the CPU" in caplog.text


def test_more_tasks_than_gpus_per_node_is_a_config_error_naming_the_stage() -> None:
    text = f"[slurm]\ngpus_per_node = 2\ntasks_per_node = 4\n{STAGE}"
    with pytest.raises(ConfigError) as exc:
        parse_config(text, source="s.toml")
    assert "stage 'a' runs 4 tasks per node on 2 GPU(s) per node: each task needs a GPU of its own" in str(exc.value)
    assert "set tasks_per_node = 2 (one rank per GPU), or gpus_per_node = 4" in str(exc.value)
    # a per-stage override is what counts, and CPU stages (gpus_per_node = 0) may run any number of tasks
    parse_config(f"[slurm]\ngpus_per_node = 2\ntasks_per_node = 4\n{STAGE}tasks_per_node = 2\n", source="s.toml")
    parse_config(f"[slurm]\ntasks_per_node = 4\n{STAGE}", source="s.toml")


# --------------------------------------------------------------------------- which precision


def test_auto_precision_follows_the_gpu_and_cpu_trains_in_fp32() -> None:
    assert resolve_precision("auto", "cuda", bf16_supported=True) == "bf16"
    assert resolve_precision("auto", "cuda", bf16_supported=False) == "fp16"
    assert resolve_precision("auto", "cpu", bf16_supported=False) == "fp32"
    assert resolve_precision("bf16", "cpu", bf16_supported=False) == "fp32"
    with pytest.raises(ConfigError) as exc:
        resolve_precision("bf16", "cuda", bf16_supported=False)
    assert exc.value.msg == 'precision = "bf16" but this GPU has no native bf16'


def test_a_requeue_onto_another_gpu_model_keeps_the_stages_precision() -> None:
    # Started in fp16 on a V100, requeued onto an A100 (auto would now say bf16): stays fp16 (its GradScaler too).
    assert keep_precision("fp16", "bf16", "cuda", True, "ck.pt") == "fp16"
    assert keep_precision("bf16", "bf16", "cuda", True, "ck.pt") == "bf16"
    assert keep_precision(None, "bf16", "cuda", True, "ck.pt") == "bf16"  # a file from before precision was kept
    assert keep_precision("fp32", "bf16", "cuda", True, "ck.pt") == "fp32"


def test_a_bf16_stage_requeued_onto_a_gpu_without_bf16_is_refused_with_the_way_out() -> None:
    with pytest.raises(CheckpointError) as exc:
        keep_precision("bf16", "fp16", "cuda", False, "ck/step_00000004.pt")
    assert exc.value.msg == "the stage trained in bf16 but this GPU has no native bf16"
    assert exc.value.loc == "ck/step_00000004.pt"
    assert "[slurm] constraint" in (exc.value.hint or "")
    with pytest.raises(CheckpointError, match="the stage trained in fp16 but this job runs on cpu"):
        keep_precision("fp16", "fp32", "cpu", False, "ck.pt")


# --------------------------------------------------------------------------- numerics


def test_tf32_is_off_unless_asked_and_deterministic_turns_on_deterministic_algorithms() -> None:
    # In a fresh process: use_deterministic_algorithms is process-wide.
    code = (
        "import os, torch\n"
        "from progressive.config import TrainConfig\n"
        "from progressive.devices import set_numerics\n"
        "set_numerics(torch.device('cpu'), TrainConfig())\n"
        "print(torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,\n"
        "      torch.are_deterministic_algorithms_enabled(), os.environ.get('CUBLAS_WORKSPACE_CONFIG'))\n"
        "set_numerics(torch.device('cpu'), TrainConfig(tf32=True, deterministic=True))\n"
        "print(torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,\n"
        "      torch.are_deterministic_algorithms_enabled(), os.environ.get('CUBLAS_WORKSPACE_CONFIG'),\n"
        "      torch.backends.cudnn.benchmark)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines() == ["highest False False None", "high True True :4096:8 False"]


def test_deterministic_exports_cublas_workspace_in_the_job_script(tmp_path: Path) -> None:
    from progressive.backends.slurm import render_script
    from progressive.plan import build_plan

    def script(train: str) -> str:
        cfg = parse_config(f'[run]\ndata = "d.h5"\n[slurm]\ngpus_per_node = 1\n[train]\n{train}\n{STAGE}',
                           source=str(tmp_path / "s.toml"))
        plan = build_plan(cfg, tmp_path / "s.toml", counts=lambda _: {16: {"train": 8, "val": 1, "test": 1}})
        return render_script(plan, plan.stages[0])

    assert "export CUBLAS_WORKSPACE_CONFIG=:4096:8\n" in script("deterministic = true")
    assert "CUBLAS_WORKSPACE_CONFIG" not in script("")


# --------------------------------------------------------------------------- the trainer keeps its precision


def test_checkpoints_record_the_precision_and_a_resume_that_cannot_keep_it_is_refused(tmp_path: Path) -> None:
    from progressive.checkpoint import load_checkpoint, save_atomic
    from progressive.trainer import train_stage
    from tests.test_trainer_support import StopAfter, make_data, make_plan, stage_toml

    data = make_data(tmp_path / "m.h5")
    plan = make_plan(tmp_path, data, stage_toml("a", bucket=16, batch_size=4, epochs=2))
    out = train_stage(plan, plan.stages[0], stop_requested=StopAfter(1), device="cpu")
    raw = load_checkpoint(out.checkpoint or "")
    assert raw["precision"] == "fp32"
    # As if the stage had started in fp16 on a GPU and were now requeued onto a CPU-only node.
    save_atomic({**raw, "precision": "fp16"}, out.checkpoint or "")
    with pytest.raises(CheckpointError) as exc:
        train_stage(plan, plan.stages[0], device="cpu")
    assert exc.value.msg == "the stage trained in fp16 but this job runs on cpu"
    assert exc.value.loc == out.checkpoint


def test_the_grad_scalers_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """fp16 training's GradScaler (CPU has one too): its scale and growth tracker survive save + load."""
    from progressive.checkpoint import load_checkpoint, save_atomic
    from progressive.data.loader import ResumableSampler
    from progressive.train_state import StageIdentity, StateCheckpoint, TrainParts, TrainState

    def parts(scaler: torch.amp.GradScaler) -> TrainParts:
        model = torch.nn.Linear(3, 1)
        return TrainParts(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler,
                          sampler=ResumableSampler(8, seed=0), loss_gen=torch.Generator().manual_seed(0))

    before = parts(torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3))
    for _ in range(4):  # three finite steps grow the scale once, the fourth counts toward the next growth
        before.scaler.scale(before.model(torch.ones(1, 3)).sum()).backward()
        before.scaler.step(before.optimizer)
        before.scaler.update()
    ident = StageIdentity(stage="a", fingerprint={}, total_steps=9, train_samples=8, world_size=1)
    ck = before.capture(ident, TrainState(step=4), [before.rng_state()], precision="fp16")
    save_atomic(ck.to_dict(), tmp_path / "step.pt")
    loaded = StateCheckpoint.from_dict(load_checkpoint(tmp_path / "step.pt"), tmp_path / "step.pt")
    assert loaded.precision == "fp16" and loaded.scaler is not None
    after = parts(torch.amp.GradScaler("cpu"))
    after.restore(loaded, rank=0, position=(0, 0), path=tmp_path / "step.pt")
    assert after.scaler.get_scale() == before.scaler.get_scale() == 2048.0
    assert after.scaler.state_dict() == before.scaler.state_dict()
