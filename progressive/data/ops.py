"""Whole-file operations: inspect (and verify), subset, merge, re-split.

Each reads sample blocks through `BucketReader`, and each output goes through `DatasetWriter`
(temp file, fsync, rename, sidecar), which checks every sample it writes.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from progressive.data.format import (
    DEFAULT_COMPRESSION,
    SPLITS,
    DatasetWriter,
    buckets_in,
    iter_samples,
    open_bucket,
    open_h5,
    read_attrs,
    sample_problem,
)
from progressive.data.generate import assign_splits, check_split, split_counts
from progressive.errors import DataError

Progress = Callable[[int, int], None]


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
    dups, examples, done = 0, [], 0
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
            for split in SPLITS:
                with open_bucket(path, n, split) as r:
                    hashes = r.hashes()
                    for i, s in enumerate(iter_samples(r)):
                        w.add(n, SPLITS[labels[j]], s.indptr, s.indices, s.data, s.rhs, digest=hashes[i])
                        j += 1
                        done += 1
                        if progress is not None:
                            progress(done, total)
        return {n: dict(c) for n, c in w.counts.items()}
