"""Writing datasets: the atomic `DatasetWriter`, split assignment, and whole-file operations
(inspect and verify, subset, merge, re-split).

Every output goes through `DatasetWriter` (temp file in the target folder, fsync, rename, then the
sidecar index), which checks every sample it writes; inputs are read through `BucketReader`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from progressive.data.format import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    SPLITS,
    Sample,
    buckets_in,
    index_path,
    iter_samples,
    matrix_hash,
    open_bucket,
    open_h5,
    read_attrs,
    sample_problem,
    write_sidecar,
)
from progressive.atomic import fsync_dir
from progressive.errors import DataError

if TYPE_CHECKING:
    import h5py
    import numpy as np

# ~256 KiB chunks: small enough that a random read of one sample decompresses little extra,
# large enough that sequential reads are not dominated by per-chunk overhead (see the docs).
_CHUNK_BYTES = 256 * 1024
_FLUSH_BYTES = 64 * 1024 * 1024  # the writer buffers this much per group before appending
_SPLIT_STREAM = 7919  # seeds the split assignment, apart from generate's family codes

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- writing

def _filter_kwargs(compression: str) -> dict[str, Any]:
    if compression in ("blosc-lz4", "blosc-zstd"):
        import hdf5plugin

        blosc = (hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE) if compression == "blosc-lz4"
                 else hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE))
        return dict(blosc)
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
    `checksum` adds HDF5's Fletcher-32 checksum to every chunk of the matrix arrays.
    """

    def __init__(self, path: str | Path, *, attrs: Mapping[str, Any], overwrite: bool = False,
                 compression: str = DEFAULT_COMPRESSION, verify: bool = True, checksum: bool = True) -> None:
        import h5py

        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise DataError("output file already exists", loc=str(self.path),
                            hint="choose another -o path, or pass --force to replace it")
        if not self.path.parent.is_dir():
            raise DataError("output folder does not exist", loc=str(self.path.parent), hint="create it first")
        _filter_kwargs(compression)  # fail before creating anything
        self.compression, self.verify, self.checksum = compression, verify, checksum
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
        # Index arrays are kept in whatever integer dtype they come (int32 halves the buffer and the
        # transfer from generator workers); they are stored as int32.
        indptr, indices = np.asarray(indptr), np.asarray(indices)
        if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
            raise DataError(f"indptr and indices must be integer arrays, got {indptr.dtype} and {indices.dtype}",
                            loc=str(self.path), hint="pass the CSR arrays of a scipy.sparse.csr_matrix")
        s = Sample(int(n), indptr, indices, np.asarray(data, dtype=np.float32), rhs.reshape(1, -1) if rhs.ndim == 1 else rhs)
        if s.n >= 2**31 - 1 or len(s.data) >= 2**31:  # the file stores int32 index arrays
            raise DataError(f"matrix too large for format version 1 (n={s.n}, nnz={len(s.data)}; both must be < 2^31)",
                            loc=str(self.path), hint="split the problem, or ask for a format with int64 indices")
        if self.verify:
            problem = sample_problem(s)
            if problem:
                key = (s.n, split)
                raise DataError(problem, loc=f"{self.path}:{n}/{split}[{len(self._hashes.get(key, []))}]",
                                hint="fix the generator or the source data; nothing was written")
        key = (s.n, split)
        self._buf.setdefault(key, []).append(s)
        self._buf_bytes[key] = self._buf_bytes.get(key, 0) + sum(a.nbytes for a in s[1:])
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
        kw = _filter_kwargs(self.compression)
        # Fletcher-32 per chunk: a flipped bit on disk fails the read loudly instead of feeding the
        # model garbage that may still be finite (measured cost: see docs/data-format.md).
        kw["fletcher32"] = self.checksum
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
        for name, value in attrs.items():
            if isinstance(value, (list, tuple, dict)):
                value = json.dumps(value)
            self._f.attrs[name] = value if not isinstance(value, np.generic) else value.item()
        self._f.attrs["format"] = FORMAT_NAME
        self._f.attrs["format_version"] = FORMAT_VERSION
        self._f.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        index_path(self.path).unlink(missing_ok=True)  # never leave a sidecar describing the old file
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
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


# --------------------------------------------------------------------------- splits

def split_counts(total: int, fractions: Sequence[float]) -> tuple[int, ...]:
    """Split `total` by `fractions` (largest remainder): the counts sum to `total` exactly."""
    raw = [total * f for f in fractions]
    counts = [math.floor(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return tuple(counts)


def assign_splits(total: int, fractions: Sequence[float], seed: int, n: int) -> "np.ndarray":
    """The split (0 train, 1 val, 2 test) of each of `total` samples of bucket `n`, by seed."""
    import numpy as np

    counts = split_counts(total, fractions)
    labels = np.repeat(np.arange(len(counts), dtype=np.int8), counts)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM, n]))
    return labels[rng.permutation(total)]


def check_split(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate train/val/test fractions (three, non-negative, summing to 1)."""
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions {','.join(map(str, fractions))} are not three non-negative numbers summing to 1",
                        loc="--split", hint="e.g. --split 0.8,0.1,0.1 (train,val,test)")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))



# --------------------------------------------------------------------------- whole-file operations



@dataclasses.dataclass
class BucketInfo:
    """One bucket as `inspect` reports it."""

    n: int
    counts: dict[str, int]
    nnz_min: int
    nnz_mean: float
    nnz_max: int
    rhs_per_sample: int
    stored_bytes: int  # on disk, compressed
    raw_bytes: int  # uncompressed, as stored (int32 indices, float32 values)


@dataclasses.dataclass
class Inspection:
    """What `progressive data inspect` shows; `problems` is filled by verify=True."""

    path: str
    file_size: int
    format_version: int
    attrs: dict[str, Any]
    buckets: list[BucketInfo]
    verified: bool = False
    checked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    problem_count: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for `inspect --json`)."""
        return dataclasses.asdict(self)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _history(attrs: dict[str, Any]) -> list[Any]:
    hist = attrs.get("history", [])
    return list(hist) if isinstance(hist, list) else []


def inspect(path: str | Path, *, verify: bool = False, max_problems: int = 20, progress: Progress | None = None) -> Inspection:
    """Describe a dataset from its metadata; `verify=True` also reads and fully checks every sample."""
    import numpy as np

    path = Path(path)
    attrs = read_attrs(path)
    infos: list[BucketInfo] = []
    with open_h5(path) as f:
        for n in buckets_in(f):
            counts, sizes, stored, raw, k = {}, [], 0, 0, 1
            for split in SPLITS:
                g = f[f"buckets/{n}/{split}"]
                offs = g["nnz_offsets"][...]
                counts[split] = len(offs) - 1
                sizes.append(np.diff(offs))
                k = int(g["rhs"].shape[1])
                for name in ("nnz_offsets", "indptr", "indices", "data", "rhs", "hash"):
                    ds = g[name]
                    stored += ds.id.get_storage_size()
                    raw += ds.size * ds.dtype.itemsize
            nnz = np.concatenate(sizes)
            infos.append(BucketInfo(n, counts, int(nnz.min()) if len(nnz) else 0, float(nnz.mean()) if len(nnz) else 0.0,
                                    int(nnz.max()) if len(nnz) else 0, k, stored, raw))
    report = Inspection(str(path), path.stat().st_size, int(attrs.get("format_version", 0)), attrs, infos)
    if verify:
        total = sum(sum(b.counts.values()) for b in infos)
        for b in infos:
            for split in SPLITS:
                with open_bucket(path, b.n, split) as r:
                    for i in range(r.count):
                        # Read one at a time: a bad sample must be named, not abort its whole block.
                        try:
                            s = r.read(i)
                            problem = sample_problem(s)
                        except DataError as exc:
                            problem = exc.msg
                        report.checked += 1
                        if problem:
                            report.problem_count += 1
                            if len(report.problems) < max_problems:
                                report.problems.append(f"{b.n}/{split}[{i}]: {problem}")
                        if progress is not None and report.checked % 64 == 0:
                            progress(report.checked, total)
        report.verified = True
        if progress is not None:
            progress(report.checked, total)
    return report


def _positive(value: int, what: str) -> None:
    if value < 0:
        raise DataError(f"{what} must be >= 0, got {value}", loc=f"--{what}")


def subset(path: str | Path, out: str | Path, *, max_samples: int, seed: int, buckets: Sequence[int] | None = None,
           overwrite: bool = False, compression: str = DEFAULT_COMPRESSION, progress: Progress | None = None) -> dict[int, dict[str, int]]:
    """A reproducible random subset of at most `max_samples` samples.

    Every (bucket, split) keeps its share of the file (largest-remainder rounding), so proportions
    survive; which samples are kept depends only on `seed` and the source file. `buckets` keeps only
    those sizes. Returns the output's counts.
    """
    import numpy as np

    _positive(max_samples, "max-samples")
    counts_in = _source_counts(path, buckets)
    strata = [(n, s) for n in sorted(counts_in) for s in SPLITS]
    total = sum(counts_in[n][s] for n, s in strata)
    keep = min(max_samples, total)
    shares = split_counts(keep, [counts_in[n][s] / total for n, s in strata]) if total else [0] * len(strata)
    attrs = read_attrs(path)
    attrs.update(created=_now(), history=_history(attrs) + [
        {"op": "subset", "source": str(path), "max_samples": max_samples, "seed": seed,
         "buckets": list(buckets) if buckets else None}])
    done = 0
    with DatasetWriter(out, attrs=_clean(attrs), overwrite=overwrite, compression=compression) as w:
        for (n, split), m in zip(strata, shares):
            if m == 0:
                continue
            rng = np.random.default_rng(np.random.SeedSequence([seed, n, SPLITS.index(split)]))
            chosen = np.sort(rng.choice(counts_in[n][split], size=m, replace=False)).tolist()
            with open_bucket(path, n, split) as r:
                hashes = r.hashes()
                for i in chosen:  # ascending, so the chunk cache serves neighbours
                    s = r.read(i)
                    w.add(n, split, s.indptr, s.indices, s.data, s.rhs, digest=hashes[i])
                    done += 1
                    if progress is not None:
                        progress(done, keep)
        return {n: dict(c) for n, c in w.counts.items()}


def _source_counts(path: str | Path, buckets: Sequence[int] | None) -> dict[int, dict[str, int]]:
    from progressive.data.format import bucket_counts

    counts = bucket_counts(path)
    if buckets:
        missing = [n for n in buckets if n not in counts]
        if missing:
            raise DataError(f"bucket(s) {', '.join(map(str, missing))} not in the file "
                            f"(buckets present: {', '.join(map(str, sorted(counts))) or 'none'})",
                            loc=str(path), hint="pick --buckets from the sizes present")
        counts = {n: counts[n] for n in buckets}
    return counts


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k not in ("format", "format_version")}


@dataclasses.dataclass
class MergeReport:
    """What `merge` wrote and which duplicates it found (by matrix content hash)."""

    counts: dict[int, dict[str, int]]
    duplicates: int
    examples: list[str]  # up to 20: "b.h5:1024/train[3] = a.h5:1024/val[17]"
    kept_duplicates: bool


def merge(paths: Sequence[str | Path], out: str | Path, *, keep_duplicates: bool = False, overwrite: bool = False,
          compression: str = DEFAULT_COMPRESSION, progress: Progress | None = None) -> MergeReport:
    """Concatenate datasets bucket by bucket, keeping each sample's split.

    A matrix already written (same content hash, wherever it came from: another file, another
    split, the same file) is a duplicate: dropped and counted unless keep_duplicates.
    """
    if len(paths) < 2:
        raise DataError("merge needs at least two input files", loc="merge", hint="progressive data merge A B -o OUT")
    if Path(out).resolve() in {Path(p).resolve() for p in paths}:
        raise DataError("the output is also an input", loc=str(out), hint="write the merge to a new file")
    all_counts = {str(p): _source_counts(p, None) for p in paths}
    total = sum(c for counts in all_counts.values() for per in counts.values() for c in per.values())
    sources = [read_attrs(p) for p in paths]
    families = sorted({str(a.get("family", "?")) for a in sources})
    seeds = sorted({int(a.get("seed", -1)) for a in sources})
    attrs = {
        "generator": sources[0].get("generator", "progressive"),
        "family": "+".join(families),
        "seed": seeds[0] if len(seeds) == 1 else -1,  # -1: no single seed; see history
        "created": _now(),
        "rhs_per_sample": int(sources[0].get("rhs_per_sample", 1)),
        "history": [{"op": "merge", "sources": [str(p) for p in paths],
                     "source_history": [_history(a) for a in sources]}],
    }
    seen: dict[str, str] = {}
    dups, done = 0, 0
    examples: list[str] = []
    with DatasetWriter(out, attrs=attrs, overwrite=overwrite, compression=compression) as w:
        for p in paths:
            for n in sorted(all_counts[str(p)]):
                for split in SPLITS:
                    with open_bucket(p, n, split) as r:
                        hashes = r.hashes()
                        for i, s in enumerate(iter_samples(r)):
                            where = f"{p}:{n}/{split}[{i}]"
                            done += 1
                            if hashes[i] in seen:
                                dups += 1
                                if len(examples) < 20:
                                    examples.append(f"{where} = {seen[hashes[i]]}")
                                if not keep_duplicates:
                                    continue
                            else:
                                seen[hashes[i]] = where
                            w.add(n, split, s.indptr, s.indices, s.data, s.rhs, digest=hashes[i])
                            if progress is not None:
                                progress(done, total)
        counts = {n: dict(c) for n, c in w.counts.items()}
    return MergeReport(counts, dups, examples, keep_duplicates)


def resplit(path: str | Path, out: str | Path, *, seed: int, split: Sequence[float], overwrite: bool = False,
            compression: str = DEFAULT_COMPRESSION, progress: Progress | None = None) -> dict[int, dict[str, int]]:
    """Re-assign every sample of each bucket to train/val/test by `seed` and fractions `split`.

    Samples are pooled per bucket in file order (train, then val, then test) and assigned as
    `generate` assigns them: the same seed and fractions give the same split of the same pool.
    """
    fractions = check_split(split)
    counts_in = _source_counts(path, None)
    total = sum(c for per in counts_in.values() for c in per.values())
    attrs = read_attrs(path)
    attrs.update(created=_now(), history=_history(attrs) + [
        {"op": "split", "source": str(path), "seed": seed, "split": list(fractions)}])
    done = 0
    with DatasetWriter(out, attrs=_clean(attrs), overwrite=overwrite, compression=compression) as w:
        for n in sorted(counts_in):
            labels = assign_splits(sum(counts_in[n].values()), fractions, seed, n)
            j = 0  # position in the pooled order; the writer keeps each target split in this order
            for source in SPLITS:
                with open_bucket(path, n, source) as r:
                    hashes = r.hashes()
                    for i, s in enumerate(iter_samples(r)):
                        w.add(n, SPLITS[labels[j]], s.indptr, s.indices, s.data, s.rhs, digest=hashes[i])
                        j += 1
                        done += 1
                        if progress is not None:
                            progress(done, total)
        return {n: dict(c) for n, c in w.counts.items()}
