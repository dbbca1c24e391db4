"""Faults on the real test cluster: preemption, and a requeue that Slurm refuses.

For the preemption test the cluster runs with preemption by partition priority (the
`preemption` fixture switches scripts/slurm-up.sh's configuration in and always back out):
debug is preemptible (PreemptMode=REQUEUE, GraceTime=30 s), a job on the high partition that
needs the whole node preempts the stage at once.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.slurm_support import (ended, preemption, slurm_cluster, slurm_jobs, squeue_state, status,  # noqa: F401
                                 wait_for)
from tests.test_slurm_run import (ENV, LIMIT, REQUEUED_STAGE, START, STAGE, assert_no_step_redone, events, record,
                                  stage, submit, weights, write_graph)
from tests.util import run_cli

pytestmark = pytest.mark.slurm

PREEMPTOR_S = 5  # how long the high-tier job holds the node


def _preempt(partition: str) -> str:
    """Submit a job on the high tier that needs both CPUs of the node: it preempts whatever runs on debug."""
    out = subprocess.run(["sbatch", "--parsable", "-p", partition, "-c", "2", "-J", "preemptor", "-o", "/dev/null",
                          "--wrap", f"sleep {PREEMPTOR_S}"], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().split(";")[0]


def test_preempted_stage_requeues_itself_and_ends_bitwise_identical(preemption: str, slurm_jobs: Path,
                                                                   tiny_dataset: Path, tmp_path: Path) -> None:
    """Preempted mid-run (SIGTERM, GraceTime 30 s): the stage saves, requeues itself under the same job id,
    resumes at the saved step (0 steps redone), completes with the weights of an uninterrupted run; the
    time-out requeue count stays 0 and its afterok child runs."""
    stages = stage("pre", 16, 2, 8, 'init_from = "none"') + stage("post", 32, 2, 1)
    cfg = write_graph(tmp_path, tiny_dataset, "preempt", stages, options="step_sleep = 0.2")
    submit(cfg)
    jobs = slurm_jobs
    metrics = jobs / "preempt" / "stages" / "pre" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and any(e.get("step", 0) >= 10 for e in events(metrics)), START, "10 steps")
    job_id = record(jobs, "preempt")["stages"]["pre"]["submissions"][-1]["job_id"]
    preempted_at = time.time()
    preemptor = _preempt(preemption)
    try:
        # Not failed, not blocked: pending (or already running again) with one preemption counted.
        back = wait_for(lambda: (lambda s: s if s["pre"]["preemptions"] == 1 else False)(status("preempt", jobs)),
                        START, "the stage to count its preemption")
        assert back["pre"]["state"] in ("pending", "running", "completed"), back
        assert back["post"]["state"] != "blocked", back
        done = wait_for(lambda: ended("preempt", jobs), STAGE, "the preempted chain's jobs to end")
        assert squeue_state(preemptor) == "COMPLETED"
    finally:
        subprocess.run(["scancel", preemptor], capture_output=True, timeout=60)
    assert all(s["state"] == "completed" and s["slurm_state"] == "COMPLETED" for s in done.values()), done
    assert done["pre"]["job_id"] == job_id  # requeued under the same id: the afterok edge held
    assert done["pre"]["requeues"] == 0 and done["pre"]["preemptions"] == 1, done
    rec = record(jobs, "preempt")
    assert all(len(rec["stages"][n]["submissions"]) == 1 for n in ("pre", "post"))  # nobody resumed by hand

    ev = events(metrics)
    stopped = [e for e in ev if e.get("event") == "stopped"]
    starts = [e for e in ev if e.get("event") == "start"]
    assert len(stopped) == 1 and len(starts) == 2, (stopped, starts)
    assert starts[1]["resumed_from"] and starts[1]["step"] == stopped[0]["step"] > 0  # resumed at the saved step
    steps = assert_no_step_redone(metrics)  # 0 steps redone
    assert steps[-1] == done["pre"]["total_steps"]
    first_step_again = next(e for e in ev if e.get("event") == "step" and e["time"] > starts[1]["time"])
    seconds = first_step_again["time"] - preempted_at
    save = next(e for e in ev if e.get("event") == "checkpoint" and e.get("reason") == "stop")
    print(f"\npreemption: saved step {stopped[0]['step']} in {save['seconds']:.2f} s, "
          f"{stopped[0]['time'] - preempted_at:.1f} s after the preemptor's submission; training again "
          f"{seconds:.1f} s after it (the preemptor holds the node {PREEMPTOR_S} s); steps redone: 0")
    logs = run_cli("logs", "preempt", "pre", "--jobs", str(jobs), check=True).stdout
    assert f"job {job_id} is being preempted: requeueing it (preemption 1" in logs
    text = run_cli("status", "preempt", "--jobs", str(jobs), check=True).stdout
    assert "pre was preempted 1 time(s) and requeued itself" in text

    ref_cfg = write_graph(tmp_path, tiny_dataset, "reference", stages, options="step_sleep = 0.0")
    proc = run_cli("submit", "--local", "-c", str(ref_cfg), cwd=tmp_path, env={**ENV, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("pre", "post"):
        got = weights(done[name]["final_checkpoint"])
        want = weights(tmp_path / "checkpoints" / "reference" / name / "final.pt")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), f"{name}: weights differ from the uninterrupted run"


def test_cancel_under_preemption_stays_a_cancel(preemption: str, slurm_jobs: Path, tiny_dataset: Path,
                                                tmp_path: Path) -> None:
    """On the cluster with preemption, `progressive cancel` (SIGTERM, like a preemption) is told apart:
    the job saves and ends CANCELLED; it does not requeue itself and counts no preemption."""
    cfg = write_graph(tmp_path, tiny_dataset, "cancelled", stage("only", 16, 2, 8, 'init_from = "none"'),
                      options="step_sleep = 0.2")
    submit(cfg)
    jobs = slurm_jobs
    metrics = jobs / "cancelled" / "stages" / "only" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and any(e.get("step", 0) >= 5 for e in events(metrics)), START, "5 steps")
    run_cli("cancel", "cancelled", "--jobs", str(jobs), check=True)
    job_id = record(jobs, "cancelled")["stages"]["only"]["submissions"][-1]["job_id"]
    wait_for(lambda: squeue_state(job_id) == "CANCELLED", START, "the cancelled job's processes to end")
    st = wait_for(lambda: (lambda s: s if s["only"]["state"] == "cancelled" else False)(status("cancelled", jobs)),
                  START, "status to show the cancel")
    assert st["only"]["preemptions"] == 0 and st["only"]["requeues"] == 0 and st["only"]["checkpoint"], st
    assert len([e for e in events(metrics) if e.get("event") == "start"]) == 1  # it did not come back
    logs = run_cli("logs", "cancelled", "only", "--jobs", str(jobs), check=True).stdout
    assert f"SIGTERM and job {job_id} is not being preempted (cancelled or requeued by Slurm): ending" in logs


def test_refused_requeue_ends_as_timeout_and_says_why(slurm_cluster: None, slurm_jobs: Path, tiny_dataset: Path,
                                                       tmp_path: Path) -> None:
    """A stage whose job has requeue disabled (as at sites that forbid requeue) reaches its time limit:
    Slurm refuses the requeue ("Requested operation is presently disabled"); the job says so in its log,
    ends as TIMEOUT with its checkpoint, and status tells the truth (timeout, child blocked, resume)."""
    cfg = write_graph(tmp_path, tiny_dataset, "norequeue",
                      stage("long", 16, 2, 12, 'init_from = "none"') + stage("next", 32, 2, 1),
                      options="step_sleep = 1.5", slurm={"time": LIMIT})
    submit(cfg)
    jobs = slurm_jobs
    job_id = record(jobs, "norequeue")["stages"]["long"]["submissions"][-1]["job_id"]
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "Requeue=0"], check=True, timeout=60)
    st = wait_for(lambda: (lambda s: s if s["long"]["state"] == "timeout" and s["next"]["state"] == "blocked"
                           and squeue_state(job_id) == "TIMEOUT" else False)(status("norequeue", jobs)),
                  REQUEUED_STAGE, "the stage to end as TIMEOUT")
    assert st["long"]["requeues"] == 0 and st["long"]["checkpoint"], st  # the refused requeue is not counted
    assert st["long"]["fix"] == "progressive resume norequeue" and st["next"]["fix"] == "progressive resume norequeue"
    logs = run_cli("logs", "norequeue", "long", "--jobs", str(jobs), check=True).stdout
    assert f"Slurm refused to requeue job {job_id}, so this stage cannot continue by itself" in logs
    assert "Requested operation is presently disabled" in logs and "progressive resume norequeue" in logs
    metrics = jobs / "norequeue" / "stages" / "long" / "metrics.jsonl"
    stopped = [e for e in events(metrics) if e.get("event") == "stopped"]
    assert len(stopped) == 1 and st["long"]["checkpoint"].endswith(f"step_{stopped[0]['step']:08d}.pt")
