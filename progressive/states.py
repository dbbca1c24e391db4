"""Stage states: the one list of what a stage can be, which of them are live, and Slurm's words for them.

Every module that asks "is this stage still running?" or "may resume touch it?" asks
here. Slurm's states (sacct and squeue spell them alike; sacct adds "CANCELLED by
<uid>") map to ours through one table, `SLURM_STATES`; anything Slurm says that the
table does not know is "unknown" and shown verbatim.
"""

from __future__ import annotations

from enum import Enum


class StageState(str, Enum):
    """What `status` shows for a stage (the value is the word shown and stored)."""

    NOT_SUBMITTED = "not submitted"
    NOT_STARTED = "not started"  # local mode: recorded, waiting for its runner to reach it
    PENDING = "pending"
    RUNNING = "running"
    SUSPENDED = "suspended"
    BLOCKED = "blocked"  # pending on a parent that will never complete (DependencyNeverSatisfied)
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"  # time-out requeues used up; the checkpoint is on disk
    CANCELLED = "cancelled"
    STOPPED = "stopped"  # local mode: interrupted (Ctrl-C, or its process died); resumable
    PRUNED = "pruned"  # a sweep decided this variant goes no further
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value

    # Enum hashes a member by its name: hash by the value instead, so that a state and its word are
    # interchangeable as keys and set members (`"pending" in LIVE`), as they already are under ==.
    def __hash__(self) -> int:
        return hash(self.value)


S = StageState

# A job exists and will make progress by itself: submit refuses to start another beside it,
# `status --watch` keeps watching, resume leaves it alone (unless its parent is redone).
RUNNING_OR_QUEUED = frozenset({S.PENDING, S.RUNNING, S.SUSPENDED})
# Holds a Slurm job that must be cancelled before the stage is submitted again.
LIVE = RUNNING_OR_QUEUED | {S.BLOCKED}
# Nothing more happens without the user: resume takes these up again.
RESUMABLE = frozenset({S.FAILED, S.TIMEOUT, S.CANCELLED, S.STOPPED, S.UNKNOWN, S.BLOCKED, S.NOT_SUBMITTED,
                       S.NOT_STARTED})
# Final for `status --watch`: every state that is not running or queued.
FINAL = frozenset(S) - RUNNING_OR_QUEUED

# Our state for each Slurm job state.
SLURM_STATES: dict[str, StageState] = {
    "PENDING": S.PENDING,
    "CONFIGURING": S.PENDING,
    "REQUEUED": S.PENDING,
    "REQUEUE_HOLD": S.PENDING,
    "REQUEUE_FED": S.PENDING,
    "RESV_DEL_HOLD": S.PENDING,
    "PREEMPTED": S.PENDING,  # we submit with --requeue: a preempted job comes back
    "SPECIAL_EXIT": S.FAILED,
    "RUNNING": S.RUNNING,
    "COMPLETING": S.RUNNING,
    "SIGNALING": S.RUNNING,
    "STAGE_OUT": S.RUNNING,
    "RESIZING": S.RUNNING,
    "SUSPENDED": S.SUSPENDED,
    "STOPPED": S.SUSPENDED,
    "COMPLETED": S.COMPLETED,
    "FAILED": S.FAILED,
    "BOOT_FAIL": S.FAILED,
    "DEADLINE": S.FAILED,
    "OUT_OF_MEMORY": S.FAILED,
    "NODE_FAIL": S.FAILED,
    "TIMEOUT": S.TIMEOUT,
    "CANCELLED": S.CANCELLED,
    "REVOKED": S.CANCELLED,
}


def from_slurm(slurm_state: str, reason: str = "") -> StageState:
    """Our state for a Slurm state word ("CANCELLED by 0", "RUNNING+") and its pending reason."""
    word = slurm_state.split()[0].rstrip("+") if slurm_state else ""
    state = SLURM_STATES.get(word, S.UNKNOWN)
    if state is S.PENDING and "DependencyNeverSatisfied" in reason:
        return S.BLOCKED
    return state
