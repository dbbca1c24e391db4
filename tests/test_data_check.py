"""One data check everywhere: plan, submit (Slurm and --local), calibrate and resume say the same words, exit 2.

Also `plan --check` (for CI) and local mode's warnings about requests this machine cannot honour.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from progressive.cli import main
from progressive.errors import DataError

HINT = ("  hint: set each stage's bucket to one the data holds, or add the bucket to the data "
        "(`progressive data generate --sizes ...`, or your own export)\n")


def graph(tmp_path: Path, data: Path, *, bucket: int = 32, run: str = "chk", slurm: str = "") -> Path:
    path = tmp_path / f"{run}.toml"
    path.write_text(f'[run]\nname = "{run}"\ndata = "{data}"\n[slurm]\n{slurm}\n'
                    '[train]\neval_samples = 1\n[model]\ntask = "tests.tasks:SlowTask"\n'
                    '[model.options]\nhidden = 8\nlayers = 1\n'
                    '[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = 1\ninit_from = "none"\n'
                    f'[[stage]]\nname = "b"\nbucket = {bucket}\nbatch_size = 2\nepochs = 1\n')
    return path


def lacking(cfg: Path, bucket: int = 48) -> str:
    return f"error: {cfg}: stage 'b': bucket {bucket} is not in tiny.h5 (present: 16, 32, 64)\n" + HINT


@pytest.mark.parametrize("argv", [["plan"], ["plan", "--json"], ["plan", "--check"], ["submit"],
                                  ["submit", "--local"], ["calibrate", "--local"]])
def test_a_bucket_the_data_lacks_is_one_message_and_exit_2(argv: list[str], tmp_path: Path, tiny_dataset: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = graph(tmp_path, tiny_dataset, bucket=48)
    assert main([*argv, "-c", str(cfg)]) == DataError.exit_code == 2
    out, err = capsys.readouterr()
    assert err == lacking(cfg)
    assert "re-run" not in out  # no advice to re-run calibrate for a bucket that is not there
    assert not (tmp_path / "jobs" / "chk" / "run.json").exists()


def test_submit_after_the_data_changed_lists_what_is_there_now(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from progressive.data.generate import generate

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "tiny.h5"
    shutil.copy2(tiny_dataset, data)
    cfg = graph(tmp_path, data, bucket=32)
    assert main(["submit", "--local", "-c", str(cfg), "--stages", "a"]) == 0  # a trains; b is never started
    data.unlink()
    generate(data, sizes=[16, 64], counts=[30, 6], seed=0, workers=1)  # bucket 32 is gone
    capsys.readouterr()
    run_graph = tmp_path / "jobs" / "chk" / "run.json"
    before = run_graph.read_text()
    assert main(["plan", "-c", str(cfg)]) == 2
    plan_err = capsys.readouterr().err
    assert plan_err == f"error: {cfg}: stage 'b': bucket 32 is not in tiny.h5 (present: 16, 64)\n" + HINT
    assert main(["submit", "--local", "-c", str(cfg)]) == 2
    assert capsys.readouterr().err == plan_err
    assert run_graph.read_text() == before


def test_resume_refuses_a_bucket_gone_since_submit(tmp_path: Path, tiny_dataset: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from progressive import runs
    from progressive.backends import get_backend
    from progressive.cli.run_cmds import load_plan
    from progressive.data.generate import generate

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "tiny.h5"
    shutil.copy2(tiny_dataset, data)
    cfg = graph(tmp_path, data, bucket=32)

    class Args:
        config, run_name, stages = str(cfg), None, None

    runs.submit(load_plan(Args()), cfg.read_text(), get_backend("local"))  # recorded, nothing trained yet
    data.unlink()
    generate(data, sizes=[16, 64], counts=[30, 6], seed=0, workers=1)
    for argv in (["resume", "chk"], ["resume", "chk", "--dry-run"]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: {cfg}: stage 'b': bucket 32 is not in tiny.h5 (present: 16, 64)\n" + HINT
    data.unlink()
    assert main(["resume", "chk"]) == 2
    assert f"{data}: dataset file not found" in capsys.readouterr().err


def test_plan_check_fails_on_any_problem(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = graph(tmp_path, tiny_dataset)
    assert main(["plan", "--check", "-c", str(cfg)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["plan", "-c", str(cfg), "--stages", "b"]) == 0  # plan shows it; only --check fails it
    assert main(["plan", "--check", "-c", str(cfg), "--stages", "b"]) == 1
    final = tmp_path / "checkpoints" / "chk" / "a" / "final.pt"
    assert capsys.readouterr().err == (f"check: stage 'b': its parent 'a' is not selected and has no final "
                                       f"checkpoint: {final}\nplan --check: 1 problem(s)\n")
    nowhere = graph(tmp_path, tmp_path / "nope.h5", run="nodata")
    assert main(["plan", "-c", str(nowhere)]) == 0  # shows the table with the data problem in it
    assert main(["plan", "--check", "-c", str(nowhere)]) == 2
    assert f"error: {nowhere}: {tmp_path / 'nope.h5'}: dataset file not found" in capsys.readouterr().err


def test_local_mode_warns_about_requests_it_cannot_honour(tmp_path: Path, tiny_dataset: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import progressive.cli.run_cmds as run_cmds

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_cmds, "_machine", lambda: (0, 24 * 1024))  # no GPU, 24G, whatever runs the test
    cfg = graph(tmp_path, tiny_dataset, slurm='gpus_per_node = 1\nmem = "64G"')
    assert main(["submit", "--local", "-c", str(cfg), "--stages", "a"]) == 0
    err = capsys.readouterr().err
    assert err == ("warning: stage 'a' asks for 1 GPU(s) per node; this machine has none, so local mode trains it "
                   "on the CPU (much slower)\n"
                   "warning: stage 'a' asks for 64G of memory; this machine has 24G, and local mode cannot "
                   "reserve any\n")
    monkeypatch.setattr(run_cmds, "_machine", lambda: (1, 128 * 1024))
    assert main(["submit", "--local", "-c", str(cfg), "--stages", "b"]) == 0
    assert capsys.readouterr().err == ""
