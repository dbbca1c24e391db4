"""Sample counts per bucket and split, for any data: what `plan` shows and `submit` checks.

`plan` runs on a login node and never imports torch. A task module always does (it
subclasses `progressive.task.Task`, which imports torch), and importing a user's module
runs their code, so **plan never imports the task**. It reads counts from, in order:

1. the count index `<data>.counts.json`, written by `progressive data index -c FILE`,
   which asks the task (`Task.count`, else `len(task.dataset(...))`) for every bucket of
   the graph and split. It records the task and a stamp of the data (size and mtime of
   the file, or of every file under the folder); a stale index counts as no index.
2. the manifest of a dense-array folder (`progressive.data.arrays`),
3. the project's sparse-matrix HDF5 file (its own `<file>.index.json` sidecar, else its metadata).

When none answers, counts are unknown (`CountsUnknown`): `plan` says so with the hint to
run `progressive data index`, and `submit` asks the task itself (`counts_from_task`),
refusing with the bucket and split named when one is missing or its training split empty.

(The count index is not called `<data>.index.json`: that name is the HDF5 sidecar's, which
the HDF5 reader rewrites; two writers of one file would overwrite each other.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from progressive.atomic import write_text
from progressive.errors import DataError, ProgressiveError

if TYPE_CHECKING:
    from progressive.task import Task

COUNTS_FORMAT = "progressive-counts"
COUNTS_VERSION = 1
COUNTS_SUFFIX = ".counts.json"
SPLITS = ("train", "val", "test")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

Counts = dict[int, dict[str, int]]


class CountsUnknown(DataError):
    """The data exists but nothing torch-free can count it: no count index, or a stale one."""


def counts_path(data: str | Path) -> Path:
    """The count index of a data file or folder: `<data>.counts.json`, next to it."""
    data = Path(data)
    return data.with_name(data.name + COUNTS_SUFFIX)


def index_hint(config: str | Path | None) -> str:
    """How to write the count index for a graph file."""
    return (f"run `progressive data index -c {config or 'stages.toml'}` once (it asks the task for every "
            "bucket's size); `submit` asks the task itself either way")


def data_stamp(data: str | Path) -> dict[str, int]:
    """What changes when the data changes: size and mtime of the file, or of all files under the folder."""
    data = Path(data)
    st = data.stat()
    if not data.is_dir():
        return {"files": 1, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files, size, mtime = 0, 0, st.st_mtime_ns
    for root, dirs, names in os.walk(data):
        dirs.sort()
        for name in names:
            s = os.stat(os.path.join(root, name))
            files, size, mtime = files + 1, size + s.st_size, max(mtime, s.st_mtime_ns)
    return {"files": files, "size": size, "mtime_ns": mtime}


def _options(options: Mapping[str, Any] | None) -> Any:
    return json.loads(json.dumps(dict(options or {}), sort_keys=True, default=str))


def write_count_index(data: str | Path, counts: Mapping[int, Mapping[str, int]], *, task: str,
                      options: Mapping[str, Any] | None = None) -> Path:
    """Write `<data>.counts.json` for the data as it is now (atomically); returns its path.

    `task` and `options` are the graph's [model] task and options: counts may depend on both.
    """
    doc = {
        "format": COUNTS_FORMAT,
        "format_version": COUNTS_VERSION,
        "data": Path(data).name,
        "task": task,
        "options": _options(options),
        "stamp": data_stamp(data),
        "counts": {str(b): {s: int(counts[b].get(s, 0)) for s in SPLITS} for b in sorted(counts)},
    }
    out = counts_path(data)
    write_text(out, json.dumps(doc, indent=1) + "\n")
    return out


def read_count_index(data: str | Path, *, task: str, options: Mapping[str, Any] | None = None,
                     config: str | Path | None = None) -> Counts | None:
    """The counts of `<data>.counts.json`; None when there is none.

    Raises CountsUnknown when the index is damaged, was written for another task, or is
    older than the data (its stamp differs).
    """
    file = counts_path(data)
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CountsUnknown(f"the count index is unreadable: {exc}", loc=str(file), hint=index_hint(config)) from None
    try:
        if doc["format"] != COUNTS_FORMAT or doc["format_version"] != COUNTS_VERSION:
            raise CountsUnknown("not a count index of this version", loc=str(file), hint=index_hint(config))
        counts = {int(b): {s: int(c.get(s, 0)) for s in SPLITS} for b, c in doc["counts"].items()}
        written_for, written_options, stamp = doc["task"], doc.get("options", {}), doc["stamp"]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CountsUnknown("the count index is damaged", loc=str(file), hint=index_hint(config)) from None
    if written_for != task:
        raise CountsUnknown(f"the count index was written for task {written_for!r}, not {task!r}", loc=str(file),
                            hint=index_hint(config))
    if written_options != _options(options):
        raise CountsUnknown("the count index was written under other [model.options]", loc=str(file),
                            hint=index_hint(config))
    if stamp != data_stamp(data):
        raise CountsUnknown("the data changed since its count index was written", loc=str(file), hint=index_hint(config))
    return counts


def plan_counts(data: str | Path, *, buckets: Iterable[int], task: str, options: Mapping[str, Any] | None = None,
                config: str | Path | None = None) -> Counts:
    """Counts for `plan` without torch: the count index, else an array manifest, else the project's HDF5.

    Raises DataError when the data does not exist, CountsUnknown when it exists but only the task
    could count it (or the count index lacks one of `buckets`).
    """
    from progressive.data.arrays import array_counts, is_array_dataset

    data = Path(data)
    if not data.exists():
        from progressive.data.format import GENERATE_HINT

        raise DataError("dataset file not found", loc=str(data), hint=GENERATE_HINT)
    indexed = read_count_index(data, task=task, options=options, config=config)
    if indexed is not None:
        lacking = sorted(set(buckets) - set(indexed))
        if lacking:
            raise CountsUnknown(f"the count index has no bucket {', '.join(map(str, lacking))}",
                                loc=str(counts_path(data)), hint=index_hint(config))
        return indexed
    if is_array_dataset(data):
        return array_counts(data)
    if data.is_file() and _is_hdf5(data):
        from progressive.data.format import bucket_counts

        try:
            return bucket_counts(data, refresh_sidecar=False)
        except DataError as exc:  # a damaged file, or an HDF5 file of the user's own layout (only their task counts it)
            hint = (f"{exc.hint}; or, if the task reads a format of its own: " if exc.hint else "") + index_hint(config)
            raise CountsUnknown(exc.msg, loc=exc.loc, hint=hint) from None
    what = "folder" if data.is_dir() else "file"
    raise CountsUnknown(f"sample counts unknown: this {what} is neither a progressive HDF5 file nor an array "
                        f"folder, and has no count index ({counts_path(data).name})", loc=str(data),
                        hint=index_hint(config))


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def counts_from_task(task: "Task", data: str | Path, buckets: Iterable[int]) -> Counts:
    """Ask the task for each bucket's and split's size: `task.count(...)`, else `len(task.dataset(...))`.

    This imports whatever the task imports (torch); `data index` and `submit` call it, `plan` never.
    Raises DataError naming the bucket and split when the task cannot give one (a split the
    data lacks should be an empty dataset, not an error).
    """
    data_path = str(Path(data))
    out: Counts = {}
    for bucket in sorted(set(buckets)):
        out[bucket] = {}
        for split in SPLITS:
            where = f"bucket {bucket}, split {split!r}"
            try:
                n = task.count(data_path, bucket, split)
                if n is None:
                    n = len(task.dataset(data_path, bucket, split))  # type: ignore[arg-type]
            except ProgressiveError as exc:
                raise DataError(f"{where}: {exc.msg}", loc=exc.loc or data_path, hint=exc.hint) from None
            except Exception as exc:  # the user's code: report it with the bucket it failed on
                raise DataError(f"{where}: the task's data raised {type(exc).__name__}: {exc}", loc=data_path,
                                hint="make Task.dataset(data, bucket, split) return an (empty, if need be) "
                                     "dataset for every bucket of the graph and every split") from exc
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise DataError(f"{where}: the task counted {n!r} samples, not a count", loc=data_path,
                                hint="Task.count must return an int >= 0 or None")
            out[bucket][split] = n
    return out


def index_data(config: str | Path) -> tuple[Path, Counts]:
    """`progressive data index`: ask the graph's task to count every bucket and split; write the index.

    Returns the index path and the counts. Imports torch (through the task).
    """
    from progressive.config import load_config
    from progressive.task import load_task

    cfg = load_config(config)
    data = (Path(config).resolve().parent / cfg.run.data).resolve()
    if not data.exists():
        raise DataError("data not found", loc=str(data), hint="make the data first, or fix [run].data")
    task = load_task(cfg.model.task, cfg.model.options)
    counts = counts_from_task(task, data, [st.bucket for st in cfg.stage])
    return write_count_index(data, counts, task=cfg.model.task, options=cfg.model.options), counts


def describe(counts: Mapping[int, Mapping[str, int]]) -> list[dict[str, Any]]:
    """Counts as rows (for --json output)."""
    return [{"bucket": b, **{s: int(counts[b].get(s, 0)) for s in SPLITS}} for b in sorted(counts)]
