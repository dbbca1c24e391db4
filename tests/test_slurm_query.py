"""The query half of the Slurm backend on Slurm's own words (canned sacct/squeue/scontrol output).

Pure parsing and fallback logic; the same code runs against the real cluster in
test_slurm_run.py (with and without accounting).
"""

from __future__ import annotations

from typing import Sequence

import pytest

from progressive.backends import slurm
from progressive.errors import SlurmError
from progressive.states import StageState as S


class FakeSlurm:
    """Answers `slurm.run` like the commands would; None makes a command fail (accounting off)."""

    def __init__(self, sacct: str | None, squeue: str | None = "", scontrol: dict[str, str] | None = None) -> None:
        self.answers = {"sacct": sacct, "squeue": squeue}
        self.scontrol = scontrol or {}
        self.calls: list[list[str]] = []

    def __call__(self, cmd: Sequence[str], *, timeout: float = 30, check: bool = True) -> str:
        self.calls.append(list(cmd))
        if cmd[0] == "scontrol":
            if cmd[-1] not in self.scontrol:
                raise SlurmError("scontrol failed (exit 1)", cmd=list(cmd), output="Invalid job id specified")
            return self.scontrol[cmd[-1]]
        out = self.answers[cmd[0]]
        if out is None:
            raise SlurmError(f"{cmd[0]} failed (exit 1)", cmd=list(cmd), output="Slurm accounting storage is disabled")
        return out


def test_sacct_answers_first(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSlurm(sacct="11|COMPLETED|None|00:01:05\n12|CANCELLED by 0|None|00:00:07\n13|TIMEOUT|None|1-00:00:00\n"
                           "14|FAILED|NonZeroExitCode|00:00:01\n99|RUNNING|None|00:00:01\n")
    monkeypatch.setattr(slurm, "run", fake)
    infos = slurm.query(["11", "12", "13", "14"])
    assert {j: i.state for j, i in infos.items()} == {"11": S.COMPLETED, "12": S.CANCELLED, "13": S.TIMEOUT, "14": S.FAILED}
    assert infos["11"].elapsed == "0:01:05" and infos["11"].reason == "" and infos["11"].source == "sacct"
    assert infos["12"].native_state == "CANCELLED by 0" and infos["14"].reason == "NonZeroExitCode"
    assert [c[0] for c in fake.calls] == ["sacct"]  # nothing pending or unknown: no fallback asked


def test_pending_jobs_are_rechecked_with_squeue(monkeypatch: pytest.MonkeyPatch) -> None:
    # sacct lags behind the controller; squeue knows a job blocked on its parent.
    fake = FakeSlurm(sacct="21|PENDING|Dependency|00:00:00\n",
                     squeue="21|PENDING|DependencyNeverSatisfied|0:00\n22|RUNNING|None|1:05\n")
    monkeypatch.setattr(slurm, "run", fake)
    infos = slurm.query(["21", "22"])
    assert infos["21"].state is S.BLOCKED and infos["21"].source == "squeue"
    assert infos["22"].state is S.RUNNING and infos["22"].elapsed == "0:01:05"


def test_without_accounting_squeue_then_scontrol(monkeypatch: pytest.MonkeyPatch) -> None:
    # 31 is queued; 32 has left the queue but the controller still remembers it; 33 is forgotten.
    fake = FakeSlurm(sacct=None, squeue="31|PENDING|Priority|0:00\n",
                     scontrol={"32": "JobId=32 JobName=r.a JobState=TIMEOUT Reason=TimeLimit RunTime=00:01:13 x=y"})
    monkeypatch.setattr(slurm, "run", fake)
    infos = slurm.query(["31", "32", "33"])
    assert infos["31"].state is S.PENDING and infos["31"].reason == "Priority"
    assert infos["32"].state is S.TIMEOUT and infos["32"].source == "scontrol" and infos["32"].elapsed == "0:01:13"
    assert "33" not in infos  # status then shows it as unknown, with the resume hint


def test_job_env_becomes_ddp_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from progressive import job

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        # setenv first, so that monkeypatch restores (removes) the key after the test: left in the
        # environment, these would make every later Slurm job of this session try DDP (sbatch exports them).
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("WORLD_SIZE", "4")  # inherited from the submitting shell through sbatch's --export=ALL
    monkeypatch.setenv("MASTER_ADDR", "elsewhere")
    job._ddp_env({"num_tasks": 1, "global_rank": 0, "local_rank": 0, "hostnames": ["n1"], "job_id": "5"})
    assert "WORLD_SIZE" not in os.environ and "MASTER_ADDR" not in os.environ  # one process: no DDP
    job._ddp_env({"num_tasks": 4, "global_rank": 3, "local_rank": 1, "hostnames": ["n1", "n2"], "job_id": "41234"})
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == \
        ("3", "1", "4", "n1")
    assert os.environ["MASTER_PORT"] == "21234"  # from the job id outside an allocation
