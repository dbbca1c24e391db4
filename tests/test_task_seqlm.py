"""The sequence task: it learns, it resumes bitwise after stops and kills, DDP (2 gloo ranks) matches, bad options are named."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from progressive.config import parse_config
from progressive.data.arrays import array_counts
from progressive.data.seqgen import generate_sequences
from progressive.errors import DataError
from progressive.metrics import read_metrics
from progressive.plan import Plan, build_plan
from progressive.tasks.seqlm import SequenceLMTask
from progressive.trainer import train_stage
from tests.test_trainer_ddp import _free_port
from tests.test_trainer_support import (
    Crash,
    StopAfter,
    assert_same_weights,
    crash_at,
    final_weights,
    one_thread,  # noqa: F401  (autouse fixture)
    stage_toml,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = "vocab = 16\nd_model = 32\nlayers = 2\nheads = 2\nmax_len = 64"
# 40 training sequences of 32 tokens, batches of 4, 2 micro-batches per step: 5 steps per epoch, 15 in all.
TRAIN = 'grad_accum = 2\nwarmup_frac = 0.2\ncheckpoint_every = "30m"\neval_samples = 4\nlr = 0.003'
STAGE = stage_toml("a", bucket=32, batch_size=4, epochs=3)


def make_seq_data(path: Path) -> Path:
    if not path.exists():
        generate_sequences(path, lengths=[32, 64], counts=[50, 20], seed=0)
    return path


def seq_plan(folder: Path, data: Path, stages: str = STAGE, *, train: str = TRAIN, slurm: str = "",
             run_name: str | None = None) -> Plan:
    text = (f'[run]\ndata = "{data}"\n[slurm]\n{slurm}\n[train]\n{train}\n[model]\n'
            f'task = "progressive.tasks.seqlm:SequenceLMTask"\n[model.options]\n{MODEL}\n{stages}')
    cfg = parse_config(text, source=str(folder / "x.toml"))
    return build_plan(cfg, folder / "x.toml", counts=array_counts, run_name=run_name)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_seq_data(tmp_path_factory.mktemp("seq") / "seq")


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    plan = seq_plan(tmp_path_factory.mktemp("ref"), data)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train_stage(plan, plan.stages[0])
    finally:
        torch.set_num_threads(before)
    assert out.status == "completed" and out.step == out.total_steps == 15 and out.checkpoint
    return final_weights(out.checkpoint)


def steps(path: str) -> list[int]:
    return [e["step"] for e in read_metrics(path) if e.get("event") == "step"]


def test_stopped_and_killed_resumes_are_bitwise_identical(data: Path, tmp_path: Path,
                                                          reference: dict[str, torch.Tensor]) -> None:
    # Periodic checkpoints every 3 steps, a DataLoader worker prefetching ahead.
    plan = seq_plan(tmp_path, data, train=TRAIN.replace('"30m"', "3") + "\nnum_workers = 1")
    stage = plan.stages[0]
    for poll, expect in [(2, 2), (4, 6)]:  # stopped mid epoch 0, then mid epoch 1
        out = train_stage(plan, stage, stop_requested=StopAfter(poll))
        assert (out.status, out.step) == ("stopped", expect)
    with pytest.raises(Crash):
        train_stage(plan, stage, on_progress=crash_at(11))  # killed: steps 10 and 11 are lost, 9 is on disk
    out = train_stage(plan, stage)
    assert out.status == "completed" and out.resumed_from and out.resumed_from.endswith("step_00000009.pt")
    assert out.checkpoint
    assert_same_weights(final_weights(out.checkpoint), reference)
    logged = steps(stage.metrics_path)
    assert sorted(set(logged)) == list(range(1, 16)) and logged.count(10) == 2  # only the killed steps redone


def test_it_learns_and_reports_loss_and_perplexity(tmp_path: Path) -> None:
    data = tmp_path / "seq"
    generate_sequences(data, lengths=[32, 64], counts=[400, 100], seed=3)
    plan = seq_plan(tmp_path, data, stage_toml("a", bucket=32, batch_size=8, epochs=2)
                    + stage_toml("b", bucket=64, batch_size=8, epochs=2), train="lr = 0.01\neval_samples = 10")
    first = train_stage(plan, plan.stages[0])
    second = train_stage(plan, plan.stages[1])
    assert second.metrics and first.metrics
    for ev in (first.metrics, second.metrics):
        assert ev["ppl"] == pytest.approx(math.exp(ev["loss"]))
        assert ev["loss"] < math.log(16) - 0.4, ev  # well below uniform guessing over 16 tokens
    floor = json.loads((data / "arrays.json").read_text())["source"]["entropy_floor"]
    assert second.metrics["loss"] > floor  # and never below what the generator allows
    start = next(e for e in read_metrics(plan.stages[1].metrics_path) if e.get("event") == "start")
    assert start["init_from"] == plan.stages[0].final_checkpoint  # the 64-token stage starts from the 32-token one


def test_bad_options_are_named(data: Path) -> None:
    with pytest.raises(DataError, match="bucket 64 is longer than max_len 32") as info:
        SequenceLMTask(max_len=32).dataset(str(data), 64, "train")
    assert "max_len >= 64" in str(info.value)
    with pytest.raises(DataError, match="the data has 16 token ids but the model 8"):
        SequenceLMTask(vocab=8).dataset(str(data), 32, "train")
    with pytest.raises(ValueError, match="heads >= 1 dividing d_model"):
        SequenceLMTask(d_model=30, heads=4)


def test_the_readme_sequence_example_runs(tmp_path: Path) -> None:
    """As the README says: generate-seq, plan, submit --local on examples/seq.toml (a copy, paths as in the repo)."""
    from tests.util import run_cli

    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "seq.toml").write_text((REPO / "examples" / "seq.toml").read_text())
    env = {"OMP_NUM_THREADS": "1"}
    run_cli("data", "generate-seq", "-o", "data/seq", cwd=tmp_path, check=True, env=env)
    plan = json.loads(run_cli("plan", "-c", "examples/seq.toml", "--json", cwd=tmp_path, check=True, env=env).stdout)
    assert [(s["bucket"], s["samples"]["train"]) for s in plan["stages"]] == [(64, 512), (128, 256), (256, 128)]
    proc = run_cli("submit", "--local", "-c", "examples/seq.toml", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "val loss" in proc.stdout and "ppl" in proc.stdout
    losses = [next(e for e in read_metrics(tmp_path / "jobs" / "seq" / "stages" / name / "metrics.jsonl")
                   if e.get("event") == "completed")["eval"]["loss"] for name in ("seq_64", "seq_128", "seq_256")]
    assert losses[0] < math.log(16) - 0.8 and losses[2] < losses[0], losses  # learns, and keeps learning by stage


def test_demo_refuses_to_invent_data_for_a_custom_task(tmp_path: Path) -> None:
    from tests.util import run_cli

    cfg = tmp_path / "g.toml"
    cfg.write_text('[run]\ndata = "mine"\n[model]\ntask = "tests.byo_task:TokenFileTask"\n'
                   '[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = 1\n')
    proc = run_cli("demo", "-c", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2 and "demo makes data only for the built-in tasks" in proc.stderr
    assert not (tmp_path / "mine").exists()


@pytest.mark.slow
def test_two_gloo_ranks_stop_resume_and_match(tmp_path: Path) -> None:
    data = make_seq_data(tmp_path / "seq")
    ref = launch(tmp_path, data, "ref")
    assert [(r["status"], r["step"]) for r in ref] == [("completed", 10)] * 2
    first = launch(tmp_path, data, "cut", stop=(1, 3))  # rank 1 alone asks: both stop at step 3
    assert [(r["status"], r["step"]) for r in first] == [("stopped", 3)] * 2
    last = launch(tmp_path, data, "cut")
    assert [(r["status"], r["step"]) for r in last] == [("completed", 10)] * 2
    assert_same_weights(final_weights(last[0]["checkpoint"]), final_weights(ref[0]["checkpoint"]))


# 40 sequences over 2 ranks: 20 per rank in batches of 4 -> 5 steps per epoch, 10 over 2 epochs.
DDP_STAGE = stage_toml("d", bucket=32, batch_size=4, epochs=2)
DDP_TRAIN = 'checkpoint_every = "30m"\neval_samples = 2\nwarmup_frac = 0.2'


def launch(folder: Path, data: Path, run: str, stop: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Run the DDP stage with 2 ranks, each a subprocess running this file."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        args = [sys.executable, "-m", "tests.test_task_seqlm", str(folder), str(data), run, json.dumps(stop)]
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _rank_main(folder: str, data: str, run: str, stop_json: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    stop = json.loads(stop_json)
    plan = seq_plan(Path(folder), Path(data), DDP_STAGE, train=DDP_TRAIN, slurm="tasks_per_node = 2", run_name=run)
    out = train_stage(plan, plan.stages[0], stop_requested=StopAfter(stop[1] if stop and stop[0] == rank else 10**9))
    print(json.dumps({"status": out.status, "step": out.step, "checkpoint": out.checkpoint}))


if __name__ == "__main__":
    _rank_main(*sys.argv[1:5])
