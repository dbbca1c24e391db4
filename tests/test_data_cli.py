"""`progressive data ...` as a user runs it: a real process, real files, exit codes and messages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (writing into Blosc datasets)
import pytest

from progressive.data.format import bucket_counts, index_path, open_bucket
from tests.util import REPO, run_cli


def test_generate_inspect_verify(tmp_path: Path) -> None:
    out = run_cli("data", "generate", "-o", "d/m.h5", "--sizes", "16,24", "--counts", "8,4", "--family", "aniso",
                  "--seed", "3", "--workers", "2", cwd=tmp_path, check=True)
    assert "wrote d/m.h5" in out.stdout and "│       16 │" in out.stdout
    path = tmp_path / "d" / "m.h5"
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.h5", "m.h5.index.json"]
    assert bucket_counts(path) == {16: {"train": 6, "val": 1, "test": 1}, 24: {"train": 3, "val": 1, "test": 0}}

    shown = run_cli("data", "inspect", str(path), "--verify", check=True).stdout
    assert "format v1" in shown and "family aniso  seed 3" in shown
    assert "verified 12 samples: all finite, square, symmetric, positive diagonal" in shown

    doc = json.loads(run_cli("data", "inspect", str(path), "--json", check=True).stdout)
    assert [b["n"] for b in doc["buckets"]] == [16, 24] and doc["attrs"]["seed"] == 3 and doc["verified"] is False


def test_verify_lists_bad_samples_and_exits_1(tiny_dataset: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    shutil.copy(tiny_dataset, bad)
    with h5py.File(bad, "r+") as f:
        f["buckets/16/train/data"][0] = float("nan")
    proc = run_cli("data", "inspect", str(bad), "--verify")
    assert proc.returncode == 1
    assert "1 of 48 samples are bad" in proc.stdout
    assert "16/train[0]: matrix has 1 non-finite value(s) (NaN)" in proc.stdout
    doc = json.loads(run_cli("data", "inspect", str(bad), "--verify", "--json").stdout)
    assert doc["problem_count"] == 1


def test_subset_merge_split(tiny_dataset: Path, tmp_path: Path) -> None:
    for name in ("s1.h5", "s2.h5"):
        run_cli("data", "subset", str(tiny_dataset), "--max-samples", "10", "--seed", "42", "-o", str(tmp_path / name),
                check=True)
    with open_bucket(tmp_path / "s1.h5", 16, "train") as a, open_bucket(tmp_path / "s2.h5", 16, "train") as b:
        assert a.hashes() == b.hashes() and len(a) == 5

    merged = run_cli("data", "merge", str(tiny_dataset), str(tmp_path / "s1.h5"), "-o", str(tmp_path / "m.h5"), check=True)
    assert "10 duplicate matrices found (dropped):" in merged.stdout
    assert f"{tmp_path / 's1.h5'}:16/train[0] = {tiny_dataset}:16/train[" in merged.stdout

    split = run_cli("data", "split", str(tiny_dataset), "--seed", "1", "--split", "0.5,0.5,0", "-o", str(tmp_path / "r.h5"),
                    check=True)
    assert "re-split" in split.stdout
    assert bucket_counts(tmp_path / "r.h5")[16] == {"train": 15, "val": 15, "test": 0}


@pytest.mark.parametrize("args, message, hint", [
    (["inspect", "nope.h5"], "error: nope.h5: dataset file not found", "progressive data generate -o PATH"),
    (["generate", "-o", "TINY", "--sizes", "16"], "output file already exists", "--force"),
    (["generate", "--sizes", "16,x", "-o", "new.h5"], "error: --sizes: cannot parse '16,x' as a comma-separated list of ints", "--sizes 512,1024"),
    (["generate", "--split", "0.9,0.2,0.1", "-o", "new.h5"], "error: --split: split fractions 0.9,0.2,0.1 are not three", "0.8,0.1,0.1"),
    (["subset", "TINY", "--max-samples", "3", "--seed", "1", "--buckets", "48", "-o", "s.h5"],
     "bucket(s) 48 not in the file (buckets present: 16, 32, 64)", "pick --buckets"),
    (["inspect", "TRUNCATED"], "not a readable HDF5 file (truncated or corrupt?)", "copy it again"),
])
def test_bad_input_messages(tiny_dataset: Path, tmp_path: Path, args: list[str], message: str, hint: str) -> None:
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(tiny_dataset.read_bytes()[:5000])
    args = [str(tiny_dataset) if a == "TINY" else str(truncated) if a == "TRUNCATED" else a for a in args]
    proc = run_cli("data", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and hint in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "new.h5").exists() and not (tmp_path / "s.h5").exists()


def test_data_without_action_shows_help() -> None:
    proc = run_cli("data")
    assert proc.returncode == 2 and "generate" in proc.stdout and "inspect" in proc.stdout


def _workers_ready(pgid: int) -> int:
    """Processes of the group that ignore SIGTERM: the generator's workers once initialised."""
    ready = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            if os.getpgid(int(status.parent.name)) != pgid:
                continue
        except (OSError, ProcessLookupError):
            continue
        ignored = int(next(line for line in text.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        ready += bool(ignored & (1 << (signal.SIGTERM - 1)))
    return ready


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc to see the workers start")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_nothing(tmp_path: Path, sig: int) -> None:
    # Ctrl-C in a terminal (SIGINT) and scancel (SIGTERM) signal the whole process group:
    # the CLI, the forkserver and the workers.
    proc = subprocess.Popen([sys.executable, "-m", "progressive", "data", "generate", "-o", "x.h5", "--sizes", "2048",
                             "--counts", "3000", "--workers", "2"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    # Wait for the temp file and for both workers to be past their start-up (ignoring SIGTERM).
    while not (any(p.name.endswith(".tmp") for p in tmp_path.iterdir()) and _workers_ready(proc.pid) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    assert not index_path(tmp_path / "x.h5").exists()
