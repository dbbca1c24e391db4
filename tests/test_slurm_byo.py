"""On the real test cluster: tasks that own their data, cut by the time limit, requeued, bitwise equal to local.

- tests/byo_task.py (outside the package, its own numpy token files): `data index`, plan with
  real counts, a 1-minute job that requeues itself, the same weights as `submit --local`.
- the built-in sequence task on generated sequences: a 2-stage length curriculum whose first
  stage requeues, both stages bitwise equal to a local run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from progressive.data.seqgen import generate_sequences
from tests.byo_task import write_token_files
from tests.slurm_support import ended, slurm_cluster, slurm_jobs, wait_for  # noqa: F401
from tests.test_slurm_run import REQUEUED_STAGE, assert_no_step_redone, events, weights
from tests.util import REPO, run_cli

pytestmark = pytest.mark.slurm

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
SLURM = 'cpus_per_task = 1\nmem = "1G"\ntime = "1m"\nsignal_delay = "20s"\nmax_requeues = 20\n'


def graph(folder: Path, run: str, data: Path, task: str, options: str, stages: str) -> Path:
    path = folder / f"{run}.toml"
    path.write_text(f'[run]\nname = "{run}"\ndata = "{data}"\nseed = 2\n[slurm]\n{SLURM}'
                    f'[train]\nlr = 0.003\ncheckpoint_every = 1000\neval_samples = 4\n'
                    f'[model]\ntask = "{task}"\n[model.options]\n{options}\n{stages}')
    return path


def stage(name: str, bucket: int, batch_size: int, epochs: int, first: bool = False) -> str:
    return (f'[[stage]]\nname = "{name}"\nbucket = {bucket}\nbatch_size = {batch_size}\nepochs = {epochs}\n'
            + ('init_from = "none"\n' if first else ""))


def run_both(tmp_path: Path, data: Path, task: str, options: str, stages: str, slow: str) -> dict[str, dict]:
    """Submit to Slurm (slow steps, 1-minute limit) and run the same graph locally; return Slurm's status."""
    cfg = graph(tmp_path, "cluster", data, task, f"{options}\n{slow}", stages)
    proc = run_cli("submit", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    local = graph(tmp_path, "local", data, task, options, stages)
    proc = run_cli("submit", "--local", "-c", str(local), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = tmp_path / "jobs"
    # Requeued jobs start again when Slurm makes them eligible (cred_expire + 1 s), never released earlier.
    done = wait_for(lambda: ended("cluster", jobs), REQUEUED_STAGE, "the Slurm run's jobs to end")
    return done


def assert_same_as_local(tmp_path: Path, done: dict[str, dict]) -> None:
    for name, st in done.items():
        assert st["state"] == "completed", done
        assert_no_step_redone(tmp_path / "jobs" / "cluster" / "stages" / name / "metrics.jsonl")
        a, b = weights(st["final_checkpoint"]), weights(tmp_path / "checkpoints" / "local" / name / "final.pt")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f"{name}: weights differ"


def test_task_outside_the_package_plans_trains_and_requeues_bitwise(slurm_cluster: None, slurm_jobs: Path,
                                                                    tmp_path: Path) -> None:
    data = write_token_files(tmp_path / "tokens")
    task = "tests.byo_task:TokenFileTask"
    stages = stage("long", 64, 4, 6, first=True)  # 68 sequences: 17 steps per epoch, 102 steps
    cfg = graph(tmp_path, "cluster", data, task, "step_sleep = 0.6", stages)
    run_cli("data", "index", "-c", str(cfg), cwd=tmp_path, env=ENV, check=True)
    plan = json.loads(run_cli("plan", "-c", str(cfg), "--json", cwd=tmp_path, env=ENV, check=True).stdout)
    assert plan["data_error"] is None and plan["stages"][0]["total_steps"] == 102

    done = run_both(tmp_path, data, task, "", stages, "step_sleep = 0.6")
    assert done["long"]["requeues"] >= 1, done  # really cut by the time limit
    starts = [e for e in events(tmp_path / "jobs" / "cluster" / "stages" / "long" / "metrics.jsonl")
              if e.get("event") == "start"]
    assert len(starts) >= 2 and all(s["resumed_from"] for s in starts[1:])
    assert_same_as_local(tmp_path, done)


def test_sequence_curriculum_chain_requeues_bitwise(slurm_cluster: None, slurm_jobs: Path, tmp_path: Path) -> None:
    data = tmp_path / "seq"
    generate_sequences(data, lengths=[32, 64], counts=[100, 20], seed=1)
    stages = stage("seq_32", 32, 4, 4, first=True) + stage("seq_64", 64, 4, 1)  # 80 train: 80 + 4 steps
    options = "vocab = 16\nd_model = 32\nlayers = 2\nheads = 2\nmax_len = 64"
    done = run_both(tmp_path, data, "tests.tasks:SlowSequenceLMTask", options, stages, "step_sleep = 0.8")
    assert done["seq_32"]["requeues"] >= 1, done
    start = next(e for e in events(tmp_path / "jobs" / "cluster" / "stages" / "seq_64" / "metrics.jsonl")
                 if e.get("event") == "start")
    assert start["init_from"] == done["seq_32"]["final_checkpoint"]
    assert_same_as_local(tmp_path, done)
