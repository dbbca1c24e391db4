"""`[train] async_checkpoint = true`: periodic saves written in the background, resumes still bitwise (issue 24).

The kill test is a real SIGKILL of a real training process while its background thread is
writing a checkpoint (the parent watches the checkpoint folder for the writer's temp file).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from progressive.checkpoint import latest_checkpoint
from progressive.metrics import read_metrics
from progressive.trainer import train_stage
from tests.test_trainer_support import (
    StopAfter,
    assert_same_weights,
    final_weights,
    make_data,
    make_plan,
    one_thread,  # noqa: F401  (autouse fixture)
    stage_toml,
)
from tests.util import REPO

STAGE = stage_toml("a", bucket=16, batch_size=2, epochs=3)
ASYNC = "checkpoint_every = 1\nasync_checkpoint = true\nkeep_checkpoints = 2"
SYNC = "checkpoint_every = 1\nkeep_checkpoints = 2"


def test_background_saves_resume_bitwise_and_say_what_the_loop_waited(tmp_path: Path) -> None:
    data = make_data(tmp_path / "m.h5")
    (tmp_path / "ref").mkdir()
    ref = make_plan(tmp_path / "ref", data, STAGE, train=SYNC)
    train_stage(ref, ref.stages[0], device="cpu")
    (tmp_path / "async").mkdir()
    plan = make_plan(tmp_path / "async", data, STAGE, train=ASYNC)
    stopped = train_stage(plan, plan.stages[0], stop_requested=StopAfter(5), device="cpu")
    assert stopped.status == "stopped" and stopped.step == 5
    done = train_stage(plan, plan.stages[0], device="cpu")
    assert done.resumed_from is not None and done.resumed_from.endswith("step_00000005.pt")
    assert_same_weights(final_weights(done.checkpoint or ""), final_weights(ref.stages[0].final_checkpoint))
    saves = [e for e in read_metrics(plan.stages[0].metrics_path) if e["event"] == "checkpoint"]
    periodic = [e for e in saves if e["reason"] == "periodic"]
    assert periodic and all(e["background"] and e["write_s"] > 0 and e["seconds"] >= 0 for e in periodic)
    assert all(not e["background"] for e in saves if e["reason"] in ("stop", "end"))  # those stay synchronous
    # rotation still keeps the newest 2 (the background writer prunes after each write)
    assert len(list(Path(plan.stages[0].checkpoint_dir).glob("step_*.pt"))) == 2


TRAIN_FOREVER = """
import sys
from progressive.plan import Plan
from progressive.trainer import train_stage
plan = Plan.model_validate_json(open(sys.argv[1]).read())
train_stage(plan, plan.stages[0], device="cpu")
"""


@pytest.mark.slow
def test_sigkill_during_a_background_write_leaves_the_previous_checkpoint_and_resume_is_bitwise(tmp_path: Path) -> None:
    data = make_data(tmp_path / "m.h5")
    wide = "hidden = 256\nlayers = 3\nsketch = 4"  # a state of a few MB: writes long enough to be caught mid-way
    stage = stage_toml("a", bucket=16, batch_size=2, epochs=4)
    (tmp_path / "ref").mkdir()
    ref = make_plan(tmp_path / "ref", data, stage, train=SYNC, model=wide)
    train_stage(ref, ref.stages[0], device="cpu")
    (tmp_path / "run").mkdir()
    plan = make_plan(tmp_path / "run", data, stage, train=ASYNC, model=wide)
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    ckpt_dir = Path(plan.stages[0].checkpoint_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    caught = None
    for _attempt in range(5):  # the write must be caught in flight; a few tries at most
        proc = subprocess.Popen([sys.executable, "-c", TRAIN_FOREVER, str(tmp_path / "plan.json")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            temps = [p for p in ckpt_dir.glob(".step_*.pt.tmp-*")] if ckpt_dir.is_dir() else []
            if temps and any(ckpt_dir.glob("step_*.pt")):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                caught = temps[0]
                break
            time.sleep(0.001)
        if caught is not None:
            break
        for f in ckpt_dir.glob("*"):
            f.unlink()
    assert caught is not None, "no background write was caught in flight"
    assert proc.returncode == -signal.SIGKILL
    intact = latest_checkpoint(ckpt_dir)
    assert intact is not None and intact.name < caught.name.lstrip(".").split(".tmp-")[0]  # the one before
    done = train_stage(plan, plan.stages[0], device="cpu")
    assert done.status == "completed" and done.resumed_from == str(intact)
    assert not list(ckpt_dir.glob(".*.tmp-*"))  # the torn temp file was cleaned at the start
    assert_same_weights(final_weights(done.checkpoint or ""), final_weights(ref.stages[0].final_checkpoint))
    steps = [e["step"] for e in read_metrics(plan.stages[0].metrics_path) if e["event"] == "step"]
    assert steps[-1] == done.total_steps
    print(json.dumps({"killed_during": caught.name, "resumed_from": intact.name}))
