"""`sweep status` of a Slurm sweep from its real records, Slurm's answers faked: what each variant is, and when
`--watch` takes the sweep for ended. The real-cluster run is in tests/test_sweep_slurm.py (the prune test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from progressive.backends.base import JobInfo
from progressive.states import StageState
from tests.util import fake_slurm_sweep, run_cli

S = StageState


def answer(monkeypatch: pytest.MonkeyPatch, infos: dict[str, StageState]) -> None:
    """What sacct + squeue say, per array task ("ARRAY_TASK")."""
    from progressive.sweep import slurm_array

    monkeypatch.setattr(slurm_array, "query_tasks", lambda ids: {
        k: JobInfo(job_id=k, state=v, native_state=v.value.upper()) for k, v in infos.items()})
    monkeypatch.setattr(slurm_array, "usage", lambda ids: {})


def finish(tmp_path: Path, variant: str, stage: str) -> None:
    final = tmp_path / "checkpoints" / "sw" / variant / stage / "final.pt"
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_bytes(b"weights")


def test_a_task_missing_from_slurms_answer_is_cancelled_unless_its_stage_completed(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from progressive.sweep import record as srecord
    from progressive.sweep.summary import ended, rows

    sweep_dir = fake_slurm_sweep(tmp_path, tiny_dataset, monkeypatch)
    # Both first stages done; v000's second task has just ended (gone from squeue, not yet in sacct),
    # v001's was cancelled while pending inside its array (Slurm never lists it): only its array is known.
    finish(tmp_path, "v000", "s16")
    finish(tmp_path, "v001", "s16")
    finish(tmp_path, "v000", "s32")
    answer(monkeypatch, {"500_0": S.COMPLETED, "500_1": S.COMPLETED, "501_9": S.CANCELLED})
    rec = srecord.load(sweep_dir)
    table = {r.name: r for r in rows(rec)}
    assert (table["v000"].state, table["v000"].stages) == ("completed", {"s16": "completed", "s32": "completed"})
    assert (table["v001"].state, table["v001"].stages) == ("cancelled", {"s16": "completed", "s32": "cancelled"})
    assert ended(rec, list(table.values()))
    # A task still pending (its parent just done) keeps the sweep going.
    answer(monkeypatch, {"500_0": S.COMPLETED, "500_1": S.COMPLETED, "501_1": S.PENDING})
    table = {r.name: r for r in rows(rec)}
    assert table["v001"].state == "pending" and not ended(rec, list(table.values()))


def test_watch_of_an_ended_slurm_sweep_prints_one_table_and_exits(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep_dir = fake_slurm_sweep(tmp_path, tiny_dataset, monkeypatch)
    for v in ("v000", "v001"):
        for st in ("s16", "s32"):
            finish(tmp_path, v, st)
    # No Slurm at all in the subprocess (sbatch not on PATH here, or the cluster's): complete on disk is enough.
    proc = run_cli("sweep", "status", "sw", "--jobs", str(sweep_dir.parent), "--watch", "1", timeout=60,
                   env={"PATH": "/nonexistent"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("sweep sw (slurm, grid): learned_iters, min is best") == 1
    assert [line.split("│")[3].strip() for line in proc.stdout.splitlines() if line.startswith("│ v")] == \
        ["completed", "completed"]


def test_a_local_sweep_ends_when_its_runner_is_gone(tmp_path: Path) -> None:
    """Between two stages every variant may look final (not started, completed); the runner decides."""
    import subprocess
    import sys

    from progressive.backends.local import this_runner
    from progressive.sweep.record import SweepRecord, VariantRecord
    from progressive.sweep.summary import VariantRow, ended

    rec = SweepRecord(name="l", mode="local", method="grid", metric="m", goal="min", parallel=1, created_at="",
                      updated_at="", sweep_dir=str(tmp_path), config_path="", sweep_path="", sweep_text="",
                      variants=[VariantRecord(name="v000", index=0, params={}, stages=["a", "b"])])
    between = [VariantRow("v000", {}, "not started", {"a": "completed", "b": "not started"}, {}, None, 0.0, 0.0, 0.0)]
    running = [VariantRow("v000", {}, "running", {"a": "completed", "b": "running"}, {}, None, 0.0, 0.0, 0.0)]
    rec.runner = this_runner()
    assert not ended(rec, between) and not ended(rec, running)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rec.runner = this_runner().model_copy(update={"pid": gone.pid, "start_ticks": None})
    assert ended(rec, between) and not ended(rec, running)  # killed without a word: nothing will start b
    rec.runner = None
    assert ended(rec, between)
