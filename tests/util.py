"""Helpers shared by the tests: run the real CLI in a subprocess, write small graph files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
