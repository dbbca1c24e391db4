"""`progressive calibrate` and what `plan`/`submit` make of it.

Real parts: the real CLI in subprocesses, real HDF5 data (tiny_dataset), real torch
measurements on CPU. The estimate arithmetic and the batch-size fit are pure and are
also tested directly on hand-written entries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from progressive.calibrate import fit_batch_size, spread
from progressive.calibration import (
    FORMAT,
    CalibrationError,
    checkpoint_saves,
    estimate,
    key_diff,
    load_calibration,
    stage_key,
    store_entries,
)
from progressive.config import load_config
from progressive.plan import Plan, build_plan
from tests.util import REPO, run_cli

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


SLURM = {"cpus_per_task": "1", "mem": '"2G"', "time": '"10m"', "signal_delay": '"30s"', "max_requeues": "1"}


def write_graph(tmp_path: Path, data: Path, *, run: str = "cal", slurm: dict[str, str | None] | None = None,
                stage_extra: str = "", throughput: str = "", sleep: float = 0.0, epochs: int = 2,
                batch_size: int = 2) -> Path:
    """Two stages (a: bucket 16, b: bucket 32) of SlowTask; `slurm` overrides [slurm] keys (None drops one)."""
    table = "".join(f"{k} = {v}\n" for k, v in {**SLURM, **(slurm or {})}.items() if v is not None)
    text = (f'[run]\nname = "{run}"\ndata = "{data}"\nseed = 1\n'
            f'[slurm]\n{table}'
            f'[train]\nlr = 0.003\ncheckpoint_every = 1000\neval_samples = 1\n{throughput}'
            f'[model]\ntask = "tests.tasks:SlowTask"\n[model.options]\nhidden = 8\nlayers = 1\nstep_sleep = {sleep}\n'
            f'[[stage]]\nname = "a"\nbucket = 16\nbatch_size = {batch_size}\nepochs = {epochs}\ninit_from = "none"\n'
            f'{stage_extra}'
            '[[stage]]\nname = "b"\nbucket = 32\nbatch_size = 2\nepochs = 1\n')
    path = tmp_path / f"{run}.toml"
    path.write_text(text)
    return path


def plan_of(cfg: Path, counts: dict[int, dict[str, int]] | None = None) -> Plan:
    from progressive.data.format import bucket_counts

    return build_plan(load_config(cfg), cfg, counts=(lambda p: counts) if counts else (lambda p: bucket_counts(p, refresh_sidecar=False)))


def entry(plan: Plan, name: str, *, step: float = 0.1, startup: float = 5.0, rss: float = 500.0,
          eval_s: float = 1.0, ckpt: float = 0.5, **extra: Any) -> dict[str, Any]:
    """A calibration entry as `measure_stage` writes it (for the pure estimate tests)."""
    return {"key": stage_key(plan, plan.stage(name)), "step_s": {"median": step, "p10": step, "p90": step},
            "samples_per_s": 2 / step, "peak_rss_mb": rss, "startup_s": startup, "eval_s": eval_s,
            "checkpoint_s": ckpt, **extra}


# --------------------------------------------------------------------------- pure: estimates


def test_estimate_adds_steps_eval_checkpoints_and_startup(tmp_path: Path, tiny_dataset: Path) -> None:
    plan = plan_of(write_graph(tmp_path, tiny_dataset))
    st = plan.stage("a")
    est = estimate(plan, st, entry(plan, "a"))
    assert est.source == "calibration" and est.calibration == "fresh" and est.segments == 1 and not est.flags
    # steps x step time + eval + (end save + final save) + one start-up
    expected = st.total_steps * 0.1 + 1.0 + 2 * 0.5 + 5.0
    assert est.estimate_min == pytest.approx(expected / 60, abs=0.01)
    assert est.peak_mem_mb == 500.0 and est.mem_request_mb == 2048
    assert est.exit_s is None and any("exit" in n and "not measured" in n for n in est.notes)
    # a measured exit (interpreter teardown) is paid once per job, like the start-up
    with_exit = estimate(plan, st, entry(plan, "a", exit_s=3.0))
    assert with_exit.exit_s == 3.0 and not any("not measured" in n for n in with_exit.notes)
    assert with_exit.estimate_min == pytest.approx((expected + 3.0) / 60, abs=0.01)


def test_exit_cost_is_measured_on_a_probe_and_none_when_it_fails() -> None:
    from progressive.calibrate import exit_cost_s

    torch_exit = exit_cost_s(["torch"])
    assert torch_exit is not None and 0 < torch_exit < 60
    assert exit_cost_s(["no_such_module_for_progressive"]) is None


def test_segments_against_requeues_are_flagged(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = write_graph(tmp_path, tiny_dataset, slurm={"max_requeues": "0"}, stage_extra='time = "1m"\n')
    plan = plan_of(cfg)
    st = plan.stage("a")
    # 1 minute - 30 s signal delay - 5 s start-up = 25 s per segment; 2 s per step needs several.
    est = estimate(plan, st, entry(plan, "a", step=2.0))
    work = st.total_steps * 2.0 + 1.0 + 2 * 0.5
    assert est.segments is not None and est.segments >= -(-work // 25) and est.segments > 1
    assert est.max_segments == 1
    assert any("max_requeues = 0 allows 1" in f for f in est.flags)
    # a limit that leaves nothing after start-up and the signal delay is flagged too
    est = estimate(plan, st, entry(plan, "a", startup=40.0))
    assert est.segments is None and any("no time to train" in f for f in est.flags)


def test_a_signal_delay_shorter_than_a_step_save_and_exit_is_flagged(tmp_path: Path, tiny_dataset: Path) -> None:
    plan = plan_of(write_graph(tmp_path, tiny_dataset))  # signal_delay = 30 s
    ok = estimate(plan, plan.stage("a"), entry(plan, "a", ckpt=5.0, exit_s=2.0, worst_step_s={"max": 3.0}))
    assert not any("signal_delay" in f for f in ok.flags)
    # a 1.5 GB state on a slow disk: 25 s to save, a 4 s step in flight, a 2 s exit = 31 s > 30 s
    est = estimate(plan, plan.stage("a"), entry(plan, "a", ckpt=25.0, exit_s=2.0, worst_step_s={"max": 4.0}))
    assert ("signal_delay = 30 s is shorter than a step, the checkpoint save and the exit (31 s measured): "
            "raise signal_delay to at least 62 s") in est.flags


def test_memory_over_the_request_is_flagged(tmp_path: Path, tiny_dataset: Path) -> None:
    plan = plan_of(write_graph(tmp_path, tiny_dataset))
    assert any("exceeds mem = 2048 MB" in f for f in estimate(plan, plan.stage("a"), entry(plan, "a", rss=3000)).flags)
    near = estimate(plan, plan.stage("a"), entry(plan, "a", rss=1900))
    assert not near.flags and any("within 10%" in n for n in near.notes)


def test_stale_entry_is_reported_not_used(tmp_path: Path, tiny_dataset: Path) -> None:
    old = plan_of(write_graph(tmp_path, tiny_dataset, batch_size=4))
    new = plan_of(write_graph(tmp_path, tiny_dataset, batch_size=2))
    est = estimate(new, new.stage("a"), entry(old, "a"))
    assert est.calibration == "stale" and est.source is None and est.estimate_min is None
    assert est.notes == ["stale calibration (batch_size 4 -> 2): re-run progressive calibrate"]
    assert key_diff({"data": {"file_bytes": 1}}, {"data": {"file_bytes": 2}}) == ["data.file_bytes 1 -> 2"]


def test_calibration_wins_over_throughput_which_stays_the_fallback(tmp_path: Path, tiny_dataset: Path) -> None:
    plan = plan_of(write_graph(tmp_path, tiny_dataset, throughput="throughput = 0.5\n"))
    st = plan.stage("a")
    by_hand = estimate(plan, st, None)
    assert by_hand.source == "throughput" and by_hand.estimate_min == st.estimate_min and by_hand.segments is not None
    measured = estimate(plan, st, entry(plan, "a"))
    assert measured.source == "calibration" and measured.estimate_min != st.estimate_min


def test_checkpoint_saves_count_periodic_end_and_final() -> None:
    assert checkpoint_saves(100, 20, 0.0) == 4 + 2  # steps 20, 40, 60, 80 (not 100: the end save)
    assert checkpoint_saves(100, "30m", 3600.0) == 2 + 2


def test_fit_batch_size_is_linear_and_capped() -> None:
    assert fit_batch_size({1: 110.0, 2: 120.0}, budget_mb=200.0, cap=1000) == 10  # 100 + 10 b <= 200
    assert fit_batch_size({1: 110.0, 2: 120.0}, budget_mb=200.0, cap=8) == 8
    assert fit_batch_size({4: 400.0}, budget_mb=250.0, cap=100) == 2  # one point: all of it per sample
    assert spread([3.0, 1.0, 2.0])["median"] == 2.0


def test_load_calibration_messages(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    assert load_calibration(path) is None
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        load_calibration(path)
    path.write_text(json.dumps({"format": FORMAT, "stages": {"a": {"key": {}}}}))
    with pytest.raises(CalibrationError, match="stage 'a': missing or malformed step_s"):
        load_calibration(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(CalibrationError, match="not a calibration file"):
        load_calibration(path)
    store_entries(path, {"a": {"x": 1}})  # a corrupt file is replaced by fresh entries, atomically
    assert json.loads(path.read_text())["stages"] == {"a": {"x": 1}}


# --------------------------------------------------------------------------- the real command


def plan_json(cfg: Path) -> dict[str, Any]:
    proc = run_cli("plan", "-c", str(cfg), "--json", cwd=cfg.parent, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {s["name"]: s for s in json.loads(proc.stdout)["stages"]} | {"": json.loads(proc.stdout)}


def test_calibrate_local_then_plan_shows_estimates(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = write_graph(tmp_path, tiny_dataset, sleep=0.02)
    before = run_cli("plan", "-c", str(cfg), cwd=tmp_path, env=ENV, check=True).stdout
    assert "no calibration in" in before and "progressive calibrate" in before

    proc = run_cli("calibrate", "--local", "-c", str(cfg), "--steps", "4", "--warmup", "1", "--min-seconds", "0", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "written jobs/cal/calibration.json" in proc.stdout
    doc = json.loads((tmp_path / "jobs" / "cal" / "calibration.json").read_text())
    assert set(doc["stages"]) == {"a", "b"}
    a = doc["stages"]["a"]
    assert a["key"]["bucket"] == 16 and a["key"]["batch_size"] == 2 and a["key"]["device"] == "cpu"
    assert a["step_s"]["n"] == 4 and a["step_s"]["median"] >= 0.02  # SlowTask sleeps 0.02 s per loss call
    assert a["step_s"]["p10"] <= a["step_s"]["median"] <= a["step_s"]["p90"]
    assert a["peak_rss_mb"] >= a["peak_train_rss_mb"] > 50  # a torch process: tens of MB at least
    assert a["startup_s"] > 0 and a["eval_samples"] == 1 and a["checkpoint_mb"] > 0
    assert 0 < a["exit_s"] < 60
    assert a["gpu"] is None and a["batch_search"] is None

    stages = plan_json(cfg)
    for name in ("a", "b"):
        s = stages[name]
        assert s["estimate_source"] == "calibration" and s["calibration"] == "fresh"
        assert s["segments"] == 1 and s["max_segments"] == 2 and s["flags"] == []
        assert s["estimate_min"] > s["total_steps"] * doc["stages"][name]["step_s"]["mean"] / 60
        assert s["peak_mem_mb"] == doc["stages"][name]["peak_rss_mb"] and s["mem_request_mb"] == 2048
    table = run_cli("plan", "-c", str(cfg), cwd=tmp_path, env=ENV, check=True).stdout
    assert "segments" in table and "peak mem" in table and "1/2" in table and "/2G" in table

    # plan stays torch-free with a calibration to read
    code = ("import sys, runpy; sys.argv = ['progressive', 'plan', '-c', sys.argv[1]]\n"
            "try:\n    runpy.run_module('progressive', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**os.environ, **ENV, "COLUMNS": "200"}).stdout
    assert "NO-TORCH" in out and "1/2" in out

    # a changed batch size makes the entry stale: said, not used
    stale = write_graph(tmp_path, tiny_dataset, sleep=0.02, batch_size=4)
    out = run_cli("plan", "-c", str(stale), cwd=tmp_path, env=ENV, check=True).stdout
    assert "a: stale calibration (batch_size 2 -> 4): re-run progressive calibrate" in out
    assert plan_json(stale)["a"]["estimate_source"] is None and plan_json(stale)["b"]["calibration"] == "fresh"


def test_a_stage_that_cannot_finish_is_flagged_and_submit_refuses(tmp_path: Path, tiny_dataset: Path) -> None:
    # 1-minute jobs, 30 s signal delay, no requeue; 0.5 s per step x 12 steps x 10 epochs needs several segments.
    cfg = write_graph(tmp_path, tiny_dataset, sleep=0.5, epochs=10, slurm={"max_requeues": "0"}, stage_extra='time = "1m"\n')
    run_cli("calibrate", "--local", "-c", str(cfg), "--steps", "2", "--warmup", "1", "--min-seconds", "0", "--stages", "a", cwd=tmp_path,
            env=ENV, check=True)
    out = run_cli("plan", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert out.returncode == 0  # plan informs; submit refuses
    assert "a: needs" in out.stdout and "max_requeues = 0 allows 1" in out.stdout
    check = run_cli("plan", "--check", "-c", str(cfg), cwd=tmp_path, env=ENV)  # CI's strict mode fails it
    assert check.returncode == 1 and "check: stage 'a': needs" in check.stderr
    assert check.stderr.endswith("plan --check: 1 problem(s)\n")
    a = plan_json(cfg)["a"]
    assert a["segments"] > a["max_segments"] == 1 and a["flags"]
    sub = run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert sub.returncode == 2 and "Traceback" not in sub.stderr
    assert "cannot run as planned: a: needs" in sub.stderr and "--force" in sub.stderr
    assert not (tmp_path / "jobs" / "cal" / "run.json").exists()  # nothing recorded, nothing run


def test_memory_flag_refuses_submit_and_force_runs_it(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = write_graph(tmp_path, tiny_dataset, slurm={"mem": '"64M"'})
    run_cli("calibrate", "--local", "-c", str(cfg), "--steps", "2", "--warmup", "1", "--min-seconds", "0", cwd=tmp_path, env=ENV, check=True)
    out = run_cli("plan", "-c", str(cfg), cwd=tmp_path, env=ENV, check=True).stdout
    assert "exceeds mem = 64 MB" in out
    refused = run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert refused.returncode == 2 and "exceeds mem = 64 MB" in refused.stderr
    forced = run_cli("submit", "--local", "--force", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert (tmp_path / "checkpoints" / "cal" / "b" / "final.pt").is_file()


def test_find_batch_size_on_cpu(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = write_graph(tmp_path, tiny_dataset, slurm={"mem": '"4G"'})
    proc = run_cli("calibrate", "--local", "--find-batch-size", "-c", str(cfg), "--stages", "a", "--steps", "2",
                   "--warmup", "1", "--min-seconds", "0", "--json", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    search = json.loads(proc.stdout)["stages"]["a"]["batch_search"]
    train = plan_json(cfg)["a"]["samples"]["train"]
    # 4 GB holds the whole tiny bucket: the answer is capped at the bucket, and every tried size fitted
    assert search["budget_mb"] == pytest.approx(0.9 * 4096) and search["batch_size"] == search["cap"] == train
    assert all(v <= search["budget_mb"] for v in search["measured"].values()) and "1" in search["measured"]

    # a budget below what the process needs at batch 1: no batch fits, and plan says the RSS exceeds mem
    small = write_graph(tmp_path, tiny_dataset, run="small", slurm={"mem": '"100M"'})
    proc = run_cli("calibrate", "--local", "--find-batch-size", "-c", str(small), "--stages", "a", "--steps", "2",
                   "--warmup", "1", "--min-seconds", "0", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "none (<= 90M)" in proc.stdout
    assert json.loads((tmp_path / "jobs" / "small" / "calibration.json").read_text())["stages"]["a"]["suggested_batch_size"] is None


def test_bad_input_messages(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = write_graph(tmp_path, tiny_dataset, slurm={"mem": None})
    proc = run_cli("calibrate", "--local", "--find-batch-size", "-c", str(cfg), "--stages", "a", "--steps", "1",
                   "--warmup", "1", "--min-seconds", "0", cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--find-batch-size on CPU needs the stage's memory request" in proc.stderr and "set mem" in proc.stderr

    for bad, what in ((["--margin", "1.5"], "between 0 and 1"), (["--steps", "0"], "positive whole number"),
                      (["--min-seconds", "-1"], "non-negative number of seconds"),
                      (["--time-limit", "soon"], "cannot parse")):
        proc = run_cli("calibrate", "--local", "-c", str(cfg), *bad, cwd=tmp_path, env=ENV)
        assert proc.returncode == 2 and what in proc.stderr, (bad, proc.stderr)

    wide = write_graph(tmp_path, tiny_dataset, run="wide", slurm={"tasks_per_node": "2"})
    proc = run_cli("calibrate", "--local", "--find-batch-size", "-c", str(wide), cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "--find-batch-size measures one process" in proc.stderr
    proc = run_cli("calibrate", "--local", "-c", str(wide), cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "calibrate them on Slurm (without --local)" in proc.stderr

    missing = write_graph(tmp_path, tmp_path / "nope.h5", run="nodata")
    proc = run_cli("calibrate", "--local", "-c", str(missing), cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "nope.h5" in proc.stderr and "progressive data generate" in proc.stderr


def test_plan_with_corrupt_calibration_says_so(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = write_graph(tmp_path, tiny_dataset)
    path = tmp_path / "jobs" / "cal" / "calibration.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "stages": {"a": ')
    proc = run_cli("plan", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "calibration:" in proc.stdout and "not valid JSON" in proc.stdout and "progressive calibrate" in proc.stdout
    doc = plan_json(cfg)[""]
    assert "not valid JSON" in doc["calibration_error"] and doc["stages"][0]["estimate_source"] is None


def test_a_failing_task_is_reported_and_earlier_stages_are_kept(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = write_graph(tmp_path, tiny_dataset)
    marker = tmp_path / "fail-{n}"
    cfg.write_text(cfg.read_text().replace('task = "tests.tasks:SlowTask"', 'task = "tests.tasks:FlakyTask"')
                   .replace("step_sleep = 0.0", f'step_sleep = 0.0\nfail_marker = "{marker}"'))
    Path(str(marker).format(n=32)).write_text("")  # stage b (bucket 32) fails, stage a measures fine
    proc = run_cli("calibrate", "--local", "-c", str(cfg), "--steps", "1", "--warmup", "1", "--min-seconds", "0",
                   cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr.split("measurement failed")[0]
    assert "stage 'b': the measurement failed (exit 1)" in proc.stderr and "injected failure" in proc.stderr
    doc = json.loads((tmp_path / "jobs" / "cal" / "calibration.json").read_text())
    assert set(doc["stages"]) == {"a"}  # what was measured before the failure is kept
