"""The time-out requeue counter of a stage's current job (`stages/<stage>/requeues.json`).

Written by the job itself (rank 0, just before it requeues), read by `status`. The
counter names its job id, so a new job (from submit or resume) starts with its full
`max_requeues` budget without anyone having to reset a file. Preemptions are not counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from progressive import atomic


def count(path: str | Path, job_id: str | None) -> int:
    """Time-out requeues used by job `job_id` (0 for another job, or no file)."""
    try:
        data = json.loads(Path(path).read_text())
        return int(data["timeouts"]) if str(data["job_id"]) == str(job_id) else 0
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return 0


def set_count(path: str | Path, job_id: str, timeouts: int) -> None:
    """Record the time-out requeues used by job `job_id` (atomically)."""
    atomic.write_text(path, json.dumps({"job_id": str(job_id), "timeouts": timeouts}))
