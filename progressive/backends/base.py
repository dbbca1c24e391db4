"""The execution backend interface: where a stage's job runs, and how we ask about it.

A backend renders a stage's job (the exact script, for a scheduler), submits it,
queries its state and cancels it. `progressive.runs` and `progressive.status` work
over this interface only, so a run does not care whether Slurm or this machine runs
it; each backend module is the only one that knows its scheduler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Mapping, Sequence

from progressive.states import StageState

if TYPE_CHECKING:
    from progressive.plan import Plan, StagePlan
    from progressive.record import RunRecord


@dataclass(frozen=True)
class JobInfo:
    """What the backend says about a stage's current job."""

    job_id: str
    state: StageState  # ours
    native_state: str  # the scheduler's own word, e.g. Slurm's "TIMEOUT" (shown verbatim)
    reason: str = ""
    elapsed: str = ""  # [D-]H:MM:SS
    source: str = ""  # where it came from: "sacct", "squeue", "scontrol", "runner"


class Backend(ABC):
    """Render, submit, query and cancel stage jobs on one kind of executor."""

    #: the name stored in the run record (`RunRecord.mode`)
    name: ClassVar[str]
    #: True when stages run inside the calling process (nothing is queued to run later)
    runs_in_process: ClassVar[bool] = False

    @abstractmethod
    def ensure_available(self) -> None:
        """Raise RunError (with a hint) when this backend cannot run jobs on this machine."""

    def check_plan(self, plan: "Plan") -> None:
        """Raise RunError when the plan asks for something this backend cannot do (default: nothing)."""

    @abstractmethod
    def render(self, plan: "Plan", stage: "StagePlan") -> str:
        """The exact job script of `stage`, its dependency on parents shown symbolically."""

    @abstractmethod
    def submit(self, plan: "Plan", stage: "StagePlan", script: str, dependency: str | None) -> str:
        """Submit the rendered `script` of `stage` after `dependency` (None: none); return the job id."""

    @abstractmethod
    def query(self, rec: "RunRecord") -> Mapping[str, JobInfo]:
        """{stage name: JobInfo} for the stages of `rec` that have a job the backend can see."""

    @abstractmethod
    def cancel(self, rec: "RunRecord", stages: Sequence[str]) -> list[str]:
        """Stop the current jobs of these stages (each checkpoints); return what was cancelled."""
