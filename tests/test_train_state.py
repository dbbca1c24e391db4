"""The trainer's state: each part round-trips through its state_dict and a checkpoint file; the on-disk
keys stay those of the format; files of the older shape still resume bitwise; bad files are refused."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from progressive.checkpoint import FORMAT, load_checkpoint, save_atomic, step_path
from progressive.data.loader import ResumableSampler
from progressive.errors import CheckpointError
from progressive.train_state import (
    FinalCheckpoint,
    StageIdentity,
    StateCheckpoint,
    TrainParts,
    TrainState,
    load_final,
    load_state,
)
from progressive.trainer import data_position, train_stage
from tests.test_trainer_support import (
    StopAfter,
    assert_same_weights,
    final_weights,
    make_data,
    make_plan,
    one_thread,  # noqa: F401  (autouse fixture)
    stage_toml,
)

IDENT = StageIdentity(stage="a", fingerprint={"bucket": 16, "lr": 0.001}, total_steps=30, train_samples=23, world_size=1)


def make_parts(seed: int, *, scale: float = 2.0**16) -> TrainParts:
    """Parts of a tiny linear model; `seed` sets its weights, generator and data order's seed stays 5."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return TrainParts(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
                      scaler=torch.amp.GradScaler("cpu", init_scale=scale),
                      sampler=ResumableSampler(23, seed=5), loss_gen=torch.Generator().manual_seed(seed))


def train_a_little(parts: TrainParts) -> None:
    for _ in range(3):
        loss = parts.model(torch.randn(8, 4, generator=parts.loss_gen)).square().mean()
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.optimizer.zero_grad()


def next_draws(parts: TrainParts) -> tuple[Any, ...]:
    """The next number from each RNG a checkpoint restores (consumes them)."""
    return (random.random(), float(np.random.rand()), float(torch.rand(())),
            float(torch.rand((), generator=parts.loss_gen)))


def assert_same_tree(a: Any, b: Any) -> None:
    """Equal nested dicts/lists of tensors and plain values (tensors bitwise)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


def test_parts_and_progress_round_trip_through_a_checkpoint_file(tmp_path: Path) -> None:
    src = make_parts(1)
    train_a_little(src)
    src.sampler.set_epoch(2, start=5)  # mid-epoch: 5 of this rank's 23 samples consumed
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    state = TrainState(step=7, elapsed_s=1.5)
    path = save_atomic(src.capture(IDENT, state, [src.rng_state()]).to_dict(), step_path(tmp_path, 7))
    expected = next_draws(src)
    remaining = list(src.sampler)

    dst = make_parts(2, scale=8.0)  # other weights, generator and scale
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ck = load_state(path, IDENT)  # torch.load(weights_only=True) inside
    dst.restore(ck, rank=0, position=(2, 5), path=path)
    resumed = TrainState()
    resumed.load_state_dict(ck.to_dict(), source=str(path))

    assert (resumed.step, resumed.elapsed_s, resumed.last_saved_step, resumed.resumed_from) == (7, 1.5, 7, str(path))
    assert_same_weights(dst.model.state_dict(), src.model.state_dict())
    assert_same_tree(dst.optimizer.state_dict(), src.optimizer.state_dict())
    assert dst.scaler.state_dict() == src.scaler.state_dict() and dst.scaler.get_scale() != 8.0
    # The sampler comes back through its own state_dict: same seed and position, same samples left.
    assert dst.sampler.state_dict() == src.sampler.state_dict() == {"seed": 5, "epoch": 2, "start": 5}
    assert list(dst.sampler) == remaining and len(remaining) == 18
    assert next_draws(dst) == expected  # Python, numpy, torch and the loss's generator


def test_typed_checkpoint_writes_the_format_keys_and_reads_them_back(tmp_path: Path) -> None:
    parts = make_parts(1)
    ck = parts.capture(IDENT, TrainState(step=3, elapsed_s=0.25), [parts.rng_state()])
    raw = ck.to_dict()
    assert raw["format"] == FORMAT and raw["kind"] == "state" and "scheduler" not in raw
    assert (raw["epoch"], raw["epoch_samples"]) == (0, 0) and raw["scaler"] is not None
    again = StateCheckpoint.from_dict(load_checkpoint(save_atomic(raw, tmp_path / "s.pt")), tmp_path / "s.pt")
    assert again.step == 3 and again.sampler == {"seed": 5, "epoch": 0, "start": 0}
    assert_same_weights(again.model, parts.model.state_dict())
    final = FinalCheckpoint(stage="a", fingerprint=IDENT.fingerprint, step=30, total_steps=30, train_samples=23, world_size=1,
                            elapsed_s=2.0, model=parts.model.state_dict(), metrics={"loss": 0.5})
    path = save_atomic(final.to_dict(), tmp_path / "final.pt")
    back = load_final(path, IDENT.fingerprint)
    assert (back.step, back.metrics) == (30, {"loss": 0.5}) and set(load_checkpoint(path)) == FINAL_KEYS
    with pytest.raises(CheckpointError, match="expected a 'state' checkpoint, found kind 'final'"):
        load_state(path, IDENT)


def test_bad_files_are_refused_with_what_is_wrong(tmp_path: Path) -> None:
    parts = make_parts(1)
    good = parts.capture(IDENT, TrainState(step=3), [parts.rng_state()]).to_dict()

    def refused(raw: dict[str, Any], ident: StageIdentity = IDENT) -> str:
        path = save_atomic(raw, tmp_path / "x.pt")
        with pytest.raises(CheckpointError) as err:
            load_state(path, ident)
        assert str(path) in str(err.value)
        return str(err.value)

    assert "format is 'progressive.checkpoint/9'" in refused({**good, "format": "progressive.checkpoint/9"})
    assert "expected a 'state' checkpoint, found kind 'final'" in refused({**good, "kind": "final"})
    assert "lacks 'optimizer', 'rng'" in refused({k: v for k, v in good.items() if k not in ("optimizer", "rng")})
    assert "written for 23 training samples, the data now has 24" in refused(good, replace(IDENT, train_samples=24))
    other_settings = replace(IDENT, fingerprint={**IDENT.fingerprint, "lr": 0.002})
    assert "different stage settings" in refused(good, other_settings) and "lr: 0.001 -> 0.002" in refused(good, other_settings)

    ck = StateCheckpoint.from_dict(good, "x.pt")
    with pytest.raises(CheckpointError, match=r"RNG states for 1 rank\(s\), not for rank 1"):
        make_parts(2).restore(ck, rank=1, position=(0, 0), path="x.pt")
    with pytest.raises(CheckpointError, match="sampler stands at epoch 0, sample 0 but step 3 is at epoch 0, sample 12"):
        make_parts(2).restore(ck, rank=0, position=(0, 12), path="x.pt")
    ck.sampler = {"seed": 6, "epoch": 0, "start": 0}
    with pytest.raises(CheckpointError, match="data order used seed 6, this run uses seed 5"):
        make_parts(2).restore(ck, rank=0, position=(0, 0), path="x.pt")


# --------------------------------------------------------------------------- through the trainer

TRAIN = 'grad_accum = 2\nwarmup_frac = 0.2\ncheckpoint_every = "30m"\neval_samples = 2'
STAGE = stage_toml("a", bucket=16, batch_size=4, epochs=3)  # 19 samples: 3 steps per epoch, 9 in all

# The on-disk format: what older readers (and `load_weights`) find in the files.
STATE_KEYS = {"format", "kind", "stage", "fingerprint", "step", "total_steps", "epoch", "epoch_samples",
              "train_samples", "world_size", "elapsed_s", "sampler", "model", "optimizer", "scaler", "precision", "rng",
              "saved_at", "torch_version"}
FINAL_KEYS = {"format", "kind", "stage", "fingerprint", "step", "total_steps", "train_samples", "world_size",
              "elapsed_s", "model", "metrics", "saved_at", "torch_version"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "m.h5")


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    plan = make_plan(tmp_path_factory.mktemp("ref"), data, STAGE, train=TRAIN)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train_stage(plan, plan.stages[0])
    finally:
        torch.set_num_threads(before)
    return final_weights(out.checkpoint or "")


def test_files_keep_the_format_keys_and_the_sampler_position(data: Path, tmp_path: Path) -> None:
    plan = make_plan(tmp_path, data, STAGE, train=TRAIN)
    stage = plan.stages[0]
    out = train_stage(plan, stage, stop_requested=StopAfter(4))  # step 4: epoch 1, 8 samples in
    raw = load_checkpoint(out.checkpoint or "")
    assert set(raw) == STATE_KEYS and raw["kind"] == "state" and raw["step"] == 4 and len(raw["rng"]) == 1
    assert data_position(4, 3, 4, 2) == (1, 8)
    assert raw["sampler"] == {"seed": plan.seed, "epoch": 1, "start": 8} and (raw["epoch"], raw["epoch_samples"]) == (1, 8)
    done = train_stage(plan, stage)
    assert set(load_checkpoint(done.checkpoint or "")) == FINAL_KEYS


@pytest.mark.parametrize("shape", ["previous", "before-sampler"])
def test_checkpoint_of_an_older_shape_resumes_bitwise(shape: str, data: Path, tmp_path: Path,
                                                      reference: dict[str, torch.Tensor]) -> None:
    plan = make_plan(tmp_path, data, STAGE, train=TRAIN)
    stage = plan.stages[0]
    path = train_stage(plan, stage, stop_requested=StopAfter(4)).checkpoint or ""
    # What the previous trainer wrote: the same keys plus a "scheduler" entry nobody read; files
    # written before that had no "sampler" either.
    raw = load_checkpoint(path)
    raw["scheduler"] = {"kind": "warmup_cosine", "step": 4, "total": 9}
    if shape == "before-sampler":
        del raw["sampler"]
    save_atomic(raw, path)
    out = train_stage(plan, stage)
    assert out.status == "completed" and out.resumed_from == path
    assert_same_weights(final_weights(out.checkpoint or ""), reference)
