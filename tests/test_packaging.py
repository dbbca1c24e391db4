"""The package as a user installs it: the demo's graph ships inside it, a wheel runs the demo anywhere."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.util import REPO

# What a wheel is built from; copied so the build's own build/ and *.egg-info stay out of the source tree.
BUILD_INPUTS = ("pyproject.toml", "README.md", "progressive")
# The source tree as a test may see it change: everything but what tools keep for themselves.
IGNORED = {".git", ".venv", ".pytest_cache", "__pycache__"}


def test_packaged_demo_graph_is_the_examples_one() -> None:
    """Two copies by design (one for a clone, one inside the package): they must not drift apart."""
    packaged = REPO / "progressive" / "examples" / "tiny.toml"
    assert packaged.read_bytes() == (REPO / "examples" / "tiny.toml").read_bytes(), (
        "progressive/examples/tiny.toml must equal examples/tiny.toml: copy one over the other")


def test_builtin_graph_keeps_its_files_under_the_given_folder(tmp_path: Path) -> None:
    from progressive.demo import builtin_graph, builtin_graph_text
    from progressive.plan import build_plan

    cfg, text = builtin_graph(tmp_path)
    assert text == (REPO / "examples" / "tiny.toml").read_text(encoding="utf-8")
    plan = build_plan(cfg, REPO / "progressive" / "examples" / "tiny.toml", run_name="demo")
    root = tmp_path.resolve()
    assert Path(plan.data_path) == root / "data" / "tiny.h5"
    assert Path(plan.run_dir) == root / "jobs" / "demo"
    assert Path(plan.checkpoint_root) == root / "checkpoints" / "demo"
    for st in plan.stages:
        assert Path(st.checkpoint_dir).is_relative_to(root) and Path(st.metrics_path).is_relative_to(root)
        assert st.init_from.checkpoint is None or Path(st.init_from.checkpoint).is_relative_to(root)
    assert builtin_graph_text() == text


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below root (minus tool caches) with its size and mtime: any write shows up."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in IGNORED]
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.slow  # 21 s alone, 41 s on the shared 2-core machine
def test_demo_runs_from_an_installed_wheel_in_an_empty_folder(tmp_path: Path) -> None:
    """Build the wheel, install it into a new venv, run `progressive demo` in an empty folder.

    The new venv gets its dependencies (torch & co.) through a .pth file pointing at this
    interpreter's site-packages: nothing is downloaded, and `progressive` itself can only come
    from the wheel (a .pth-added folder's own .pth files, like the editable install's, are not read).
    """
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
    shutil.rmtree(src / "progressive" / "__pycache__", ignore_errors=True)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("progressive-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "progressive/py.typed" in names and "progressive/examples/tiny.toml" in names
    assert "progressive/cli/run_cmds.py" in names and not any(n.startswith(("tests/", "examples/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    new_site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    (new_site / "_progressive_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import progressive, torch; print(progressive.__file__)"],
                           check=True, capture_output=True, text=True, env=env, cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(new_site), where

    work = tmp_path / "empty folder"
    work.mkdir()
    before_site, before_repo = _snapshot(new_site / "progressive"), _snapshot(REPO)
    proc = subprocess.run([str(venv / "bin" / "progressive"), "demo"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in ("tiny_64", "tiny_128", "tiny_256"):
        assert f"completed {stage}" in proc.stdout
        assert (work / "checkpoints" / "demo" / stage / "final.pt").is_file()
    assert (work / "data" / "tiny.h5").is_file() and (work / "jobs" / "demo" / "run.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "data", "jobs"]
    assert "learned iters" in proc.stdout
    assert _snapshot(new_site / "progressive") == before_site, "the demo wrote into site-packages"
    assert _snapshot(REPO) == before_repo, "the demo wrote into the source tree"
