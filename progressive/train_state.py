"""The trainer's state: what a stage's training is made of, and the checkpoints that hold it.

- `TrainState`: where training stands (step, wall time, last save): the one record the loop advances.
- `TrainParts`: the stateful objects (model, optimizer, scaler, sampler, the loss's generator), each
  saved and restored through its own `state_dict` / `load_state_dict`, plus every rank's RNG states.
- `StateCheckpoint` (a `step_N.pt`) and `FinalCheckpoint` (`final.pt`): the typed files. `to_dict`
  gives exactly the keys of the on-disk format (`progressive.checkpoint.FORMAT`), plain data that
  loads with `weights_only=True`; `from_dict` checks the kind and names any missing key.
- `StageIdentity`: what a checkpoint must match to be resumed by this job.

Reading is lenient where older files of the same format differ: keys this code no longer writes
(a `"scheduler"` entry: the learning rate is a pure function of the step) are ignored, and a file
without `"sampler"` (written before the sampler recorded its position) resumes from the position
its step implies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

import torch

from progressive.checkpoint import FORMAT, capture_rng, check_fingerprint, load_checkpoint, load_weights, now_iso, restore_rng
from progressive.data.loader import ResumableSampler
from progressive.errors import CheckpointError
from progressive.plan import InitFrom

__all__ = ["TrainState", "TrainParts", "StageIdentity", "StateCheckpoint", "FinalCheckpoint", "load_state",
           "load_final", "init_weights"]


# --------------------------------------------------------------------------- progress


@dataclass
class TrainState:
    """Where a stage's training stands, over all the jobs that have trained it."""

    step: int = 0  # optimizer steps done
    elapsed_s: float = 0.0  # training wall time over all jobs of this stage
    last_saved_step: int = -1  # the step of the newest checkpoint this job wrote or resumed from
    resumed_from: str | None = None  # the checkpoint this job resumed from, if any

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the progress: {"step", "elapsed_s"}."""
        return {"step": self.step, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, state: Mapping[str, Any], source: str | None = None) -> None:
        """Continue from a `state_dict()` read from the checkpoint file `source`."""
        self.step, self.elapsed_s = int(state["step"]), float(state["elapsed_s"])
        self.last_saved_step, self.resumed_from = self.step, source


@dataclass(frozen=True)
class StageIdentity:
    """What this job is training; a checkpoint must match it to be resumed."""

    stage: str
    fingerprint: dict[str, Any]  # the plan's settings that determine the weights
    total_steps: int
    train_samples: int
    world_size: int


# --------------------------------------------------------------------------- the files

_C = TypeVar("_C", bound="_Checkpoint")


@dataclass(kw_only=True)
class _Checkpoint:
    """Fields both kinds of checkpoint file share; a field with a default may be absent on read."""

    KIND: ClassVar[str]

    stage: str
    fingerprint: dict[str, Any]
    step: int
    total_steps: int
    train_samples: int
    world_size: int
    elapsed_s: float
    model: dict[str, torch.Tensor]
    saved_at: str = field(default_factory=now_iso)
    torch_version: str = field(default_factory=lambda: str(torch.__version__))

    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict: "format", "kind" and every field (shallow: tensors are not copied)."""
        return {"format": FORMAT, "kind": self.KIND, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls: type[_C], raw: Mapping[str, Any], path: str | Path) -> _C:
        """The typed checkpoint of a loaded file; keys it does not know are ignored.

        Raises:
            CheckpointError: another format or kind of file, or a required key missing (named).
        """
        if raw.get("format") != FORMAT:
            raise CheckpointError(f"the checkpoint's format is {raw.get('format')!r}; this version reads {FORMAT!r}",
                                  loc=str(path), hint="resume it with the progressive version that wrote it, "
                                  "or start the stage afresh")
        if raw.get("kind") != cls.KIND:
            raise CheckpointError(f"expected a {cls.KIND!r} checkpoint, found kind {raw.get('kind')!r}", loc=str(path),
                                  hint="step_N.pt files hold the training state, final.pt the final weights")
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in raw
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {', '.join(map(repr, missing))}", loc=str(path),
                                  hint="it is damaged or was not written by progressive's trainer")
        return cls(**{f.name: raw[f.name] for f in fields if f.name in raw})


@dataclass(kw_only=True)
class StateCheckpoint(_Checkpoint):
    """A `step_N.pt`: everything needed to continue the stage exactly after optimizer step `step`."""

    KIND: ClassVar[str] = "state"

    epoch: int  # for humans: the sampler's position, as `sampler` holds it
    epoch_samples: int
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None = None  # only with fp16 on a GPU
    precision: str | None = None  # what the stage trains in ("fp32", "bf16", "fp16"): kept on requeue
    sampler: dict[str, int] | None = None  # ResumableSampler.state_dict() at the samples consumed
    rng: list[dict[str, Any]]  # per rank: capture_rng() with the loss's generator


@dataclass(kw_only=True)
class FinalCheckpoint(_Checkpoint):
    """`final.pt`: the stage's final weights (what child stages start from) and its evaluation."""

    KIND: ClassVar[str] = "final"

    metrics: dict[str, float] = field(default_factory=dict)


def load_state(path: str | Path, ident: StageIdentity) -> StateCheckpoint:
    """Read a step checkpoint for this job: settings, data size and format must match.

    Loaded on CPU: RNG states must stay CPU tensors; `load_state_dict` moves the rest.

    Raises:
        CheckpointError: unreadable, another stage's settings (naming what differs), another
            training-set size, another format, or a key missing.
    """
    raw = load_checkpoint(path)
    check_fingerprint(raw, ident.fingerprint, path)
    ck = StateCheckpoint.from_dict(raw, path)
    if ck.train_samples != ident.train_samples:
        raise CheckpointError(f"the checkpoint was written for {ck.train_samples} training samples, "
                              f"the data now has {ident.train_samples}", loc=str(path),
                              hint="use the data file the run started with, or start a new run")
    return ck


def load_final(path: str | Path, fingerprint: Mapping[str, Any]) -> FinalCheckpoint:
    """Read a stage's final.pt, refusing one written under other settings."""
    raw = load_checkpoint(path)
    check_fingerprint(raw, fingerprint, path)
    return FinalCheckpoint.from_dict(raw, path)


# --------------------------------------------------------------------------- the stateful parts


@dataclass
class TrainParts:
    """The stateful objects of a stage's training, saved and restored through their own state_dicts."""

    model: torch.nn.Module  # the bare model, never the DDP wrapper (its keys carry a "module." prefix)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: ResumableSampler
    loss_gen: torch.Generator  # the task's loss draws from it; saved per rank with the global RNGs

    def rng_state(self) -> dict[str, Any]:
        """This rank's RNG states (Python, numpy, torch, CUDA, the loss's generator)."""
        return capture_rng(self.loss_gen)

    def capture(self, ident: StageIdentity, state: TrainState, rngs: list[dict[str, Any]],
                precision: str | None = None) -> StateCheckpoint:
        """The checkpoint of the current state; `rngs` is every rank's `rng_state()`, by rank.

        The sampler's position must be set to the samples consumed (not what the loader prefetched).
        """
        sampler = self.sampler.state_dict()
        return StateCheckpoint(
            stage=ident.stage, fingerprint=ident.fingerprint, total_steps=ident.total_steps,
            train_samples=ident.train_samples, world_size=ident.world_size, **state.state_dict(),
            epoch=sampler["epoch"], epoch_samples=sampler["start"], sampler=sampler,
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None, precision=precision, rng=rngs)

    def restore(self, ck: StateCheckpoint, *, rank: int, position: tuple[int, int], path: str | Path) -> None:
        """Load every part from `ck` on this rank; `position` = (epoch, samples) that `ck.step` implies.

        Raises:
            CheckpointError: no RNG state for this rank, another data order (seed), or a sampler
                position that disagrees with the step (the file is inconsistent).
        """
        if not 0 <= rank < len(ck.rng):
            raise CheckpointError(f"the checkpoint holds RNG states for {len(ck.rng)} rank(s), not for rank {rank}",
                                  loc=str(path), hint="resume with the world size the stage started with")
        self.model.load_state_dict(ck.model)
        self.optimizer.load_state_dict(ck.optimizer)
        if ck.scaler:
            self.scaler.load_state_dict(ck.scaler)
        restore_rng(ck.rng[rank], self.loss_gen)
        if ck.sampler is None:  # written before the sampler recorded its position
            self.sampler.set_epoch(*position)
            return
        self.sampler.load_state_dict(ck.sampler)  # refuses another seed
        if (self.sampler.epoch, self.sampler.start) != position:
            raise CheckpointError(f"the sampler stands at epoch {self.sampler.epoch}, sample {self.sampler.start} "
                                  f"but step {ck.step} is at epoch {position[0]}, sample {position[1]}",
                                  loc=str(path), hint="the file is inconsistent: move it aside (rename it to "
                                                      "<name>.corrupt) to resume from an older one")


def init_weights(model: torch.nn.Module, ref: InitFrom, loc: str) -> None:
    """Load a parent's final weights (or a given file's) into `model`; a fresh optimizer and schedule follow.

    Raises:
        CheckpointError: the file is missing, or its tensors do not fit the model (names and shapes listed).
    """
    path = Path(ref.checkpoint or "")
    if not path.is_file():
        what = f"parent stage {ref.stage!r} has no final checkpoint" if ref.kind == "stage" else "init_from file not found"
        raise CheckpointError(f"{what}: {path}", loc=loc,
                              hint="run the parent stage to completion first" if ref.kind == "stage"
                              else "check the init_from path in the stage graph")
    weights = load_weights(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes))
        if missing:
            parts.append("missing from the checkpoint: " + ", ".join(missing))
        if unexpected:
            parts.append("not in the model: " + ", ".join(unexpected))
        raise CheckpointError(f"weights in {path} do not fit this stage's model: " + " | ".join(parts), loc=loc,
                              hint="the parent must use the same task and [model.options] (hidden size, layers)")
    model.load_state_dict(weights)
