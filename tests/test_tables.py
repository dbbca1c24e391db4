"""Tables fit 80 columns: names are never cut, nothing ends in "…", wide columns move behind --wide."""

from __future__ import annotations

from pathlib import Path

import pytest

from progressive.cli.render import Col, console, print_table
from tests.util import REPO, run_cli

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
NAMES = ("warmup_small_16", "middle_bucket_32", "the_final_stage_64")


def fits(text: str, width: int = 80) -> None:
    """No cell cut, no line past the edge."""
    assert "…" not in text, text
    assert max(map(len, text.splitlines())) <= width, text


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished three-stage local run with long stage names, and what `submit --local` printed at 80 columns."""
    tmp = tmp_path_factory.mktemp("tables")
    text = (f'[run]\nname = "narrow"\ndata = "{tiny_dataset}"\n[slurm]\ngpus_per_node = 0\nmem = "1G"\n'
            '[train]\neval_samples = 1\ncheckpoint_every = 1000\n'
            '[model]\ntask = "tests.tasks:SlowTask"\n[model.options]\nhidden = 8\nlayers = 1\n')
    for i, (name, bucket) in enumerate(zip(NAMES, (16, 32, 64))):
        text += f'[[stage]]\nname = "{name}"\nbucket = {bucket}\nbatch_size = 2\nepochs = 1\n'
        text += 'init_from = "none"\n' if i == 0 else ""
    (tmp / "stages.toml").write_text(text)
    proc = run_cli("submit", "--local", cwd=tmp, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, proc.stdout


def test_results_table_fits(trained: tuple[Path, str]) -> None:
    _, out = trained
    results = out[out.index("results"):out.index("next:")]
    fits(results)
    assert all(f"│ {name} " in results for name in NAMES)
    assert "learned" in results and "jacobi" in results  # the task's own evaluation stays in view


@pytest.mark.parametrize("argv", [["plan"], ["status", "narrow"], ["runs"]])
def test_run_tables_fit_and_wide_shows_the_rest(argv: list[str], trained: tuple[Path, str]) -> None:
    folder, _ = trained
    out = run_cli(*argv, cwd=folder, env=ENV, check=True).stdout
    fits(out)
    table = out[:out.index("└")]
    fits(table)
    assert all(f"│ {name} " in table for name in NAMES) or argv == ["runs"]
    if argv != ["runs"]:
        assert "(see --wide)" in " ".join(out.split())
        wide = run_cli(*argv, "--wide", cwd=folder, env=ENV, check=True).stdout
        assert "…" not in wide and "(see --wide)" not in wide
        assert ("checkpoint" if argv[0] == "status" else "slurm (nodes x tasks") in wide


def test_data_inspect_fits(tiny_dataset: Path) -> None:
    out = run_cli("data", "inspect", str(tiny_dataset), env=ENV, check=True).stdout
    table = out[out.index("┏"):out.index("└")]
    fits(table)
    assert "│       16 │" in table and "train" in table
    assert "not shown at 80 columns: raw, ratio (see --wide)\n" in out


def test_print_table_drops_columns_in_their_order(capsys: pytest.CaptureFixture[str]) -> None:
    con = console()
    width = con.width
    con.width = 40
    try:
        cols = [Col("name"), Col("a" * 12, drop=2), Col("b" * 12, drop=1), Col("c", drop=3)]
        hidden = print_table(cols, [["a_rather_long_name", "1", "2", "3"]], con=con)
    finally:
        con.width = width
    out = capsys.readouterr().out
    assert hidden == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]  # both had to go; c (dropped last) stays
    assert "a_rather_long_name" in out
    assert "not shown at 40 columns: aaaaaaaaaaaa, bbbbbbbbbbbb (see --wide)" in " ".join(out.split())
    fits(out, 40)


def test_calibration_table_fits(capsys: pytest.CaptureFixture[str]) -> None:
    from progressive.cli.calibrate_cmds import show_entries

    spread = {"mean": 0.0213, "median": 0.0209, "p10": 0.0201, "p90": 0.0232}
    entry = {"device": "cpu", "device_name": "cpu", "step_s": spread, "worst_step_s": {"median": 0.031},
             "samples_per_s": 93.9, "peak_rss_mb": 412.0, "gpu": None, "eval_s": 0.12, "checkpoint_s": 0.03,
             "startup_s": 1.9, "exit_s": 0.8, "batch_search": None}
    con = console()
    width = con.width
    con.width = 80
    try:
        show_entries({"warmup_small_16": entry, "the_final_stage_64": entry})
    finally:
        con.width = width
    out = capsys.readouterr().out
    fits(out)
    assert "│ the_final_stage_64 │" in out and "0.0213" in out and "412M" in out
    assert "(see --json)" in " ".join(out.split())
