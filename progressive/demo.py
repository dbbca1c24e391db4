"""The demo's built-in stage graph: shipped inside the package, its files kept in the current folder.

`progressive demo` without `-c` runs `progressive/examples/tiny.toml`, a copy of the repository's
`examples/tiny.toml` (a test keeps the two identical). The copy lives in the package so the demo
works from an installed wheel, where there is no repository around it; it is read with
`importlib.resources`, so nothing depends on where the package sits on disk.

Its relative `[run]` paths are written for the repository layout (`../data` from `examples/`), and
resolving them against the package folder would put the demo's data and runs into site-packages
(or into the source tree of an editable install). The demo instead keeps them under the folder it
was started from: `data/`, `jobs/` and `checkpoints/` there.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from progressive.config import GraphConfig, parse_config

# Inside the package; declared as package data in pyproject.toml.
BUILTIN_GRAPH = ("examples", "tiny.toml")


def builtin_graph_text() -> str:
    """The text of the packaged tiny graph."""
    return resources.files("progressive").joinpath(*BUILTIN_GRAPH).read_text(encoding="utf-8")


def builtin_graph_path() -> Path:
    """Where the packaged graph is (for display and the run record: nothing is read relative to it)."""
    return Path(str(resources.files("progressive").joinpath(*BUILTIN_GRAPH)))


def builtin_graph(workdir: Path) -> tuple[GraphConfig, str]:
    """The packaged tiny graph with its data, jobs and checkpoints under `workdir`, and its text.

    The `[run]` paths become absolute paths below `workdir` (the data file keeps its name), so
    the plan resolves them there whatever folder the graph itself sits in.
    """
    text = builtin_graph_text()
    cfg = parse_config(text, source=str(builtin_graph_path()))
    workdir = workdir.resolve()
    run = cfg.run.model_copy(update={
        "data": str(workdir / "data" / Path(cfg.run.data).name),
        "jobs": str(workdir / "jobs"),
        "checkpoints": str(workdir / "checkpoints"),
    })
    return cfg.model_copy(update={"run": run}), text
