"""Helpers shared by the tests: run the real CLI in a subprocess, write small graph files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `python -m progressive ARGS` as a user would; return the finished process."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "progressive", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"progressive {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


STAGE = """
[[stage]]
name = "{name}"
bucket = {bucket}
batch_size = {batch_size}
epochs = {epochs}
"""


def graph_toml(stages: list[dict], head: str = "") -> str:
    """A small stage graph: `head` (tables like [run]) then one [[stage]] per dict."""
    text = head
    for st in stages:
        extra = {k: v for k, v in st.items() if k not in ("name", "bucket", "batch_size", "epochs")}
        text += STAGE.format(name=st["name"], bucket=st.get("bucket", 16), batch_size=st.get("batch_size", 2),
                             epochs=st.get("epochs", 1))
        for k, v in extra.items():
            text += f"{k} = {v!r}\n".replace("'", '"')
    return text


def fake_slurm_sweep(tmp_path: Path, data: Path, monkeypatch: "pytest.MonkeyPatch", *, name: str = "sw") -> Path:
    """A grid sweep of two variants x two stages (s16 -> s32) submitted as Slurm arrays, in process, with
    sbatch faked (array ids 500, 501; summary job 502) and every record real; returns jobs/<name>."""
    import progressive.backends.slurm as slurm_backend
    from progressive.cli import main
    from progressive.sweep import slurm_array

    ids = iter(["500", "501", "502", "503"])
    monkeypatch.setattr(slurm_backend, "slurm_available", lambda: True)
    monkeypatch.setattr(slurm_array, "sbatch", lambda script, dep: next(ids))
    monkeypatch.setattr(slurm_array, "queued_arrays", lambda: set())
    (tmp_path / "stages.toml").write_text(
        f'[run]\nname = "g"\ndata = "{data}"\n[slurm]\ntime = "5m"\n'
        '[[stage]]\nname = "s16"\nbucket = 16\nbatch_size = 4\nepochs = 1\ninit_from = "none"\n'
        '[[stage]]\nname = "s32"\nbucket = 32\nbatch_size = 4\nepochs = 1\n')
    (tmp_path / "sweep.toml").write_text(f'[sweep]\nname = "{name}"\nmetric = "learned_iters"\n'
                                         '[sweep.params]\n"train.lr" = [1e-3, 3e-3]\n')
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "submit"]) == 0
    return tmp_path / "jobs" / name
