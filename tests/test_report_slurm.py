"""`progressive report` of a real Slurm run that requeued itself: the requeues are in the data and the time account."""

from __future__ import annotations

from pathlib import Path

import pytest

from progressive.metrics import read_metrics
from tests.slurm_support import ended, slurm_cluster, slurm_jobs, wait_for  # noqa: F401
from tests.test_slurm_run import ENV, REQUEUED_STAGE, stage, submit, write_graph
from tests.util import run_cli

pytestmark = pytest.mark.slurm


def test_report_of_a_requeued_slurm_run(slurm_cluster: None, slurm_jobs: Path, tiny_dataset: Path,
                                        tmp_path: Path) -> None:
    """A 1-minute job (signal 20 s before the limit) that needs more requeues itself at least once; requeued
    jobs wait out Slurm's own hold (no release), so the queue wait between segments is real."""
    cfg = write_graph(tmp_path, tiny_dataset, "rq", stage("long", 16, 2, 8, 'init_from = "none"'),
                      options="step_sleep = 0.4", slurm={"time": '"1m"', "signal_delay": '"20s"', "max_requeues": "20"})
    submit(cfg)
    jobs = slurm_jobs
    # sacct records the last attempt a moment after final.pt exists: wait for Slurm, not for a clock.
    done = wait_for(lambda: ended("rq", jobs), REQUEUED_STAGE, "the stage's job to end")
    assert done["long"]["state"] == "completed" and done["long"]["slurm_state"] == "COMPLETED", done

    proc = run_cli("report", "rq", "--jobs", str(jobs), "--no-transfer", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    from progressive import record
    from progressive.report.accounting import match_segments
    from progressive.report.build import collect
    from progressive.report.series import curves

    rec = record.load(jobs / "rq")
    run, acc = collect(rec)
    (st,) = run.stages
    events = read_metrics(rec.plan.stage("long").metrics_path)
    starts = [e for e in events if e.get("event") == "start"]
    stops = [e for e in events if e.get("event") == "stopped"]
    assert len(starts) >= 2 and len(stops) == len(starts) - 1  # requeued at least once, each after a checkpoint
    assert [s.end for s in st.segments] == ["stopped"] * len(stops) + ["completed"]
    restarts = [m for m in curves(run).markers if m.kind == "restart"]
    assert [m.global_step for m in restarts] == [e["step"] for e in starts[1:]]

    # Slurm's view: one job id, one attempt per segment (sacct --duplicates), each segment inside its attempt.
    assert acc.source == "sacct" and len(st.job_ids) == 1
    attempts = acc.attempts["long"]
    assert len(attempts) == len(starts) and {a.job_id for a in attempts} == set(st.job_ids)
    assert [a.state for a in attempts] == ["REQUEUED"] * len(stops) + ["COMPLETED"]
    assert sorted(match_segments(st, attempts)) == list(range(len(attempts)))
    t = acc.stages["long"]
    assert t.segments == len(starts)
    assert t.allocated_s == pytest.approx(sum(a.elapsed_s for a in attempts), abs=len(attempts))
    assert t.queue_wait_s >= 5 * len(stops)  # each requeued attempt waited in the queue (cred_expire ~10 s)
    assert t.before_limit_s > 0  # stopped by the pre-timeout signal before the 1-minute limit
    # shutdown may be 0: sacct's End has 1 s resolution and a job often exits within the second of its
    # last event (one run here: 2 segments, shutdown 0.0 s), so only its sign is checked.
    assert t.startup_s > 0 and t.shutdown_s >= 0 and t.redone_steps == 0
    assert 0 < t.useful_s < t.allocated_s and acc.total.ratio == pytest.approx(t.useful_s / t.allocated_s)
    index = (jobs / "rq" / "report" / "index.md").read_text()
    assert "sacct --duplicates" in index and f"| segments | {len(starts)} | {len(starts)} |" in index
    assert index.count("(REQUEUED)") == len(stops) and "(COMPLETED)" in index
