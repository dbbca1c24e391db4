"""Errors the library raises and the CLI reports.

The library never prints: it raises one of these with a location (`loc`), what is
wrong (`msg`) and how to fix it (`hint`). The CLI turns them into `loc: msg` lines
and an exit code (fastapi-cli style).
"""

from __future__ import annotations


class ProgressiveError(Exception):
    """Base class of every error a user may see.

    Attributes:
        msg: what is wrong, one sentence.
        loc: where: a file, a file and key, a stage, a job.
        hint: how to fix it.
        exit_code: the process exit code the CLI uses.
    """

    exit_code: int = 1

    def __init__(self, msg: str, *, loc: str | None = None, hint: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.loc = loc
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.loc}: {self.msg}" if self.loc else self.msg
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ConfigError(ProgressiveError):
    """The stage graph file is invalid (exit 2, like a usage error)."""

    exit_code = 2


class DataError(ProgressiveError):
    """A dataset file is missing, corrupt, or lacks what a stage needs."""

    exit_code = 2


class CheckpointError(ProgressiveError):
    """A checkpoint is missing, corrupt, or belongs to a different stage config."""


class SlurmError(ProgressiveError):
    """Slurm refused a command: carries the command that was run and Slurm's words."""

    def __init__(self, msg: str, *, cmd: list[str] | None = None, output: str = "", hint: str | None = None) -> None:
        detail = msg
        if cmd:
            detail += f"\n  command: {' '.join(cmd)}"
        if output.strip():
            detail += "\n  slurm said: " + output.strip().replace("\n", "\n    ")
        super().__init__(detail, loc="slurm", hint=hint)
        self.cmd = cmd or []
        self.output = output


class RunError(ProgressiveError):
    """A run record is missing, locked, or inconsistent with the request."""


class MissingDependencyError(ProgressiveError):
    """An optional dependency (an extra such as `progressive[report]`) is not installed."""


class TrackingError(ProgressiveError):
    """A tracker's own tool (e.g. `wandb sync`) refused: carries the command that was run and its words."""

    def __init__(self, msg: str, *, cmd: list[str], output: str = "", hint: str | None = None) -> None:
        detail = msg + f"\n  command: {' '.join(cmd)}"
        if output.strip():
            detail += "\n  it said: " + output.strip()[-2000:].replace("\n", "\n    ")
        super().__init__(detail, loc="sync", hint=hint)
        self.cmd, self.output = cmd, output
