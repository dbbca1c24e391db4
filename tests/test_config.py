"""The stage-graph file: parsing, defaults, overrides, and every rejected-file message."""

from __future__ import annotations

from pathlib import Path

import pytest

from progressive.config import (
    find_cycle,
    json_schema,
    load_config,
    parse_config,
    resolved,
    topological_order,
)
from progressive.errors import ConfigError
from progressive.units import parse_duration_min, parse_mem_mb, parse_seconds
from tests.util import REPO, graph_toml, run_cli

A = {"name": "a"}
B = {"name": "b"}


@pytest.mark.parametrize("text, minutes", [
    ("4h", 240), ("90m", 90), ("2h30m", 150), ("45s", 1), ("1-12:00:00", 2160), ("08:00:00", 480),
    ("1-12", 2160), ("30", 30), ("05:30", 6), (15, 15), ("1d", 1440),
])
def test_durations(text: str | int, minutes: int) -> None:
    assert parse_duration_min(text) == minutes


@pytest.mark.parametrize("bad", ["4x", "", "h", "1:99:00", "-5m", "0", 0, True])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration_min(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, mb", [("24G", 24576), ("512M", 512), ("1.5T", 1572864), ("2.5G", 2560), (1000, 1000), ("64GB", 65536)])
def test_memory(text: str | int, mb: int) -> None:
    assert parse_mem_mb(text) == mb


def test_seconds() -> None:
    assert parse_seconds("90s") == 90 and parse_seconds("2m") == 120 and parse_seconds(30) == 30
    with pytest.raises(ValueError):
        parse_seconds("soon")


def test_defaults_overrides_and_order() -> None:
    cfg = parse_config(graph_toml([{"name": "a", "time": "4h", "mem": "24G", "lr": 0.01, "partition": "big"}, B, {"name": "c", "init_from": "a"}],
                                  head="[slurm]\npartition = \"gpu\"\nmem = \"8G\"\n[train]\nlr = 0.001\n"))
    slurm_a, train_a = resolved(cfg, cfg.stage[0])
    slurm_b, train_b = resolved(cfg, cfg.stage[1])
    assert (slurm_a.time, slurm_a.mem, slurm_a.partition, train_a.lr) == (240, 24576, "big", 0.01)
    assert (slurm_b.time, slurm_b.mem, slurm_b.partition, train_b.lr) == (60, 8192, "gpu", 0.001)
    assert topological_order(cfg) == ["a", "b", "c"]


def test_dag_order_follows_parents_not_file_order() -> None:
    cfg = parse_config(graph_toml([{"name": "late", "init_from": "root"}, {"name": "root", "init_from": "none"}]))
    assert topological_order(cfg) == ["root", "late"]


def test_two_children_of_one_parent() -> None:
    cfg = parse_config(graph_toml([A, {"name": "b", "init_from": "a"}, {"name": "c", "init_from": "a"}]))
    assert topological_order(cfg) == ["a", "b", "c"]


def test_find_cycle() -> None:
    assert find_cycle({"a": None, "b": "a"}) == []
    assert set(find_cycle({"a": "c", "b": "a", "c": "b"})) == {"a", "b", "c"}


def test_example_files_are_valid() -> None:
    cfg = load_config(REPO / "stages.toml")
    assert [s.bucket for s in cfg.stage] == [512, 1024, 1536, 2048, 3072, 4096]
    assert [s.batch_size for s in cfg.stage] == [8, 2, 4, 2, 1, 1]
    assert [s.epochs for s in cfg.stage] == [30, 20, 25, 25, 25, 20]
    assert [resolved(cfg, s)[0].time for s in cfg.stage] == [240, 180, 360, 360, 480, 360]
    assert load_config(REPO / "examples" / "tiny.toml").stage


def test_schema_lists_every_table() -> None:
    schema = json_schema()
    assert {"run", "slurm", "train", "model", "stage"} <= set(schema["properties"])


# Every rejected file: (file text, substrings the one message must contain).
BAD_FILES = {
    "unknown_key": (graph_toml([{"name": "a", "batch_siz": 3}]),
                    ["stage 'a'", "batch_siz", "unknown key", "did you mean 'batch_size'", "valid keys"]),
    "unknown_table": ("[trian]\nlr = 1\n" + graph_toml([A]), ["unknown key 'trian'", "did you mean 'train'"]),
    "unknown_key_in_table": ("[slurm]\npartiton = \"x\"\n" + graph_toml([A]), ["[slurm].partiton", "did you mean 'partition'"]),
    "duplicate": (graph_toml([A, A]), ["stage 'a' ([[stage]] #2).name", "duplicate stage name 'a'", "unique"]),
    "init_from_unknown": (graph_toml([A, {"name": "b", "init_from": "aa"}]),
                          ["stage 'b'", "init_from", "names no stage", "did you mean 'a'", "valid stages: a, b"]),
    "cycle": (graph_toml([{"name": "a", "init_from": "b"}, {"name": "b", "init_from": "a"}]),
              ["init_from", "cycle", "a starts from b", "b starts from a"]),
    "self_parent": (graph_toml([{"name": "a", "init_from": "a"}]), ["starts from itself"]),
    "zero_batch": (graph_toml([{"name": "a", "batch_size": 0}]), ["stage 'a'", "batch_size", "greater than 0", "positive"]),
    "negative_epochs": (graph_toml([{"name": "a", "epochs": -2}]), ["stage 'a'", "epochs", "greater than 0"]),
    "bad_time": (graph_toml([{"name": "a", "time": "4 hours"}]), ["stage 'a'", ".time", "cannot parse", "\"4h\""]),
    "bad_mem": (graph_toml([{"name": "a", "mem": "lots"}]), ["stage 'a'", ".mem", "cannot parse 'lots' as memory", "24G"]),
    "bad_slurm_time": ("[slurm]\ntime = \"forever\"\n" + graph_toml([A]), ["[slurm].time", "cannot parse"]),
    "bad_name_dot": (graph_toml([{"name": ".hidden"}]), ["invalid stage name '.hidden'", "no leading dot", "rename"]),
    "bad_name_slash": (graph_toml([{"name": "a/b"}]), ["invalid stage name 'a/b'"]),
    "bad_name_shell": (graph_toml([{"name": "a;rm -rf"}]), ["invalid stage name"]),
    "bad_run_name": ("[run]\nname = \"my run\"\n" + graph_toml([A]), ["[run].name", "invalid run name"]),
    "empty_graph": ("[run]\nname = \"x\"\n", ["stage", "required key is missing"]),
    "empty_list": ("stage = []\n", ["no stages", "add at least one [[stage]]"]),
    "wrong_type": ("[[stage]]\nname = \"a\"\nbucket = \"big\"\nbatch_size = 1\nepochs = 1\n", ["stage 'a'", "bucket", "valid integer", "got 'big'"]),
    "wrong_type_table": ("[train]\nlr = \"fast\"\n" + graph_toml([A]), ["[train].lr", "got 'fast'"]),
    "bad_signal": ("[slurm]\nsignal = \"KILL\"\n" + graph_toml([A]), ["[slurm].signal", "'USR2'", "got 'KILL'"]),
    "bad_precision": ("[train]\nprecision = \"fp8\"\n" + graph_toml([A]), ["[train].precision", "'bf16'"]),
    "bad_task": ("[model]\ntask = \"no colon\"\n" + graph_toml([A]), ["[model].task", "module:Object"]),
    "missing_bucket": ("[[stage]]\nname = \"a\"\nbatch_size = 1\nepochs = 1\n", ["stage 'a'", "bucket", "required key is missing"]),
    "toml_syntax": ("[run]\nname = \n" + graph_toml([A]), ["TOML syntax error", "line 2", "column"]),
    "bad_extra": ("[slurm]\nextra = {\"Mail Type\" = \"END\"}\n" + graph_toml([A]), ["[slurm].extra", "sbatch long option"]),
    "bad_checkpoint_every": ("[train]\ncheckpoint_every = \"often\"\n" + graph_toml([A]), ["[train].checkpoint_every", "cannot parse"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_message(case: str, tmp_path: Path) -> None:
    text, expected = BAD_FILES[case]
    path = tmp_path / "stages.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    assert info.value.exit_code == 2


@pytest.mark.parametrize("case", ["unknown_key", "cycle", "toml_syntax", "bad_time", "duplicate"])
def test_bad_file_via_cli(case: str, tmp_path: Path) -> None:
    """The user's view: exit 2, the message on stderr, no traceback, nothing written."""
    text, expected = BAD_FILES[case]
    path = tmp_path / "stages.toml"
    path.write_text(text)
    proc = run_cli("plan", "-c", str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert expected[0] in proc.stderr.replace("\n", " ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.toml"]


def test_missing_file_via_cli(tmp_path: Path) -> None:
    proc = run_cli("plan", "-c", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "nope.toml: file not found" in proc.stderr and "-c PATH" in proc.stderr


def test_schema_command_prints_json_schema(tmp_path: Path) -> None:
    import json

    proc = run_cli("schema", cwd=tmp_path, check=True)
    schema = json.loads(proc.stdout)
    assert schema["title"].startswith("progressive stage graph")
    stage = schema["$defs"]["StageConfig"]
    assert {"name", "bucket", "batch_size", "epochs", "init_from", "partition", "lr"} <= set(stage["properties"])
    assert stage["additionalProperties"] is False
