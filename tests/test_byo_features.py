"""A task that owns its data (the sequence task on the dense-array layout) through the layer above one run:
calibrate, plan's estimates, a local run, report with its transfer matrix, and a sweep plan, all from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from tests.util import run_cli

ENV = {"OMP_NUM_THREADS": "1"}
GRAPH = """
[run]
name = "byo"
data = "data/seq"
[slurm]
mem = "2G"
time = "10m"
[train]
lr = 3e-3
checkpoint_every = 20
eval_samples = 4
[model]
task = "progressive.tasks.seqlm:SequenceLMTask"
[model.options]
vocab = 16
d_model = 16
layers = 1
heads = 2
max_len = 64
[[stage]]
name = "short"
bucket = 32
batch_size = 8
epochs = 1
init_from = "none"
[[stage]]
name = "long"
bucket = 64
batch_size = 4
epochs = 1
"""
SWEEP = """
[sweep]
name = "byo-lr"
method = "grid"
metric = "loss"
goal = "min"
[sweep.params]
"train.lr" = [1e-3, 3e-3]
"""


def test_sequence_task_through_calibrate_report_and_sweep_plan(tmp_path: Path) -> None:
    (tmp_path / "byo.toml").write_text(GRAPH)
    (tmp_path / "sweep.toml").write_text(SWEEP)
    run_cli("data", "generate-seq", "-o", "data/seq", "--lengths", "32,64", "--counts", "40,24", cwd=tmp_path,
            check=True, env=ENV)

    cal = run_cli("calibrate", "--local", "-c", "byo.toml", "--steps", "3", "--warmup", "1", "--min-seconds", "0",
                  cwd=tmp_path, env=ENV)
    assert cal.returncode == 0, cal.stdout + cal.stderr
    plan = json.loads(run_cli("plan", "-c", "byo.toml", "--json", cwd=tmp_path, check=True, env=ENV).stdout)
    for st in plan["stages"]:
        assert st["samples"]["train"] > 0 and st["total_steps"] > 0
        assert st["estimate_source"] == "calibration" and st["estimate_min"] > 0, st
        assert st["segments"] == 1 and st["peak_mem_mb"] > 0

    run = run_cli("submit", "--local", "-c", "byo.toml", cwd=tmp_path, env=ENV)
    assert run.returncode == 0, run.stdout + run.stderr
    rep = run_cli("report", "byo", cwd=tmp_path, env=ENV)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    folder = tmp_path / "jobs" / "byo" / "report"
    index = (folder / "index.md").read_text()
    assert "Transfer" in index and "short" in index and "long" in index
    cells = json.loads((folder / "transfer.json").read_text())
    assert len(cells) == 4  # both stages' weights on both buckets, by the task's own evaluate()
    assert all("loss" in c for c in cells.values())

    sweep = run_cli("sweep", "plan", "-c", "byo.toml", "-s", "sweep.toml", "--json", cwd=tmp_path, env=ENV)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    variants = json.loads(sweep.stdout)["variants"]
    assert [v["name"] for v in variants] == ["v000", "v001"]
    assert [v["steps"] for v in variants] == [[st["total_steps"] for st in plan["stages"]]] * 2  # counted like plan
