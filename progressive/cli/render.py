"""Shared output helpers for the CLI: consoles and error reports."""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from typing import TYPE_CHECKING

from progressive.errors import ProgressiveError

if TYPE_CHECKING:
    from rich.console import Console


@lru_cache(maxsize=None)
def console() -> "Console":
    """The stdout console (rich, imported on first use)."""
    return _new_console(stderr=False)


@lru_cache(maxsize=None)
def err_console() -> "Console":
    """The stderr console."""
    return _new_console(stderr=True)


def _new_console(*, stderr: bool) -> "Console":
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich would exit 1 here; `main` ends every closed pipe the same way (quietly, 141).
            self.quiet = True
            raise BrokenPipeError

    return _Console(stderr=stderr, highlight=False, width=_width())


def _width() -> int | None:
    """Rich assumes 80 columns when piped; plan tables are wider, so use 160 unless told."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return 160


def report_error(exc: ProgressiveError) -> None:
    """Print `loc: msg` and the hint on stderr, without markup surprises."""
    from rich.text import Text

    text = Text("error: ", style="bold red")
    text.append(str(exc.loc) + ": " if exc.loc else "")
    text.append(exc.msg)
    err_console().print(text, soft_wrap=True)
    if exc.hint:
        err_console().print(Text("  hint: ", style="yellow") + Text(exc.hint), soft_wrap=True)
