"""Fixtures and helpers for tests against the project's real single-node Slurm cluster.

The cluster is started by scripts/slurm-up.sh (the README's test command does it). A
`slurm` test whose cluster is not up FAILS with the command that starts it: these
tests are never skipped silently.
"""

from __future__ import annotations

import json
import subprocess
import threading
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
    if not any(s.startswith(("idle", "mixed", "alloc", "allocated")) for s in states):
        return f"node state {states}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The real test cluster must be up; fail loudly (never skip) if it is not."""
    problem = _cluster_problem()
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


def squeue_reason(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True, timeout=20)
    return out.stdout.strip()


@pytest.fixture
def release_requeued() -> Iterator[None]:
    """Make requeued jobs eligible at once (Slurm holds them ~cred_expire seconds): keeps CI short."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            out = subprocess.run(["squeue", "-h", "-t", "PENDING", "-o", "%i|%r"], capture_output=True, text=True)
            for line in out.stdout.splitlines():
                jid, _, reason = line.partition("|")
                if reason == "BeginTime":
                    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True)
            stop.wait(1.0)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(timeout=5)


@pytest.fixture
def accounting_off(slurm_cluster: None) -> Iterator[None]:
    """Run a test with Slurm accounting off (sacct fails); always turned back on."""
    subprocess.run(["bash", str(REPO / "scripts" / "slurm-accounting.sh"), "off"], check=True, capture_output=True, timeout=120)
    try:
        yield
    finally:
        subprocess.run(["bash", str(REPO / "scripts" / "slurm-accounting.sh"), "on"], check=True, capture_output=True, timeout=120)


# ---------------------------------------------------------------- the 2-node cluster
MULTINODE_CONF = Path("/var/lib/progressive-slurm-mn/slurm.conf")
MULTINODE_NODES = ["pmn1", "pmn2"]


def multinode_env() -> dict[str, str]:
    """Environment that points Slurm's commands (ours, submitit's, the jobs' srun) at the 2-node cluster."""
    import os

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
