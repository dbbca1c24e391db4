"""The dry-run's sbatch script against the real cluster, and Slurm's refusals as the user sees them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.slurm_support import slurm_cluster, status  # noqa: F401  (fixture)
from tests.util import graph_toml, run_cli

pytestmark = pytest.mark.slurm


def test_dry_run_script_is_accepted_by_sbatch_test_only(slurm_cluster: None, tmp_path: Path) -> None:
    head = '[run]\nname = "t"\n[slurm]\ntime = "5m"\nmem = "1G"\ngpus_per_node = 1\nsignal_delay = "30s"\n'
    (tmp_path / "stages.toml").write_text(graph_toml([{"name": "a", "bucket": 16}], head=head))
    plan = json.loads(run_cli("plan", "--json", cwd=tmp_path, check=True).stdout)
    script = tmp_path / "a.sbatch"
    script.write_text(plan["stages"][0]["sbatch"])
    proc = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "to start at" in proc.stderr  # sbatch --test-only reports on stderr


def test_refused_second_stage_cancels_the_first(slurm_cluster: None, tiny_dataset: Path, tmp_path: Path) -> None:
    """No half-submitted chain: sbatch refuses stage b, so stage a (already queued) is cancelled."""
    head = (f'[run]\nname = "refused"\ndata = "{tiny_dataset}"\n[slurm]\ntime = "5m"\nmem = "1G"\n'
            '[model]\n[model.options]\nhidden = 8\nlayers = 1\n')
    stages = [{"name": "a", "bucket": 32, "epochs": 50}, {"name": "b", "bucket": 64, "partition": "nope"}]
    (tmp_path / "stages.toml").write_text(graph_toml(stages, head=head))
    proc = run_cli("submit", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.replace("\n", " ")
    assert "sbatch refused stage 'b'" in err
    assert "command: sbatch" in err
    assert "invalid partition" in err.lower()  # Slurm's own words
    assert not (tmp_path / "jobs" / "refused" / "run.json").exists()  # no record of a chain that does not exist
    # Every job of that name still known to slurmctld (MinJobAge keeps ended ones) was cancelled.
    queued = subprocess.run(["squeue", "-h", "-t", "all", "-n", "refused.a", "-o", "%i %T"], capture_output=True,
                            text=True, timeout=60).stdout.split("\n")
    assert all(line.split()[1] in ("CANCELLED", "COMPLETING") for line in queued if line.strip()), queued


def test_submit_without_data_submits_nothing(slurm_cluster: None, tmp_path: Path) -> None:
    head = '[run]\nname = "nodata"\ndata = "missing.h5"\n'
    (tmp_path / "stages.toml").write_text(graph_toml([{"name": "a", "bucket": 16}], head=head))
    proc = run_cli("submit", cwd=tmp_path)
    assert proc.returncode != 0
    assert "missing.h5" in proc.stderr and "progressive data generate" in proc.stderr
    assert not (tmp_path / "jobs").exists()


def _without_dependency(script: str) -> str:
    return "".join(line for line in script.splitlines(keepends=True) if not line.startswith("#SBATCH --dependency="))


def test_submit_sends_exactly_the_dry_run_script(slurm_cluster: None, tiny_dataset: Path, tmp_path: Path) -> None:
    """What `plan --dry-run` shows is what Slurm received, byte for byte, the dependency line aside."""
    head = (f'[run]\nname = "same"\ndata = "{tiny_dataset}"\n[slurm]\ntime = "5m"\nmem = "1G"\nsignal_delay = "30s"\n'
            'setup = ["export SAME_SCRIPT=1"]\n[model]\n[model.options]\nhidden = 8\nlayers = 1\n')
    (tmp_path / "stages.toml").write_text(graph_toml([{"name": "a", "bucket": 32, "epochs": 50},
                                                      {"name": "b", "bucket": 64}], head=head))
    shown = {s["name"]: s["sbatch"] for s in json.loads(run_cli("plan", "--json", cwd=tmp_path, check=True).stdout)["stages"]}
    dry = run_cli("plan", "--dry-run", cwd=tmp_path, check=True).stdout
    assert all(s.strip() in dry for s in shown.values())  # the dry-run prints the same text
    run_cli("submit", cwd=tmp_path, check=True)
    rec = json.loads((tmp_path / "jobs" / "same" / "run.json").read_text())
    ids = {n: s["submissions"][-1]["job_id"] for n, s in rec["stages"].items()}
    try:
        for name, job in ids.items():
            received = subprocess.run(["scontrol", "write", "batch_script", job, "-"], capture_output=True, text=True,
                                      timeout=30, check=True).stdout
            kept = (tmp_path / "jobs" / "same" / "slurm" / job / f"{job}_submission.sh").read_text()
            assert received == kept
            assert _without_dependency(received) == _without_dependency(shown[name]), name
        assert "#SBATCH --dependency=afterok:" + ids["a"] + "\n" in received  # b's line, bound to a's real id
        assert "--dependency='afterok:<a>'" in shown["b"] and "--dependency" not in shown["a"]
    finally:
        subprocess.run(["scancel", *ids.values()], capture_output=True, timeout=30)
