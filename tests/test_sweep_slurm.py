"""Sweeps on the real single-node Slurm cluster: arrays chained by aftercorr, a task requeuing itself only,
pruning by a Slurm job, cancel and resume of one variant, the summary job's outputs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.slurm_support import slurm_cluster, slurm_jobs, wait_for  # noqa: F401
from tests.util import REPO, run_cli

pytestmark = pytest.mark.slurm

ENV = {"PYTHONPATH": str(REPO)}
FINAL = ("completed", "failed", "cancelled", "timeout", "blocked", "pruned")


def graph(data: Path) -> str:
    return (f'[run]\nname = "g"\ndata = "{data}"\nseed = 2\n'
            '[slurm]\ncpus_per_task = 1\nmem = "1G"\ntime = "1m"\nsignal_delay = "20s"\nmax_requeues = 8\n'
            '[train]\nlr = 0.003\ncheckpoint_every = 50\neval_samples = 2\n'
            '[model]\ntask = "tests.tasks:SlowTask"\n[model.options]\nhidden = 4\nlayers = 1\nstep_sleep = 0.25\n'
            '[[stage]]\nname = "s16"\nbucket = 16\nbatch_size = 4\nepochs = 1\ninit_from = "none"\n'
            '[[stage]]\nname = "s32"\nbucket = 32\nbatch_size = 4\nepochs = 1\n')


def sweep_status(name: str, jobs: Path) -> dict[str, Any]:
    return json.loads(run_cli("sweep", "status", name, "--jobs", str(jobs), "--json", check=True).stdout)


def in_queue(job_ids: list[str]) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def settled(name: str, jobs: Path) -> Any:
    """Every variant final and no job of the sweep left in the queue (the summary job included)."""
    rec = json.loads((jobs / name / "sweep.json").read_text())
    ids = [a["job_id"] for a in rec["arrays"]] + [p["job_id"] for p in rec["prunes"] if p["job_id"]] + [rec["final_job"]]
    st = sweep_status(name, jobs)
    return st if all(v["state"] in FINAL for v in st["variants"]) and not in_queue(ids) else False


def sacct_rows(array_ids: list[str]) -> list[list[str]]:
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", ",".join(array_ids), "--format", "JobID,State"],
                         capture_output=True, text=True, check=True)
    return [line.split("|") for line in out.stdout.splitlines() if line]


def summary(jobs: Path, name: str) -> dict[str, dict[str, str]]:
    with (jobs / name / "summary.csv").open() as f:
        return {r["variant"]: r for r in csv.DictReader(f)}


def test_grid_as_arrays_one_task_requeues_itself_cancel_and_resume(slurm_cluster: None, slurm_jobs: Path,
                                                                   tiny_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text(graph(tiny_dataset))
    # v003 trains 48 epochs of ~1.5 s: it outlasts its 1-minute limit; the others take seconds.
    (tmp_path / "sweep.toml").write_text('[sweep]\nname = "grid"\nmetric = "learned_iters"\nparallel = 2\n'
                                         '[sweep.params]\n"stage.s16.epochs" = [1, 2, 3, 48]\n')
    proc = run_cli("sweep", "submit", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = tmp_path / "jobs"
    cancel = run_cli("sweep", "cancel", "grid", "--jobs", str(jobs), "--variants", "v002", check=True)
    assert "cancelled" in cancel.stdout
    rec = json.loads((jobs / "grid" / "sweep.json").read_text())
    a0, a1 = rec["arrays"]
    assert (a0["key"], sorted(a0["tasks"]), a1["dependency"]) == ("a0", ["0", "1", "2", "3"], f"aftercorr:{a0['job_id']}")
    # What plan showed is what was submitted.
    shown = json.loads(run_cli("sweep", "plan", "--json", cwd=tmp_path, check=True).stdout)
    assert Path(a0["script"]).read_text() == shown["arrays"][0]["sbatch"]
    runs = {v: json.loads((jobs / "grid" / v / "run.json").read_text()) for v in ("v000", "v003")}
    assert runs["v003"]["stages"]["s16"]["submissions"][0]["job_id"] == f"{a0['job_id']}_3"

    st = wait_for(lambda: settled("grid", jobs), 900, "the sweep to settle")
    states = {v["name"]: v["state"] for v in st["variants"]}
    assert states["v000"] == states["v001"] == states["v003"] == "completed", states
    assert states["v002"] in ("cancelled", "blocked"), states
    # Only task 3 was requeued (sacct -D lists one row per attempt), and its own counter says so.
    rows = sacct_rows([a0["job_id"]])
    attempts = {t: sum(1 for jid, _ in rows if jid == f"{a0['job_id']}_{t}") for t in range(4)}
    assert attempts[3] >= 2 and attempts[0] == attempts[1] == 1, rows
    counter = json.loads((jobs / "grid" / "v003" / "stages" / "s16" / "requeues.json").read_text())
    assert counter["job_id"] == f"{a0['job_id']}_3" and counter["timeouts"] >= 1
    # aftercorr held through the requeues: v003's second stage started from its first stage's final weights.
    events = [json.loads(x) for x in (jobs / "grid" / "v003" / "stages" / "s32" / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e.get("event") == "start")
    assert start["init_from"].endswith("grid/v003/s16/final.pt")
    table = summary(jobs, "grid")
    assert table["v002"]["state"] in ("cancelled", "blocked") and table["v000"]["state"] == "completed"
    assert float(table["v003"]["cpu_hours"]) > float(table["v000"]["cpu_hours"]) > 0

    resumed = run_cli("sweep", "resume", "grid", "--jobs", str(jobs), env=ENV)
    assert resumed.returncode == 0 and "v002 s16: resubmitted" in resumed.stdout, resumed.stdout + resumed.stderr
    st = wait_for(lambda: settled("grid", jobs), 600, "the resumed variant to finish")
    assert all(v["state"] == "completed" for v in st["variants"]), st
    table = summary(jobs, "grid")
    assert all(r["state"] == "completed" and r["final.learned_iters"] for r in table.values())
    best = json.loads((jobs / "grid" / "best" / "best.json").read_text())
    assert best["variant"] == st["best"] and (jobs / "grid" / "best" / "final.pt").is_file()
    assert (jobs / "grid" / "comparison.png").is_file()


def test_prune_job_stops_half_after_the_first_stage(slurm_cluster: None, tiny_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text(graph(tiny_dataset).replace("step_sleep = 0.25", "step_sleep = 0.0"))
    (tmp_path / "sweep.toml").write_text('[sweep]\nname = "halve"\nmetric = "learned_iters"\nparallel = 2\n'
                                         '[sweep.prune]\nkeep = 0.5\n'
                                         '[sweep.params]\n"train.lr" = [1e-4, 1e-3, 3e-3, 1e-2]\n')
    proc = run_cli("sweep", "submit", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = tmp_path / "jobs"
    # `sweep status --watch`, piped, from submit on: it must end by itself once every variant is final.
    watched = tmp_path / "watch.out"
    with watched.open("w") as out:
        watch = subprocess.Popen([sys.executable, "-m", "progressive", "sweep", "status", "halve", "--jobs", str(jobs),
                                  "--watch", "2"], stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, **ENV, "COLUMNS": "200"})
    st = wait_for(lambda: settled("halve", jobs), 600, "the pruned sweep to settle")
    assert watch.wait(timeout=60) == 0, watched.read_text()
    tables = watched.read_text().split("sweep halve (slurm, grid): learned_iters, min is best")[1:]
    assert len(tables) >= 2 and "\x1b" not in watched.read_text()
    assert "pending" in tables[0] or "running" in tables[0], tables[0]
    last = sorted(line.split("│")[3].strip() for line in tables[-1].splitlines() if line.startswith("│ v"))
    assert last == ["completed", "completed", "pruned", "pruned"], tables[-1]
    rec = json.loads((jobs / "halve" / "sweep.json").read_text())
    decision = rec["prunes"][0]
    assert decision["decided"] and decision["job_id"] and len(decision["kept"]) == 2 and len(decision["pruned"]) == 2
    states = {v["name"]: v["state"] for v in st["variants"]}
    assert sorted(states.values()) == ["completed", "completed", "pruned", "pruned"], states
    a1 = rec["arrays"][1]
    assert a1["dependency"] == f"aftercorr:{rec['arrays'][0]['job_id']},afterany:{decision['job_id']}"
    by_task = dict(sacct_rows([a1["job_id"]]))
    for name, metric in decision["pruned"].items():
        index = int(name[1:])
        assert by_task[f"{a1['job_id']}_{index}"].startswith("CANCELLED")  # its later task never ran
        row = summary(jobs, "halve")[name]
        assert row["state"] == "pruned" and float(row["s16.learned_iters"]) == metric and row["s32.learned_iters"] == ""
    kept_metrics = [float(summary(jobs, "halve")[n]["s16.learned_iters"]) for n in decision["kept"]]
    assert max(kept_metrics) <= min(decision["pruned"].values())
    # `logs VARIANT STAGE --jobs jobs/<sweep>` prints that variant's array task file, as sbatch wrote it.
    kept = decision["kept"][0]
    out = run_cli("logs", kept, "s32", "--jobs", str(jobs / "halve"), check=True).stdout
    assert out == (jobs / "halve" / "slurm" / f"{a1['job_id']}_{int(kept[1:])}.out").read_text()
    assert "stage s32: starting" in out and "stage s32: completed" in out, out
    pruned = next(iter(decision["pruned"]))
    first = run_cli("logs", pruned, "s16", "--jobs", str(jobs / "halve"), check=True).stdout
    assert "stage s16: completed" in first and "stage s32" not in first, first


def test_sbatch_refusal_leaves_nothing(slurm_cluster: None, tiny_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text(graph(tiny_dataset))
    (tmp_path / "sweep.toml").write_text('[sweep]\nname = "refused"\nmetric = "learned_iters"\n'
                                         '[sweep.params]\n"slurm.partition" = ["nosuchpartition"]\n')
    proc = run_cli("sweep", "submit", cwd=tmp_path, env=ENV)
    assert proc.returncode == 1 and "sbatch failed" in proc.stderr and "nosuchpartition" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "jobs" / "refused").exists()  # no half-submitted sweep left behind


def test_tpe_on_the_cluster_draws_from_the_journal_its_array_tasks_fed(slurm_cluster: None, tiny_dataset: Path,
                                                                      tmp_path: Path) -> None:
    """method = "tpe" as Slurm array tasks: each task draws its trial's parameters when it starts, from the Optuna
    journal on the shared file system, and tells it its final metric; with parallel = 2 the last two trials are
    drawn after the first two told theirs, so their suggestions come from what the array tasks wrote."""
    optuna = pytest.importorskip("optuna", reason="the `sweep` extra (scripts/setup.sh installs it)")
    (tmp_path / "stages.toml").write_text(graph(tiny_dataset).replace("step_sleep = 0.25", "step_sleep = 0.0")
                                          .split('[[stage]]\nname = "s32"')[0])
    (tmp_path / "sweep.toml").write_text('[sweep]\nname = "tpe"\nmethod = "tpe"\ntrials = 4\nmetric = "learned_iters"\n'
                                         'parallel = 2\n[sweep.params]\n"train.lr" = { low = 1e-3, high = 1e-2, log = true }\n')
    proc = run_cli("sweep", "submit", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = tmp_path / "jobs"
    st = wait_for(lambda: settled("tpe", jobs), 600, "the tpe sweep to settle")
    assert sorted(v["state"] for v in st["variants"]) == ["completed"] * 4, st
    rec = json.loads((jobs / "tpe" / "sweep.json").read_text())
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(jobs / "tpe" / "optuna.journal")))
    trials = {t.number: t for t in optuna.load_study(study_name="tpe", storage=storage).trials}
    rows = summary(jobs, "tpe")
    assert sorted(trials) == [0, 1, 2, 3] == sorted(v["trial"] for v in rec["variants"])
    for v in rec["variants"]:
        t = trials[v["trial"]]
        run = json.loads((jobs / "tpe" / v["name"] / "run.json").read_text())
        assert t.state == optuna.trial.TrialState.COMPLETE and t.params == v["params"]
        assert all(stage["train"]["lr"] == v["params"]["train.lr"] for stage in run["plan"]["stages"])
        assert t.value == float(rows[v["name"]]["final.learned_iters"])
    first_done = min(trials[0].datetime_complete, trials[1].datetime_complete)
    assert max(trials[2].datetime_start, trials[3].datetime_start) >= first_done  # drawn from a journal with results
