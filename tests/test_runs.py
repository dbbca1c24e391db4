"""Submit, status, resume and cancel logic over a fake backend (pure: no Slurm, no torch, no training).

The fake is a scheduler in a dict: it hands out job ids, records what it was sent, and
reports whatever state a test sets. The real Slurm and local backends are tested
against the real cluster and real processes elsewhere (test_slurm_*.py, test_local*.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import pytest

from progressive import record, runs
from progressive.backends import Backend, JobInfo, get_backend
from progressive.config import parse_config
from progressive.data.counts import write_count_index
from progressive.errors import RunError
from progressive.plan import Plan, StagePlan, build_plan
from progressive.states import FINAL, LIVE, RESUMABLE, RUNNING_OR_QUEUED, SLURM_STATES, StageState, from_slurm
from progressive.status import stage_statuses
from progressive.units import hms

S = StageState


class FakeBackend(Backend):
    """A queue in memory: job ids 100, 101, ...; states set by the test; refuses a stage when told to."""

    name = "slurm"

    def __init__(self, refuse: str | None = None) -> None:
        self.jobs: dict[str, S] = {}
        self.sent: list[tuple[str, str, str | None]] = []  # (stage, script, dependency)
        self.rendered: list[str] = []
        self.cancelled: list[str] = []
        self.refuse = refuse
        self.next_id = 100

    def ensure_available(self) -> None:
        pass

    def render(self, plan: Plan, stage: StagePlan) -> str:
        self.rendered.append(stage.name)
        return f"#!/bin/bash\n# script of {stage.name}\n"

    def submit(self, plan: Plan, stage: StagePlan, script: str, dependency: str | None) -> str:
        if stage.name == self.refuse:
            raise RunError(f"refused {stage.name}")
        job = str(self.next_id)
        self.next_id += 1
        self.jobs[job] = S.PENDING
        self.sent.append((stage.name, script, dependency))
        return job

    def query(self, rec: record.RunRecord) -> Mapping[str, JobInfo]:
        out = {}
        for name, srec in rec.stages.items():
            if srec.job_id in self.jobs:
                st = self.jobs[srec.job_id]
                out[name] = JobInfo(job_id=srec.job_id, state=st, native_state=st.value.upper())
        return out

    def cancel(self, rec: record.RunRecord, stages: Sequence[str]) -> list[str]:
        ids = [j for j in (rec.stage_record(n).job_id for n in stages) if j]
        for j in ids:
            self.jobs[j] = S.CANCELLED
        self.cancelled += ids
        return ids


GRAPH = """
[run]
name = "r"
data = "data.h5"
[[stage]]
name = "a"
bucket = 16
batch_size = 2
epochs = 1
init_from = "none"
[[stage]]
name = "b"
bucket = 32
batch_size = 2
epochs = 1
[[stage]]
name = "c"
bucket = 64
batch_size = 2
epochs = 1
"""


def make_plan(tmp_path: Path, select: list[str] | None = None) -> Plan:
    cfg_path = tmp_path / "stages.toml"
    cfg_path.write_text(GRAPH)
    counts = {16: {"train": 8, "val": 1, "test": 1}, 32: {"train": 8, "val": 1, "test": 1},
              64: {"train": 8, "val": 1, "test": 1}}
    cfg = parse_config(GRAPH, str(cfg_path))
    plan = build_plan(cfg, cfg_path, counts=lambda _: counts, select=select)
    # The data as resume finds it again (it checks the data now): a file with a count index.
    data = Path(plan.data_path)
    if not data.exists():
        data.write_bytes(b"tokens")
        write_count_index(data, counts, task=cfg.model.task, options=cfg.model.options)
    return plan


def finish(plan: Plan, stage: str) -> None:
    final = Path(plan.stage(stage).final_checkpoint)
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_bytes(b"weights")


def states(rec: record.RunRecord, fake: FakeBackend) -> list[str]:
    return [s.state.value for s in stage_statuses(record.load(rec.run_dir), fake)]


def test_submit_chains_the_rendered_scripts_by_afterok(tmp_path: Path) -> None:
    plan, fake = make_plan(tmp_path), FakeBackend()
    rec = runs.submit(plan, GRAPH, fake)
    assert fake.rendered == ["a", "b", "c"]  # each script rendered once...
    assert fake.sent == [("a", "#!/bin/bash\n# script of a\n", None),  # ...and sent as it was rendered
                         ("b", "#!/bin/bash\n# script of b\n", "afterok:100"),
                         ("c", "#!/bin/bash\n# script of c\n", "afterok:101")]
    saved = record.load(plan.run_dir)
    assert [saved.stage_record(n).job_id for n in "abc"] == ["100", "101", "102"]
    assert saved.mode == "slurm" and saved.config_text == GRAPH and saved.plan == rec.plan
    assert states(rec, fake) == ["pending", "pending", "pending"]


def test_a_refused_stage_cancels_what_was_submitted_and_records_nothing(tmp_path: Path) -> None:
    plan, fake = make_plan(tmp_path), FakeBackend(refuse="c")
    with pytest.raises(RunError, match="refused c"):
        runs.submit(plan, GRAPH, fake)
    assert fake.cancelled == ["100", "101"]
    assert not record.record_path(plan.run_dir).exists()


@pytest.mark.parametrize("live", [S.PENDING, S.RUNNING, S.SUSPENDED, S.BLOCKED])
def test_submit_refuses_a_run_with_live_jobs(tmp_path: Path, live: S) -> None:
    plan, fake = make_plan(tmp_path), FakeBackend()
    runs.submit(plan, GRAPH, fake)
    fake.jobs["101"] = live
    for j in ("100", "102"):
        fake.jobs[j] = S.CANCELLED
    with pytest.raises(RunError, match="still has live jobs: b") as err:
        runs.submit(plan, GRAPH, fake)
    assert "progressive cancel" in (err.value.hint or "")
    assert len(fake.sent) == 3  # nothing more was sent


def test_submit_refuses_missing_inputs_and_completed_stages(tmp_path: Path) -> None:
    plan, fake = make_plan(tmp_path, select=["b", "c"]), FakeBackend()
    with pytest.raises(RunError, match="parent 'a' is not selected and has no final checkpoint"):
        runs.submit(plan, GRAPH, fake)
    finish(plan, "b")
    finish(make_plan(tmp_path), "a")
    with pytest.raises(RunError, match=r"stage\(s\) b already completed in run 'r'"):
        runs.submit(plan, GRAPH, fake)
    assert fake.sent == []


def test_status_of_every_state(tmp_path: Path) -> None:
    plan, fake = make_plan(tmp_path), FakeBackend()
    rec = runs.submit(plan, GRAPH, fake)
    finish(plan, "a")
    fake.jobs["100"] = S.COMPLETED
    fake.jobs["101"] = S.COMPLETED  # Slurm says done, but no final weights: the job did not finish the stage
    del fake.jobs["102"]  # Slurm forgot the job (accounting purged)
    st = stage_statuses(record.load(rec.run_dir), fake)
    assert [s.state for s in st] == [S.COMPLETED, S.FAILED, S.UNKNOWN]
    assert st[0].final_checkpoint == plan.stage("a").final_checkpoint and st[0].fix is None
    assert st[1].fix == st[2].fix == "progressive resume r"
    for word in ("blocked", "timeout", "cancelled", "stopped"):
        fake.jobs["101"] = S(word)
        s = stage_statuses(record.load(rec.run_dir), fake)[1]
        assert s.state is S(word) and s.fix == "progressive resume r"
    fake.jobs["101"] = S.BLOCKED
    assert "DependencyNeverSatisfied" in stage_statuses(record.load(rec.run_dir), fake)[1].reason
    fake.jobs["101"] = S.RUNNING
    assert stage_statuses(record.load(rec.run_dir), fake)[1].fix is None


def test_resume_skips_completed_keeps_live_and_rechains_the_rest(tmp_path: Path) -> None:
    plan, fake = make_plan(tmp_path), FakeBackend()
    rec = runs.submit(plan, GRAPH, fake)
    finish(plan, "a")
    fake.jobs.update({"100": S.COMPLETED, "101": S.FAILED, "102": S.BLOCKED})
    dry = runs.resume(rec, backend=fake, dry_run=True)
    assert [(a.stage, a.action) for a in dry] == [("a", "skip (completed)"), ("b", "submit"), ("c", "cancel+submit")]
    assert fake.cancelled == [] and len(fake.sent) == 3  # a dry run changes nothing
    actions = runs.resume(rec, backend=fake)
    assert fake.cancelled == ["102"]  # the blocked job, before anything new
    assert fake.sent[3:] == [("b", "#!/bin/bash\n# script of b\n", None),  # a is complete: nothing to wait for
                             ("c", "#!/bin/bash\n# script of c\n", "afterok:103")]
    assert [(a.new_job, a.dependency) for a in actions[1:]] == [("103", None), ("104", "afterok:103")]
    saved = record.load(rec.run_dir)
    assert [sub.reason for sub in saved.stage_record("b").submissions] == ["submit", "resume"]
    again = runs.resume(saved, backend=fake)  # the new jobs are live: nothing to do
    assert [a.action for a in again] == ["skip (completed)", "keep (live)", "keep (live)"] and len(fake.sent) == 5


def test_resume_waits_for_a_live_parent_and_redoes_children_of_a_redone_parent(tmp_path: Path) -> None:
    plan, fake = make_plan(tmp_path), FakeBackend()
    rec = runs.submit(plan, GRAPH, fake)
    fake.jobs.update({"100": S.RUNNING, "101": S.CANCELLED, "102": S.PENDING})
    actions = runs.resume(rec, backend=fake)
    # b waits for a's running job; c was pending behind b's cancelled job: cancelled and re-chained.
    assert [a.action for a in actions] == ["keep (live)", "submit", "cancel+submit"]
    assert fake.sent[3:] == [("b", "#!/bin/bash\n# script of b\n", "afterok:100"),
                             ("c", "#!/bin/bash\n# script of c\n", "afterok:103")]
    assert fake.cancelled == ["102"]


def test_cancel_names_unknown_stages(tmp_path: Path) -> None:
    plan, fake = make_plan(tmp_path), FakeBackend()
    rec = runs.submit(plan, GRAPH, fake)
    assert runs.cancel(rec, ["b"], backend=fake) == ["101"]
    with pytest.raises(RunError, match="no stage named zz in run 'r'") as err:
        runs.cancel(rec, ["a", "zz"], backend=fake)
    assert err.value.hint == "valid stages: a, b, c"


def test_find_run_names_the_command_and_the_newest_run(tmp_path: Path) -> None:
    for verb in ("status", "resume", "logs", "cancel"):
        with pytest.raises(RunError) as err:
            runs.find_run(tmp_path / "jobs", None, verb=verb)
        assert err.value.loc == verb and "no runs under" in err.value.msg
    plan = make_plan(tmp_path)
    runs.submit(plan, GRAPH, FakeBackend())
    assert runs.find_run(Path(plan.run_dir).parent, None).run_name == "r"
    with pytest.raises(RunError, match="invalid run name"):
        runs.find_run(tmp_path / "jobs", "../x")


def test_unknown_backend_lists_the_valid_ones() -> None:
    with pytest.raises(RunError, match="unknown execution backend 'pbs'") as err:
        get_backend("pbs")
    assert err.value.hint == "valid backends: local, slurm"


def test_local_backend_reports_a_dead_runner_as_stopped(tmp_path: Path) -> None:
    import subprocess
    import sys

    from progressive.backends.local import this_runner

    plan = make_plan(tmp_path)
    local = get_backend("local")
    rec = runs.submit(plan, GRAPH, local)
    assert states(rec, local) == ["not started"] * 3  # type: ignore[arg-type]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rec.stages["a"].local_state = "running"
    rec.stages["a"].runner = this_runner().model_copy(update={"pid": gone.pid, "start_ticks": None})
    record.save(rec)
    st = stage_statuses(record.load(rec.run_dir))
    assert st[0].state is S.STOPPED and f"pid {gone.pid}" in st[0].reason and st[0].fix == "progressive resume r"
    assert runs.cancel(record.load(rec.run_dir), ["a"]) == []  # nothing alive to stop
    rec.stages["a"].runner = this_runner()  # this very process: alive
    record.save(rec)
    assert stage_statuses(record.load(rec.run_dir))[0].state is S.RUNNING


# ------------------------------------------------------------------ the state table


@pytest.mark.parametrize("word,ours", sorted(SLURM_STATES.items()))
def test_every_slurm_state_maps(word: str, ours: S) -> None:
    assert from_slurm(word) is ours


def test_slurm_words_as_sacct_and_squeue_spell_them() -> None:
    assert from_slurm("CANCELLED by 0") is S.CANCELLED
    assert from_slurm("RUNNING+") is S.RUNNING
    assert from_slurm("PENDING", "DependencyNeverSatisfied") is S.BLOCKED
    assert from_slurm("PENDING", "Dependency") is S.PENDING
    assert from_slurm("SOMETHING_NEW") is S.UNKNOWN and from_slurm("") is S.UNKNOWN
    assert hms("00:01:05") == hms("1:05") == "0:01:05" and hms("1-02:03:04") == "1-2:03:04"


def test_state_sets_agree() -> None:
    assert RUNNING_OR_QUEUED < LIVE and S.BLOCKED in LIVE and S.BLOCKED in RESUMABLE
    assert FINAL == frozenset(S) - RUNNING_OR_QUEUED and not (RESUMABLE & RUNNING_OR_QUEUED)
    assert "pending" in LIVE and S("not started") in RESUMABLE  # states and their words are interchangeable


def test_every_state_has_a_status_colour() -> None:
    from progressive.cli.run_cmds import STATE_STYLE

    assert set(STATE_STYLE) == set(StageState)


def test_resume_command_says_where_each_stage_starts_or_that_nothing_is_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import progressive.backends
    from progressive.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    plan, fake = make_plan(tmp_path), FakeBackend()
    monkeypatch.setattr(progressive.backends, "get_backend", lambda name: fake)
    runs.submit(plan, GRAPH, fake)  # jobs 100, 101, 102, all pending
    assert main(["resume", "r"]) == 0
    assert capsys.readouterr().out == ("nothing to resubmit: every stage is complete or live "
                                       "(a, b, c queued or running)\n")
    finish(plan, "a")
    fake.jobs["100"] = S.COMPLETED
    step = Path(plan.stage("b").checkpoint_dir) / "step_00000112.pt"
    step.parent.mkdir(parents=True, exist_ok=True)
    step.write_bytes(b"state")  # not a real checkpoint: status only lists it, resume only names it
    monkeypatch.setattr("progressive.status.latest_checkpoint_file",
                        lambda st: str(step) if st.name == "b" else None)
    fake.jobs["101"] = S.TIMEOUT
    assert main(["resume", "r"]) == 0
    out = capsys.readouterr().out
    assert "resubmitted b from step 112 as job 103\n" in out
    assert f"resubmitted c from the start, initialised from {Path('checkpoints') / 'r' / 'b' / 'final.pt'} as job 104\n" in out
    finish(plan, "b")
    finish(plan, "c")
    assert main(["resume", "r"]) == 0
    assert capsys.readouterr().out == "nothing to resume: run r is complete (3 of 3 stages)\nnext: progressive report r\n"
