"""Fixtures and helpers for tests against the project's real single-node Slurm cluster.

The cluster is started by scripts/slurm-up.sh (the README's test command does it). A
`slurm` test whose cluster is not up FAILS with the command that starts it: these
tests are never skipped silently.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.util import REPO, run_cli


def _cluster_problem() -> str | None:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    states = out.stdout.split()
    if out.returncode != 0 or not states:
        return f"sinfo: {out.stderr.strip() or 'no nodes'}"
    # completing: the node is up, a job (e.g. the previous lock holder's last one) is still exiting on it.
    if not any(s.startswith(("idle", "mixed", "alloc", "allocated", "completing")) for s in states):
        return f"node state {states}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The real test cluster must be up; fail loudly (never skip) if it is not. A node busy with the
    cluster's own transitions (a restart by scripts/slurm-accounting.sh) gets up to a minute to settle."""
    deadline = time.monotonic() + 60
    while (problem := _cluster_problem()) and time.monotonic() < deadline:
        time.sleep(2)
    if problem:
        pytest.fail(f"the Slurm test cluster is not running ({problem}); start it with `bash scripts/slurm-up.sh` "
                    "(or deselect these tests with -m 'not slurm')", pytrace=False)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 2.0) -> Any:
    """Poll until predicate() is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def status(run: str, jobs: Path, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """`progressive status RUN --json`, keyed by stage (`env`: e.g. another cluster's SLURM_CONF)."""
    proc = run_cli("status", run, "--jobs", str(jobs), "--json", check=True, env=env)
    return {s["name"]: s for s in json.loads(proc.stdout)["stages"]}


# Slurm's final job states: the job has ended and nothing of it runs any more (squeue shows
# COMPLETING, not one of these, while its processes are still exiting).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED"})

SLURM_DIR = Path(os.environ.get("PROGRESSIVE_SLURM_DIR", "/var/lib/progressive-slurm"))  # scripts/slurm-up.sh


def squeue_state(job_id: str) -> str:
    """slurmctld's own word for a job (`squeue -t all`: no accounting lag; MinJobAge keeps ended jobs 10 min)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                         timeout=30)
    return out.stdout.strip()


def ended(run: str, jobs: Path) -> dict[str, dict[str, Any]] | bool:
    """status --json once every stage's job has ended in Slurm's own record (squeue) and `status` reports a
    final Slurm state for it too (sacct may lag squeue by a moment); else False.

    `status` says "completed" as soon as final.pt exists, while the job may still be exiting and
    writing its last lines: wait for this before reading metrics, logs or Slurm states.
    """
    st = status(run, jobs)
    for s in st.values():
        if not s["job_id"] or squeue_state(s["job_id"]) not in FINAL_STATES or s["slurm_state"] not in FINAL_STATES:
            return False
    return st


def job_ids(jobs: Path) -> list[str]:
    """Every job id any run under `jobs` ever submitted (from the run records)."""
    ids: list[str] = []
    for rec in sorted(jobs.glob("*/run.json")):
        for srec in json.loads(rec.read_text())["stages"].values():
            ids += [str(sub["job_id"]) for sub in srec.get("submissions", []) if sub.get("job_id")]
    return ids


LOGS = ("slurmctld.log", "slurmd.log")
# Slurm killing or refusing a job by itself, e.g. "Killing non-startable batch JobId=14: Job credential revoked".
_ANOMALIES = ("credential revoked", "non-startable", "launch failed", "launch failure", "requeue held")


def log_sizes() -> dict[str, int]:
    """Current size of each Slurm daemon log (0 when unreadable): where a test's lines start."""
    sizes = {}
    for name in LOGS:
        try:
            sizes[name] = (SLURM_DIR / "log" / name).stat().st_size
        except OSError:
            sizes[name] = 0
    return sizes


def slurm_log_anomalies(ids: list[str], since: dict[str, int]) -> list[str]:
    """Lines the Slurm daemons logged after `since` (log_sizes()) that show Slurm killing or refusing one
    of these jobs by itself; [] when the logs are not readable (a cluster other than scripts/slurm-up.sh's)."""
    pats = [re.compile(rf"(JobId=|StepId=|job ?id[ =]?){re.escape(i)}\b", re.I) for i in ids]
    found: list[str] = []
    for name in LOGS:
        try:
            with open(SLURM_DIR / "log" / name, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(since.get(name, 0) if since.get(name, 0) <= size else 0)  # rotated: read it all
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        found += [f"{name}: {ln}" for ln in lines
                  if any(b in ln.lower() for b in _ANOMALIES) and any(p.search(ln) for p in pats)]
    return found


@pytest.fixture
def slurm_jobs(tmp_path: Path) -> Iterator[Path]:
    """The `jobs` folder of a test's runs. Afterwards: fail on Slurm log lines that show Slurm killing or
    refusing one of the test's jobs (a race the test itself may not notice), and cancel any of its jobs
    still queued or running so that a failed test leaves nothing behind for the next one."""
    jobs = tmp_path / "jobs"
    since = log_sizes()
    yield jobs
    ids = job_ids(jobs)
    live = [j for j in ids if squeue_state(j) not in FINAL_STATES | {""}]
    if live:
        subprocess.run(["scancel", *live], capture_output=True, timeout=60)
    anomalies = slurm_log_anomalies(ids, since)
    assert not anomalies, "Slurm killed or refused a job of this test:\n" + "\n".join(anomalies)


def _script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Each restart of slurmctld/slurmd waits up to PROGRESSIVE_SLURM_TIMEOUT (60 s) per daemon: slow on a loaded machine.
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env} if env else None)


@pytest.fixture
def accounting_off(slurm_cluster: None) -> Iterator[None]:
    """Run a test with Slurm accounting off (sacct fails); always turned back on, also when turning it
    off failed half-way or the test failed. Should `on` fail, scripts/slurm-up.sh (which rewrites the
    configuration with accounting on) repairs the cluster, so the next test never finds accounting off."""
    try:
        off = _script(str(REPO / "scripts" / "slurm-accounting.sh"), "off")
        assert off.returncode == 0, f"slurm-accounting.sh off failed:\n{off.stdout}{off.stderr}"
        yield
    finally:
        on = _script(str(REPO / "scripts" / "slurm-accounting.sh"), "on")
        if on.returncode != 0:
            up = _script(str(REPO / "scripts" / "slurm-up.sh"))
            assert up.returncode == 0, (f"accounting could not be turned back on:\n{on.stdout}{on.stderr}\n"
                                        f"slurm-up.sh:\n{up.stdout}{up.stderr}")


PREEMPTING_PARTITION = "high"  # scripts/slurm-up.sh with PROGRESSIVE_SLURM_PREEMPT=1


def partitions() -> list[str]:
    """The cluster's partitions as slurmctld has them now (sinfo; the default one has no '*' here)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=20)
    return sorted(out.stdout.split())


def _live_preempt_type() -> str:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20)
    return next((ln.split("=", 1)[1].strip() for ln in out.stdout.splitlines() if ln.startswith("PreemptType")), "")


@pytest.fixture(scope="module")
def preemption(slurm_cluster: None) -> Iterator[str]:
    """Run a module's tests on the cluster with preemption by partition priority (scripts/slurm-up.sh with
    PROGRESSIVE_SLURM_PREEMPT=1: debug preemptible with PreemptMode=REQUEUE and GraceTime=30 s, plus a
    high-tier partition); yields the high partition's name. One switch in and out per module (each restarts
    slurmctld and slurmd, ~5 s); jobs that only use debug are never preempted, so other tests of the module
    are not disturbed. The normal configuration is ALWAYS restored afterwards, also when switching failed
    half-way or a test failed: slurm-up.sh rewrites the config it owns, restarts the daemons (a PreemptType
    change needs that) and waits for the node itself."""
    try:
        on = _script(str(REPO / "scripts" / "slurm-up.sh"), env={"PROGRESSIVE_SLURM_PREEMPT": "1"})
        assert on.returncode == 0, f"slurm-up.sh with preemption failed:\n{on.stdout}{on.stderr}"
        wait_for(lambda: PREEMPTING_PARTITION in partitions() and _live_preempt_type() == "preempt/partition_prio",
                 60, "slurmctld to run with preemption by partition priority")
        yield PREEMPTING_PARTITION
    finally:
        off = _script(str(REPO / "scripts" / "slurm-up.sh"), env={"PROGRESSIVE_SLURM_PREEMPT": "0"})
        assert off.returncode == 0, f"slurm-up.sh could not restore the normal configuration:\n{off.stdout}{off.stderr}"
        wait_for(lambda: partitions() == ["debug"] and _live_preempt_type() == "preempt/none", 60,
                 "slurmctld to run with the normal configuration again")


# ---------------------------------------------------------------- the 2-node cluster
MULTINODE_CONF = Path("/var/lib/progressive-slurm-mn/slurm.conf")
MULTINODE_NODES = ["pmn1", "pmn2"]


def multinode_env() -> dict[str, str]:
    """Environment that points Slurm's commands (ours, submitit's, the jobs' srun) at the 2-node cluster."""
    return {**os.environ, "SLURM_CONF": str(MULTINODE_CONF), "PYTHONPATH": str(REPO)}


def _multinode_problem() -> str | None:
    if not MULTINODE_CONF.is_file():
        return f"{MULTINODE_CONF} does not exist"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20,
                             env=multinode_env())
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if out.returncode != 0:
        return f"sinfo: {out.stderr.strip()}"
    nodes = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    if sorted(nodes) != MULTINODE_NODES:
        return f"nodes {sorted(nodes)}, expected {MULTINODE_NODES}"
    bad = {n: s for n, s in nodes.items() if not s.startswith(("idle", "mixed", "alloc", "completing"))}
    return f"node states {bad}" if bad else None


@pytest.fixture(scope="session")
def multinode_cluster() -> dict[str, str]:
    """The 2-node test cluster must be up; fail loudly (never skip) if not. Returns the env that targets it."""
    problem = _multinode_problem()
    if problem:
        pytest.fail(f"the 2-node Slurm test cluster is not running ({problem}); start it with "
                    "`bash scripts/slurm-up.sh && bash scripts/slurm-multinode-up.sh` "
                    "(or deselect these tests with -m 'not slurm')", pytrace=False)
    return multinode_env()
