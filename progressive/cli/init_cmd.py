"""`progressive init`: write a starter stages.toml (and sweep.toml) here and say what to type next."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from progressive.cli.render import console, print_next


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `init`."""
    p = sub.add_parser("init", help="write a commented starter stages.toml (and sweep.toml) into this folder",
                       description="Write a commented stages.toml for a built-in task, with data/, jobs/ and "
                       "checkpoints/ relative to the folder, and print the next three commands.")
    p.add_argument("--task", choices=("precond", "seqlm"), default="precond",
                   help="precond: a learned preconditioner on sparse matrices (default); seqlm: a tiny language model")
    p.add_argument("--sweep", action="store_true", help="also write a sweep.toml over the stages")
    p.add_argument("--dir", default=".", metavar="DIR", help="the folder to write into (default: this one)")
    p.add_argument("--force", action="store_true", help="replace files that exist")
    p.set_defaults(handler=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    """Handler of `progressive init`."""
    from progressive.cli.plan_cmds import rel
    from progressive.starter import next_commands, write_starter

    folder = Path(args.dir)
    written = write_starter(folder, args.task, sweep=args.sweep, force=args.force)
    console().print(f"wrote {', '.join(rel(p) for p in written)}", markup=False)
    commands = next_commands(args.task, sweep=args.sweep)
    if folder.resolve() != Path.cwd().resolve():
        commands = [f"cd {shlex.quote(rel(folder))}", *commands]
    print_next(*commands)
    return 0
