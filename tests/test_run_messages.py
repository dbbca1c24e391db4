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
