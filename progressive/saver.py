"""Rank 0's step-checkpoint writes during training: in the training thread, or in the background.

`[train] async_checkpoint = true` makes periodic saves asynchronous: the step loop blocks only
while the state is copied to host memory (training then changes the live tensors in place);
the write, its fsync and atomic rename, and the rotation of old checkpoints happen on a
background thread, at most one at a time (a save due while one is in flight waits for it). Stop
and end-of-stage saves stay synchronous, after any write in flight: the pre-timeout or
preemption save is complete before the job requeues. A process killed during a background write
leaves a temp file (removed at the next start) and the previous checkpoint intact.

A background write that fails (a full disk) is raised at the next step on every rank (the
trainer's per-step all-reduce carries it), as a synchronous save would have raised it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from progressive.checkpoint import prune_checkpoints, save_atomic

__all__ = ["CheckpointWriter", "SaveDone", "to_host"]


@dataclass(frozen=True)
class SaveDone:
    """A finished save, for the metrics line: when the loop was blocked and how long the write took."""

    step: int
    path: Path
    reason: str
    blocked_s: float  # the training loop's wait: the whole save, or only the copy to host memory
    write_s: float  # torch.save + fsync + rename (+ rotation)
    background: bool


def to_host(obj: Any, buffers: list[torch.Tensor] | None = None) -> Any:
    """A copy of a checkpoint dict whose tensors are CPU tensors of their own (training changes the originals).

    `buffers`: host tensors of an earlier copy of the same layout, reused where shape and dtype match
    (then filled in order, and the list updated): a copy into memory already mapped is ~2x faster than
    one that must first fault in fresh pages, and the state's layout rarely changes between saves.
    """
    pool = iter(list(buffers)) if buffers is not None else None
    used: list[torch.Tensor] = []

    def copy(t: torch.Tensor) -> torch.Tensor:
        old = next(pool, None) if pool is not None else None
        if old is not None and old.shape == t.shape and old.dtype == t.dtype:
            out = old.copy_(t.detach())
        else:
            out = t.detach().to("cpu", copy=True)
        used.append(out)
        return out

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return copy(o)
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v) for v in o)
        return o

    result = walk(obj)
    if buffers is not None:
        buffers[:] = used
    return result


class CheckpointWriter:
    """Writes a stage's step checkpoints and rotates them; at most one background write in flight."""

    def __init__(self, stage_dir: str | Path, keep: int) -> None:
        self.stage_dir, self.keep = Path(stage_dir), keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done: list[SaveDone] = []
        self._lock = threading.Lock()
        self._buffers: list[torch.Tensor] = []  # the last background copy's host tensors, reused by the next

    def save(self, state: dict[str, Any], path: Path, step: int, reason: str, *, background: bool) -> None:
        """Write `state` to `path` now, or (background) copy it and write it on the writer's thread."""
        t0 = time.perf_counter()
        self._join()  # one in flight at most; a stop or end save comes after the periodic one before it
        if not background:
            self._write(state, path, step, reason, t0, background=False)
            return
        copy = to_host(state, self._buffers)  # safe to overwrite: wait() above means no write reads them now
        blocked = time.perf_counter() - t0
        # Not a daemon: a job that ends (or fails) while a write is in flight finishes the write first.
        self._thread = threading.Thread(target=self._write, args=(copy, path, step, reason, blocked),
                                        kwargs={"background": True}, name="progressive-checkpoint")
        self._thread.start()

    def _write(self, state: dict[str, Any], path: Path, step: int, reason: str, t0_or_blocked: float, *,
               background: bool) -> None:
        start = time.perf_counter()
        try:
            save_atomic(state, path)
            prune_checkpoints(self.stage_dir, self.keep)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the training thread)
            if not background:
                raise
            self._error = exc
            return
        write_s = time.perf_counter() - start
        blocked = t0_or_blocked if background else time.perf_counter() - t0_or_blocked
        with self._lock:
            self._done.append(SaveDone(step, path, reason, blocked, write_s, background))

    @property
    def failed(self) -> bool:
        """A background write has failed (or is failing) and its error is not yet raised."""
        return self._error is not None

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """Until no write is in flight; raises the error of a failed background write.

        Only the trainer's all-rank check (`_agree`) calls it, so that every rank stops together.
        """
        self._join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def finished(self) -> list[SaveDone]:
        """Saves finished since the last call (a failed one is kept for `wait` to raise)."""
        if self._thread is not None and not self._thread.is_alive():
            self._join()
        with self._lock:
            done, self._done = self._done, []
        return done
