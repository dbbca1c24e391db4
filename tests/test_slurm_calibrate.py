"""`progressive calibrate` on the real Slurm test cluster: one calibration job per stage."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from progressive.backends.slurm import query
from tests.slurm_support import slurm_cluster, wait_for  # noqa: F401
from tests.util import REPO, run_cli

pytestmark = pytest.mark.slurm

ENV = {"PYTHONPATH": str(REPO)}


def test_one_calibration_job_per_stage_writes_the_file(slurm_cluster: None, tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cal.toml"
    cfg.write_text(f'[run]\nname = "slurmcal"\ndata = "{tiny_dataset}"\nseed = 2\n'
                   '[slurm]\ncpus_per_task = 1\nmem = "1G"\ntime = "5m"\nsignal_delay = "20s"\nmax_requeues = 2\n'
                   '[train]\neval_samples = 1\n[model]\n[model.options]\nhidden = 8\nlayers = 1\n'
                   '[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = 2\ninit_from = "none"\n'
                   # fake GPUs: Slurm schedules it, the measurement runs on CPU, and plan must notice
                   '[[stage]]\nname = "b"\nbucket = 32\nbatch_size = 2\nepochs = 1\ngpus_per_node = 1\n')
    proc = run_cli("calibrate", "-c", str(cfg), "--steps", "3", "--warmup", "1", "--min-seconds", "0", "--time-limit", "3m",
                   cwd=tmp_path, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "calibration job" in proc.stdout and "completed" in proc.stdout

    run_dir = tmp_path / "jobs" / "slurmcal"
    doc = json.loads((run_dir / "calibration.json").read_text())
    assert set(doc["stages"]) == {"a", "b"}
    assert doc["stages"]["a"]["step_s"]["n"] == 3 and doc["stages"]["a"]["threads"] == 1  # SLURM_CPUS_PER_TASK
    scripts = {p.read_text() for p in (run_dir / "calibration").glob("*/*_submission.sh")}
    assert len(scripts) == 2
    for text in scripts:
        assert "#SBATCH --mem=1024M" in text and "#SBATCH --time=3" in text and "--requeue" not in text
    assert sum("#SBATCH --gpus-per-node=1" in t for t in scripts) == 1

    plan = json.loads(run_cli("plan", "-c", str(cfg), "--json", cwd=tmp_path, env=ENV, check=True).stdout)
    by_name = {s["name"]: s for s in plan["stages"]}
    assert by_name["a"]["estimate_source"] == "calibration" and by_name["a"]["segments"] == 1
    assert by_name["b"]["calibration"] == "stale"
    assert 'device "cpu" -> "cuda"' in by_name["b"]["notes"][0]


def test_ctrl_c_cancels_the_calibration_jobs(slurm_cluster: None, tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "slow.toml"
    cfg.write_text(f'[run]\nname = "slowcal"\ndata = "{tiny_dataset}"\n'
                   '[slurm]\ncpus_per_task = 1\nmem = "1G"\ntime = "5m"\n'
                   '[model]\ntask = "tests.tasks:SlowTask"\n[model.options]\nhidden = 8\nlayers = 1\nstep_sleep = 20\n'
                   '[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = 1\ninit_from = "none"\n')
    proc = subprocess.Popen([sys.executable, "-m", "progressive", "calibrate", "-c", str(cfg), "--time-limit", "4m"],
                            cwd=tmp_path, env={**os.environ, **ENV, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as from a terminal: a background shell would hand SIGINT down ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    job_id = None
    assert proc.stdout is not None
    for line in proc.stdout:  # the job is in Slurm's hands once calibrate says it runs
        m = re.search(r"job (\d+) running", line)
        if m:
            job_id = m.group(1)
            break
    assert job_id, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err, out + err

    def cancelled() -> bool:
        info = query([job_id]).get(job_id)
        return info is not None and info.state == "cancelled"

    wait_for(cancelled, 60, f"Slurm to record job {job_id} cancelled")
    assert not (tmp_path / "jobs" / "slowcal" / "calibration.json").exists()
