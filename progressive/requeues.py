"""The requeue counters of a stage's current job (`stages/<stage>/requeues.json`).

Written by the job itself (rank 0, just before it requeues), read by `status`. Two
counts, kept apart: `timeouts` (requeues after the pre-timeout signal, which spend the
stage's `max_requeues` budget) and `preemptions` (requeues after a preemption, which
the stage does not control and which spend nothing). The file names its job id, so a
new job (from submit or resume) starts with its full budget without anyone having to
reset a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from progressive import atomic


def _read(path: str | Path, job_id: str | None) -> dict[str, Any]:
    """The file's counts when it belongs to `job_id`; {} for another job, no file or a damaged one."""
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) and str(data.get("job_id")) == str(job_id) else {}
    except (FileNotFoundError, ValueError, TypeError):
        return {}


def _int(data: dict[str, Any], key: str) -> int:
    try:
        return int(data.get(key, 0))
    except (ValueError, TypeError):
        return 0


def count(path: str | Path, job_id: str | None) -> int:
    """Time-out requeues used by job `job_id` (0 for another job, or no file)."""
    return _int(_read(path, job_id), "timeouts")


def preemptions(path: str | Path, job_id: str | None) -> int:
    """Preemptions job `job_id` came back from (0 for another job, or no file)."""
    return _int(_read(path, job_id), "preemptions")


def _write(path: str | Path, job_id: str, timeouts: int, preempted: int) -> None:
    atomic.write_text(path, json.dumps({"job_id": str(job_id), "timeouts": timeouts, "preemptions": preempted}))


def set_count(path: str | Path, job_id: str, timeouts: int) -> None:
    """Record the time-out requeues used by job `job_id` (atomically; its preemption count is kept)."""
    _write(path, job_id, timeouts, preemptions(path, job_id))


def set_preemptions(path: str | Path, job_id: str, preempted: int) -> None:
    """Record the preemptions job `job_id` came back from (atomically; its time-out count is kept)."""
    _write(path, job_id, count(path, job_id), preempted)


def add_preemption(path: str | Path, job_id: str) -> int:
    """Count one more preemption of job `job_id` (atomically; its time-out count is kept); returns the new count."""
    n = preemptions(path, job_id) + 1
    _write(path, job_id, count(path, job_id), n)
    return n
