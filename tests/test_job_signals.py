"""What a stage job does after SIGTERM, on Slurm's own words (canned scontrol output, no cluster).

The same code runs against the real cluster in test_slurm_preempt.py (a preemption) and
test_slurm_run.py (a cancel). The scontrol lines are what Slurm 22.05 printed on the test cluster.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pytest

from progressive import job, requeues
from progressive.backends import slurm
from progressive.errors import SlurmError

# `scontrol show job -o` (cut down) inside GraceTime of a preemption, after scancel, and on a cluster
# without preemption (no PreemptTime field at all).
PREEMPTING = "JobId=7 JobName=r.a JobState=RUNNING Reason=None PreemptEligibleTime=2026-12-04T18:33:12 " \
             "PreemptTime=2026-12-04T18:33:16 Partition=debug"
CANCELLING = "JobId=7 JobName=r.a JobState=COMPLETING Reason=None PreemptEligibleTime=2026-12-04T18:34:17 " \
             "PreemptTime=None Partition=debug"
NO_PREEMPTION = "JobId=7 JobName=r.a JobState=RUNNING Reason=None Requeue=1 Partition=debug"
DISABLED = "Requested operation is presently disabled for job 7"


class FakeScontrol:
    """Answers `slurm.run` for `scontrol show job` and `scontrol requeue`; records the requeues."""

    def __init__(self, show: str | None, requeue_error: str | None = None) -> None:
        self.show, self.requeue_error = show, requeue_error
        self.requeued: list[str] = []

    def __call__(self, cmd: Sequence[str], *, timeout: float = 30, check: bool = True) -> str:
        if list(cmd[:2]) == ["scontrol", "show"]:
            if self.show is None:
                raise SlurmError("scontrol did not answer within 20 s", cmd=list(cmd))
            return self.show
        assert list(cmd[:2]) == ["scontrol", "requeue"], cmd
        if self.requeue_error:
            raise SlurmError("scontrol failed (exit 1)", cmd=list(cmd), output=self.requeue_error)
        self.requeued.append(cmd[2])
        return ""


def _after_sigterm(monkeypatch: pytest.MonkeyPatch, fake: FakeScontrol, counter: Path) -> list[float]:
    """Run job._after_sigterm against `fake`; returns the waits it asked for (instead of sleeping)."""
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        raise SystemExit(1)

    monkeypatch.setattr(slurm, "run", fake)
    monkeypatch.setattr(job, "_wait_for_time_limit", wait)
    with pytest.raises(SystemExit) as exit_info:
        job._after_sigterm("7", counter)
    assert exit_info.value.code == 1  # never 0: a stopped stage must not count as COMPLETED
    return waits


@pytest.mark.parametrize(("text", "expected"), [(PREEMPTING, True), (CANCELLING, False), (NO_PREEMPTION, False)])
def test_being_preempted_reads_jobstate_and_preempttime(monkeypatch: pytest.MonkeyPatch, text: str,
                                                        expected: bool) -> None:
    monkeypatch.setattr(slurm, "run", FakeScontrol(text))
    assert slurm.being_preempted("7") is expected


def test_preempted_job_requeues_itself_and_counts_a_preemption(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    counter = tmp_path / "requeues.json"
    requeues.set_count(counter, "7", 2)  # two time-outs before
    fake = FakeScontrol(PREEMPTING)
    with caplog.at_level(logging.INFO, "progressive.job"):
        assert _after_sigterm(monkeypatch, fake, counter) == []
    assert fake.requeued == ["7"]
    assert requeues.preemptions(counter, "7") == 1 and requeues.count(counter, "7") == 2  # time-outs untouched
    assert "job 7 is being preempted: requeueing it (preemption 1; time-out requeues unaffected)" in caplog.text


def test_cancelled_job_is_not_requeued(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    counter = tmp_path / "requeues.json"
    fake = FakeScontrol(CANCELLING)
    with caplog.at_level(logging.INFO, "progressive.job"):
        assert _after_sigterm(monkeypatch, fake, counter) == []
    assert fake.requeued == [] and not counter.exists()
    assert "SIGTERM and job 7 is not being preempted (cancelled or requeued by Slurm): ending" in caplog.text


def test_refused_requeue_of_a_preempted_job_waits_for_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    counter = tmp_path / "requeues.json"
    with caplog.at_level(logging.INFO, "progressive.job"):
        waits = _after_sigterm(monkeypatch, FakeScontrol(PREEMPTING, requeue_error=DISABLED), counter)
    assert waits == [600]  # stays until Slurm kills it at the end of GraceTime: recorded PREEMPTED, not FAILED
    assert "Slurm refused to requeue preempted job 7; waiting for Slurm to end it" in caplog.text
    assert DISABLED in caplog.text and "scontrol requeue 7" in caplog.text  # Slurm's words and the command


def test_unanswered_scontrol_ends_the_job_as_a_cancel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeScontrol(None)
    with caplog.at_level(logging.INFO, "progressive.job"):
        _after_sigterm(monkeypatch, fake, tmp_path / "requeues.json")
    assert fake.requeued == []
    assert "could not ask Slurm whether job 7 is being preempted, so ending it as a cancel" in caplog.text
    assert "scontrol did not answer" in caplog.text


def test_requeue_counts_are_kept_apart(tmp_path: Path) -> None:
    counter = tmp_path / "requeues.json"
    assert requeues.count(counter, "5") == 0 and requeues.preemptions(counter, "5") == 0  # no file
    assert requeues.add_preemption(counter, "5") == 1
    requeues.set_count(counter, "5", 1)
    assert requeues.add_preemption(counter, "5") == 2
    assert (requeues.count(counter, "5"), requeues.preemptions(counter, "5")) == (1, 2)
    assert requeues.preemptions(counter, "6") == 0 and requeues.count(counter, "6") == 0  # another job: fresh
    counter.write_text('{"job_id": "5", "timeouts": 3}')  # written before preemptions were counted
    assert (requeues.count(counter, "5"), requeues.preemptions(counter, "5")) == (3, 0)
    counter.write_text("not json")
    assert requeues.count(counter, "5") == 0


def test_refused_time_out_requeue_is_said_and_ends_as_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_trainer_support import make_data, make_plan, stage_toml

    plan = make_plan(tmp_path, make_data(tmp_path / "d.h5"), stage_toml("a", epochs=1),
                     slurm='max_requeues = 3\nsignal_delay = "20s"', run_name="refused")
    counter = tmp_path / "requeues.json"
    requeues.set_count(counter, "7", 1)
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        raise SystemExit(1)

    monkeypatch.setattr(slurm, "run", FakeScontrol(NO_PREEMPTION, requeue_error=DISABLED))
    monkeypatch.setattr(job, "_wait_for_time_limit", wait)
    with caplog.at_level(logging.INFO, "progressive.job"), pytest.raises(SystemExit):
        job._after_time_limit_signal("7", counter, plan.stages[0], plan.run_name)
    assert waits == [320]  # stays until the limit: Slurm records TIMEOUT (not FAILED, never COMPLETED)
    assert requeues.count(counter, "7") == 1  # the refused requeue is not counted
    assert "Slurm refused to requeue job 7, so this stage cannot continue by itself" in caplog.text
    assert "continue with `progressive resume refused`" in caplog.text and DISABLED in caplog.text
