"""Local mode and the run commands without Slurm: demo, Ctrl-C then resume, status, logs, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.util import REPO, run_cli

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def graph(tmp_path: Path, data: Path, run: str, *, sleep: float = 0.0, epochs: int = 3) -> Path:
    text = (f'[run]\nname = "{run}"\ndata = "{data}"\nseed = 5\n'
            '[train]\nlr = 0.003\ncheckpoint_every = 1000\neval_samples = 1\n'
            f'[model]\ntask = "tests.tasks:SlowTask"\n[model.options]\nhidden = 8\nlayers = 1\nstep_sleep = {sleep}\n'
            f'[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = {epochs}\ninit_from = "none"\n'
            '[[stage]]\nname = "b"\nbucket = 32\nbatch_size = 2\nepochs = 1\n')
    path = tmp_path / f"{run}.toml"
    path.write_text(text)
    return path


def final_weights(tmp_path: Path, run: str, stage: str) -> dict[str, torch.Tensor]:
    ck = torch.load(tmp_path / "checkpoints" / run / stage / "final.pt", map_location="cpu", weights_only=True)
    return ck["model"] if "model" in ck else ck


def test_demo_runs_the_tiny_curriculum(tmp_path: Path) -> None:
    (tmp_path / "examples").mkdir()  # tiny.toml's paths are relative to it: ../data, ../jobs
    shutil.copy(REPO / "examples" / "tiny.toml", tmp_path / "examples" / "tiny.toml")
    proc = run_cli("demo", "-c", str(tmp_path / "examples" / "tiny.toml"), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in ("tiny_64", "tiny_128", "tiny_256"):
        assert f"completed {stage}" in proc.stdout
        assert (tmp_path / "checkpoints" / "demo" / stage / "final.pt").is_file()
    assert "results" in proc.stdout and "learned iters" in proc.stdout and "jacobi iters" in proc.stdout
    assert proc.stdout.rstrip().endswith("next:\n  progressive report demo\n  progressive status demo\n"
                                         "  progressive logs demo tiny_256")
    again = run_cli("demo", "-c", str(tmp_path / "examples" / "tiny.toml"), cwd=tmp_path, check=True)
    assert "continuing the demo run" in again.stdout and "completed tiny_64" not in again.stdout


def test_ctrl_c_checkpoints_and_resume_finishes_bitwise(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = graph(tmp_path, tiny_dataset, "interrupted", sleep=0.05, epochs=6)
    proc = subprocess.Popen([sys.executable, "-m", "progressive", "submit", "--local", "-c", str(cfg)], cwd=tmp_path,
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "jobs" / "interrupted" / "stages" / "a" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count('"event": "step"') >= 20):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "stopped a at step" in out and "progressive resume interrupted" in out
    st = json.loads(run_cli("status", "interrupted", "--json", cwd=tmp_path, check=True).stdout)["stages"]
    assert [s["state"] for s in st] == ["stopped", "not started"]
    assert st[0]["checkpoint"] and 0 < st[0]["step"] < st[0]["total_steps"]

    resumed = run_cli("resume", "interrupted", cwd=tmp_path, env=ENV)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    checkpoint_step = int(Path(st[0]["checkpoint"]).stem.split("_")[1])
    assert f"resuming a from step {checkpoint_step}\n" in resumed.stdout
    assert "resuming b from the start, initialised from checkpoints/interrupted/a/final.pt" in resumed.stdout
    finished = run_cli("resume", "interrupted", cwd=tmp_path, check=True)
    assert finished.stdout == ("nothing to resume: run interrupted is complete (2 of 2 stages)\n"
                               "next: progressive report interrupted\n")
    assert "completed a" in resumed.stdout and "completed b" in resumed.stdout
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"event": "step"' in line]
    assert steps == sorted(set(steps))  # no step was done twice

    reference = graph(tmp_path, tiny_dataset, "straight", sleep=0.0, epochs=6)
    run_cli("submit", "--local", "-c", str(reference), cwd=tmp_path, env=ENV, check=True)
    for stage in ("a", "b"):
        a, b = final_weights(tmp_path, "interrupted", stage), final_weights(tmp_path, "straight", stage)
        assert all(torch.equal(a[k], b[k]) for k in a), stage

    logs = run_cli("logs", "interrupted", "a", cwd=tmp_path, check=True).stdout
    assert "resuming" in logs and "completed" in logs


def test_submit_without_slurm_points_at_local(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = graph(tmp_path, tiny_dataset, "noslurm")
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run_cli("submit", "-c", str(cfg), cwd=tmp_path, env={"PATH": str(empty)})
    assert proc.returncode == 1
    assert "Slurm is not available" in proc.stderr and "--local" in proc.stderr
    assert not (tmp_path / "jobs" / "noslurm" / "run.json").exists()


def test_completed_stage_is_not_resubmitted(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = graph(tmp_path, tiny_dataset, "twice", epochs=1)
    run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, env=ENV, check=True)
    again = run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert again.returncode == 1
    assert "already completed in run 'twice'" in again.stderr and "--run-name" in again.stderr
    unknown = run_cli("logs", "twice", "zz", cwd=tmp_path)
    assert unknown.returncode == 1 and "no stage named 'zz' in run 'twice'" in unknown.stderr and "valid stages: a, b" in unknown.stderr
    extra = run_cli("logs", "twice", "a", "b", cwd=tmp_path)
    assert extra.returncode == 1 and "expected [RUN] STAGE" in extra.stderr
    bad_cancel = run_cli("cancel", "twice", "--stages", "a,zz", cwd=tmp_path)
    assert bad_cancel.returncode == 1 and "no stage named zz" in bad_cancel.stderr
    only_b = run_cli("submit", "--local", "-c", str(cfg), "--stages", "b", "--run-name", "twice-b", cwd=tmp_path, env=ENV)
    assert only_b.returncode == 1  # b's parent has no final weights under this run name
    assert "parent 'a' is not selected and has no final checkpoint" in only_b.stderr


def test_run_command_errors(tmp_path: Path) -> None:
    none = run_cli("status", cwd=tmp_path)
    assert none.returncode == 1 and "no runs under jobs" in none.stderr and "progressive submit" in none.stderr
    bad = run_cli("status", "../etc", cwd=tmp_path)
    assert bad.returncode == 1 and "invalid run name" in bad.stderr
    watch = run_cli("status", "--watch", "0", cwd=tmp_path)
    assert watch.returncode == 2 and "expected a positive number of seconds, got '0'" in watch.stderr
    missing = run_cli("resume", "ghost", cwd=tmp_path)
    assert missing.returncode == 1 and "no run record here" in missing.stderr


def test_local_refuses_multi_process_stages_before_recording(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = graph(tmp_path, tiny_dataset, "wide")
    cfg.write_text(cfg.read_text().replace("[train]", "[slurm]\ntasks_per_node = 2\n[train]"))
    proc = run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert proc.returncode == 1
    assert "ask for 2 processes" in proc.stderr and "tasks_per_node = 1" in proc.stderr
    assert not (tmp_path / "jobs" / "wide" / "run.json").exists()
