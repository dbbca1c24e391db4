"""`progressive data ...`: make, check and reshape bucketed datasets.

generate, inspect [--verify], subset, merge, split (plus index, pack-arrays and generate-seq
from `data_byo_cmds`). The work is in `progressive.data`; this
module parses, shows progress and prints. Heavy imports happen inside the handlers, so
`progressive --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from progressive.cli.render import Col, print_table
from progressive.errors import DataError
from progressive.signals import INTERRUPT_SIGNALS



def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the `data` command group."""
    from progressive.data.format import COMPRESSIONS, DEFAULT_COMPRESSION

    p = sub.add_parser("data", help="generate, inspect, verify, subset, merge and split datasets; index a task's own data",
                       description="Make, check and reshape bucketed HDF5 datasets (docs/data-format.md); "
                       "pack numpy arrays into the dense-array layout; count any task's data for plan (index).")
    def show_help(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(handler=show_help)
    acts = p.add_subparsers(dest="data_command", metavar="ACTION")

    def output(q: argparse.ArgumentParser, default: str | None = None) -> None:
        q.add_argument("-o", "--output", default=default, required=default is None, metavar="PATH",
                       help="the file to write (atomically: a temp file renamed at the end)"
                       + (f" (default: {default})" if default else ""))
        q.add_argument("--force", action="store_true", help="replace the output file if it exists")
        q.add_argument("--compression", choices=COMPRESSIONS, default=DEFAULT_COMPRESSION,
                       help=f"HDF5 filter for the matrices (default: {DEFAULT_COMPRESSION}, chosen by benchmark)")

    g = acts.add_parser("generate", help="generate synthetic SPD matrices, reproducibly from a seed",
                        description="Generate sparse SPD matrices in buckets of size n. The same seed gives the same matrices.")
    output(g, "data/matrices.h5")
    g.add_argument("--sizes", default="512,1024,1536,2048,3072,4096", metavar="N,N,...", help="matrix sizes (the buckets)")
    g.add_argument("--counts", default="1200,900,480,144,88,30", metavar="K,K,...",
                   help="samples per size (one number: the same for every size)")
    g.add_argument("--family", choices=("poisson", "aniso", "graph", "mix"), default="poisson",
                   help="poisson: variable-coefficient 2D Poisson; aniso: anisotropic diffusion; "
                   "graph: shifted random-graph Laplacian; mix: each sample draws one")
    g.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    g.add_argument("--split", default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST", help="split fractions")
    g.add_argument("--rhs", type=int, default=1, help="right-hand sides per matrix (default 1)")
    g.add_argument("--workers", type=int, default=2, help="processes building matrices (default 2)")
    g.set_defaults(handler=cmd_generate)

    i = acts.add_parser("inspect", help="show buckets, counts, sizes and provenance; --verify checks every sample",
                        description="Describe a dataset file; with --verify, read every sample and check it "
                        "(finite, square, symmetric, positive diagonal). Exit 1 if any sample is bad.")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--verify", action="store_true", help="read and check every sample")
    i.add_argument("--wide", action="store_true", help="show every column, even when the table is wider than the terminal")
    i.set_defaults(handler=cmd_inspect)

    s = acts.add_parser("subset", help="a reproducible random subset (per bucket and split, proportionally)",
                        description="Keep at most N samples, chosen by seed; every bucket and split keeps its share.")
    s.add_argument("path", metavar="PATH")
    s.add_argument("--max-samples", type=int, required=True, metavar="N", help="samples to keep in total")
    s.add_argument("--seed", type=int, required=True, help="which samples are kept")
    s.add_argument("--buckets", default=None, metavar="N,N,...", help="keep only these sizes")
    output(s)
    s.set_defaults(handler=cmd_subset)

    m = acts.add_parser("merge", help="concatenate datasets; duplicate matrices are reported and dropped",
                        description="Merge files bucket by bucket, keeping each sample's split. A matrix seen "
                        "before (same content hash) is a duplicate: reported, and dropped unless --keep-duplicates.")
    m.add_argument("paths", nargs="+", metavar="PATH")
    m.add_argument("--keep-duplicates", action="store_true", help="keep duplicate matrices (still reported)")
    output(m)
    m.set_defaults(handler=cmd_merge)

    r = acts.add_parser("split", help="re-split every bucket into train/val/test by seed",
                        description="Pool each bucket's samples and re-assign train/val/test by seed and fractions.")
    r.add_argument("path", metavar="PATH")
    r.add_argument("--seed", type=int, required=True, help="seed of the assignment")
    r.add_argument("--split", default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST", help="split fractions")
    output(r)
    r.set_defaults(handler=cmd_resplit)

    from progressive.cli import data_byo_cmds  # index, pack-arrays, generate-seq: data of any task

    data_byo_cmds.register(acts)


# --------------------------------------------------------------------------- parsing helpers

def _numbers(text: str, flag: str, kind: Callable[[str], Any]) -> list[Any]:
    try:
        values = [kind(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise DataError(f"cannot parse {text!r} as a comma-separated list of {kind.__name__}s", loc=flag,
                        hint=f"e.g. {flag} {'512,1024' if kind is int else '0.8,0.1,0.1'}") from None
    if not values:
        raise DataError("empty list", loc=flag)
    return values


def _prepare_output(args: argparse.Namespace) -> Path:
    out = Path(args.output)
    if out.exists() and not args.force:
        raise DataError("output file already exists", loc=str(out), hint="choose another -o path, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar; yields the `progress(done, total)` callback the library calls.

    While it runs, Ctrl-C, SIGTERM (scancel) and SIGHUP (a closed terminal) only set a flag, and
    the callback raises KeyboardInterrupt at its next call: the library then deletes its temp file
    and stops its workers. Raising from the signal handler itself could land anywhere, e.g. in a
    weakref callback where Python swallows it (seen in testing: the run went on and finished).
    A second signal interrupts at once.
    """
    from progressive.cli.render import console

    caught: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        caught.append(signum)
        if len(caught) > 1:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in INTERRUPT_SIGNALS}
    try:
        with _bar(label, console()) as update:
            def checked(done: int, total: int) -> None:
                if caught:
                    raise KeyboardInterrupt
                update(done, total)

            try:
                # A signal after the last call finds the work complete and the file in place: let it be.
                yield checked
            except DataError:
                if caught:  # e.g. workers killed by the same signal before they could ignore it
                    raise KeyboardInterrupt from None
                raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _bar(label: str, con: Any) -> Iterator[Callable[[int, int], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=con, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _counts_table(counts: Mapping[int, Mapping[str, int]], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("bucket n", "train", "val", "test", "total"):
        t.add_column(col, justify="right")
    for n in sorted(counts):
        c = counts[n]
        t.add_row(str(n), *(str(c.get(s, 0)) for s in ("train", "val", "test")), str(sum(c.values())))
    return t


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


# --------------------------------------------------------------------------- handlers

def cmd_generate(args: argparse.Namespace) -> int:
    """`progressive data generate`."""
    from progressive.cli.render import console
    from progressive.data.generate import generate

    sizes = _numbers(args.sizes, "--sizes", int)
    counts = _numbers(args.counts, "--counts", int)
    if len(counts) == 1:
        counts = counts * len(sizes)
    split = _numbers(args.split, "--split", float)
    out = _prepare_output(args)
    t0 = time.perf_counter()
    with _progress(f"generating {args.family}") as progress:
        result = generate(out, sizes=sizes, counts=counts, family=args.family, seed=args.seed, split=split,
                          rhs=args.rhs, workers=args.workers, overwrite=args.force, compression=args.compression,
                          progress=progress)
    con = console()
    con.print(_counts_table(result, f"{out}  ({args.family}, seed {args.seed})"))
    con.print(f"wrote {out} ({_mb(out.stat().st_size)}) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """`progressive data inspect`: exit 1 if --verify found bad samples."""
    from progressive.data.ops import inspect

    if args.verify and not args.json:
        with _progress("verifying") as progress:
            report = inspect(args.path, verify=True, progress=progress)
    else:
        report = inspect(args.path, verify=args.verify)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        _print_inspection(report, wide=args.wide)
    return 1 if report.problem_count else 0


# At 80 columns the bucket and its counts stay; the byte counts go first, then the nnz spread.
INSPECT_COLUMNS = tuple(Col(h, "right", d) for h, d in (
    ("bucket n", 0), ("train", 0), ("val", 0), ("test", 0), ("nnz min", 4), ("nnz mean", 6), ("nnz max", 5),
    ("rhs", 7), ("on disk", 3), ("raw", 1), ("ratio", 2)))


def _print_inspection(report: Any, *, wide: bool = False) -> None:
    from progressive.cli.render import console

    con = console()
    a = report.attrs
    con.print(f"[bold]{report.path}[/]  {_mb(report.file_size)}  format v{report.format_version}")
    con.print(f"family {a.get('family', '?')}  seed {a.get('seed', '?')}  created {a.get('created', '?')}  "
              f"by {a.get('generator', '?')}")
    rows = []
    for b in report.buckets:
        ratio = f"{b.raw_bytes / b.stored_bytes:.2f}x" if b.stored_bytes else "-"
        rows.append([str(b.n), *(str(b.counts[s]) for s in ("train", "val", "test")), str(b.nnz_min),
                     f"{b.nnz_mean:.0f}", str(b.nnz_max), str(b.rhs_per_sample), _mb(b.stored_bytes), _mb(b.raw_bytes),
                     ratio])
    print_table(INSPECT_COLUMNS, rows, wide=wide, con=con)
    ops = " -> ".join(str(h.get("op", "?")) for h in a.get("history", []) if isinstance(h, dict))
    if ops:
        con.print(f"history: {ops}")
    if report.verified:
        if report.problem_count:
            con.print(f"[red]{report.problem_count} of {report.checked} samples are bad[/]"
                      + (f" (first {len(report.problems)} shown)" if report.problem_count > len(report.problems) else ""))
            for p in report.problems:
                con.print(f"  {p}", markup=False)
        else:
            con.print(f"[green]verified {report.checked} samples: all finite, square, symmetric, positive diagonal[/]")


def cmd_subset(args: argparse.Namespace) -> int:
    """`progressive data subset`."""
    from progressive.cli.render import console
    from progressive.data.ops import subset

    buckets = _numbers(args.buckets, "--buckets", int) if args.buckets else None
    out = _prepare_output(args)
    with _progress("subset") as progress:
        counts = subset(args.path, out, max_samples=args.max_samples, seed=args.seed, buckets=buckets,
                        overwrite=args.force, compression=args.compression, progress=progress)
    console().print(_counts_table(counts, f"{out}  (subset of {args.path}, seed {args.seed})"))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """`progressive data merge`."""
    from progressive.cli.render import console
    from progressive.data.ops import merge

    out = _prepare_output(args)
    with _progress("merging") as progress:
        report = merge(args.paths, out, keep_duplicates=args.keep_duplicates, overwrite=args.force,
                       compression=args.compression, progress=progress)
    con = console()
    con.print(_counts_table(report.counts, f"{out}  (merge of {len(args.paths)} files)"))
    if report.duplicates:
        verb = "kept" if report.kept_duplicates else "dropped"
        con.print(f"[yellow]{report.duplicates} duplicate matrices found ({verb}):[/]")
        for line in report.examples:
            con.print(f"  {line}", markup=False)
        if report.duplicates > len(report.examples):
            con.print(f"  ... and {report.duplicates - len(report.examples)} more")
    else:
        con.print("no duplicate matrices")
    return 0


def cmd_resplit(args: argparse.Namespace) -> int:
    """`progressive data split`."""
    from progressive.cli.render import console
    from progressive.data.ops import resplit

    split = _numbers(args.split, "--split", float)
    out = _prepare_output(args)
    with _progress("re-splitting") as progress:
        counts = resplit(args.path, out, seed=args.seed, split=split, overwrite=args.force,
                         compression=args.compression, progress=progress)
    console().print(_counts_table(counts, f"{out}  (re-split of {args.path}, seed {args.seed})"))
    return 0
