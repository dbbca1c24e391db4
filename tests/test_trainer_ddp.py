"""DDP on CPU: 2 and 4 gloo processes train, agree on the step they stop at, resume, and end bitwise identical.

Each rank is a real subprocess with the environment torchrun or the Slurm job wrapper sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); it runs this file as a script.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_trainer_support import (
    RECORDING,
    TINY_MODEL,
    RecordingTask,
    StopAfter,
    assert_same_weights,
    final_weights,
    make_data,
    make_plan,
    stage_toml,
)

REPO = Path(__file__).resolve().parents[1]
# 19 matrices over 2 ranks: 10 per rank, micro-batches of 2, 2 per step -> 3 steps per epoch (2, 2, 1).
STAGE = stage_toml("d", bucket=16, batch_size=2, epochs=2)
TRAIN = 'grad_accum = 2\ncheckpoint_every = "30m"\neval_samples = 1\nwarmup_frac = 0.2'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Wide enough that DDP's gradient buffer spans several of gloo's ring chunks (hidden = 8 does not show it).
WIDE_MODEL = "hidden = 64\nlayers = 3\nsketch = 4"


def launch(folder: Path, data: Path, run: str, stop: tuple[int, int] | None = None,
           world: int = 2, model: str = TINY_MODEL) -> list[dict[str, Any]]:
    """Run the stage with `world` ranks; `stop` = (rank, poll): that rank alone asks to stop at that poll."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": "lo",
               "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DDP_TEST_MODEL": model}
        args = [sys.executable, "-m", "tests.test_trainer_ddp", str(folder), str(data), run,
                json.dumps(list(stop) if stop else None)]
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def rank_weights(folder: Path, run: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"{run}.rank{rank}.pt", weights_only=True)


@pytest.mark.slow
def test_two_gloo_ranks_stop_together_resume_and_match(tmp_path: Path) -> None:
    data = make_data(tmp_path / "m.h5")

    # Uninterrupted reference.
    ref = launch(tmp_path, data, "ref")
    assert [(r["status"], r["step"], r["total"]) for r in ref] == [("completed", 6, 6)] * 2
    ref_final = final_weights(ref[0]["checkpoint"])
    assert_same_weights(rank_weights(tmp_path, "ref", 0), ref_final)
    assert_same_weights(rank_weights(tmp_path, "ref", 1), ref_final)

    # Rank 1 alone asks to stop after step 2 (mid-epoch): both ranks stop there, rank 0 saves.
    first = launch(tmp_path, data, "cut", stop=(1, 2))
    assert [(r["status"], r["step"]) for r in first] == [("stopped", 2)] * 2
    assert first[0]["checkpoint"] == first[1]["checkpoint"] and first[0]["checkpoint"].endswith("step_00000002.pt")
    assert first[0]["polls"] == 2  # rank 0 never asked: it learned of the stop through the all-reduce
    # Then rank 0 asks after one more step (the end of epoch 0), then the stage completes.
    second = launch(tmp_path, data, "cut", stop=(0, 1))
    assert [(r["status"], r["step"]) for r in second] == [("stopped", 3)] * 2
    last = launch(tmp_path, data, "cut")
    assert [(r["status"], r["step"]) for r in last] == [("completed", 6)] * 2

    assert_same_weights(final_weights(last[0]["checkpoint"]), ref_final)
    assert_same_weights(rank_weights(tmp_path, "cut", 0), ref_final)
    assert_same_weights(rank_weights(tmp_path, "cut", 1), ref_final)
    # Only rank 0 wrote metrics, and no step was done twice.
    events = [json.loads(line) for line in Path(last[0]["metrics"]).read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert all(e["world_size"] == 2 for e in events if e["event"] == "start")
    # each rank's host, gathered by rank 0 (both here; tests/test_slurm_multinode.py has them on two nodes)
    me = socket.gethostname()
    assert all(e["hosts"] == [me, me] and e["nodes"] == [me] for e in events if e["event"] == "start")


@pytest.mark.slow
def test_four_gloo_ranks_resume_bitwise_after_the_first_step_and_mid_epoch(tmp_path: Path) -> None:
    """4 ranks: a resumed job's first step must reduce gradients in the same order as an uninterrupted run's.

    With 2 ranks a + b = b + a hides it; with 4, a gradient reduced at another position of DDP's buffer
    (DDP re-buckets by gradient-ready order after its first iteration) sums in another order.
    """
    data = make_data(tmp_path / "m.h5")
    # 19 matrices over 4 ranks: 5 per rank, micro-batches of 2, 2 per step -> 2 steps per epoch (4, 1), 2 epochs.
    ref = launch(tmp_path, data, "ref4", world=4, model=WIDE_MODEL)
    assert [(r["status"], r["step"]) for r in ref] == [("completed", 4)] * 4
    ref_final = final_weights(ref[0]["checkpoint"])
    # Stop after the very first step (the one DDP buckets differently), then mid-epoch 1 (step 3).
    assert [r["step"] for r in launch(tmp_path, data, "cut4", stop=(3, 1), world=4, model=WIDE_MODEL)] == [1] * 4
    assert [r["step"] for r in launch(tmp_path, data, "cut4", stop=(2, 2), world=4, model=WIDE_MODEL)] == [3] * 4
    last = launch(tmp_path, data, "cut4", world=4, model=WIDE_MODEL)
    assert [(r["status"], r["step"]) for r in last] == [("completed", 4)] * 4
    assert_same_weights(final_weights(last[0]["checkpoint"]), ref_final)
    for rank in range(4):
        assert_same_weights(rank_weights(tmp_path, "cut4", rank), ref_final)


def _rank_main(folder: str, data: str, run: str, stop_json: str) -> None:
    """One rank of `launch`: train the stage, print the outcome as JSON, save this rank's weights."""
    from progressive.trainer import train_stage

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    stop = json.loads(stop_json)
    plan = make_plan(Path(folder), Path(data), STAGE, train=TRAIN, model=os.environ["DDP_TEST_MODEL"], slurm=f"tasks_per_node = {os.environ['WORLD_SIZE']}", task=RECORDING,
                     run_name=run)
    stage = plan.stages[0]
    poller = StopAfter(stop[1] if stop and stop[0] == rank else 10**9)
    RecordingTask.reset()
    out = train_stage(plan, stage, stop_requested=poller)
    assert RecordingTask.model is not None
    torch.save(RecordingTask.model.state_dict(), Path(folder) / f"{run}.rank{rank}.pt")
    print(json.dumps({"status": out.status, "step": out.step, "total": out.total_steps, "checkpoint": out.checkpoint,
                      "polls": poller.calls, "metrics": stage.metrics_path}))


if __name__ == "__main__":
    _rank_main(*sys.argv[1:5])
