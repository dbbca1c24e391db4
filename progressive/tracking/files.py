"""The tracking files of a run: tracker ids, notes for `status`, offline W&B runs (all torch- and tracker-free).

    <jobs>/<run>/tracking.json                     {"wandb": {stage: id}, "mlflow": {"parent": id, stage: id}}
    <jobs>/<run>/stages/<stage>/tracking-notes.json  what went wrong with a tracker (one line each)
    <jobs>/<run>/stages/<stage>/tracking-sent.json   per tracker, the last global step handed to it
    <jobs>/<run>/stages/<stage>/wandb/offline-run-*  W&B offline runs, one per job of the stage

The ids are what keeps one tracker run per stage across requeues, preemptions and `resume`: the
first job of a stage creates them under a lock (stages of one run may start at once) and every
later job reads them back. Written atomically, like every file of a run.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from progressive import atomic

__all__ = ["ids_path", "get_or_create_id", "read_id", "add_note", "read_notes", "offline_runs", "unsynced_runs", "read_sent",
           "write_sent"]

IDS_FILE = "tracking.json"
NOTES_FILE = "tracking-notes.json"
SENT_FILE = "tracking-sent.json"


def ids_path(run_dir: str | Path) -> Path:
    """Where a run keeps its tracker ids."""
    return Path(run_dir) / IDS_FILE


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def get_or_create_id(run_dir: str | Path, tracker: str, key: str, create: Callable[[], str] | None = None) -> str:
    """The stored id of `key` (a stage, or "parent") for `tracker`, made by `create` (default: a random
    hex id) and stored the first time. Under a lock: two stages starting together get one parent."""
    path = ids_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=60):
        data = _read(path)
        found = data.get(tracker, {}).get(key)
        if isinstance(found, str) and found:
            return found
        new = create() if create else uuid.uuid4().hex[:16]
        data.setdefault(tracker, {})[key] = new
        atomic.write_text(path, json.dumps(data, indent=1, sort_keys=True))
        return new


def read_id(run_dir: str | Path, tracker: str, key: str) -> str | None:
    """The stored id of `key` for `tracker`, or None if no job has made one yet."""
    found = _read(ids_path(run_dir)).get(tracker, {}).get(key)
    return found if isinstance(found, str) and found else None


def add_note(stage_dir: str | Path, note: str) -> None:
    """Remember a tracker problem for `status` (the stage's log has it too)."""
    path = Path(stage_dir) / NOTES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=30):
        notes = read_notes(stage_dir)
        if note not in notes:
            atomic.write_text(path, json.dumps(notes + [note], indent=1))


def read_notes(stage_dir: str | Path) -> list[str]:
    """The stage's tracker notes, oldest first."""
    try:
        data = json.loads((Path(stage_dir) / NOTES_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [str(n) for n in data] if isinstance(data, list) else []


def read_sent(stage_dir: str | Path) -> dict[str, int]:
    """{tracker: last global step handed to it} over every job of the stage so far."""
    data = _read(Path(stage_dir) / SENT_FILE)
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}


def write_sent(stage_dir: str | Path, sent: dict[str, int]) -> None:
    """Record what has been handed to each tracker, before it is (see TrackerHub._dispatch).

    Renamed into place but not fsynced: it is rewritten every step from the trackers' thread, must
    survive the process (SIGKILL), and a lost node loses the trackers' own unsent buffers anyway.
    """
    path = Path(stage_dir) / SENT_FILE
    tmp = path.with_name(f".{SENT_FILE}.tmp")
    tmp.write_text(json.dumps(sent), encoding="utf-8")
    tmp.replace(path)


def offline_runs(folder: str | Path) -> list[Path]:
    """Every W&B offline run folder below `folder` (a run's or a sweep's), oldest first.

    W&B names them offline-run-<YYYYMMDD_HHMMSS>-<id>: sorted by that time within each id, then by
    id, which is the order they must be uploaded in (each later one resumes the same W&B run).
    """
    found = [p for p in Path(folder).glob("**/wandb/offline-run-*") if p.is_dir()]
    return sorted(found, key=lambda p: (p.name.rsplit("-", 1)[-1], p.name))


def unsynced_runs(folder: str | Path) -> list[Path]:
    """The offline runs below `folder` that `wandb sync` has not uploaded yet (it marks them .synced)."""
    return [p for p in offline_runs(folder) if not any(p.glob("*.wandb.synced"))]
