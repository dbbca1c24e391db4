"""The plan: step counts, parents, selection, inputs, the sbatch script, and `plan` on the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from progressive.config import parse_config
from progressive.errors import ConfigError
from progressive.plan import build_plan, missing_inputs, steps_per_epoch
from progressive.backends.slurm import render_script, sbatch_parameters
from tests.util import REPO, graph_toml, run_cli

HEAD = '[run]\nname = "t"\ndata = "d.h5"\n[slurm]\ntime = "90m"\nsignal_delay = "45s"\nmem = "3G"\n'
COUNTS = {16: {"train": 10, "val": 2, "test": 1}, 32: {"train": 7, "val": 1, "test": 1}}


def counts(_path: Path) -> dict[int, dict[str, int]]:
    return COUNTS


def make(tmp_path: Path, stages: list[dict], head: str = HEAD, **kw: object):  # type: ignore[no-untyped-def]
    cfg = parse_config(graph_toml(stages, head=head))
    return build_plan(cfg, tmp_path / "stages.toml", counts=counts, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("n, bs, world, accum, expected", [
    (10, 4, 1, 1, 3), (8, 4, 1, 1, 2), (10, 4, 2, 1, 2), (10, 1, 1, 3, 4), (1, 8, 1, 1, 1), (7, 2, 2, 2, 1),
])
def test_steps_per_epoch(n: int, bs: int, world: int, accum: int, expected: int) -> None:
    assert steps_per_epoch(n, bs, world, accum) == expected


def test_chain_paths_parents_and_steps(tmp_path: Path) -> None:
    plan = make(tmp_path, [{"name": "a", "bucket": 16, "batch_size": 4, "epochs": 2},
                           {"name": "b", "bucket": 32, "batch_size": 2, "epochs": 3}])
    a, b = plan.stages
    assert (a.samples, a.steps_per_epoch, a.total_steps) == (COUNTS[16], 3, 6)
    assert (b.steps_per_epoch, b.total_steps) == (4, 12)
    assert a.init_from.kind == "none" and a.depends_on == ()
    assert b.init_from.kind == "stage" and b.depends_on == ("a",)
    assert b.init_from.checkpoint == a.final_checkpoint == str(tmp_path / "checkpoints" / "t" / "a" / "final.pt")
    assert plan.run_dir == str(tmp_path / "jobs" / "t")
    assert plan.data_path == str(tmp_path / "d.h5")
    assert a.time_limit_min == 90 and a.slurm.mem == 3072


def test_missing_bucket_and_unknown_counts(tmp_path: Path) -> None:
    plan = make(tmp_path, [{"name": "a", "bucket": 64}])
    assert plan.stages[0].samples == {"train": 0, "val": 0, "test": 0}
    assert missing_inputs(plan) == ["stage 'a': bucket 64 is not in d.h5 (present: 16, 32)"]
    cfg = parse_config(graph_toml([{"name": "a"}], head=HEAD))
    unknown = build_plan(cfg, tmp_path / "s.toml", counts=None)
    assert unknown.stages[0].samples is None and unknown.stages[0].total_steps is None


def test_selection_outside_parent_needs_its_final_checkpoint(tmp_path: Path) -> None:
    stages = [{"name": "a", "bucket": 16}, {"name": "b", "bucket": 32}]
    plan = make(tmp_path, stages, select=["b"])
    assert plan.names == ["b"] and plan.stages[0].depends_on == ()
    problems = missing_inputs(plan)
    assert len(problems) == 1 and "parent 'a' is not selected and has no final checkpoint" in problems[0]
    final = Path(make(tmp_path, stages).stages[0].final_checkpoint)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"weights")
    assert missing_inputs(make(tmp_path, stages, select=["b"])) == []


def test_selection_and_run_name_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no stage named 'zz'.*") as info:
        make(tmp_path, [{"name": "a"}], select=["zz"])
    assert "valid stages: a" in str(info.value)
    with pytest.raises(ConfigError, match="invalid run name"):
        make(tmp_path, [{"name": "a"}], run_name="../escape")


def test_init_from_path(tmp_path: Path) -> None:
    plan = make(tmp_path, [{"name": "a", "bucket": 16, "init_from": "weights/pre.pt"}])
    assert plan.stages[0].init_from.kind == "path"
    assert plan.stages[0].init_from.checkpoint == str(tmp_path / "weights" / "pre.pt")
    assert "init_from names a checkpoint that does not exist" in missing_inputs(plan)[0]


def test_time_estimate_needs_throughput(tmp_path: Path) -> None:
    plan = make(tmp_path, [{"name": "a", "bucket": 16, "epochs": 6, "throughput": 0.5}])
    assert plan.stages[0].estimate_min == 2.0  # 10 samples * 6 epochs / 0.5 per s = 120 s


def test_sbatch_script_has_the_request(tmp_path: Path) -> None:
    head = HEAD + 'partition = "gpu"\ngpus_per_node = 2\ntasks_per_node = 2\nsignal = "USR1"\nextra = {mail-type = "END"}\n'
    plan = make(tmp_path, [{"name": "a", "bucket": 16}, {"name": "b", "bucket": 32}], head=head)
    script = render_script(plan, plan.stages[1])
    for line in ["#SBATCH --job-name=t.b", "#SBATCH --time=90", "#SBATCH --mem=3072M", "#SBATCH --partition=gpu",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --signal=USR1@45",
                 "#SBATCH --requeue", "#SBATCH --mail-type=END", "#SBATCH --dependency='afterok:<a>'",
                 "export SUBMITIT_PREEMPT_SIGNAL=USR1", "expandable_segments:True", "submitit.core._submit"]:
        assert line in script, line
    assert "--dependency" not in render_script(plan, plan.stages[0])
    assert sbatch_parameters(plan, plan.stages[1], "afterok:17")["dependency"] == "afterok:17"


def test_plan_json_and_dry_run_via_cli(tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text(graph_toml([{"name": "a", "bucket": 16}, {"name": "b", "bucket": 32}], head=HEAD))
    proc = run_cli("plan", "--json", cwd=tmp_path, check=True)
    data = json.loads(proc.stdout)
    a, b = data["stages"]
    for key in ("name", "bucket", "batch_size", "epochs", "time_limit_min", "init_from", "depends_on", "sbatch"):
        assert key in b
    assert (b["init_from"], b["depends_on"], b["time_limit_min"]) == ("a", ["a"], 90)
    assert a["init_from"] == "none"
    dry = run_cli("plan", "--dry-run", cwd=tmp_path, check=True).stdout
    assert "sbatch script: a" in dry and "afterok:<a>" in dry and "nothing written, nothing submitted" in dry
    assert b["sbatch"].strip() in dry.replace("\r", "")  # the JSON and the dry-run show the same script
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.toml"]  # plan wrote nothing


def test_stages_toml_dry_run_shows_all_six(tmp_path: Path) -> None:
    out = run_cli("plan", "--dry-run", cwd=REPO, check=True).stdout
    for name in ["small_512", "small_1024", "mid_1536", "mid_2048", "mid_3072", "large_4096"]:
        assert f"sbatch script: {name}" in out
        assert f"#SBATCH --job-name=curriculum.{name}" in out
    assert "#SBATCH --time=480" in out and "#SBATCH --gpus-per-node=1" in out


def test_plan_and_help_do_not_import_torch(tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text(graph_toml([{"name": "a", "bucket": 16}], head=HEAD))
    code = ("import sys, runpy; sys.argv = ['progressive'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('progressive', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', 'SUBMITIT' if 'submitit' in sys.modules else 'NO-SUBMITIT')")
    for args in (["--help"], ["plan"], ["plan", "--dry-run"], ["plan", "--check"], ["status"], ["runs"], ["schema"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert "NO-TORCH" in proc.stdout, (args, proc.stdout[-300:], proc.stderr[-500:])
    proc = subprocess.run([sys.executable, "-c", code, "plan"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "NO-SUBMITIT" in proc.stdout  # the table alone needs no submitit either


def test_plan_reads_real_counts_and_writes_nothing(tmp_path: Path, tiny_dataset: Path) -> None:
    """Real HDF5 data, its sidecar index removed: plan reads the counts from the file and writes no new index."""
    import shutil

    data = tmp_path / "d.h5"
    shutil.copy(tiny_dataset, data)
    (tmp_path / "stages.toml").write_text(graph_toml([{"name": "a", "bucket": 16}, {"name": "b", "bucket": 64},
                                                      {"name": "c", "bucket": 48}], head=HEAD))
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli("plan", "--json", cwd=tmp_path)
    assert proc.returncode == 2 and "stage 'c': bucket 48 is not in d.h5 (present: 16, 32, 64)" in proc.stderr
    stages = {s["name"]: s for s in json.loads(proc.stdout)["stages"]}
    assert stages["a"]["samples"]["train"] > 0 and sum(stages["b"]["samples"].values()) == 6
    assert stages["c"]["samples"] == {"train": 0, "val": 0, "test": 0}
    table = run_cli("plan", cwd=tmp_path).stdout
    assert "missing" in table  # bucket 48 has no samples
    assert sorted(p.name for p in tmp_path.iterdir()) == before
