"""`progressive data index|pack-arrays|generate-seq`: counts for any task's data, and the dense-array layout.

Registered into the `data` group by `data_cmds.register`. Heavy imports (numpy, and for
`index` the task with torch) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

from progressive.errors import DataError


def register(acts: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add index, pack-arrays and generate-seq to the `data` group."""
    i = acts.add_parser("index", help="ask the graph's task for every bucket's size; write <data>.counts.json for plan",
                        description="Import the task of the graph (and torch), count each bucket of the graph and "
                        "each split with Task.count or len(Task.dataset(...)), and write the count index "
                        "<data>.counts.json next to the data, which `plan` reads without importing torch. "
                        "Run it again when the data changes (plan says when it is stale).")
    i.add_argument("-c", "--config", default="stages.toml", metavar="PATH", help="the stage graph (default: stages.toml)")
    i.add_argument("--json", action="store_true", help="print the counts as JSON")
    i.set_defaults(handler=cmd_index)

    p = acts.add_parser("pack-arrays", help="pack numpy arrays (train_64, val_64, ...) into the dense-array layout",
                        description="Write per-sample arrays (token sequences, features) as a dense-array dataset "
                        "folder: <out>/arrays.json plus <bucket>/<split>.npy. Inputs are .npz files whose arrays are "
                        "named <split>_<bucket> (e.g. train_64, val_64) or .npy files named that way; each array has "
                        "shape (samples, ...). The folder is written under a temp name and renamed at the end.")
    p.add_argument("inputs", nargs="+", metavar="FILE", help=".npz or .npy files")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the dataset folder to write")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.set_defaults(handler=cmd_pack)

    g = acts.add_parser("generate-seq", help="generate synthetic token sequences (one bucket per length), by seed",
                        description="Token sequences with learnable structure (a topic token, then that topic's "
                        "Markov chain), in the dense-array layout. The same seed gives the same data.")
    g.add_argument("-o", "--output", default="data/seq", metavar="DIR", help="the folder to write (default: data/seq)")
    g.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    g.add_argument("--lengths", default="64,128,256", metavar="L,L,...", help="sequence lengths (the buckets)")
    g.add_argument("--counts", default="640,320,160", metavar="K,K,...", help="sequences per length (or one for all)")
    g.add_argument("--vocab", type=int, default=16, help="token ids 0..vocab-1 (default 16)")
    g.add_argument("--topics", type=int, default=4, help="topic tokens, each with its own Markov chain (default 4)")
    g.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    g.add_argument("--split", default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST", help="split fractions")
    g.set_defaults(handler=cmd_generate_seq)


def _ints(text: str, flag: str, kind: type = int) -> list[Any]:
    try:
        values = [kind(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise DataError(f"cannot parse {text!r} as a comma-separated list of {kind.__name__}s", loc=flag) from None
    if not values:
        raise DataError("empty list", loc=flag)
    return values


def _table(counts: Mapping[int, Mapping[str, int]], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("bucket", "train", "val", "test"):
        t.add_column(col, justify="right")
    for b in sorted(counts):
        row = [str(counts[b].get(s, 0)) for s in ("train", "val", "test")]
        t.add_row(str(b), *[f"[red]{v}[/]" if v == "0" and s == "train" else v for s, v in zip(("train", "val", "test"), row)])
    return t


def cmd_index(args: argparse.Namespace) -> int:
    """`progressive data index`: exit 1 when a bucket has no training samples (the index is still written)."""
    from progressive.cli.render import console
    from progressive.data.counts import describe, index_data

    path, counts = index_data(args.config)
    empty = [b for b in sorted(counts) if counts[b]["train"] == 0]
    if args.json:
        print(json.dumps({"index": str(path), "counts": describe(counts)}, indent=2))
    else:
        con = console()
        con.print(_table(counts, f"{path}"))
        con.print(f"wrote {path}; `progressive plan -c {args.config}` now shows these counts")
        if empty:
            con.print(f"[red]bucket {', '.join(map(str, empty))} has no training samples: submit will refuse "
                      "the stages that train on it[/]")
    return 1 if empty else 0


def cmd_pack(args: argparse.Namespace) -> int:
    """`progressive data pack-arrays`."""
    from progressive.cli.render import console
    from progressive.data.arrays import load_npz_inputs, write_arrays

    arrays = load_npz_inputs(args.inputs)
    counts = write_arrays(args.output, arrays, force=args.force,
                          source={"packed_from": [Path(p).name for p in args.inputs]})
    con = console()
    con.print(_table(counts, f"{args.output}  (packed from {len(args.inputs)} file(s))"))
    con.print(f"wrote {args.output}")
    return 0


def cmd_generate_seq(args: argparse.Namespace) -> int:
    """`progressive data generate-seq`."""
    from progressive.cli.render import console
    from progressive.data.seqgen import generate_sequences

    counts = generate_sequences(args.output, lengths=_ints(args.lengths, "--lengths"), counts=_ints(args.counts, "--counts"),
                                seed=args.seed, vocab=args.vocab, topics=args.topics,
                                split=_ints(args.split, "--split", float), force=args.force)
    con = console()
    con.print(_table(counts, f"{args.output}  (token sequences, vocab {args.vocab}, seed {args.seed})"))
    con.print(f"wrote {args.output}")
    return 0
