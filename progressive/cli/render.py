"""Shared output helpers for the CLI: consoles, error reports, and tables that fit the terminal."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Literal, Sequence

from progressive.errors import ProgressiveError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


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


def print_next(*commands: str) -> None:
    """The commands a user types next, one a line (copyable: no markup, no wrapping)."""
    con = console()
    con.print("next:", style="bold")
    for cmd in commands:
        con.print(f"  {cmd}", markup=False, soft_wrap=True)


@dataclass(frozen=True)
class Col:
    """One column of a table that must fit the terminal.

    `drop` orders the columns given up when the table is too wide (1 goes first; 0 never: the
    name columns). A column is never cut: it is shown whole, or left out and named in a note.
    """

    header: str
    justify: Literal["left", "right"] = "left"
    drop: int = 0
    fold: bool = False  # when the table is too wide, first try this header over two lines


def print_table(columns: Sequence[Col], rows: Sequence[Sequence[str]], *, title: str | None = None,
                wide: bool = False, wide_flag: str | None = "--wide", con: "Console | None" = None) -> list[str]:
    """Print a table whose columns fit the console width, whole; return the headers left out.

    Columns go, in their `drop` order, until the table fits; a dim note then names them and the
    flag that shows them (`wide_flag`). With `wide`, every column is shown at its full width even
    if the lines run past the terminal's edge.
    """
    from rich.measure import Measurement
    from rich.text import Text

    con = con or console()
    unbounded = con.options.update_width(100_000)  # the table's natural width, not the console's

    def natural(t: "Table") -> int:
        return Measurement.get(con, unbounded, t).maximum

    keep = list(range(len(columns)))
    table = _table(columns, rows, keep, title)
    if not wide and natural(table) > con.width and any(c.fold for c in columns):
        columns = [replace(c, header=fold_header(c.header)) if c.fold else c for c in columns]
        table = _table(columns, rows, keep, title)
    if not wide:
        order = sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: columns[i].drop)
        while order and natural(table) > con.width:
            keep.remove(order.pop(0))
            table = _table(columns, rows, keep, title)
    if wide and natural(table) > con.width:
        # print(width=...) is capped at the console's width: widen the console for this one table.
        width = con.width
        con.width = natural(table)
        try:
            con.print(table, crop=False)
        finally:
            con.width = width
    else:
        con.print(table)
    hidden = [c.header.replace("\n", " ").split(" (")[0] for i, c in enumerate(columns) if i not in keep]
    if hidden and wide_flag:
        con.print(Text(f"not shown at {con.width} columns: {', '.join(hidden)} (see {wide_flag})", style="dim"))
    return hidden


def fold_header(header: str) -> str:
    """`learned iters` -> `learned\\niters`: a header over two lines, split at the space nearest its middle."""
    words = header.split(" ")
    if len(words) < 2:
        return header
    cut = min(range(1, len(words)), key=lambda i: abs(len(" ".join(words[:i])) - len(" ".join(words[i:]))))
    return " ".join(words[:cut]) + "\n" + " ".join(words[cut:])


def _table(columns: Sequence[Col], rows: Sequence[Sequence[str]], keep: list[int], title: str | None) -> "Table":
    from rich.table import Table

    t = Table(title=title, header_style="bold")
    for i in keep:
        # no_wrap everywhere: a column is shown whole or not at all, never folded or cut with "…".
        t.add_column(columns[i].header, justify=columns[i].justify, no_wrap=True)
    for row in rows:
        t.add_row(*(row[i] for i in keep))
    return t
