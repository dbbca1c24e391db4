"""`progressive init`: a starter graph in an empty folder, whose printed commands work as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from progressive.starter import STARTERS, graph_text, sweep_text
from tests.util import REPO, run_cli

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "80"}


def test_init_writes_a_graph_whose_next_commands_run(tmp_path: Path) -> None:
    proc = run_cli("init", cwd=tmp_path, env=ENV, check=True)
    assert proc.stdout == ("wrote stages.toml\nnext:\n"
                           "  progressive data generate -o data/tiny.h5 --sizes 64,128,256 --counts 96,48,32\n"
                           "  progressive plan\n  progressive submit --local\n")
    commands = [line.strip().split()[1:] for line in proc.stdout.splitlines()[2:]]
    run_cli(*commands[0], cwd=tmp_path, env=ENV, check=True)
    plan = json.loads(run_cli("plan", "--json", "--check", cwd=tmp_path, env=ENV, check=True).stdout)
    assert plan["data_path"] == str(tmp_path / "data" / "tiny.h5")  # every path relative to the folder
    assert plan["run_dir"] == str(tmp_path / "jobs" / "tiny")
    assert all(Path(st["checkpoint_dir"]).is_relative_to(tmp_path / "checkpoints") for st in plan["stages"])
    ran = run_cli(*commands[2], cwd=tmp_path, env=ENV)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "completed tiny_256" in ran.stdout and ran.stdout.rstrip().endswith("progressive logs tiny tiny_256")


def test_init_refuses_to_replace_and_force_does(tmp_path: Path) -> None:
    run_cli("init", cwd=tmp_path, env=ENV, check=True)
    again = run_cli("init", "--sweep", cwd=tmp_path, env=ENV)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr == (f"error: {tmp_path}: stages.toml already exists\n"
                            "  hint: edit it, write into another folder, or replace it with --force\n")
    assert not (tmp_path / "sweep.toml").exists()  # refused whole: nothing written
    forced = run_cli("init", "--sweep", "--task", "seqlm", "--force", cwd=tmp_path, env=ENV, check=True)
    assert forced.stdout.startswith("wrote stages.toml, sweep.toml\n")
    assert 'task = "progressive.tasks.seqlm:SequenceLMTask"' in (tmp_path / "stages.toml").read_text()


def test_init_into_another_folder_says_cd_first(tmp_path: Path) -> None:
    proc = run_cli("init", "--dir", "proj", cwd=tmp_path, env=ENV, check=True)
    assert proc.stdout.splitlines()[:3] == ["wrote proj/stages.toml", "next:", "  cd proj"]


@pytest.mark.parametrize("kind", sorted(STARTERS))
def test_every_starter_and_its_sweep_plan_cleanly(kind: str, tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text(graph_text(kind))
    (tmp_path / "sweep.toml").write_text(sweep_text(kind))
    make = STARTERS[kind].make_data.split()[1:]
    run_cli(*make, cwd=tmp_path, env=ENV, check=True)
    run_cli("plan", "--check", cwd=tmp_path, env=ENV, check=True)
    sweep = json.loads(run_cli("sweep", "plan", "--json", cwd=tmp_path, env=ENV, check=True).stdout)
    assert len(sweep["variants"]) == 8
    table = run_cli("sweep", "plan", cwd=tmp_path, env=ENV, check=True).stdout  # at 80 columns
    assert "…" not in table and max(map(len, table.splitlines())) <= 80, table
    assert all(f"│ {v['name']} " in table for v in sweep["variants"])


def test_missing_graph_hint_points_at_init(tmp_path: Path) -> None:
    proc = run_cli("plan", cwd=tmp_path, env=ENV)
    assert proc.returncode == 2
    assert proc.stderr == ("error: stages.toml: file not found\n  hint: pass the stage graph with -c PATH, or write "
                           "a starter one here with `progressive init`\n")
    sweep = run_cli("sweep", "plan", cwd=tmp_path, env=ENV)
    assert "write a starter one here with `progressive init --sweep`" in sweep.stderr
