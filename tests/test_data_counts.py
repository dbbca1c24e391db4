"""A task that owns its data (tests/byo_task.py, its own numpy token files): plan, data index, submit --local.

Real CLI subprocesses on real files; the task is imported by the jobs like any user's task.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from progressive.data.counts import (
    CountsUnknown,
    counts_from_task,
    counts_path,
    plan_counts,
    read_count_index,
    write_count_index,
)
from progressive.errors import DataError
from tests.byo_task import TokenFileTask, write_token_files
from tests.util import REPO, run_cli

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TASK = "tests.byo_task:TokenFileTask"


def byo_graph(folder: Path, *, buckets: tuple[int, ...] = (16, 64), run: str = "byo", options: str = "",
              data: str = "tokens") -> Path:
    """A 2-stage graph over the token files in folder/tokens."""
    text = (f'[run]\nname = "{run}"\ndata = "{data}"\nseed = 1\n[train]\nlr = 0.003\neval_samples = 4\n'
            f'checkpoint_every = 1000\n[model]\ntask = "{TASK}"\n[model.options]\n{options}\n')
    for i, b in enumerate(buckets):
        text += f'[[stage]]\nname = "s{b}"\nbucket = {b}\nbatch_size = 4\nepochs = 1\n'
        text += 'init_from = "none"\n' if i == 0 else ""
    path = folder / f"{run}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    return write_token_files(tmp_path / "tokens")


def expected_counts(folder: Path, buckets: tuple[int, ...]) -> dict[int, dict[str, int]]:
    """Counted here independently of the task: lengths in (b/2, b]."""
    out: dict[int, dict[str, int]] = {}
    for b in buckets:
        out[b] = {}
        for split in ("train", "val", "test"):
            lengths = np.load(folder / f"{split}.lengths.npy")
            out[b][split] = int(((lengths > b // 2) & (lengths <= b)).sum())
    return out


PLAN_WITHOUT_TORCH = ("import sys, runpy; sys.argv = ['progressive'] + sys.argv[1:]\n"
                      "try:\n    runpy.run_module('progressive', run_name='__main__')\n"
                      "except SystemExit:\n    pass\n"
                      "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")


def test_plan_says_unknown_then_index_gives_real_counts_without_torch(tmp_path: Path, tokens: Path) -> None:
    cfg = byo_graph(tmp_path)
    before = run_cli("plan", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert before.returncode == 0, before.stderr
    assert "sample counts unknown" in before.stdout and "progressive data index -c" in before.stdout
    assert "unknown" in before.stdout and not counts_path(tokens).exists()  # plan wrote nothing
    unknown = json.loads(run_cli("plan", "-c", str(cfg), "--json", cwd=tmp_path, env=ENV, check=True).stdout)
    assert f"run `progressive data index -c {cfg}` once" in unknown["data_error"]
    assert all(s["samples"] is None and s["total_steps"] is None for s in unknown["stages"])

    index = run_cli("data", "index", "-c", str(cfg), "--json", cwd=tmp_path, env=ENV)
    assert index.returncode == 0, index.stderr
    want = expected_counts(tokens, (16, 64))
    got = {row["bucket"]: {s: row[s] for s in ("train", "val", "test")} for row in json.loads(index.stdout)["counts"]}
    assert got == want and counts_path(tokens).is_file()

    plan = json.loads(run_cli("plan", "-c", str(cfg), "--json", cwd=tmp_path, env=ENV, check=True).stdout)
    assert plan["data_error"] is None
    assert [s["samples"] for s in plan["stages"]] == [want[16], want[64]]
    assert plan["stages"][1]["total_steps"] == -(-want[64]["train"] // 4)
    # The index is read by plan without importing the task, hence without torch.
    proc = subprocess.run([sys.executable, "-c", PLAN_WITHOUT_TORCH, "plan", "-c", str(cfg)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env={**ENV, "PATH": "/usr/bin:/bin"})
    assert "NO-TORCH" in proc.stdout and f"{want[64]['train']}/{want[64]['val']}" in proc.stdout, proc.stderr


def data_error(cfg: Path) -> str | None:
    """plan --json's data_error."""
    return json.loads(run_cli("plan", "-c", str(cfg), "--json", cwd=cfg.parent, env=ENV, check=True).stdout)["data_error"]


def test_changed_data_or_options_make_the_index_stale(tmp_path: Path, tokens: Path) -> None:
    cfg = byo_graph(tmp_path)
    run_cli("data", "index", "-c", str(cfg), cwd=tmp_path, env=ENV, check=True)
    assert data_error(cfg) is None
    write_token_files(tokens, seed=7)  # new data in place
    err = data_error(cfg)
    assert err and "the data changed since its count index was written" in err and "progressive data index" in err
    run_cli("data", "index", "-c", str(cfg), cwd=tmp_path, env=ENV, check=True)
    assert data_error(cfg) is None
    other = byo_graph(tmp_path, options="d_model = 8")
    err = data_error(other)
    assert err and "written under other [model.options]" in err


def test_index_lacking_a_bucket_or_damaged_is_unknown(tmp_path: Path, tokens: Path) -> None:
    write_count_index(tokens, {16: {"train": 3}}, task=TASK)
    with pytest.raises(CountsUnknown, match="has no bucket 64") as info:
        plan_counts(tokens, buckets=[16, 64], task=TASK, config="g.toml")
    assert "progressive data index -c g.toml" in str(info.value)
    with pytest.raises(CountsUnknown, match="written for task 'tests.byo_task:TokenFileTask', not 'other:Task'"):
        read_count_index(tokens, task="other:Task")
    counts_path(tokens).write_text("{not json")
    with pytest.raises(CountsUnknown, match="count index is unreadable"):
        plan_counts(tokens, buckets=[16], task=TASK)
    with pytest.raises(DataError, match="dataset file not found"):
        plan_counts(tmp_path / "absent", buckets=[16], task=TASK)


def test_submit_local_asks_the_task_and_trains(tmp_path: Path, tokens: Path) -> None:
    cfg = byo_graph(tmp_path)  # no index: submit counts with the task itself
    proc = run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "completed s16" in proc.stdout and "completed s64" in proc.stdout
    rec = json.loads((tmp_path / "jobs" / "byo" / "run.json").read_text())
    want = expected_counts(tokens, (16, 64))
    assert [s["samples"] for s in rec["plan"]["stages"]] == [want[16], want[64]]  # the record holds real counts
    assert (tmp_path / "checkpoints" / "byo" / "s64" / "final.pt").is_file()
    assert not counts_path(tokens).exists()


def test_empty_bucket_is_refused_naming_it(tmp_path: Path, tokens: Path) -> None:
    cfg = byo_graph(tmp_path, buckets=(2, 16))  # lengths start at 4: bucket 2 is empty
    index = run_cli("data", "index", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert index.returncode == 1 and "bucket 2 has no training samples" in index.stdout
    proc = run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "stage 's2': bucket 2 is not in tokens (present: 16)" in proc.stderr
    assert not (tmp_path / "jobs").exists()  # nothing half-done


def test_missing_split_is_refused_naming_bucket_and_split(tmp_path: Path, tokens: Path) -> None:
    (tokens / "test.lengths.npy").unlink()
    cfg = byo_graph(tmp_path)
    for args in (["submit", "--local"], ["submit"], ["data", "index"]):
        proc = run_cli(*args, "-c", str(cfg), cwd=tmp_path, env=ENV)
        assert proc.returncode != 0, args
        assert "bucket 16, split 'test': the task's data raised FileNotFoundError" in proc.stderr, proc.stderr
        assert "return an (empty, if need be) dataset" in proc.stderr
    assert not (tmp_path / "jobs").exists()


def test_task_counts_must_be_counts(tokens: Path) -> None:
    class Bad(TokenFileTask):
        def count(self, data_path: str, bucket: int, split: str) -> int | None:
            return -1

    with pytest.raises(DataError, match="bucket 16, split 'train': the task counted -1 samples"):
        counts_from_task(Bad(), tokens, [16])
    assert counts_from_task(TokenFileTask(), tokens, [64]) == expected_counts(tokens, (64,))


def test_reference_hdf5_data_plans_as_before(tmp_path: Path, tiny_dataset: Path) -> None:
    """The project's sparse HDF5 files still need no index; a non-HDF5 file in their place is 'unknown'."""
    counts = plan_counts(tiny_dataset, buckets=[16], task="progressive.tasks.precond:PreconditionerTask")
    assert counts[16]["train"] > 0
    fake = tmp_path / "m.h5"
    fake.write_bytes(b"not hdf5 at all")
    with pytest.raises(CountsUnknown, match="neither a progressive HDF5 file nor an array folder"):
        plan_counts(fake, buckets=[16], task="x:Y")


def test_damaged_or_foreign_indexes_and_files_are_unknown(tmp_path: Path, tokens: Path) -> None:
    write_count_index(tokens, {16: {"train": 3}}, task=TASK)
    doc = json.loads(counts_path(tokens).read_text())
    counts_path(tokens).write_text(json.dumps({**doc, "format_version": 7}))
    with pytest.raises(CountsUnknown, match="not a count index of this version"):
        read_count_index(tokens, task=TASK)
    counts_path(tokens).write_text(json.dumps({**doc, "counts": {"16": 3}}))
    with pytest.raises(CountsUnknown, match="the count index is damaged"):
        read_count_index(tokens, task=TASK)
    import h5py

    foreign = tmp_path / "theirs.h5"  # an HDF5 file of someone else's layout: only their task can count it
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CountsUnknown, match="not a progressive dataset") as info:
        plan_counts(foreign, buckets=[16], task=TASK, config="g.toml")
    assert "progressive data index -c g.toml" in str(info.value)


def test_task_errors_are_named_with_bucket_and_split(tmp_path: Path) -> None:
    from progressive.data.counts import index_data
    from progressive.data.seqgen import generate_sequences
    from progressive.tasks.seqlm import SequenceLMTask

    generate_sequences(tmp_path / "seq", lengths=[8, 64], counts=[10], seed=0)
    with pytest.raises(DataError, match="bucket 64, split 'train': bucket 64 is longer than max_len 32") as info:
        counts_from_task(SequenceLMTask(max_len=32), tmp_path / "seq", [8, 64])
    assert "max_len >= 64" in str(info.value)  # the task's own hint is kept
    cfg = byo_graph(tmp_path, data="nowhere")
    with pytest.raises(DataError, match="data not found") as info:
        index_data(cfg)
    assert "fix [run].data" in str(info.value)


def test_damaged_project_hdf5_keeps_its_own_hint(tmp_path: Path, tiny_dataset: Path) -> None:
    cut = tmp_path / "cut.h5"
    cut.write_bytes(tiny_dataset.read_bytes()[:3000])  # a transfer cut short
    with pytest.raises(CountsUnknown, match="not a readable HDF5 file") as info:
        plan_counts(cut, buckets=[16], task="progressive.tasks.precond:PreconditionerTask", config="g.toml")
    assert "copy it again" in str(info.value) and "progressive data index -c g.toml" in str(info.value)
    cfg = tmp_path / "g.toml"
    cfg.write_text('[run]\ndata = "cut.h5"\n[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = 1\n')
    proc = run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, env=ENV)  # the task's loader says why
    assert proc.returncode == 2 and "bucket 16, split 'train': not a readable HDF5 file" in proc.stderr
    assert not (tmp_path / "jobs").exists()
