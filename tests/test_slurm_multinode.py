"""Multi-node stages on the real 2-node Slurm test cluster (scripts/slurm-multinode-up.sh).

Two nodes, one task each, gloo DDP on CPU across two network namespaces: a stage cut by
its time limit requeues the whole allocation and ends bitwise identical to the same
two-rank stage run straight through; a rank that dies takes the job down at once and
`resume` continues from the last checkpoint; `plan --dry-run` shows the script Slurm
received. Every Slurm command here (ours, submitit's sbatch, the jobs' srun and scontrol)
reaches that cluster through SLURM_CONF in the environment; the single-node tests keep the
default cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from progressive.metrics import read_metrics
from tests.slurm_support import MULTINODE_NODES, multinode_cluster, status, wait_for  # noqa: F401
from tests.util import run_cli

pytestmark = pytest.mark.slurm

SLURM = {"nodes": "2", "tasks_per_node": "1", "cpus_per_task": "1", "mem": '"1G"', "time": '"5m"',
         "signal_delay": '"20s"', "max_requeues": "8"}
FINAL = ("completed", "failed", "timeout", "cancelled")


def graph(tmp_path: Path, data: Path, run: str, stages: str, *, options: str = "step_sleep = 0.0",
          task: str = "tests.tasks:SlowTask", slurm: dict[str, str] | None = None, checkpoint_every: int = 50) -> Path:
    """A 2-node graph: tiny model, 1 CPU and 1 GB per node, 5-minute jobs unless `slurm` says otherwise."""
    table = "".join(f"{k} = {v}\n" for k, v in {**SLURM, **(slurm or {})}.items())
    text = (f'[run]\nname = "{run}"\ndata = "{data}"\nseed = 5\n[slurm]\n{table}'
            f'[train]\nlr = 0.003\ncheckpoint_every = {checkpoint_every}\neval_samples = 1\n'
            f'[model]\ntask = "{task}"\n[model.options]\nhidden = 8\nlayers = 1\n{options}\n{stages}')
    path = tmp_path / f"{run}.toml"
    path.write_text(text)
    return path


def stage(name: str, bucket: int, batch_size: int, epochs: int, extra: str = 'init_from = "none"') -> str:
    return f'\n[[stage]]\nname = "{name}"\nbucket = {bucket}\nbatch_size = {batch_size}\nepochs = {epochs}\n{extra}\n'


def submit(cfg: Path, env: dict[str, str]) -> dict[str, str]:
    """Submit the graph; return {stage: job id}."""
    proc = run_cli("submit", "-c", str(cfg), cwd=cfg.parent, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads((cfg.parent / "jobs" / cfg.stem / "run.json").read_text())
    return {name: s["submissions"][-1]["job_id"] for name, s in rec["stages"].items()}


def finished(run: str, jobs: Path, env: dict[str, str]) -> Any:
    """status --json once every stage is final and Slurm has recorded its job's end (else False)."""
    st = status(run, jobs, env)
    done = all(s["state"] in FINAL for s in st.values())
    # Slurm's own word may be missing for a moment (sacct lags behind the controller): not ended yet.
    ended = done and all((s["slurm_state"] or "PENDING").split()[0] in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED")
                         for s in st.values())
    return st if ended else False


def sacct(job_id: str, env: dict[str, str], fields: str) -> list[str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", fields], capture_output=True, text=True,
                         timeout=30, env=env, check=True)
    return out.stdout.strip().splitlines()[-1].split("|")


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck["model"] if "model" in ck else ck


def without_dependency(script: str) -> str:
    return re.sub(r"^#SBATCH --dependency=.*\n", "", script, flags=re.M)


def task_log(jobs: Path, run: str, job_id: str, task: int) -> str:
    return (jobs / run / "slurm" / job_id / f"{job_id}_{task}_log.out").read_text(errors="replace")


def test_two_node_stage_requeues_and_ends_bitwise_identical(multinode_cluster: dict[str, str], tiny_dataset: Path,
                                                           tmp_path: Path) -> None:
    """A 2-node stage with a 2-minute limit is stopped by it, every rank on both nodes gets the
    signal and stops at the same step, rank 0 checkpoints once and requeues the allocation, the
    job resumes on both nodes, and its final weights equal the same 2-rank stage run without a cut."""
    env = multinode_cluster
    wide = stage("wide", 16, 2, 12)
    # ~2 minutes of work under a 2-minute limit. Slurm checks limits coarsely: the signal comes
    # 20-50 s before the limit, so the cut lands after 70-100 s and the rest fits in one more job.
    cut_cfg = graph(tmp_path, tiny_dataset, "mncut", wide, options="step_sleep = 1.5", slurm={"time": '"2m"'})
    ref_cfg = graph(tmp_path, tiny_dataset, "mnref", wide, options="step_sleep = 0.0", slurm={"time": '"10m"'})
    cut_id = submit(cut_cfg, env)["wide"]
    submit(ref_cfg, env)  # the nodes have room for both (1 core of 2 each)
    jobs = tmp_path / "jobs"

    ref = wait_for(lambda: finished("mnref", jobs, env), 300, "the uninterrupted 2-node reference")
    assert ref["wide"]["state"] == "completed", ref
    cut = wait_for(lambda: finished("mncut", jobs, env), 600, "the time-limited 2-node stage")
    assert cut["wide"]["state"] == "completed", cut
    assert cut["wide"]["requeues"] >= 1, cut  # it really was cut by its time limit
    assert sacct(cut_id, env, "NNodes,NodeList") == ["2", "pmn[1-2]"]

    metrics = read_metrics(jobs / "mncut" / "stages" / "wide" / "metrics.jsonl")
    starts = [e for e in metrics if e.get("event") == "start"]
    stops = [e for e in metrics if e.get("event") == "stopped"]
    assert len(starts) == len(stops) + 1 >= 2 and all(s["resumed_from"] for s in starts[1:])
    for s in starts:  # every segment ran rank 0 on the first node and rank 1 on the second
        assert s["world_size"] == 2 and s["hosts"] == MULTINODE_NODES and s["nodes"] == MULTINODE_NODES, s
    steps = [e["step"] for e in metrics if e.get("event") == "step"]
    assert steps == list(range(1, cut["wide"]["total_steps"] + 1))  # no step lost, none redone
    stop_saves = [e for e in metrics if e.get("event") == "checkpoint" and e["reason"] == "stop"]
    assert [e["step"] for e in stop_saves] == [e["step"] for e in stops]  # one checkpoint per stop
    for stop, start in zip(stops, starts[1:]):
        assert start["step"] == stop["step"] and start["resumed_from"] == stop["checkpoint"]

    # The signal reached the task on each node, and both stopped at the same step, every time.
    per_task = []
    for task in (0, 1):
        text = task_log(jobs, "mncut", cut_id, task)
        assert text.count("received SIGUSR2") == len(stops), f"task {task}:\n{text[-3000:]}"
        per_task.append(re.findall(r"stage wide stopped at step (\d+)/", text))
    assert per_task[0] == per_task[1] == [str(e["step"]) for e in stops]
    assert f"requeueing job {cut_id}" in task_log(jobs, "mncut", cut_id, 0)
    assert "requeueing" not in task_log(jobs, "mncut", cut_id, 1)  # rank 0 alone requeues

    cut_w, ref_w = weights(cut["wide"]["final_checkpoint"]), weights(ref["wide"]["final_checkpoint"])
    assert cut_w.keys() == ref_w.keys()
    for k in cut_w:
        assert torch.equal(cut_w[k], ref_w[k]), f"{k} differs"


def test_dead_rank_fails_the_job_at_once_and_resume_continues(multinode_cluster: dict[str, str], tiny_dataset: Path,
                                                              tmp_path: Path) -> None:
    """Rank 1 (second node) raises mid-stage: srun ends rank 0 too (no wait in a collective until the
    limit), the stage is failed with rank 1's error in `logs --task 1`, and resume continues from the
    last periodic checkpoint."""
    env = multinode_cluster
    marker = tmp_path / "rank1-fails"
    marker.write_text("rank 1 fails while this file exists")
    cfg = graph(tmp_path, tiny_dataset, "mnfail", stage("wide", 16, 2, 4), task="tests.tasks:RankFailTask",
                options=f'step_sleep = 0.1\nfail_marker = "{marker}"\nfail_rank = 1\nfail_at = 9',
                checkpoint_every=4)
    jobs = tmp_path / "jobs"
    job_id = submit(cfg, env)["wide"]
    failed = wait_for(lambda: finished("mnfail", jobs, env), 240, "the stage to fail")
    assert failed["wide"]["state"] == "failed", failed
    state, elapsed_s = sacct(job_id, env, "State,ElapsedRaw")
    assert state == "FAILED" and int(elapsed_s) < 90, (state, elapsed_s)  # promptly, not at the 5-minute limit
    assert failed["wide"]["checkpoint"], "the periodic checkpoint before the failure must be there"

    err1 = run_cli("logs", "mnfail", "wide", "--err", "--task", "1", "--jobs", str(jobs), env=env, check=True).stdout
    assert "injected failure on rank 1" in err1
    every = run_cli("logs", "mnfail", "wide", "--err", "--task", "all", "--jobs", str(jobs), env=env, check=True).stdout
    assert f"==> {job_id}_0_log.err <==" in every and f"==> {job_id}_1_log.err <==" in every
    assert "injected failure on rank 1" in every
    missing = run_cli("logs", "mnfail", "wide", "--task", "7", "--jobs", str(jobs), env=env)
    assert missing.returncode != 0 and "no output of task 7" in missing.stderr and "--task all" in missing.stderr
    bad = run_cli("logs", "mnfail", "wide", "--task", "one", "--jobs", str(jobs), env=env)
    assert bad.returncode == 2 and "expected a task number (0, 1, ...) or 'all', got 'one'" in bad.stderr

    metrics = jobs / "mnfail" / "stages" / "wide" / "metrics.jsonl"
    saved = max(e["step"] for e in read_metrics(metrics) if e.get("event") == "checkpoint")
    marker.unlink()
    proc = run_cli("resume", "mnfail", "--jobs", str(jobs), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = wait_for(lambda: finished("mnfail", jobs, env), 240, "the resumed stage")
    assert done["wide"]["state"] == "completed", done
    starts = [e for e in read_metrics(metrics) if e.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["step"] == saved and starts[1]["resumed_from"].endswith(f"step_{saved:08d}.pt")
    assert starts[1]["hosts"] == MULTINODE_NODES


def test_dry_run_shows_the_multinode_script_slurm_received(multinode_cluster: dict[str, str], tiny_dataset: Path,
                                                          tmp_path: Path) -> None:
    env = multinode_cluster
    cfg = graph(tmp_path, tiny_dataset, "mnplan", stage("a", 16, 2, 1) + stage("b", 32, 2, 1, extra=""))
    planned = {s["name"]: s["sbatch"] for s in
               json.loads(run_cli("plan", "-c", str(cfg), "--json", cwd=tmp_path, env=env, check=True).stdout)["stages"]}
    text = run_cli("plan", "-c", str(cfg), "--dry-run", cwd=tmp_path, env=env, check=True).stdout
    assert "#SBATCH --nodes=2" in text and "srun --unbuffered" in text and "--kill-on-bad-exit=1" in text
    ids = submit(cfg, env)
    try:
        jobs = tmp_path / "jobs"
        for name, job_id in ids.items():
            sent = (jobs / "mnplan" / "slurm" / job_id / f"{job_id}_submission.sh").read_text()
            held = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True,
                                  timeout=30, env=env, check=True).stdout
            assert without_dependency(sent) == without_dependency(planned[name])
            assert without_dependency(held).strip() == without_dependency(planned[name]).strip()
            assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1" in held and "--kill-on-bad-exit=1" in held
        # the dependency itself: symbolic in the plan, the parent's job id in what Slurm got
        assert "#SBATCH --dependency='afterok:<a>'\n" in planned["b"]
        assert f"#SBATCH --dependency=afterok:{ids['a']}\n" in (jobs / "mnplan" / "slurm" / ids["b"] /
                                                                f"{ids['b']}_submission.sh").read_text()
        assert "--dependency" not in planned["a"]
    finally:
        subprocess.run(["scancel", *ids.values()], env=env, timeout=30)
        wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", ",".join(ids.values())], capture_output=True,
                                            text=True, env=env).stdout.strip(), 60, "the jobs to leave the queue")
