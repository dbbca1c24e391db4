"""Who runs a local stage: a runner killed without warning shows as stopped and resume finishes it;
a live runner is seen as running, blocks a second runner, and `cancel` stops it with a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.test_local import ENV, final_weights, graph
from tests.util import run_cli


def _start(cfg: Path, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "progressive", "submit", "--local", "-c", str(cfg)], cwd=cwd,
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_steps(metrics: Path, n: int, proc: subprocess.Popen[str]) -> None:
    """Wait until the runner has logged `n` optimizer steps (its own progress, not a sleep)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count('"event": "step"') >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"the runner did not reach step {n}")


def _status(run: str, cwd: Path) -> list[dict]:
    return json.loads(run_cli("status", run, "--json", cwd=cwd, check=True).stdout)["stages"]


def test_sigkilled_runner_shows_stopped_and_resume_finishes_bitwise(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = graph(tmp_path, tiny_dataset, "killed", sleep=0.05, epochs=6)
    cfg.write_text(cfg.read_text().replace("checkpoint_every = 1000", "checkpoint_every = 5"))
    proc = _start(cfg, tmp_path)
    _wait_steps(tmp_path / "jobs" / "killed" / "stages" / "a" / "metrics.jsonl", 12, proc)
    proc.kill()  # SIGKILL: no handler runs, nothing is recorded
    proc.wait()

    st = _status("killed", tmp_path)
    assert [s["state"] for s in st] == ["stopped", "not started"]
    assert f"pid {proc.pid}" in st[0]["reason"] and "ended without a word" in st[0]["reason"]
    assert st[0]["checkpoint"] and st[0]["fix"] == "progressive resume killed"
    table = run_cli("status", "killed", cwd=tmp_path, check=True).stdout
    assert "stopped" in table and "running" not in table

    nothing = run_cli("cancel", "killed", cwd=tmp_path, check=True)
    assert "cancelled nothing" in nothing.stdout

    resumed = run_cli("resume", "killed", cwd=tmp_path, env=ENV)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "completed a" in resumed.stdout and "completed b" in resumed.stdout
    assert [s["state"] for s in _status("killed", tmp_path)] == ["completed", "completed"]

    reference = graph(tmp_path, tiny_dataset, "straight", sleep=0.0, epochs=6)
    run_cli("submit", "--local", "-c", str(reference), cwd=tmp_path, env=ENV, check=True)
    for stage in ("a", "b"):
        a, b = final_weights(tmp_path, "killed", stage), final_weights(tmp_path, "straight", stage)
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_live_runner_blocks_a_second_one_and_cancel_stops_it(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = graph(tmp_path, tiny_dataset, "live", sleep=0.2, epochs=6)
    proc = _start(cfg, tmp_path)
    try:
        _wait_steps(tmp_path / "jobs" / "live" / "stages" / "a" / "metrics.jsonl", 3, proc)
        st = _status("live", tmp_path)
        assert st[0]["state"] == "running" and st[0]["job_id"] == f"pid {proc.pid}"

        again = run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, env=ENV)
        assert again.returncode == 1 and "still has live jobs: a" in again.stderr
        second = run_cli("resume", "live", cwd=tmp_path, env=ENV)
        assert second.returncode == 1 and "is running right now" in second.stderr and "progressive cancel live" in second.stderr

        cancelled = run_cli("cancel", "live", cwd=tmp_path, check=True)
        assert f"cancelled pid {proc.pid}" in cancelled.stdout
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert "stopped a at step" in out
    st = _status("live", tmp_path)
    assert st[0]["state"] == "stopped" and st[0]["checkpoint"] and st[0]["reason"] == ""


def test_a_reused_pid_is_not_the_runner(tmp_path: Path) -> None:
    from progressive.backends.local import runner_alive, this_runner

    me = this_runner()
    assert runner_alive(me) is True
    assert runner_alive(me.model_copy(update={"start_ticks": (me.start_ticks or 0) + 1})) is False  # same pid, other process
    assert runner_alive(me.model_copy(update={"boot_id": "another-boot"})) is False
    assert runner_alive(me.model_copy(update={"host": "elsewhere"})) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert runner_alive(me.model_copy(update={"pid": child.pid, "start_ticks": None})) is False
    zombie = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # killed, not reaped yet: a zombie is not a runner
        state = Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.05)
    assert runner_alive(me.model_copy(update={"pid": zombie.pid, "start_ticks": None})) is False
    zombie.wait()
