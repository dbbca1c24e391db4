"""Runs on the real single-node Slurm cluster: chains, time-limit requeues, failure, cancel, resume, DDP.

No mocks: the CLI submits through submitit to the cluster started by scripts/slurm-up.sh,
the jobs train the reference task on real HDF5 data, and the tests read what a user
reads (status --json, logs, checkpoints, metrics).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from progressive.metrics import read_metrics
from tests.slurm_support import (accounting_off, ended, slurm_cluster, slurm_jobs, squeue_state,  # noqa: F401
                                 status, wait_for)
from tests.util import REPO, run_cli

pytestmark = pytest.mark.slurm

# Timeouts of waits for a real Slurm state: generous, since they only bound how long a broken run takes
# to fail. On a loaded 2-core machine a job start (python, torch, submitit, data) alone can take 20 s+,
# and a requeued job waits cred_expire + 1 = 11 s before it may start again.
START = 300  # a queued job to start and log its first steps
STAGE = 600  # a short stage (or chain of short stages) to run to its end
REQUEUED_STAGE = 1500  # a stage cut by its time limit a few times, each requeue waiting ~11 s

# Time-limit tests use 2-minute jobs. slurmctld checks time limits every 30 s and sends the pre-timeout
# signal at the first check within signal_delay + 30 s of the limit: with time = 2m and signal_delay = 20s
# a job gets it 70 to 100 s after it starts. (With 1-minute jobs it came 10 to 40 s after the start, in
# practice 19 s after each requeued start, since the requeue itself happens at a check and the job is
# eligible 11 s later: a loaded machine spent most of that starting Python and torch, and a stage could
# use up its requeues without progress.) So a stage with more than 2 x 100 s of steps is cut at least twice.
LIMIT = '"2m"'

# Jobs import tests.tasks: sbatch exports the submitting environment, PYTHONPATH included.
ENV = {"PYTHONPATH": str(REPO)}


SLURM_DEFAULTS = {"cpus_per_task": "1", "mem": '"1G"', "time": '"5m"', "signal_delay": '"20s"', "max_requeues": "8"}


def write_graph(tmp_path: Path, data: Path, run: str, stages: str, *, task: str = "tests.tasks:SlowTask",
                options: str = "step_sleep = 0.0", slurm: dict[str, str] | None = None, tables: str = "") -> Path:
    """A stage graph for these tests: tiny model, 1 CPU, 1 GB, 5-minute jobs unless `slurm` says otherwise;
    `tables` adds whole tables (e.g. [tracking.wandb])."""
    slurm_table = "".join(f"{k} = {v}\n" for k, v in {**SLURM_DEFAULTS, **(slurm or {})}.items())
    text = (f'[run]\nname = "{run}"\ndata = "{data}"\nseed = 3\n'
            f'[slurm]\n{slurm_table}'
            f'[train]\nlr = 0.003\ncheckpoint_every = 50\neval_samples = 1\n{tables}\n'
            f'[model]\ntask = "{task}"\n[model.options]\nhidden = 8\nlayers = 1\n{options}\n{stages}')
    path = tmp_path / f"{run}.toml"
    path.write_text(text)
    return path


def stage(name: str, bucket: int, batch_size: int, epochs: int, extra: str = "") -> str:
    return f'\n[[stage]]\nname = "{name}"\nbucket = {bucket}\nbatch_size = {batch_size}\nepochs = {epochs}\n{extra}\n'


def submit(cfg: Path, *args: str) -> None:
    proc = run_cli("submit", "-c", str(cfg), *args, cwd=cfg.parent, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def events(metrics: Path) -> list[dict[str, Any]]:
    return read_metrics(metrics)


def record(jobs: Path, run: str) -> dict[str, Any]:
    return json.loads((jobs / run / "run.json").read_text())


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck["model"] if "model" in ck else ck


def assert_no_step_redone(metrics: Path) -> list[int]:
    steps = [e["step"] for e in events(metrics) if e.get("event") == "step"]
    assert steps == sorted(set(steps)), "a step was logged twice: work was redone after a requeue"
    return steps


def test_chain_runs_each_stage_from_its_parent(slurm_cluster: None, slurm_jobs: Path, tiny_dataset: Path,
                                                tmp_path: Path) -> None:
    cfg = write_graph(tmp_path, tiny_dataset, "chain",
                      stage("s16", 16, 4, 2, 'init_from = "none"') + stage("s32", 32, 2, 2) + stage("s64", 64, 2, 2))
    submit(cfg)
    jobs = slurm_jobs
    again = run_cli("submit", "-c", str(cfg), cwd=tmp_path, env=ENV)  # the chain is live: refused, nothing submitted
    assert again.returncode == 1 and "still has live jobs" in again.stderr and "--run-name" in again.stderr
    # `completed` as soon as final.pt exists; Slurm records COMPLETED a moment later, when the job exits.
    final = wait_for(lambda: ended("chain", jobs), STAGE, "the 3-stage chain's jobs to end")
    assert all(s["state"] == "completed" and s["slurm_state"] == "COMPLETED" for s in final.values()), final
    rec = record(jobs, "chain")
    assert all(len(rec["stages"][n]["submissions"]) == 1 for n in ("s16", "s32", "s64"))
    ids = [rec["stages"][n]["submissions"][0]["job_id"] for n in ("s16", "s32", "s64")]
    assert rec["stages"]["s32"]["submissions"][0]["dependency"] == f"afterok:{ids[0]}"
    assert rec["stages"]["s64"]["submissions"][0]["dependency"] == f"afterok:{ids[1]}"
    for parent, child in (("s16", "s32"), ("s32", "s64")):
        start = next(e for e in events(jobs / "chain" / "stages" / child / "metrics.jsonl") if e.get("event") == "start")
        assert start["init_from"] == final[parent]["final_checkpoint"]
        assert os.path.getmtime(final[parent]["final_checkpoint"]) <= start["time"]
        assert final[child]["slurm_state"] == "COMPLETED" and final[child]["step"] == final[child]["total_steps"]
    logs = run_cli("logs", "chain", "s32", "--jobs", str(jobs), check=True).stdout
    assert "stage s32 completed" in logs


def test_time_limit_requeues_and_ends_bitwise_identical(slurm_cluster: None, slurm_jobs: Path,
                                                        tiny_dataset: Path, tmp_path: Path) -> None:
    """A 2-minute job that needs ~3.6 minutes of work requeues itself, redoes no step, and ends with
    exactly the weights of the same stage run locally without interruption. Requeued jobs start again
    when Slurm makes them eligible (cred_expire + 1 s after the requeue): releasing them earlier gets
    them killed ("Job credential revoked"). With W&B (offline) and MLflow (sqlite) on: one tracker run
    for the stage across its jobs, each history whole, in order, with no step twice."""
    stages = stage("long", 16, 2, 12, 'init_from = "none"')
    # 144 steps of >= 1.5 s: cut at least twice (see LIMIT). max_requeues 20: the test is about requeues
    # working, not about how many a stage needs on a loaded machine.
    ml = tmp_path / "ml.db"
    cfg = write_graph(tmp_path, tiny_dataset, "requeue", stages, options="step_sleep = 1.5",
                      slurm={"time": LIMIT, "max_requeues": "20"},
                      tables=f'[tracking.wandb]\nmode = "offline"\n[tracking.mlflow]\ntracking_uri = "sqlite:///{ml}"\n')
    submit(cfg)
    jobs = slurm_jobs
    done = wait_for(lambda: ended("requeue", jobs), REQUEUED_STAGE, "the stage's job to end")
    assert done["long"]["state"] == "completed" and done["long"]["slurm_state"] == "COMPLETED", done
    assert done["long"]["requeues"] >= 2, done  # it really was cut by the time limit, twice or more
    steps = assert_no_step_redone(jobs / "requeue" / "stages" / "long" / "metrics.jsonl")
    assert steps[-1] == done["long"]["total_steps"]
    starts = [e for e in events(jobs / "requeue" / "stages" / "long" / "metrics.jsonl") if e.get("event") == "start"]
    assert len(starts) >= 3 and all(s["resumed_from"] for s in starts[1:])
    from tests.test_tracking import mlflow_runs, wandb_segments

    segs = wandb_segments(jobs / "requeue" / "stages" / "long")
    assert 2 <= len(segs) <= len(starts) and len({s[0] for s in segs}) == 1, segs  # one W&B run for the stage
    assert [step for seg in segs for step in seg[3]] == list(range(1, steps[-1] + 1))
    tracked = mlflow_runs(f"sqlite:///{ml}", experiment="requeue")
    assert set(tracked["runs"]) == {"requeue", "requeue.long"}
    assert tracked["history"]["requeue.long"] == list(range(1, steps[-1] + 1))
    assert tracked["runs"]["requeue.long"].info.status == "FINISHED"

    local_cfg = write_graph(tmp_path, tiny_dataset, "reference", stages, options="step_sleep = 0.0")
    proc = run_cli("submit", "--local", "-c", str(local_cfg), cwd=tmp_path, env={**ENV, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    slurm_w = weights(done["long"]["final_checkpoint"])
    local_w = weights(tmp_path / "checkpoints" / "reference" / "long" / "final.pt")
    assert slurm_w.keys() == local_w.keys()
    for k in slurm_w:
        assert torch.equal(slurm_w[k], local_w[k]), f"{k} differs"


def test_failure_blocks_dependents_and_resume_finishes(slurm_cluster: None, slurm_jobs: Path, tiny_dataset: Path,
                                                       tmp_path: Path) -> None:
    marker = tmp_path / "fail-32"
    marker.write_text("stage 2 fails while this file exists")
    cfg = write_graph(tmp_path, tiny_dataset, "flaky",
                      stage("one", 16, 4, 1, 'init_from = "none"') + stage("two", 32, 2, 2) + stage("three", 64, 2, 1),
                      task="tests.tasks:FlakyTask", options=f'fail_marker = "{tmp_path}/fail-{{n}}"')
    submit(cfg)
    jobs = slurm_jobs
    # Three is blocked once slurmctld has two's end; sacct (behind `status`) may record FAILED a moment later.
    blocked = wait_for(lambda: (lambda s: s if s["three"]["state"] == "blocked" and s["two"]["state"] != "running"
                                else False)(status("flaky", jobs)), STAGE, "stage three to be blocked")
    assert blocked["one"]["state"] == "completed" and blocked["two"]["state"] == "failed", blocked
    assert blocked["three"]["fix"] == "progressive resume flaky"
    text = run_cli("status", "flaky", "--jobs", str(jobs), check=True).stdout
    assert "three is blocked" in text and "DependencyNeverSatisfied" in text and "progressive resume flaky" in text

    marker.unlink()
    dry = run_cli("resume", "flaky", "--jobs", str(jobs), "--dry-run", check=True).stdout
    assert "skip (completed)" in dry and "cancel+submit" in dry
    proc = run_cli("resume", "flaky", "--jobs", str(jobs), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = run_cli("resume", "flaky", "--jobs", str(jobs), cwd=tmp_path, env=ENV, check=True).stdout
    assert "nothing to resubmit" in again  # the first resume's jobs are live: the second submits nothing
    done = wait_for(lambda: ended("flaky", jobs), STAGE, "the resumed run's jobs to end")
    assert all(s["state"] == "completed" for s in done.values()), done
    rec = record(jobs, "flaky")
    assert len(rec["stages"]["one"]["submissions"]) == 1  # stage one never ran again
    assert [s["reason"] for s in rec["stages"]["two"]["submissions"]] == ["submit", "resume"]
    starts = [e for e in events(jobs / "flaky" / "stages" / "one" / "metrics.jsonl") if e.get("event") == "start"]
    assert len(starts) == 1


def test_cancel_then_resume_continues_from_checkpoint(slurm_cluster: None, slurm_jobs: Path, tiny_dataset: Path,
                                                      tmp_path: Path) -> None:
    cfg = write_graph(tmp_path, tiny_dataset, "cancelled",
                      stage("first", 16, 2, 6, 'init_from = "none"') + stage("second", 32, 2, 1),
                      options="step_sleep = 0.2")
    submit(cfg)
    jobs = slurm_jobs
    metrics = jobs / "cancelled" / "stages" / "first" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and any(e.get("step", 0) >= 15 for e in events(metrics)), START, "15 steps")
    run_cli("cancel", "cancelled", "--jobs", str(jobs), check=True)
    # Slurm says CANCELLED at once, while the job still finishes its step and saves (squeue: COMPLETING):
    # wait until its processes are gone before looking for the checkpoint and the last step.
    first_job = record(jobs, "cancelled")["stages"]["first"]["submissions"][-1]["job_id"]
    wait_for(lambda: squeue_state(first_job) == "CANCELLED", START, "the cancelled job's processes to end")
    st = wait_for(lambda: (lambda s: s if s["first"]["state"] == "cancelled" else False)(status("cancelled", jobs)),
                  START, "status to show the cancel")
    assert st["first"]["checkpoint"], "SIGTERM on cancel must leave a checkpoint"
    stopped_at = max(e["step"] for e in events(metrics) if e.get("event") == "step")
    run_cli("resume", "cancelled", "--jobs", str(jobs), cwd=tmp_path, env=ENV, check=True)
    done = wait_for(lambda: ended("cancelled", jobs), STAGE, "the resumed run's jobs to end")
    assert all(s["state"] == "completed" for s in done.values()), done
    starts = [e for e in events(metrics) if e.get("event") == "start"]
    assert starts[-1]["resumed_from"] and starts[-1]["step"] >= stopped_at - 1 and starts[-1]["step"] > 0
    assert_no_step_redone(metrics)


def test_ddp_two_tasks_survive_a_requeue(slurm_cluster: None, slurm_jobs: Path, tiny_dataset: Path,
                                         tmp_path: Path) -> None:
    cfg = write_graph(tmp_path, tiny_dataset, "ddp", stage("wide", 16, 2, 12, 'init_from = "none"'),
                      options="step_sleep = 1.6", slurm={"time": LIMIT, "tasks_per_node": "2", "max_requeues": "20"})
    submit(cfg)
    jobs = slurm_jobs
    done = wait_for(lambda: ended("ddp", jobs), REQUEUED_STAGE, "the DDP stage's job to end")
    assert done["wide"]["state"] == "completed" and done["wide"]["slurm_state"] == "COMPLETED", done
    assert done["wide"]["requeues"] >= 1
    metrics = jobs / "ddp" / "stages" / "wide" / "metrics.jsonl"
    assert all(e["world_size"] == 2 for e in events(metrics) if e.get("event") == "start")
    steps = assert_no_step_redone(metrics)  # only rank 0 writes, and no step is written twice
    assert steps[-1] == done["wide"]["total_steps"]


def test_status_without_accounting(accounting_off: None, slurm_jobs: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    assert subprocess.run(["sacct", "-n"], capture_output=True).returncode != 0  # accounting really is off
    cfg = write_graph(tmp_path, tiny_dataset, "noacct", stage("only", 16, 4, 30, 'init_from = "none"'),
                      options="step_sleep = 0.1")
    submit(cfg)
    jobs = slurm_jobs
    seen = wait_for(lambda: (lambda s: s if s["only"]["state"] in ("running", "completed") else False)(status("noacct", jobs)),
                    START, "the job to be seen running without sacct")
    assert seen["only"]["slurm_state"] in ("RUNNING", "COMPLETING", "COMPLETED") or seen["only"]["state"] == "completed"
    # Until the job has ended: turning accounting back on restarts slurmctld and slurmd.
    done = wait_for(lambda: ended("noacct", jobs), STAGE, "the job to end without accounting")
    assert done["only"]["state"] == "completed" and done["only"]["slurm_state"] == "COMPLETED", done
