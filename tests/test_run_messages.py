"""Messages of the run commands when the run they need is not there: the right verb, hints that work."""

from __future__ import annotations

from pathlib import Path

import pytest

from progressive.cli import build_parser, main


@pytest.mark.parametrize("argv", [["status"], ["resume"], ["cancel"], ["logs", "tiny_64"]])
def test_no_runs_error_names_the_command(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: {argv[0]}: no runs under jobs" in err
    assert "progressive submit" in err
    assert not (tmp_path / "jobs").exists()  # asking wrote nothing


def _record_a_run(tmp_path: Path, data: Path, run: str) -> None:
    """A real run record, as `submit --local` writes it before it starts training."""
    from progressive import runs
    from progressive.backends import get_backend
    from progressive.data.format import bucket_counts
    from progressive.config import load_config
    from progressive.plan import build_plan

    path = tmp_path / f"{run}.toml"
    path.write_text(f'[run]\nname = "{run}"\ndata = "{data}"\n[model]\ntask = "tests.tasks:SlowTask"\n'
                    '[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = 1\ninit_from = "none"\n')
    plan = build_plan(load_config(path), path, counts=lambda p: bucket_counts(p, refresh_sidecar=False))
    runs.submit(plan, path.read_text(), get_backend("local"))


def test_unknown_run_hint_lists_the_runs_there(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["status", "ghost"]) == 1
    err = capsys.readouterr().err
    assert "no run record here" in err and "there are no runs under jobs" in err and "progressive submit" in err
    _record_a_run(tmp_path, tiny_dataset, "first")
    _record_a_run(tmp_path, tiny_dataset, "second")
    for verb in ("status", "resume", "cancel"):
        assert main([verb, "ghost"]) == 1
        err = capsys.readouterr().err
        assert f"{Path('jobs') / 'ghost' / 'run.json'}: no run record here" in err
        assert "runs under jobs: " in err and "first" in err and "second" in err
        assert "progressive status RUN" in err
        assert "--all" not in err


def test_suggested_status_command_exists() -> None:
    """The hint's command parses; `status --all`, which an old hint suggested, does not."""
    parser = build_parser()
    assert parser.parse_args(["status", "first"]).run == "first"
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "--all"])


def test_runs_lists_every_run_newest_first(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import os

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["runs"]) == 0
    assert capsys.readouterr().out == ("no runs under jobs; start one with `progressive submit --local` or "
                                       "`progressive demo`\n")
    _record_a_run(tmp_path, tiny_dataset, "first")
    _record_a_run(tmp_path, tiny_dataset, "second")
    os.utime(tmp_path / "jobs" / "first" / "run.json", (1e9, 1e9))  # 2001: first is the older run
    assert main(["runs", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["mode"], r["state"], r["stages_done"], r["stages"]) for r in doc["runs"]] == [
        ("second", "local", "not started", 0, 1), ("first", "local", "not started", 0, 1)]
    assert doc["runs"][1]["last_change"].startswith("2001-09-09")
    assert main(["runs"]) == 0
    table = capsys.readouterr().out
    assert "│ second │ local │ not started │         0/1 │" in table and "…" not in table


def test_run_state_is_the_most_telling_stage() -> None:
    from progressive.runs import run_state
    from progressive.states import StageState as S

    assert run_state([S.COMPLETED, S.COMPLETED]) is S.COMPLETED
    assert run_state([S.COMPLETED, S.FAILED, S.NOT_STARTED]) is S.FAILED
    assert run_state([S.COMPLETED, S.RUNNING, S.PENDING]) is S.RUNNING
    assert run_state([S.COMPLETED, S.NOT_STARTED]) is S.NOT_STARTED


def test_commands_say_which_run_they_chose(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import os

    monkeypatch.chdir(tmp_path)
    _record_a_run(tmp_path, tiny_dataset, "first")
    assert main(["status", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["run"] == "first"  # stdout stays JSON: the choice is said on stderr
    assert err == "run first (the only run under jobs; name one with RUN or -c FILE)\n"
    _record_a_run(tmp_path, tiny_dataset, "second")
    os.utime(tmp_path / "jobs" / "first" / "run.json", (1e9, 1e9))
    for argv in (["status"], ["resume", "--dry-run"], ["cancel"]):
        assert main(argv) == 0
        assert capsys.readouterr().err == "run second (the most recent of 2 under jobs; name one with RUN or -c FILE)\n"
    # -c names the run (its [run].name) and the jobs folder (its [run].jobs, from the file's folder)
    assert main(["status", "--json", "-c", str(tmp_path / "first.toml")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["run"] == "first" and err == ""
    assert main(["logs", "-c", str(tmp_path / "first.toml"), "a"]) == 1
    assert "error: " in capsys.readouterr().err  # found the run: it has no log yet (nothing trained)
    assert main(["status", "second", "-c", "first.toml"]) == 1
    assert capsys.readouterr().err == ("error: status: both a run name ('second') and -c first.toml given\n"
                                       "  hint: name the run, or let -c name it: `progressive status -c first.toml`\n")
