"""The bucketed HDF5 format: index, reader, writer and sample checks.

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
numpy, h5py and scipy are imported inside the functions that need them, for the same reason.
"""

from __future__ import annotations

import hashlib
import json
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

# ~256 KiB chunks: small enough that a random read of one sample decompresses little extra,
# large enough that sequential reads are not dominated by per-chunk overhead (see the docs).
_CHUNK_BYTES = 256 * 1024
_FLUSH_BYTES = 64 * 1024 * 1024  # the writer buffers this much per group before appending


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


def bucket_counts(path: str | Path) -> dict[int, dict[str, int]]:
    """Samples per bucket and split: {n: {"train": k, "val": k, "test": k}}.

    Answers from the sidecar index when it matches the file's size and mtime (no numpy, no h5py:
    a few milliseconds), else from the HDF5 metadata (the matrices are never read) and refreshes the
    sidecar if the folder is writable. Raises DataError for a missing, corrupt or foreign file.
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
    try:
        write_sidecar(path, counts)
    except OSError:
        pass  # a cache only: a read-only data folder must not break `plan`
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
                            loc=str(path), hint="convert it with progressive.data.format.DatasetWriter (see docs/data-format.md)")
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
    matrices. Hold one reader per process: h5py handles must not cross a fork.
    """

    def __init__(self, path: str | Path, bucket: int, split: str) -> None:
        import numpy as np

        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}", loc=str(path), hint=f"use one of {', '.join(SPLITS)}")
        self.path, self.bucket, self.split = Path(path), int(bucket), split
        self._f = open_h5(self.path, filters=True)
        try:
            present = buckets_in(self._f)
            if self.bucket not in present:
                listed = ", ".join(map(str, present)) or "none"
                raise DataError(f"bucket n={self.bucket} is not in the file (buckets present: {listed})",
                                loc=str(self.path), hint="set the stage's bucket to one of those sizes, "
                                "or generate the size with `progressive data generate --sizes ...`")
            g = _group(self._f, self.bucket, split)
            self._g = g
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

    def read_block(self, start: int = 0, stop: int | None = None) -> tuple["np.ndarray", ...]:
        """Samples [start, stop) as whole arrays: (nnz_offsets rebased to 0, indptr (m, n+1) int64,
        indices int64, data float32, rhs (m, k, n) float32). Four reads: the fast way to load a bucket."""
        import numpy as np

        stop = self.count if stop is None else min(stop, self.count)
        a, b = int(self.nnz_offsets[start]), int(self.nnz_offsets[stop])
        ds = self._ds
        try:
            offs = self.nnz_offsets[start:stop + 1] - a
            indptr = ds["indptr"][start:stop].astype(np.int64)
            indices = ds["indices"][a:b].astype(np.int64)
            data = ds["data"][a:b]
            rhs = ds["rhs"][start:stop]
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read samples {start}..{stop - 1}: {_h5_reason(exc)}", loc=self.loc(),
                            hint="the file is corrupt; re-create or copy it again") from None
        problem = _block_problem(self.n, offs, indptr, indices, data, rhs)
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


def open_bucket(path: str | Path, bucket: int, split: str) -> BucketReader:
    """Open one bucket and split for reading: `open_bucket(p, 1024, "train").read(i)`."""
    return BucketReader(path, bucket, split)


def iter_samples(reader: BucketReader, block: int = 256) -> Iterator[Sample]:
    """Every sample of a reader, read a block at a time (fast sequential scans)."""
    for start in range(0, reader.count, block):
        offs, indptr, indices, data, rhs = reader.read_block(start, start + block)
        for j in range(len(offs) - 1):
            a, b = offs[j], offs[j + 1]
            yield Sample(reader.n, indptr[j], indices[a:b], data[a:b], rhs[j])


# --------------------------------------------------------------------------- checks

def sample_problem(s: Sample, *, full: bool = True, sym_rtol: float = 1e-6) -> str | None:
    """What is wrong with a sample, or None.

    The cheap checks (always): shapes, CSR structure, square (column indices below n), finite values
    and right-hand sides. `full=True` adds: sorted unique columns per row, symmetric (within
    `sym_rtol` of the largest entry), positive diagonal.
    """
    import numpy as np

    n, indptr, indices, data, rhs = s
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
    import scipy.sparse as sp

    a = sp.csr_matrix((data, indices, indptr), shape=(n, n))
    scale = float(np.abs(data).max()) if nnz else 0.0
    diff = abs(a - a.T)
    asym = float(diff.max()) if diff.nnz else 0.0
    if asym > sym_rtol * scale:
        return f"matrix is not symmetric (max |A - A^T| = {asym:.3g}, max |A| = {scale:.3g})"
    diag = a.diagonal()
    if np.any(diag <= 0):
        return f"diagonal is not positive at {np.count_nonzero(diag <= 0)} row(s) (an SPD matrix needs a positive diagonal)"
    return None


def _block_problem(n: int, offs: "np.ndarray", indptr: "np.ndarray", indices: "np.ndarray",
                   data: "np.ndarray", rhs: "np.ndarray") -> str | None:
    """The cheap checks of `sample_problem`, vectorised over a block of samples."""
    import numpy as np

    if len(indptr) and (np.any(indptr[:, 0] != 0) or np.any(indptr[:, -1] != np.diff(offs))
                        or np.any(np.diff(indptr, axis=1) < 0)):
        return "broken CSR structure (indptr does not match indices/data)"
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        return f"matrix is not square: column index {int(indices.max())} outside 0..{n - 1} (n={n})"
    if not np.isfinite(data).all():
        return f"matrix has {np.count_nonzero(~np.isfinite(data))} non-finite value(s) (NaN or Inf)"
    if not np.isfinite(rhs).all():
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


# --------------------------------------------------------------------------- writing

def _filter_kwargs(compression: str, itemsize: int) -> dict[str, Any]:
    if compression == "blosc-lz4" or compression == "blosc-zstd":
        import hdf5plugin

        cname = compression.split("-")[1]
        return dict(hdf5plugin.Blosc(cname=cname, clevel=5 if cname == "lz4" else 3, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "none":
        return {}
    raise DataError(f"unknown compression {compression!r}", hint=f"use one of {', '.join(COMPRESSIONS)}")


class DatasetWriter:
    """Writes a dataset file atomically: a temp file in the target folder, fsync, rename, then the sidecar.

    Use as a context manager; an exception (Ctrl-C included) deletes the temp file, so a target
    is never left half-written::

        with DatasetWriter("data/m.h5", attrs={"generator": ..., "family": ..., "seed": 0}) as w:
            w.add(n, "train", indptr, indices, data, rhs)

    `add` checks every sample (`sample_problem`, full) unless `verify=False` (the caller already did).
    """

    def __init__(self, path: str | Path, *, attrs: Mapping[str, Any], overwrite: bool = False,
                 compression: str = DEFAULT_COMPRESSION, verify: bool = True) -> None:
        import h5py

        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise DataError("output file already exists", loc=str(self.path),
                            hint="choose another -o path, or pass --force to replace it")
        if not self.path.parent.is_dir():
            raise DataError("output folder does not exist", loc=str(self.path.parent), hint="create it first")
        _filter_kwargs(compression, 4)  # fail before creating anything
        self.compression, self.verify = compression, verify
        self.attrs = dict(attrs)
        self.tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        self._f = h5py.File(self.tmp, "w")
        self._buf: dict[tuple[int, str], list[Sample]] = {}
        self._buf_bytes: dict[tuple[int, str], int] = {}
        self._hashes: dict[tuple[int, str], list[str]] = {}
        self.counts: dict[int, dict[str, int]] = {}
        self._done = False

    def add(self, n: int, split: str, indptr: "np.ndarray", indices: "np.ndarray", data: "np.ndarray",
            rhs: "np.ndarray", *, digest: str | None = None) -> str:
        """Append one sample to bucket `n`, split `split`; returns its content hash."""
        import numpy as np

        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}", hint=f"use one of {', '.join(SPLITS)}")
        rhs = np.asarray(rhs, dtype=np.float32)
        s = Sample(int(n), np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64),
                   np.asarray(data, dtype=np.float32), rhs.reshape(1, -1) if rhs.ndim == 1 else rhs)
        if self.verify:
            problem = sample_problem(s)
            if problem:
                key = (s.n, split)
                raise DataError(problem, loc=f"{self.path}:{n}/{split}[{len(self._hashes.get(key, []))}]",
                                hint="fix the generator or the source data; nothing was written")
        key = (s.n, split)
        self._buf.setdefault(key, []).append(s)
        self._buf_bytes[key] = self._buf_bytes.get(key, 0) + s.data.nbytes * 2 + s.rhs.nbytes + s.indptr.nbytes
        digest = digest or matrix_hash(s.n, s.indptr, s.indices, s.data)
        self._hashes.setdefault(key, []).append(digest)
        self.counts.setdefault(s.n, dict.fromkeys(SPLITS, 0))[split] += 1
        if self._buf_bytes[key] >= _FLUSH_BYTES:
            self._flush(key)
        return digest

    def _create(self, n: int, split: str, k: int) -> "h5py.Group":
        import numpy as np

        g = self._f.require_group(f"buckets/{n}/{split}")
        g.attrs["n"] = n
        g.attrs["count"] = 0
        row = lambda per: max(1, _CHUNK_BYTES // per)  # noqa: E731  (rows of `per` bytes per chunk)
        g.create_dataset("nnz_offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(1024,))
        kw = _filter_kwargs(self.compression, 4)
        g.create_dataset("indptr", (0, n + 1), np.int32, maxshape=(None, n + 1), chunks=(row(4 * (n + 1)), n + 1), **kw)
        g.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(_CHUNK_BYTES // 4,), **kw)
        g.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(_CHUNK_BYTES // 4,), **kw)
        g.create_dataset("rhs", (0, k, n), np.float32, maxshape=(None, k, n), chunks=(row(4 * k * n), k, n), **kw)
        g.create_dataset("hash", (0,), "S32", maxshape=(None,), chunks=(256,))
        return g

    def _flush(self, key: tuple[int, str]) -> None:
        import numpy as np

        samples = self._buf.pop(key, [])
        self._buf_bytes[key] = 0
        if not samples:
            return
        n, split = key
        k = samples[0].rhs.shape[0]
        if any(s.rhs.shape[0] != k for s in samples):
            raise DataError(f"bucket {n}/{split}: samples have different numbers of right-hand sides",
                            loc=str(self.path), hint="give every sample of a bucket the same number of rhs")
        name = f"buckets/{n}/{split}"
        g = self._f[name] if name in self._f else self._create(n, split, k)
        if g["rhs"].shape[1] != k:
            raise DataError(f"bucket {n}/{split}: {k} right-hand sides per sample, but earlier samples have "
                            f"{g['rhs'].shape[1]}", loc=str(self.path), hint="use one rhs count per bucket")
        m0, nnz0 = g["indptr"].shape[0], g["data"].shape[0]
        m, nnz = len(samples), sum(len(s.data) for s in samples)
        offs = nnz0 + np.cumsum([len(s.data) for s in samples], dtype=np.int64)
        for ds, new_len in (("indptr", m0 + m), ("rhs", m0 + m), ("hash", m0 + m), ("nnz_offsets", m0 + m + 1),
                            ("indices", nnz0 + nnz), ("data", nnz0 + nnz)):
            g[ds].resize(new_len, axis=0)
        g["nnz_offsets"][m0 + 1:] = offs
        g["indptr"][m0:] = np.stack([s.indptr for s in samples]).astype(np.int32)
        g["rhs"][m0:] = np.stack([s.rhs for s in samples])
        g["indices"][nnz0:] = np.concatenate([s.indices for s in samples]).astype(np.int32)
        g["data"][nnz0:] = np.concatenate([s.data for s in samples])
        hashes = self._hashes[key]
        g["hash"][m0:] = np.array(hashes[m0:m0 + m], dtype="S32")
        g.attrs["count"] = m0 + m

    def commit(self) -> Path:
        """Flush, write the provenance, fsync, rename over the target, write the sidecar."""
        import numpy as np

        if self._done:
            return self.path
        for key in list(self._buf):
            self._flush(key)
        # Every bucket gets all three splits (maybe empty), so readers never special-case a missing one.
        ks = {n: self._f[f"buckets/{n}/{s}/rhs"].shape[1] for (n, s) in self._hashes}
        for n in self.counts:
            for split in SPLITS:
                if f"buckets/{n}/{split}" not in self._f:
                    self._create(n, split, ks[n])
        attrs = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self.attrs}
        for key, value in attrs.items():
            if isinstance(value, (list, tuple, dict)):
                value = json.dumps(value)
            self._f.attrs[key] = value if not isinstance(value, np.generic) else value.item()
        self._f.attrs["format"] = FORMAT_NAME
        self._f.attrs["format_version"] = FORMAT_VERSION
        self._f.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        index_path(self.path).unlink(missing_ok=True)  # never leave a sidecar describing the old file
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        write_sidecar(self.path, self.counts)
        self._done = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse directory fsync; the rename itself is still atomic
    finally:
        os.close(fd)


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
