"""Job signals: which signals stop a stage, the flag they set, and the processes that ignore them.

Two sets, for two kinds of process:
- INTERRUPT_SIGNALS (INT, TERM, HUP): what a person or a scheduler sends to stop a
  command: Ctrl-C, scancel or preemption, a closed terminal.
- JOB_SIGNALS: those plus USR1/USR2, one of which Slurm sends before a time limit
  (`[slurm].signal`). A stage's trainer turns them into a `StopFlag`; helper processes
  (DataLoader workers, data-generation workers) ignore them, because Slurm and the
  terminal signal the whole process group and only the main process may react.

A handler only sets a flag: saving a checkpoint inside a handler would tear the
optimizer step in flight. The trainer polls the flag after every step.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from types import FrameType
from typing import Iterator, Sequence

log = logging.getLogger("progressive.signals")

# Signals Slurm may be asked to send before a time limit (`[slurm].signal`). TERM is excluded:
# cancel and preemption send it, and a job must tell those apart from its time limit.
TIME_LIMIT_SIGNAL_NAMES = ("USR1", "USR2", "INT", "HUP", "URG")
INTERRUPT_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
JOB_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def signal_number(name: str) -> int:
    """signal.SIGUSR2 for "USR2" (names as in `[slurm].signal`)."""
    return int(getattr(signal, f"SIG{name}"))


def job_signals(time_limit_signal: str | None = None) -> tuple[int, ...]:
    """JOB_SIGNALS plus the stage's own pre-timeout signal (e.g. URG), without duplicates."""
    extra = (signal_number(time_limit_signal),) if time_limit_signal else ()
    return tuple(dict.fromkeys((*JOB_SIGNALS, *extra)))


class StopFlag:
    """Remembers the first stop signal; the trainer polls it (call it) after every optimizer step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: only set the flag (saving here would tear the step in flight)."""
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: will checkpoint after the current optimizer step", signal.Signals(signum).name)

    def install(self, *signums: int) -> None:
        """Route these signals to the flag (for the rest of the process)."""
        for s in signums:
            signal.signal(s, self.handler)

    @contextlib.contextmanager
    def installed(self, *signums: int) -> Iterator["StopFlag"]:
        """Route these signals to the flag while the block runs, then restore the previous handlers."""
        previous = {s: signal.getsignal(s) for s in signums}
        self.install(*signums)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def ignore_job_signals(signals: Sequence[int] = JOB_SIGNALS) -> None:
    """Ignore the job's signals in this process: for worker processes, whose main process reacts."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
