"""The dense-array layout: per-sample arrays (token sequences, feature vectors) by bucket and split.

For data whose samples in one bucket all have the same shape (a sequence-length
curriculum: every sequence of bucket 128 has 128 tokens). A dataset is a folder::

    data/seq/
        arrays.json         {"format": "progressive-arrays", "format_version": 1,
                             "counts": {"64": {"train": 512, "val": 64, "test": 64}, ...},
                             "arrays": {"64": {"train": {"shape": [512, 64], "dtype": "int16"}, ...}},
                             "created": ..., "source": ...}
        64/train.npy        one .npy per bucket and split: shape (samples, *sample_shape)
        64/val.npy
        ...

Why a folder of `.npy` files: numpy reads one sample of a memory-mapped `.npy` without
reading the rest (random access for the sampler, nothing to reopen in DataLoader workers
beyond a lazy `np.load(mmap_mode="r")`), any tool reads it, and the manifest gives `plan`
the counts without numpy. A split absent from a bucket has 0 samples.

Writes are atomic: the whole folder is written under a hidden temp name next to the
target and renamed into place at the end; a crash leaves the previous folder (or none).
This module imports neither torch nor, at module level, numpy.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from progressive.atomic import fsync_dir, write_text
from progressive.errors import DataError

if TYPE_CHECKING:
    import numpy as np

ARRAYS_FORMAT = "progressive-arrays"
ARRAYS_VERSION = 1
MANIFEST = "arrays.json"
SPLITS = ("train", "val", "test")
KEY_RE = re.compile(r"^(train|val|test)_([1-9][0-9]*)$")
PACK_HINT = "write it with `progressive data pack-arrays` or `progressive data generate-seq`"

__all__ = ["ArrayDataset", "array_counts", "is_array_dataset", "parse_key", "read_manifest", "write_arrays"]


def is_array_dataset(path: str | Path) -> bool:
    """True when `path` is a folder holding an `arrays.json` manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an array dataset (DataError when absent, damaged or foreign)."""
    path = Path(path)
    file = path / MANIFEST
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        what = "folder has no " + MANIFEST if path.is_dir() else "array dataset not found"
        raise DataError(what, loc=str(path), hint=PACK_HINT) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {MANIFEST}: {exc}", loc=str(file), hint=PACK_HINT) from None
    if not isinstance(doc, dict) or doc.get("format") != ARRAYS_FORMAT:
        raise DataError(f"not a {ARRAYS_FORMAT} manifest", loc=str(file), hint=PACK_HINT)
    if doc.get("format_version") != ARRAYS_VERSION:
        raise DataError(f"format version {doc.get('format_version')!r} is not supported (this is {ARRAYS_VERSION})",
                        loc=str(file), hint="upgrade progressive, or re-pack the data with this version")
    return doc


def array_counts(path: str | Path) -> dict[int, dict[str, int]]:
    """Samples per bucket and split from the manifest: {bucket: {split: count}} (no numpy)."""
    doc = read_manifest(path)
    try:
        return {int(b): {s: int(c.get(s, 0)) for s in SPLITS} for b, c in doc["counts"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError("the manifest's counts are damaged", loc=str(Path(path) / MANIFEST), hint=PACK_HINT) from None


def parse_key(key: str, loc: str) -> tuple[int, str]:
    """`"train_64"` -> (64, "train"); anything else is a DataError naming the expected form."""
    m = KEY_RE.match(key)
    if not m:
        raise DataError(f"array name {key!r} is not <split>_<bucket>", loc=loc,
                        hint="name each array like train_64, val_64, test_64 (split: train, val or test)")
    return int(m.group(2)), m.group(1)


def write_arrays(path: str | Path, arrays: Mapping[int, Mapping[str, "np.ndarray"]], *, force: bool = False,
                 source: Any = None) -> dict[int, dict[str, int]]:
    """Write `{bucket: {split: array (samples, ...)}}` as an array dataset folder, atomically.

    Every array must be numeric (bool, int, uint or float) with at least one dimension; the
    first is the sample axis. Returns the counts written. Raises DataError when the target
    exists (without `force`) or an array is unfit, before anything is written.
    """
    import numpy as np

    path = Path(path)
    if path.exists() and not force:
        raise DataError("output exists", loc=str(path), hint="pass --force to replace it, or choose another -o")
    if path.exists() and not is_array_dataset(path):
        raise DataError("output exists and is not an array dataset: refusing to replace it", loc=str(path),
                        hint="choose another -o, or remove it yourself")
    if not arrays:
        raise DataError("no arrays to write", loc=str(path), hint="give at least one array named like train_64")
    for bucket, splits in arrays.items():
        for split, arr in splits.items():
            where = f"{split}_{bucket}"
            if split not in SPLITS:
                raise DataError(f"unknown split {split!r}", loc=where, hint="splits are train, val and test")
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf" or arr.ndim < 1:
                kind = getattr(getattr(arr, "dtype", None), "name", type(arr).__name__)
                raise DataError(f"array of {kind} with shape {getattr(arr, 'shape', '?')} cannot be packed", loc=where,
                                hint="each array must be numeric (int/float/bool), shape (samples, ...), "
                                     "all samples of a bucket the same shape (pad ragged sequences first)")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    counts: dict[int, dict[str, int]] = {}
    meta: dict[str, dict[str, Any]] = {}
    try:
        tmp.mkdir()
        for bucket in sorted(arrays):
            (tmp / str(bucket)).mkdir()
            counts[bucket] = {s: 0 for s in SPLITS}
            meta[str(bucket)] = {}
            for split, arr in sorted(arrays[bucket].items()):
                file = tmp / str(bucket) / f"{split}.npy"
                with open(file, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
                counts[bucket][split] = int(arr.shape[0])
                meta[str(bucket)][split] = {"shape": list(arr.shape), "dtype": arr.dtype.str}
            fsync_dir(tmp / str(bucket))
        doc = {"format": ARRAYS_FORMAT, "format_version": ARRAYS_VERSION,
               "counts": {str(b): c for b, c in counts.items()}, "arrays": meta,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source}
        write_text(tmp / MANIFEST, json.dumps(doc, indent=1) + "\n")
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` to `path`; an old `path` is moved aside first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)  # put the previous dataset back
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ArrayDataset:
    """The samples of one bucket and split of an array dataset, as numpy arrays (a torch-style Dataset).

    The file is memory-mapped on first access in each process, so a DataLoader worker opens
    its own map and reads only the samples it is asked for.
    """

    def __init__(self, path: str | Path, bucket: int, split: str = "train") -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}", loc=str(path), hint="splits are train, val and test")
        self.path, self.bucket, self.split = Path(path), int(bucket), split
        counts = array_counts(self.path)
        if self.bucket not in counts:
            have = ", ".join(str(b) for b in sorted(counts)) or "none"
            raise DataError(f"no bucket {self.bucket}", loc=str(self.path),
                            hint=f"buckets in this dataset: {have}; re-pack it with that bucket or change the stage")
        self._len = counts[self.bucket][split]
        self._file = self.path / str(self.bucket) / f"{split}.npy"
        self._arr: "np.ndarray | None" = None

    def __len__(self) -> int:
        return self._len

    def _array(self) -> "np.ndarray":
        if self._arr is None:
            import numpy as np

            try:
                arr = np.load(self._file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read {self.split} of bucket {self.bucket}: {exc}", loc=str(self._file),
                                hint=PACK_HINT) from None
            if arr.shape[0] != self._len:
                raise DataError(f"holds {arr.shape[0]} samples but the manifest says {self._len}", loc=str(self._file),
                                hint="the folder was modified by hand: re-pack it")
            self._arr = arr
        return self._arr

    def __getitem__(self, i: int) -> "np.ndarray":
        import numpy as np

        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} of {self._len}")
        return np.array(self._array()[i])  # a private copy: the map stays read-only and shareable

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arr"] = None  # each process maps the file itself
        return state


def load_npz_inputs(files: Iterable[str | Path]) -> dict[int, dict[str, "np.ndarray"]]:
    """Read `.npz` (arrays named `<split>_<bucket>`) and `.npy` files (named `<split>_<bucket>.npy`).

    Raises DataError on an unreadable file, a badly named array or one named twice.
    """
    import numpy as np

    out: dict[int, dict[str, np.ndarray]] = {}
    seen: dict[str, str] = {}
    for file in map(Path, files):
        try:
            if file.suffix == ".npy":
                items = [(file.stem, np.load(file, allow_pickle=False))]
            else:
                with np.load(file, allow_pickle=False) as z:
                    items = [(k, z[k]) for k in z.files]
        except FileNotFoundError:
            raise DataError("input file not found", loc=str(file), hint="check the path") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read numpy arrays: {exc}", loc=str(file),
                            hint="give .npz files (np.savez) or .npy files (np.save) of numeric arrays") from None
        for key, arr in items:
            bucket, split = parse_key(key, f"{file}: {key}")
            if key in seen:
                raise DataError(f"array {key!r} is given twice", loc=str(file), hint=f"it is also in {seen[key]}")
            seen[key] = str(file)
            out.setdefault(bucket, {})[split] = arr
    return out
