"""Sweeps on this machine: real variants trained by the real trainer in worker processes, on real HDF5 data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.util import REPO, run_cli

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def graph(data: Path) -> str:
    return (f'[run]\nname = "g"\ndata = "{data}"\nseed = 1\n[slurm]\ntime = "5m"\n'
            '[train]\nlr = 0.003\ncheckpoint_every = 50\neval_samples = 2\n'
            '[model.options]\nhidden = 4\nlayers = 1\n'
            '[[stage]]\nname = "s16"\nbucket = 16\nbatch_size = 4\nepochs = 1\ninit_from = "none"\n'
            '[[stage]]\nname = "s32"\nbucket = 32\nbatch_size = 4\nepochs = 1\n')


def setup(tmp_path: Path, data: Path, sweep: str) -> None:
    (tmp_path / "stages.toml").write_text(graph(data))
    (tmp_path / "sweep.toml").write_text(sweep)


def summary(tmp_path: Path, name: str) -> list[dict[str, str]]:
    with (tmp_path / "jobs" / name / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_random_sweep_with_pruning_and_subset(tiny_dataset: Path, tmp_path: Path) -> None:
    setup(tmp_path, tiny_dataset, '[sweep]\nname = "r"\nmethod = "random"\ntrials = 4\nseed = 3\nmetric = "learned_iters"\n'
                                  'parallel = 2\n[sweep.subset]\nmax_samples = 30\nseed = 1\n[sweep.prune]\nkeep = 0.5\n'
                                  '[sweep.params]\n"train.lr" = { low = 1e-3, high = 1e-2, log = true }\n'
                                  '"model.options.hidden" = [4, 8]\n')
    plan = json.loads(run_cli("sweep", "plan", "--json", cwd=tmp_path, check=True).stdout)
    proc = run_cli("sweep", "submit", "--local", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.endswith("next:\n  progressive report r\n  progressive sweep status r\n")
    sweep_dir = tmp_path / "jobs" / "r"
    rec = json.loads((sweep_dir / "sweep.json").read_text())
    # The variants ran what plan showed: same parameters, and the subset's counts as plan predicted them.
    assert [v["params"] for v in rec["variants"]] == [v["params"] for v in plan["variants"]]
    for v in plan["variants"]:
        run = json.loads((sweep_dir / v["name"] / "run.json").read_text())
        assert [st["total_steps"] for st in run["plan"]["stages"]] == v["steps"]
        assert run["plan"]["data_path"] == str(sweep_dir / "data" / "subset.h5")
    pruned = [v for v in rec["variants"] if v["pruned_after"]]
    assert len(pruned) == 2 and all(v["pruned_after"] == "s16" and v["pruned_metric"] is not None for v in pruned)
    decision = rec["prunes"][0]
    assert decision["decided"] and len(decision["kept"]) == 2
    # The kept ones were the better half by the stage's metric (min is best).
    assert max(pruned_m := [v["pruned_metric"] for v in pruned]) >= max(
        float(r["s16.learned_iters"]) for r in summary(tmp_path, "r") if r["variant"] in decision["kept"])
    assert min(pruned_m) >= min(float(r["s16.learned_iters"]) for r in summary(tmp_path, "r")
                                if r["variant"] in decision["kept"])
    rows = {r["variant"]: r for r in summary(tmp_path, "r")}
    for v in pruned:
        assert rows[v["name"]]["state"] == "pruned" and rows[v["name"]]["s32.learned_iters"] == ""
        assert not (tmp_path / "checkpoints" / "r" / v["name"] / "s32").exists()  # never started
    kept = [rows[n] for n in decision["kept"]]
    assert all(r["state"] == "completed" and r["final.learned_iters"] for r in kept)
    # wall_s counts each stage process's set-up, evaluation and saves, not only its optimizer steps.
    for r in kept:
        steps_s = 0.0
        for st in ("s16", "s32"):
            lines = (sweep_dir / r["variant"] / "stages" / st / "metrics.jsonl").read_text().splitlines()
            steps_s += max(json.loads(x).get("elapsed_s") or 0.0 for x in lines)
        assert float(r["wall_s"]) > steps_s > 0, (r["wall_s"], steps_s)
    # best/: the best kept variant's final weights and its parameters and metrics.
    best = json.loads((sweep_dir / "best" / "best.json").read_text())
    winner = min(kept, key=lambda r: (float(r["final.learned_iters"]), r["variant"]))
    assert best["variant"] == winner["variant"] and best["final_metric"] == float(winner["final.learned_iters"])
    assert best["params"] == next(v["params"] for v in rec["variants"] if v["name"] == winner["variant"])
    a = torch.load(sweep_dir / "best" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "checkpoints" / "r" / winner["variant"] / "s32" / "final.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert (sweep_dir / "comparison.png").stat().st_size > 1000
    status = json.loads(run_cli("sweep", "status", "r", "--jobs", str(tmp_path / "jobs"), "--json", check=True).stdout)
    assert status["best"] == winner["variant"]
    assert sorted(v["state"] for v in status["variants"]) == ["completed", "completed", "pruned", "pruned"]
    narrow = run_cli("sweep", "status", "r", "--jobs", str(tmp_path / "jobs"), env={"COLUMNS": "80"}, check=True).stdout
    assert "…" not in narrow and max(map(len, narrow.splitlines())) <= 80, narrow
    assert all(f"{v['name']} " in narrow for v in status["variants"])  # every variant's name, whole
    # A second submit of the same sweep is refused and changes nothing.
    before = (sweep_dir / "sweep.json").read_text()
    again = run_cli("sweep", "submit", "--local", cwd=tmp_path, env=ENV)
    assert again.returncode == 1 and "already exists" in again.stderr and "sweep resume r" in again.stderr
    assert (sweep_dir / "sweep.json").read_text() == before


def test_tpe_draws_at_start_and_tells_the_journal(tiny_dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="the `sweep` extra (scripts/setup.sh installs it)")
    import optuna

    setup(tmp_path, tiny_dataset, '[sweep]\nname = "t"\nmethod = "tpe"\ntrials = 4\nmetric = "learned_iters"\nparallel = 2\n'
                                  '[sweep.params]\n"train.lr" = { low = 1e-3, high = 1e-2, log = true }\n'
                                  '"model.options.hidden" = [4, 8]\n')
    plan = json.loads(run_cli("sweep", "plan", "--json", cwd=tmp_path, check=True).stdout)
    assert all(v["params"] is None and v["drawn_at_start"] for v in plan["variants"])
    proc = run_cli("sweep", "submit", "--local", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep_dir = tmp_path / "jobs" / "t"
    rec = json.loads((sweep_dir / "sweep.json").read_text())
    assert sorted(v["trial"] for v in rec["variants"]) == [0, 1, 2, 3]
    rows = {r["variant"]: r for r in summary(tmp_path, "t")}
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.journal")))
    trials = {t.number: t for t in optuna.load_study(study_name="t", storage=storage).trials}
    for v in rec["variants"]:
        run = json.loads((sweep_dir / v["name"] / "run.json").read_text())
        # The drawn values are what the variant trained with, and the journal has its final metric.
        assert run["plan"]["model"]["options"]["hidden"] == v["params"]["model.options.hidden"]
        assert all(st["train"]["lr"] == v["params"]["train.lr"] for st in run["plan"]["stages"])
        t = trials[v["trial"]]
        assert t.state == optuna.trial.TrialState.COMPLETE and t.params == v["params"]
        assert t.value == float(rows[v["name"]]["final.learned_iters"])


def test_tell_dead_marks_a_died_trial_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial whose chain died is told as failed by the next draw (real Optuna journal; the state table faked)."""
    pytest.importorskip("optuna")
    from progressive.sweep.record import SweepRecord, VariantRecord
    from progressive.sweep import tpe

    rec = SweepRecord(name="d", mode="local", method="tpe", metric="m", goal="min", parallel=1, created_at="",
                      updated_at="", sweep_dir=str(tmp_path), config_path="", sweep_path="sweep.toml",
                      sweep_text='[sweep]\nname = "d"\nmethod = "tpe"\ntrials = 2\nmetric = "m"\n'
                                 '[sweep.params]\n"train.lr" = { low = 0.1, high = 1.0 }\n',
                      variants=[VariantRecord(name="v000", index=0, params=None, stages=["a"], trial=0)])
    study = tpe.study(rec)
    study.ask(tpe.distributions(rec))

    import optuna

    import progressive.sweep.summary as summary_mod

    monkeypatch.setattr(summary_mod, "stage_states", lambda r, runs=None: {"v000": {"a": ("running", None)}})
    tpe.tell_dead(rec, study)
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # alive: left alone
    monkeypatch.setattr(summary_mod, "stage_states", lambda r, runs=None: {"v000": {"a": ("failed", None)}})
    tpe.tell_dead(rec, study)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL


def test_submit_refuses_missing_data_and_writes_nothing(tmp_path: Path) -> None:
    setup(tmp_path, tmp_path / "absent.h5", '[sweep]\nname = "m"\nmetric = "learned_iters"\n'
                                            '[sweep.params]\n"train.lr" = [1e-3]\n')
    proc = run_cli("sweep", "submit", "--local", cwd=tmp_path, env=ENV)
    assert proc.returncode == 1 and "cannot submit variant v000" in proc.stderr and "data generate" in proc.stderr
    assert not (tmp_path / "jobs").exists()
    missing = run_cli("sweep", "status", "--jobs", str(tmp_path / "jobs"), cwd=tmp_path)
    assert missing.returncode == 1 and "no sweeps under" in missing.stderr


def test_local_resume_finishes_failed_variants_without_rerunning_complete_stages(tiny_dataset: Path, tmp_path: Path) -> None:
    marker = tmp_path / "fail-32"
    marker.write_text("bucket 32 fails while this file exists")
    text = graph(tiny_dataset).replace('[model.options]', f'[model]\ntask = "tests.tasks:FlakyTask"\n[model.options]\n'
                                                          f'fail_marker = "{tmp_path}/fail-{{n}}"\nstep_sleep = 0.0')
    (tmp_path / "stages.toml").write_text(text)
    (tmp_path / "sweep.toml").write_text('[sweep]\nname = "f"\nmetric = "learned_iters"\nparallel = 2\n'
                                         '[sweep.params]\n"train.lr" = [1e-3, 3e-3]\n')
    proc = run_cli("sweep", "submit", "--local", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = summary(tmp_path, "f")
    assert [r["state"] for r in rows] == ["failed", "failed"] and all(r["s16.learned_iters"] for r in rows)
    # The status table points at each failed variant's log: `logs VARIANT STAGE --jobs jobs/<sweep>` shows
    # the variant's worker output, the failure's traceback too.
    assert "v000 failed in s32; its log: progressive logs v000 s32 --jobs jobs/f\n" in proc.stdout, proc.stdout
    assert "v001 failed in s32; its log: progressive logs v001 s32 --jobs jobs/f\n" in proc.stdout
    logs = run_cli("logs", "v001", "s32", "--jobs", "jobs/f", cwd=tmp_path, check=True).stdout
    assert "stage s32: starting" in logs and f"RuntimeError: injected failure: {tmp_path}/fail-32 exists" in logs, logs
    assert "stage s16" not in logs
    s16 = tmp_path / "checkpoints" / "f" / "v000" / "s16" / "final.pt"
    first = s16.stat().st_mtime_ns
    dry = run_cli("sweep", "resume", "f", "--jobs", str(tmp_path / "jobs"), "--dry-run", check=True).stdout
    assert "v000 s32: would resubmit" in dry and "s16" not in dry
    marker.unlink()
    proc = run_cli("sweep", "resume", "f", "--jobs", str(tmp_path / "jobs"), env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = summary(tmp_path, "f")
    assert [r["state"] for r in rows] == ["completed", "completed"] and all(r["final.learned_iters"] for r in rows)
    assert s16.stat().st_mtime_ns == first  # the complete stage was not rerun
    assert (tmp_path / "jobs" / "f" / "best" / "final.pt").is_file()


def test_sweep_status_watch_ends_by_itself_when_the_sweep_ends(tiny_dataset: Path, tmp_path: Path) -> None:
    """`sweep status --watch 1`, piped, started as soon as a local sweep exists: a table each time it changes,
    no control codes, and it exits 0 by itself once the sweep is over, the last table all completed. One
    variant at a time: between two stages nothing runs, and the watch must not take that for the end."""
    import os
    import subprocess
    import sys
    import time

    setup(tmp_path, tiny_dataset, '[sweep]\nname = "w"\nmetric = "learned_iters"\nparallel = 1\n'
                                  '[sweep.params]\n"train.lr" = [1e-3, 3e-3]\n')
    submit = subprocess.Popen([sys.executable, "-m", "progressive", "sweep", "submit", "--local"], cwd=tmp_path,
                              env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sweep_dir = tmp_path / "jobs" / "w"
    deadline = time.monotonic() + 120
    while not (sweep_dir / "sweep.json").is_file():
        assert submit.poll() is None and time.monotonic() < deadline, submit.stderr.read() if submit.stderr else ""
        time.sleep(0.1)
    watch = run_cli("sweep", "status", "w", "--jobs", str(tmp_path / "jobs"), "--watch", "1", timeout=300)
    summary_when_watch_ended = (sweep_dir / "summary.csv").is_file()
    assert submit.wait(timeout=120) == 0
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert "\x1b" not in watch.stdout
    tables = watch.stdout.split("sweep w (local, grid): learned_iters, min is best")[1:]
    assert len(tables) >= 3, watch.stdout
    assert "not started" in tables[0], tables[0]
    assert any("running" in t for t in tables)
    assert all(a != b for a, b in zip(tables, tables[1:]))  # printed once per change
    last = [line for line in tables[-1].splitlines() if line.startswith("│ v")]
    assert len(last) == 2 and all("│ completed │" in line for line in last), tables[-1]
    assert tables[-1].rstrip().splitlines()[-1].startswith("best so far: v00")
    assert summary_when_watch_ended  # it ended with the sweep's runner (after its outputs), not before
