"""Output plumbing of the CLI: closed pipes end quietly, each error is printed once, progress ends on a real loss."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from progressive.cli import SIGPIPE_EXIT, main
from progressive.cli.run_cmds import _loss_text
from progressive.errors import DataError
from tests.util import REPO

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "80"}


def _graph(tmp_path: Path, data: Path, run: str = "piped") -> Path:
    path = tmp_path / f"{run}.toml"
    path.write_text(f'[run]\nname = "{run}"\ndata = "{data}"\n[model]\ntask = "tests.tasks:SlowTask"\n'
                    '[model.options]\nhidden = 8\nlayers = 1\n'
                    '[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = 1\ninit_from = "none"\n')
    return path


def _record(cfg: Path) -> None:
    """A run record as `submit --local` writes it before training starts."""
    from progressive import runs
    from progressive.backends import get_backend
    from progressive.config import load_config
    from progressive.data.format import bucket_counts
    from progressive.plan import build_plan

    plan = build_plan(load_config(cfg), cfg, counts=lambda p: bucket_counts(p, refresh_sidecar=False))
    runs.submit(plan, cfg.read_text(), get_backend("local"))


def _into_closed_pipe(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI with stdout a pipe whose reader has already gone (what `| head -1` leaves behind)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "progressive", *args], cwd=cwd, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, env={**os.environ, **ENV})
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [["status", "--json"], ["status"], ["plan", "-c", "piped.toml", "--json"],
                                  ["plan", "-c", "piped.toml"], ["--help"]])
def test_a_closed_pipe_ends_quietly(args: list[str], tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = _graph(tmp_path, tiny_dataset)
    _record(cfg)
    proc = _into_closed_pipe(args, tmp_path)
    chosen = "run piped (the only run under jobs; name one with RUN or -c FILE)\n" if args[0] == "status" else ""
    assert proc.stderr == chosen  # no BrokenPipeError traceback, no "Exception ignored" at exit
    assert proc.returncode in (0, SIGPIPE_EXIT)  # --help exits through argparse's own SystemExit(0)
    if args != ["--help"]:
        assert proc.returncode == SIGPIPE_EXIT


def test_a_failed_stage_prints_its_error_once(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import progressive.trainer

    def fail(*args: object, **kwargs: object) -> None:
        raise DataError("the bucket went away", loc="tiny.h5", hint="make it again")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(progressive.trainer, "train_stage", fail)
    cfg = _graph(tmp_path, tiny_dataset, "failing")
    assert main(["submit", "--local", "-c", str(cfg)]) == DataError.exit_code
    out, err = capsys.readouterr()
    both = out + err
    assert both.count("the bucket went away") == 1 and both.count("make it again") == 1
    assert "failed a; its log: jobs/failing/stages/a/local.log" in out
    assert err == "error: tiny.h5: the bucket went away\n  hint: make it again\n"


def test_progress_keeps_the_last_real_loss() -> None:
    assert _loss_text({"event": "step", "step": 79, "loss": 0.0912}) == "loss 0.0912"
    # The checkpoint and completed lines have a step and no loss: the bar keeps what it shows.
    assert _loss_text({"event": "checkpoint", "step": 80, "path": "x"}) is None
    assert _loss_text({"event": "completed", "step": 80, "total_steps": 80}) is None
    assert _loss_text({"event": "step", "step": 3, "loss": float("nan")}) == "loss nan"  # a real NaN
