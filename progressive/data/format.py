"""The bucketed HDF5 format, read side: the index, the reader and the sample checks.

(Writing is `progressive.data.ops.DatasetWriter`.)

Layout (version 1; docs/data-format.md explains the choice and its measurements)::

    /                         attrs: format, format_version, generator, family, seed, created,
                              history (JSON list of operations), rhs_per_sample
    /buckets/<n>/<split>/     one group per matrix size n and split (train, val, test); attrs: n, count
        nnz_offsets (S+1,)    int64, uncompressed: sample i's nonzeros are [nnz_offsets[i], nnz_offsets[i+1])
        indptr      (S, n+1)  int32, each row a sample's CSR row pointer (starting at 0)
        indices     (nnz,)    int32, all samples' CSR column indices, concatenated
        data        (nnz,)    float32, all samples' CSR values, concatenated
        rhs         (S, k, n) float32, k right-hand sides per sample
        hash        (S,)      ASCII: blake2b-128 of the matrix (n, indptr, indices, data), for dedup

Next to a file `F`, `F.index.json` caches the sample counts, keyed by F's size and mtime, so that
`bucket_counts` (run by `progressive plan` on a login node) answers without importing numpy or h5py.
numpy and h5py are imported inside the functions that need them, for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple

from progressive.errors import DataError

if TYPE_CHECKING:
    import h5py
    import numpy as np

FORMAT_NAME = "progressive-buckets"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
INDEX_SUFFIX = ".index.json"
COMPRESSIONS = ("blosc-lz4", "blosc-zstd", "gzip", "lzf", "none")
DEFAULT_COMPRESSION = "blosc-lz4"

GENERATE_HINT = "create it with `progressive data generate -o PATH`, or point [run].data at an existing file"
VERIFY_HINT = "run `progressive data inspect PATH --verify` to list every bad sample; regenerate or re-export the file"


class Sample(NamedTuple):
    """One matrix and its right-hand sides, as CSR arrays.

    indptr (n+1,) int64, indices (nnz,) int64, data (nnz,) float32, rhs (k, n) float32: the
    right-hand sides are always 2-D, k >= 1, so code never branches on their shape.
    """

    n: int
    indptr: "np.ndarray"
    indices: "np.ndarray"
    data: "np.ndarray"
    rhs: "np.ndarray"


# --------------------------------------------------------------------------- the index

def index_path(path: str | Path) -> Path:
    """The sidecar index of a dataset file: `<file>.index.json`."""
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


def bucket_counts(path: str | Path, *, refresh_sidecar: bool = True) -> dict[int, dict[str, int]]:
    """Samples per bucket and split: {n: {"train": k, "val": k, "test": k}}.

    Answers from the sidecar index when it matches the file's size and mtime (no numpy, no h5py:
    a few milliseconds), else from the HDF5 metadata (the matrices are never read) and, with
    `refresh_sidecar`, rewrites the sidecar if the folder is writable (`plan` passes False: it
    writes nothing). Raises DataError for a missing, corrupt or foreign file.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError("dataset file not found", loc=str(path), hint=GENERATE_HINT) from None
    except OSError as exc:
        raise DataError(f"cannot read the dataset file: {exc.strerror}", loc=str(path)) from None
    cached = _read_sidecar(path, st)
    if cached is not None:
        return cached
    with open_h5(path) as f:
        counts = _counts(f)
    if refresh_sidecar:
        try:
            write_sidecar(path, counts)
        except OSError:
            pass  # a cache only: a read-only data folder must not break anything
    return counts


def _read_sidecar(path: Path, st: os.stat_result) -> dict[int, dict[str, int]] | None:
    try:
        raw = json.loads(index_path(path).read_text(encoding="utf-8"))
        if (raw.get("format") != FORMAT_NAME or raw.get("format_version") != FORMAT_VERSION
                or raw.get("size") != st.st_size or raw.get("mtime_ns") != st.st_mtime_ns):
            return None
        return {int(n): {s: int(c[s]) for s in SPLITS} for n, c in raw["counts"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent, stale or damaged: fall back to the file itself


def write_sidecar(path: str | Path, counts: Mapping[int, Mapping[str, int]]) -> Path:
    """Write `<file>.index.json` for the file as it is now (atomically)."""
    path = Path(path)
    st = path.stat()
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "file": path.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "counts": {str(n): {s: int(counts[n].get(s, 0)) for s in SPLITS} for n in sorted(counts)},
    }
    side = index_path(path)
    tmp = side.with_name(f".{side.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, side)
    finally:
        tmp.unlink(missing_ok=True)
    return side


def _counts(f: "h5py.File") -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {}
    try:
        for n in buckets_in(f):
            b = f[f"buckets/{n}"]
            # The index's shape is metadata: no data is read.
            counts[n] = {s: b[s]["nnz_offsets"].shape[0] - 1 if s in b else 0 for s in SPLITS}
    except (KeyError, OSError, ValueError) as exc:
        raise DataError(f"corrupt dataset index: {_h5_reason(exc)}", loc=f.filename, hint="re-create the file") from None
    return counts


def buckets_in(f: "h5py.File") -> list[int]:
    """The matrix sizes present in an open file, ascending."""
    if "buckets" not in f:
        return []
    return sorted(int(k) for k in f["buckets"].keys() if k.isdigit())


def _group(f: "h5py.File", n: int, split: str) -> "h5py.Group":
    return f[f"buckets/{n}/{split}"]


# --------------------------------------------------------------------------- opening

def open_h5(path: str | Path, *, filters: bool = False, rdcc_nbytes: int = 4 * 1024 * 1024) -> "h5py.File":
    """Open a dataset file read-only and check it is one this code reads.

    `filters=True` also loads the compression plugins (hdf5plugin, ~0.1 s), needed to read matrices
    but not metadata. Raises DataError for a missing, non-HDF5, truncated, foreign or too-new file.
    """
    import h5py

    if filters:
        import hdf5plugin  # noqa: F401  (registers the Blosc filter with HDF5)
    path = Path(path)
    if not path.exists():
        raise DataError("dataset file not found", loc=str(path), hint=GENERATE_HINT)
    try:
        f = h5py.File(path, "r", rdcc_nbytes=rdcc_nbytes)
    except OSError as exc:
        raise DataError(f"not a readable HDF5 file (truncated or corrupt?): {_h5_reason(exc)}", loc=str(path),
                        hint="re-create it (`progressive data generate`), or copy it again if a transfer was cut short") from None
    try:
        fmt = f.attrs.get("format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt != FORMAT_NAME:
            raise DataError(f"not a progressive dataset (format attribute is {fmt!r}, expected {FORMAT_NAME!r})",
                            loc=str(path), hint="write it with progressive.data.ops.DatasetWriter (see docs/data-format.md)")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            newer = version > FORMAT_VERSION
            raise DataError(f"unsupported format version {version} (this progressive reads version {FORMAT_VERSION})",
                            loc=str(path), hint="upgrade progressive to read it" if newer
                            else "re-create the file with `progressive data generate`")
        return f
    except DataError:
        f.close()
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        f.close()
        raise DataError(f"corrupt dataset file: {_h5_reason(exc)}", loc=str(path)) from None


def _h5_reason(exc: BaseException) -> str:
    """HDF5's messages are long; keep the informative first part."""
    text = str(exc).split("(", 1)[0].strip() or str(exc)
    return text[:200]


class BucketReader:
    """Reads the samples of one bucket (matrix size n) and split of a dataset file.

    Opening reads the group's small index (`nnz_offsets`, one int64 per sample), never the
    matrices. Hold one reader per process: h5py handles must not cross a fork. `cache_bytes` is
    HDF5's chunk cache per dataset: it serves neighbouring samples of a chunk to `read`; whole-bucket
    loads are ~5% faster with 0 (chunks then go straight to the output array).
    """

    def __init__(self, path: str | Path, bucket: int, split: str, *, cache_bytes: int = 4 * 1024 * 1024) -> None:
        import numpy as np

        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}", loc=str(path), hint=f"use one of {', '.join(SPLITS)}")
        self.path, self.bucket, self.split = Path(path), int(bucket), split
        self._f = open_h5(self.path, filters=True, rdcc_nbytes=cache_bytes)
        try:
            present = buckets_in(self._f)
            if self.bucket not in present:
                listed = ", ".join(map(str, present)) or "none"
                raise DataError(f"bucket {self.bucket} is not in {self.path.name} (present: {listed})",
                                loc=str(self.path), hint="set the stage's bucket to one of those sizes, "
                                "or generate the size with `progressive data generate --sizes ...`")
            g = _group(self._f, self.bucket, split)
            # Looking a dataset up by name costs ~0.1 ms, more than reading a small sample: do it once.
            self._ds = {k: g[k] for k in ("indptr", "indices", "data", "rhs", "hash")}
            self.n = int(g.attrs["n"])
            self.nnz_offsets: np.ndarray = np.asarray(g["nnz_offsets"][...], dtype=np.int64)
            self.count = len(self.nnz_offsets) - 1
            self.rhs_per_sample = int(g["rhs"].shape[1])
            if (self.n != self.bucket or g["indptr"].shape != (self.count, self.n + 1)
                    or g["data"].shape != (int(self.nnz_offsets[-1]),) or g["indices"].shape != g["data"].shape
                    or g["rhs"].shape[::2] != (self.count, self.n)):
                raise DataError(f"bucket {self.bucket}/{split}: array shapes disagree with the index",
                                loc=str(self.path), hint="the file is corrupt; re-create it")
        except DataError:
            self._f.close()
            raise
        except (KeyError, OSError, ValueError, IndexError) as exc:
            self._f.close()
            raise DataError(f"corrupt bucket {self.bucket}/{split}: {_h5_reason(exc)}", loc=str(self.path),
                            hint="re-create the file") from None

    def __len__(self) -> int:
        return self.count

    def loc(self, i: int | None = None) -> str:
        """`file:bucket/split[i]`, for error messages."""
        return f"{self.path}:{self.bucket}/{self.split}" + (f"[{i}]" if i is not None else "")

    def read(self, i: int) -> Sample:
        """Sample `i` (cheap checks: structure, range, finiteness; DataError if they fail)."""
        import numpy as np

        if not 0 <= i < self.count:
            raise IndexError(f"sample {i} out of range for {self.count} samples")
        a, b = int(self.nnz_offsets[i]), int(self.nnz_offsets[i + 1])
        ds = self._ds
        try:
            indptr = ds["indptr"][i].astype(np.int64)
            indices = ds["indices"][a:b].astype(np.int64)
            data = ds["data"][a:b]
            rhs = ds["rhs"][i]
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the sample: {_h5_reason(exc)}", loc=self.loc(i),
                            hint="the file is corrupt; re-create or copy it again") from None
        sample = Sample(self.n, indptr, indices, data, rhs)
        problem = sample_problem(sample, full=False)
        if problem:
            raise DataError(problem, loc=self.loc(i), hint=VERIFY_HINT)
        return sample

    def read_block(self, start: int = 0, stop: int | None = None, *, check: bool = True) -> tuple["np.ndarray", ...]:
        """Samples [start, stop) as whole arrays, in their stored dtypes: (nnz_offsets rebased to 0
        (int64), indptr (m, n+1) int32, indices int32, data float32, rhs (m, k, n) float32).

        Four bulk reads: the fast way to load a bucket. `check` runs the cheap checks on the block
        (vectorised; about a fifth of a warm load) and raises DataError if they fail.
        """
        stop = self.count if stop is None else min(stop, self.count)
        a, b = int(self.nnz_offsets[start]), int(self.nnz_offsets[stop])
        ds = self._ds
        try:
            offs = self.nnz_offsets[start:stop + 1] - a
            indptr = ds["indptr"][start:stop]
            indices = ds["indices"][a:b]
            data = ds["data"][a:b]
            rhs = ds["rhs"][start:stop]
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read samples {start}..{stop - 1}: {_h5_reason(exc)}", loc=self.loc(),
                            hint="the file is corrupt; re-create or copy it again") from None
        problem = _block_problem(self.n, offs, indptr, indices, data, rhs) if check else None
        if problem:
            raise DataError(problem, loc=self.loc(), hint=VERIFY_HINT)
        return offs, indptr, indices, data, rhs

    def hashes(self) -> list[str]:
        """The stored content hash of every sample (see `matrix_hash`)."""
        return [h.decode() for h in self._ds["hash"][...]]

    def close(self) -> None:
        """Release the HDF5 handle."""
        self._f.close()

    def __enter__(self) -> "BucketReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bucket(path: str | Path, bucket: int, split: str, *, cache_bytes: int = 4 * 1024 * 1024) -> BucketReader:
    """Open one bucket and split for reading: `open_bucket(p, 1024, "train").read(i)`."""
    return BucketReader(path, bucket, split, cache_bytes=cache_bytes)


def iter_samples(reader: BucketReader, block: int = 256) -> Iterator[Sample]:
    """Every sample of a reader, read a block at a time (fast sequential scans)."""
    for start in range(0, reader.count, block):
        offs, indptr, indices, data, rhs = reader.read_block(start, start + block)
        for j in range(len(offs) - 1):
            yield block_sample(reader.n, offs, indptr, indices, data, rhs, j)


def block_sample(n: int, offs: "np.ndarray", indptr: "np.ndarray", indices: "np.ndarray", data: "np.ndarray",
                 rhs: "np.ndarray", j: int) -> Sample:
    """Sample `j` of a `read_block` result, with the int64 index arrays `Sample` promises."""
    import numpy as np

    a, b = offs[j], offs[j + 1]
    return Sample(n, indptr[j].astype(np.int64), indices[a:b].astype(np.int64), data[a:b], rhs[j])


# --------------------------------------------------------------------------- checks

def sample_problem(s: Sample, *, full: bool = True, sym_rtol: float = 1e-6) -> str | None:
    """What is wrong with a sample, or None.

    The cheap checks (always): shapes, CSR structure, square (column indices below n), finite values
    and right-hand sides. `full=True` adds: sorted unique columns per row, symmetric (within
    `sym_rtol` of the largest entry), positive diagonal.
    """
    import numpy as np

    n, indptr, indices, data, rhs = s
    indptr, indices = np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64)  # no overflow in n * n
    if indptr.ndim != 1 or len(indptr) != n + 1:
        return f"matrix is not square: {len(indptr) - 1} rows but n={n}"
    nnz = len(data)
    if len(indices) != nnz or indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
        return "broken CSR structure (indptr does not match indices/data)"
    if nnz and (indices.min() < 0 or indices.max() >= n):
        return f"matrix is not square: column index {int(indices.max())} outside 0..{n - 1} (n={n})"
    bad = np.count_nonzero(~np.isfinite(data))
    if bad:
        kind = "NaN" if np.isnan(data).any() else "Inf"
        return f"matrix has {bad} non-finite value(s) ({kind})"
    if rhs.ndim != 2 or rhs.shape[1] != n or rhs.shape[0] < 1:
        return f"right-hand sides have shape {rhs.shape}, expected (k, {n})"
    bad = np.count_nonzero(~np.isfinite(rhs))
    if bad:
        return f"right-hand side has {bad} non-finite value(s) ({'NaN' if np.isnan(rhs).any() else 'Inf'})"
    if not full:
        return None
    rows = np.repeat(np.arange(n), np.diff(indptr))
    # Within a row the columns must increase strictly; a row start may go down.
    step = np.diff(indices)
    same_row = rows[1:] == rows[:-1]
    if np.any(step[same_row] <= 0):
        return "column indices are not sorted and unique within each row"
    # Symmetry without scipy: sort the entries by (column, row); for a symmetric matrix that is
    # the original (row, column) order again, with equal values.
    keys = rows * n + indices  # ascending, since the rows are sorted and unique
    order = np.argsort(indices * n + rows, kind="stable")
    if not np.array_equal((indices * n + rows)[order], keys):
        return "matrix is not symmetric (its sparsity pattern is not)"
    scale = float(np.abs(data).max()) if nnz else 0.0
    asym = float(np.abs(data[order] - data).max()) if nnz else 0.0
    if asym > sym_rtol * scale:
        return f"matrix is not symmetric (max |A - A^T| = {asym:.3g}, max |A| = {scale:.3g})"
    on_diag = rows == indices
    positive = np.count_nonzero(data[on_diag] > 0)
    if positive != n:
        return f"diagonal is not positive at {n - positive} row(s) (an SPD matrix needs a positive diagonal)"
    return None


def _block_problem(n: int, offs: "np.ndarray", indptr: "np.ndarray", indices: "np.ndarray",
                   data: "np.ndarray", rhs: "np.ndarray") -> str | None:
    """The cheap checks of `sample_problem`, vectorised over a block of samples."""
    import numpy as np

    if len(indptr) and (np.any(indptr[:, 0] != 0) or np.any(indptr[:, -1] != np.diff(offs))
                        or np.any(indptr[:, 1:] < indptr[:, :-1])):
        return "broken CSR structure (indptr does not match indices/data)"
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        return f"matrix is not square: column index {int(indices.max())} outside 0..{n - 1} (n={n})"
    # A float64 sum of float32 values cannot overflow, so it is finite iff every value is: one fast pass.
    if not math.isfinite(data.sum(dtype=np.float64)):
        return f"matrix has {np.count_nonzero(~np.isfinite(data))} non-finite value(s) (NaN or Inf)"
    if not math.isfinite(rhs.sum(dtype=np.float64)):
        return f"right-hand side has {np.count_nonzero(~np.isfinite(rhs))} non-finite value(s) (NaN or Inf)"
    return None


def matrix_hash(n: int, indptr: "np.ndarray", indices: "np.ndarray", data: "np.ndarray") -> str:
    """A content hash of a matrix (not its right-hand sides), independent of storage dtypes."""
    import numpy as np

    h = hashlib.blake2b(digest_size=16)
    h.update(np.int64(n).tobytes())
    for arr, dt in ((indptr, np.int64), (indices, np.int64), (data, np.float32)):
        h.update(np.ascontiguousarray(arr, dtype=dt).tobytes())
    return h.hexdigest()


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The file's root attributes (provenance), JSON strings decoded."""
    with open_h5(path) as f:
        out: dict[str, Any] = {}
        for key, value in f.attrs.items():
            value = value.decode() if isinstance(value, bytes) else value
            value = value.item() if hasattr(value, "item") else value
            if key == "history" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            out[key] = value
        return out
