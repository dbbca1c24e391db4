"""The command line: the only part of progressive that prints.

Commands live in small modules (`plan_cmds`, `data_cmds`, `run_cmds`), each with a
`register(subparsers)` that adds its subcommands; a handler returns an exit code.
The library raises `ProgressiveError`; `main` reports it as `loc: msg` (plus a hint)
on stderr and exits with its code, without a traceback. argparse (stdlib) rather than
a CLI framework: `--help`, `plan` and `status` must answer fast on a login node, and
typer/click added ~80 ms of imports in our measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

# pydantic scans every installed package's entry points for plugins when the first
# model class is built (~30 ms): a CLI that must start fast on a login node opts out.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from progressive import __version__
from progressive.errors import ProgressiveError

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The full parser, every command registered."""
    from progressive.cli import (
        calibrate_cmds,
        data_cmds,
        doctor_cmds,
        init_cmd,
        plan_cmds,
        report_cmd,
        run_cmds,
        runs_cmd,
        sweep_cmds,
        sync_cmds,
    )

    parser = argparse.ArgumentParser(
        prog="progressive",
        description="Train one model through a curriculum of stages on Slurm (or on this machine), "
        "surviving time limits: plan, submit, watch, resume.",
    )
    parser.add_argument("--version", action="version", version=f"progressive {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (init_cmd, plan_cmds, calibrate_cmds, run_cmds, runs_cmd, sweep_cmds, report_cmd, data_cmds,
                   doctor_cmds, sync_cmds):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `progressive` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
        return code
    except ProgressiveError as exc:
        from progressive.cli.render import report_error

        report_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `progressive status --json | head -1`: the reader left, which is no error of ours.
        _silence_stdout()
        return SIGPIPE_EXIT


SIGPIPE_EXIT = 141  # what a shell reports for a process killed by SIGPIPE (128 + 13)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor (tests, IDEs)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
