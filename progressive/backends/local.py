"""The local backend: run a graph's stages on this machine, one after another, in this process.

Same trainer, checkpoints and run record as on Slurm. Ctrl-C (SIGINT) or SIGTERM asks
the trainer to stop after its current optimizer step; it saves a checkpoint and the
stage is recorded as "stopped", so `progressive resume` continues from there.

A local stage has no scheduler to ask, so the runner writes its state into the record
itself, with who it is (pid, host, process start time, boot id). A runner that died
without a word (SIGKILL, the OOM killer, a reboot) cannot record anything: `query`
notices that its process is gone and reports the stage as stopped, which `resume`
continues from its last checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from progressive import record
from progressive.backends.base import Backend, JobInfo
from progressive.errors import RunError
from progressive.layout import is_complete
from progressive.plan import Plan, StagePlan
from progressive.record import Runner, RunRecord
from progressive.signals import INTERRUPT_SIGNALS, StopFlag
from progressive.states import StageState
from progressive.units import now_iso

Progress = Callable[[str, dict[str, Any]], None]
StageEvent = Callable[[str, str, Any], None]


class LocalBackend(Backend):
    """Stages run by `run_local` in the calling process; state and runner identity in the record."""

    name = "local"
    runs_in_process = True

    def ensure_available(self) -> None:
        """This machine can always run a stage."""

    def check_plan(self, plan: Plan) -> None:
        wide = [st for st in plan.stages if st.world_size > 1]
        if wide:
            raise RunError(f"stage(s) {', '.join(st.name for st in wide)} ask for {wide[0].world_size} processes",
                           loc="--local", hint="local mode runs one process per stage: set tasks_per_node = 1 and nodes = 1")

    def render(self, plan: Plan, stage: StagePlan) -> str:
        return f"# stage {stage.name} runs in this process (progressive submit --local / resume)\n"

    def submit(self, plan: Plan, stage: StagePlan, script: str, dependency: str | None) -> str:
        raise RunError("the local backend runs stages in this process; it queues nothing", loc="submit",
                       hint="use run_local(record)")

    def query(self, rec: RunRecord) -> Mapping[str, JobInfo]:
        out: dict[str, JobInfo] = {}
        for name, srec in rec.stages.items():
            if srec.local_state is None:
                continue
            state = StageState(srec.local_state)
            reason = ""
            if state is StageState.RUNNING and srec.runner is not None:
                alive = runner_alive(srec.runner)
                if alive is False:
                    state = StageState.STOPPED
                    reason = (f"its runner (pid {srec.runner.pid} on {srec.runner.host}) ended without a word "
                              "(killed, out of memory, or a reboot)")
                elif alive is None:
                    reason = f"running on {srec.runner.host} (cannot be checked from {socket.gethostname()})"
            job = f"pid {srec.runner.pid}" if srec.runner else ""
            out[name] = JobInfo(job_id=job, state=state, native_state=srec.local_state, reason=reason, source="runner")
        return out

    def cancel(self, rec: RunRecord, stages: Sequence[str]) -> list[str]:
        """SIGTERM the live runners of these stages on this host (each checkpoints and stops)."""
        done: list[str] = []
        for name in stages:
            runner = rec.stage_record(name).runner
            if rec.stage_record(name).local_state == StageState.RUNNING and runner and runner_alive(runner):
                os.kill(runner.pid, signal.SIGTERM)
                done.append(f"pid {runner.pid}")
        return done


def unhonoured_requests(plan: Plan, *, gpus: int, mem_mb: int | None) -> list[str]:
    """The Slurm requests of `plan` that this machine (`gpus` devices, `mem_mb` of memory) cannot honour.

    Local mode runs each stage in this one process on what the machine has: a stage written for a
    GPU node runs on the CPU here (for hours, perhaps), and nothing caps its memory.
    """
    out: list[str] = []
    for st in plan.stages:
        want = st.slurm.gpus_per_node
        if want and gpus == 0:
            out.append(f"stage {st.name!r} asks for {want} GPU(s) per node; this machine has none, "
                       "so local mode trains it on the CPU (much slower)")
        elif want > 1:
            out.append(f"stage {st.name!r} asks for {want} GPUs per node; local mode trains on one")
        if st.slurm.mem and mem_mb and st.slurm.mem > mem_mb:
            out.append(f"stage {st.name!r} asks for {_mb(st.slurm.mem)} of memory; this machine has "
                       f"{_mb(mem_mb)}, and local mode cannot reserve any")
    return out


def _mb(mb: int) -> str:
    return f"{mb / 1024:.3g}G" if mb >= 1024 else f"{mb}M"


# ------------------------------------------------------------------ who runs a stage

def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22 of stat; the list starts at 3


def this_runner() -> Runner:
    """The identity of the current process, as recorded for a local stage."""
    pid = os.getpid()
    return Runner(pid=pid, host=socket.gethostname(), started_at=now_iso(), start_ticks=_start_ticks(pid),
                  boot_id=_boot_id())


def runner_alive(r: Runner) -> bool | None:
    """True if the recorded runner process still runs, False if it is gone, None if it runs on another host."""
    if r.host != socket.gethostname():
        return None
    if r.boot_id and _boot_id() and r.boot_id != _boot_id():
        return False  # the machine rebooted since
    try:
        os.kill(r.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's: the start time below decides
    fields = _proc_stat(r.pid)
    if fields is None:
        return os.path.exists(f"/proc/{r.pid}") or not os.path.isdir("/proc")
    if fields[0] in ("Z", "X"):
        return False  # killed, not yet reaped by its parent
    return r.start_ticks is None or _start_ticks(r.pid) == r.start_ticks  # else: the pid was reused


# ------------------------------------------------------------------ the runner

def run_local(rec: RunRecord, *, on_progress: Optional[Progress] = None,
              on_stage: Optional[StageEvent] = None) -> dict[str, str]:
    """Run every incomplete stage of a local run in dependency order; return {stage: final state}.

    Stops at the first stage that is interrupted or fails (its dependents cannot start).
    `on_progress(stage, metrics)` gets each optimizer step's metrics; `on_stage(stage, event, outcome)`
    gets "start", "completed", "stopped" and "failed" events.
    """
    from progressive.trainer import train_stage

    if rec.mode != LocalBackend.name:
        raise RunError(f"run {rec.run_name!r} was submitted to Slurm", loc="--local",
                       hint=f"use `progressive resume {rec.run_name}` without --local")
    results: dict[str, str] = {}
    with StopFlag().installed(*INTERRUPT_SIGNALS) as flag:
        for st in rec.plan.stages:
            if is_complete(st.final_checkpoint):
                results[st.name] = StageState.COMPLETED.value
                continue
            _set_state(rec, st.name, StageState.RUNNING, this_runner())
            if on_stage:
                on_stage(st.name, "start", None)
            handler = _file_logger(rec.layout.stage(st.name).local_log)
            forward: Callable[[dict[str, Any]], None] | None = None
            if on_progress is not None:
                forward = functools.partial(on_progress, st.name)
            try:
                outcome = train_stage(rec.plan, st, stop_requested=flag, on_progress=forward)
            except Exception as exc:  # a ProgressiveError or a bug in the task: recorded, then re-raised
                _set_state(rec, st.name, StageState.FAILED, None)
                if on_stage:
                    on_stage(st.name, "failed", exc)
                raise
            finally:
                logging.getLogger().removeHandler(handler)
                handler.close()
            state = StageState.COMPLETED if outcome.status == "completed" else StageState.STOPPED
            _set_state(rec, st.name, state, None)
            results[st.name] = state.value
            if on_stage:
                on_stage(st.name, state.value, outcome)
            if state is not StageState.COMPLETED:
                break
    return results


def _set_state(rec: RunRecord, stage: str, state: StageState, runner: Runner | None) -> None:
    with record.locked(rec.run_dir):
        fresh = record.load(rec.run_dir)
        srec = fresh.stages.setdefault(stage, record.StageRecord())
        srec.local_state, srec.runner = state.value, runner
        record.save(fresh)
    srec = rec.stages.setdefault(stage, record.StageRecord())
    srec.local_state, srec.runner = state.value, runner


def _file_logger(path: Path) -> logging.Handler:
    """Send the trainer's log lines to the stage's local.log (what `progressive logs` shows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler
