"""`progressive calibrate` on the real Slurm test cluster: one calibration job per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.slurm_support import slurm_cluster  # noqa: F401
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
