"""Sweep files: every bad-input path gives one message naming the file and key (exit 2); expansion and layout logic."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from progressive.errors import ConfigError
from progressive.plan import build_plan
from progressive.sweep import slurm_array
from progressive.sweep.config import Range, parse_sweep
from progressive.sweep.expand import apply_params, draw, expand, plan_variants
from progressive.sweep.prune import decide
from tests.util import run_cli

GRAPH = """
[run]
name = "tiny"
data = "data.h5"
[slurm]
time = "5m"
[model.options]
hidden = 8
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

HEAD = '[sweep]\nname = "s"\nmetric = "learned_iters"\n'


def variants(tmp_path: Path, sweep_text: str) -> list:
    cfg = tmp_path / "stages.toml"
    cfg.write_text(GRAPH)
    sweep = parse_sweep(sweep_text, "sweep.toml").sweep
    return plan_variants(sweep, GRAPH, cfg, "sweep.toml", None)[1]


def error_of(tmp_path: Path, sweep_text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        variants(tmp_path, sweep_text)
    return info.value


@pytest.mark.parametrize("text, loc, msg, hint", [
    ("[sweep\n", "sweep.toml", "TOML syntax error", "quotes"),
    (HEAD + "methd = \"grid\"\n[sweep.params]\n\"train.lr\" = [1e-3]\n", "[sweep].methd", "unknown key 'methd'",
     "did you mean 'method'?"),
    ('[sweep]\nname = "s"\n[sweep.params]\n"train.lr" = [1e-3]\n', "[sweep].metric", "required key is missing", "metric ="),
    (HEAD + 'method = "bayes"\n[sweep.params]\n"train.lr" = [1e-3]\n', "[sweep].method", "'grid', 'random' or 'tpe'",
     "one of the values"),
    (HEAD + "[sweep.params]\n", "[sweep].params", "no parameters", None),
    (HEAD + '[sweep.params]\n"train.lr" = []\n', "[sweep].params", "empty list of choices", None),
    (HEAD + 'method = "random"\ntrials = 2\n[sweep.params]\n"train.lr" = { low = 1e-2, high = 1e-3 }\n',
     '[sweep.params]."train.lr"', "low < high", "low, high, type, log"),
    (HEAD + 'method = "random"\ntrials = 2\n[sweep.params]\n"train.lr" = { low = 0, high = 1, log = true }\n',
     '[sweep.params]."train.lr"', "log range needs low > 0", None),
    (HEAD + 'method = "random"\ntrials = 2\n[sweep.params]\n"train.lr" = { low = 0.1, hi = 1 }\n',
     '[sweep.params]."train.lr"', "'hi'", "low, high, type, log"),
    (HEAD + '[sweep.params]\n"train.lr" = 0.1\n', '[sweep.params]."train.lr"', "a list of values or a range", None),
    (HEAD + '[sweep.params]\n"train.lr" = { low = 1e-3, high = 1e-2 }\n', "[sweep].params.train.lr",
     "a grid needs a list", "method = \"random\""),
    (HEAD + 'method = "random"\n[sweep.params]\n"train.lr" = [1e-3]\n', "[sweep].trials", "needs the number of trials",
     "trials = 8"),
    (HEAD + 'trials = 3\n[sweep.params]\n"train.lr" = [1e-3, 1e-2]\n', "[sweep].trials", "a grid has 2 variants", None),
    ('[sweep]\nname = "../x"\nmetric = "m"\n[sweep.params]\n"train.lr" = [1e-3]\n', "[sweep].name", "invalid sweep name",
     None),
    (HEAD + '[sweep.prune]\nkeep = 1.5\n[sweep.params]\n"train.lr" = [1e-3]\n', "[sweep.prune].keep", "less than 1", None),
    (HEAD + '[sweep.params]\n"train.lrr" = [1e-3]\n', '[sweep.params]."train.lrr"', "names no key of the stage graph",
     "did you mean 'train.lr'?"),
    (HEAD + '[sweep.params]\n"stage.z.epochs" = [1]\n', '[sweep.params]."stage.z.epochs"', "no stage named 'z'",
     "valid stages: a, b, c"),
    (HEAD + '[sweep.params]\n"stage.*.epoch" = [1]\n', '[sweep.params]."stage.*.epoch"', "names no key",
     "did you mean 'stage.*.epochs'?"),
    (HEAD + '[sweep.params]\n"stages" = [["a", "q"]]\n', '[sweep.params]."stages"', "no stage named 'q'",
     "valid stages: a, b, c"),
    (HEAD + '[sweep.params]\n"stages" = ["a", "b"]\n', '[sweep.params]."stages"', "non-empty list of stage names",
     "valid stages"),
    (HEAD + '[sweep.params]\n"model.optons.x" = [1]\n', '[sweep.params]."model.optons.x"', "names no key",
     "model.options.<key>"),
    (HEAD + '[sweep.params]\n"train.lr" = [1e-3, -1.0]\n', '[sweep.params]."train.lr" = -1.0', "greater than 0",
     "positive"),
    (HEAD + '[sweep.params]\n"stage.b.epochs" = [2, 0]\n', '[sweep.params]."stage.b.epochs" = 0', "greater than 0", None),
    (HEAD + '[sweep.params]\n"slurm.time" = ["soon"]\n', "[sweep.params].\"slurm.time\" = 'soon'", "as a duration",
     "\"4h\""),
    (HEAD + 'method = "tpe"\ntrials = 2\n[sweep.params]\n"stages" = [["a"], ["b"]]\n', '[sweep.params]."stages"',
     "draws a trial's parameters when its job starts", "grid"),
])
def test_bad_sweep_file_names_file_and_key(tmp_path: Path, text: str, loc: str, msg: str, hint: str | None) -> None:
    err = error_of(tmp_path, text)
    assert err.loc is not None and err.loc.startswith("sweep.toml") and loc in err.loc, err.loc
    assert msg in err.msg, err.msg
    if hint:
        assert err.hint and hint in err.hint, err.hint
    assert err.exit_code == 2


def test_cli_exits_2_with_one_message(tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text(GRAPH)
    (tmp_path / "sweep.toml").write_text(HEAD + '[sweep.params]\n"train.lrr" = [1e-3]\n')
    proc = run_cli("sweep", "plan", cwd=tmp_path)
    assert proc.returncode == 2
    assert "sweep.toml" in proc.stderr and "train.lrr" in proc.stderr and "did you mean 'train.lr'" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = run_cli("sweep", "plan", "-s", "nope.toml", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.toml: file not found" in missing.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.toml", "sweep.toml"]  # plan wrote nothing


def test_grid_is_the_product_in_key_order(tmp_path: Path) -> None:
    vs = variants(tmp_path, HEAD + '[sweep.params]\n"train.lr" = [1e-3, 3e-3]\n"model.options.hidden" = [4, 8, 16]\n')
    assert [v.variant.name for v in vs] == [f"v{i:03d}" for i in range(6)]
    assert [(v.variant.params["train.lr"], v.variant.params["model.options.hidden"]) for v in vs] == [
        (1e-3, 4), (1e-3, 8), (1e-3, 16), (3e-3, 4), (3e-3, 8), (3e-3, 16)]
    # Each variant is its own run under jobs/<sweep>/ and checkpoints/<sweep>/, with its values in its plan.
    p = vs[4].plan
    assert p.run_dir == str(tmp_path / "s" / "v004") or p.run_dir.endswith("jobs/s/v004")
    assert p.checkpoint_root.endswith("checkpoints/s/v004")
    assert p.model.options["hidden"] == 8 and all(st.train.lr == 3e-3 for st in p.stages)


def test_random_draws_are_seeded_and_inside_their_ranges(tmp_path: Path) -> None:
    text = (HEAD + 'method = "random"\ntrials = 20\nseed = 5\n[sweep.params]\n'
            '"train.lr" = { low = 1e-4, high = 1e-2, log = true }\n"stage.a.epochs" = { low = 1, high = 3, type = "int" }\n'
            '"model.options.hidden" = [4, 8]\n')
    sweep = parse_sweep(text).sweep
    first, again = expand(sweep), expand(sweep)
    assert first == again
    assert {v.params["stage.a.epochs"] for v in first} == {1, 2, 3}
    assert all(1e-4 <= v.params["train.lr"] <= 1e-2 for v in first)
    assert {v.params["model.options.hidden"] for v in first} == {4, 8}
    other = expand(parse_sweep(text.replace("seed = 5", "seed = 6")).sweep)
    assert [v.params for v in other] != [v.params for v in first]
    rng = random.Random(0)
    log_draws = [draw(Range(low=1, high=1000, log=True, type="int"), rng) for _ in range(400)]
    assert min(log_draws) >= 1 and max(log_draws) <= 1000 and sum(d < 32 for d in log_draws) > 100  # log: half below sqrt


def test_stages_param_picks_stages_each_from_the_previous(tmp_path: Path) -> None:
    vs = variants(tmp_path, HEAD + '[sweep.params]\n"stages" = [["a", "b", "c"], ["a", "c"], ["c"]]\n'
                                   '"stage.*.epochs" = [2]\n"stage.b.batch_size" = [1]\n')
    full, skip, alone = (v.plan for v in vs)
    assert full.names == ["a", "b", "c"] and full.stage("b").batch_size == 1
    assert skip.names == ["a", "c"] and skip.stage("c").depends_on == ("a",)
    assert alone.names == ["c"] and alone.stage("c").init_from.kind == "none"
    assert all(st.epochs == 2 for p in (full, skip, alone) for st in p.stages)


def test_apply_params_leaves_the_graph_alone() -> None:
    raw = {"train": {"lr": 1.0}, "stage": [{"name": "a"}]}
    out = apply_params(raw, {"train.lr": 2.0, "model.options.k": 3, "stage.a.epochs": 4})
    assert raw == {"train": {"lr": 1.0}, "stage": [{"name": "a"}]}
    assert out["train"]["lr"] == 2.0 and out["model"]["options"]["k"] == 3 and out["stage"][0]["epochs"] == 4


def test_layout_one_array_per_step_split_by_resources(tmp_path: Path) -> None:
    vs = variants(tmp_path, HEAD + '[sweep.params]\n"slurm.time" = ["5m", "9m"]\n"stages" = [["a", "b"], ["b"]]\n')
    specs = slurm_array.layout((v.variant.name, v.variant.index, v.plan.stages) for v in vs)
    # 4 variants: time 5m/9m x stages ab/b. Step 0: one array per time; step 1: one per time.
    assert [(s.key, s.step, sorted(s.tasks), s.parent) for s in specs] == [
        ("a0", 0, [0, 1], None), ("a1", 1, [0], "a0"), ("a2", 0, [2, 3], None), ("a3", 1, [2], "a2")]
    assert specs[0].tasks[1] == ("v001", "b")
    assert slurm_array.task_list([0, 1, 2, 5, 7, 8], 3) == "0-2,5,7-8%3"


def test_plan_json_shows_arrays_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text(GRAPH)
    (tmp_path / "sweep.toml").write_text(HEAD + 'parallel = 3\n[sweep.prune]\nkeep = 0.5\n[sweep.params]\n'
                                                '"train.lr" = [1e-3, 2e-3, 3e-3, 4e-3]\n')
    out = json.loads(run_cli("sweep", "plan", "--json", cwd=tmp_path, check=True).stdout)
    assert [a["dependency"] for a in out["arrays"]] == [None, "aftercorr:<a0>,afterany:<prune0>",
                                                        "aftercorr:<a1>,afterany:<prune1>"]
    assert "#SBATCH --array=0-3%3" in out["arrays"][0]["sbatch"]
    assert "progressive.sweep.task stage" in out["arrays"][0]["sbatch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.toml", "sweep.toml"]


def test_sweep_plan_does_not_import_torch(tmp_path: Path) -> None:
    (tmp_path / "stages.toml").write_text(GRAPH)
    (tmp_path / "sweep.toml").write_text(HEAD + '[sweep.params]\n"train.lr" = [1e-3]\n')
    code = ("import sys, runpy; sys.argv = ['progressive'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('progressive', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', 'OPTUNA' if 'optuna' in sys.modules else 'NO-OPTUNA')")
    for args in (["sweep", "plan", "--dry-run"], ["sweep", "--help"], ["sweep", "status"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert "NO-TORCH NO-OPTUNA" in proc.stdout, (args, proc.stdout[-300:], proc.stderr[-300:])


def test_prune_keeps_the_best_share() -> None:
    kept, pruned = decide({"v0": 3.0, "v1": 1.0, "v2": 2.0, "v3": 4.0}, 0.5, "min")
    assert kept == ["v1", "v2"] and pruned == {"v0": 3.0, "v3": 4.0}
    kept, pruned = decide({"v0": 3.0, "v1": 1.0, "v2": None}, 0.5, "max")
    assert kept == ["v0", "v1"] and pruned == {"v2": None}  # ceil(1.5) = 2; a failed variant is never kept
    assert decide({"v0": 1.0}, 0.1, "min")[0] == ["v0"]  # at least one goes on


def test_build_plan_unchanged_for_a_graph(tmp_path: Path) -> None:
    """The variant machinery goes through the graph's own validation: a plain graph plans as before."""
    from progressive.config import parse_config

    cfg = parse_config(GRAPH)
    assert build_plan(cfg, tmp_path / "stages.toml").names == ["a", "b", "c"]


def test_master_port_differs_between_tasks_of_one_array(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tasks of array 500 on one node (their own job ids 501, 502) get different DDP ports; a requeue keeps it."""
    from progressive.job import master_port

    monkeypatch.setenv("SLURM_JOB_ID", "501")
    first = master_port("500_0")
    monkeypatch.setenv("SLURM_JOB_ID", "502")
    second = master_port("500_1")
    assert first != second and 20000 <= first < 40000
    monkeypatch.setenv("SLURM_JOB_ID", "501")
    assert master_port("500_0") == first
    monkeypatch.delenv("SLURM_JOB_ID")
    assert master_port("77") == 20077  # outside Slurm's environment: from the id given
