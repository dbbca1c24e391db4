"""The Slurm backend: render, submit, query and cancel stage jobs. The only module that imports submitit.

One function decides each stage's sbatch parameters (`sbatch_parameters`); `render`
turns them into the script once, and `submit` hands sbatch exactly that text (our
executor's submission-file hook returns it), with only the dependency line bound to
real job ids. So what `plan --dry-run` shows is what Slurm receives (a test compares
the two on the real cluster). States from sacct (or squeue/scontrol when accounting is
off) map to ours through `progressive.states`. Commands run as argument lists, never
through a shell, so no user string reaches a shell.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from progressive.backends.base import Backend, JobInfo
from progressive.devices import CUBLAS_WORKSPACE
from progressive.errors import RunError, SlurmError
from progressive.plan import Plan, StagePlan
from progressive.states import StageState, from_slurm
from progressive.units import hms

if TYPE_CHECKING:
    import submitit

    from progressive.record import RunRecord

# submitit is imported where it is used: `status` only needs sacct/squeue and must start fast.

DEPENDENCY_RE = re.compile(r"^#SBATCH --dependency=.*\n", re.MULTILINE)


def slurm_available() -> bool:
    """True when this machine has the Slurm client commands."""
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


class SlurmBackend(Backend):
    """Stage jobs as sbatch scripts rendered by submitit, chained by afterok, queried with sacct."""

    name = "slurm"

    def ensure_available(self) -> None:
        if not slurm_available():
            raise RunError("Slurm is not available on this machine (no sbatch/srun on PATH)", loc="submit",
                           hint="run the graph here with `progressive submit --local`")

    def render(self, plan: Plan, stage: StagePlan) -> str:
        return render_script(plan, stage)

    def submit(self, plan: Plan, stage: StagePlan, script: str, dependency: str | None) -> str:
        return submit_script(plan, stage, with_dependency(script, dependency))

    def query(self, rec: "RunRecord") -> Mapping[str, JobInfo]:
        ids = {name: s.job_id for name, s in rec.stages.items() if s.job_id}
        if not ids or not slurm_available():
            return {}
        infos = query(list(ids.values()))
        return {name: infos[j] for name, j in ids.items() if j in infos}

    def cancel(self, rec: "RunRecord", stages: Sequence[str]) -> list[str]:
        ids = [j for j in (rec.stage_record(n).job_id for n in stages) if j]
        cancel(ids)
        return ids


@lru_cache(maxsize=None)
def _executor_class() -> type["submitit.SlurmExecutor"]:
    import submitit

    class _Executor(submitit.SlurmExecutor):
        """submitit's Slurm executor with two of its plugin hooks set.

        `affinity`: constructible where srun is absent (to render dry-runs). Submitting
        still needs Slurm; `submit_script` checks that first.
        `_make_submission_file_text`: the script submitted is the one we rendered, not a new rendering.
        """

        script: str | None = None

        @classmethod
        def affinity(cls) -> int:
            return 2

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            if self.script is None:  # only `render_script` builds the text
                return super()._make_submission_file_text(command, uid)
            return self.script

    return _Executor


def sbatch_parameters(plan: Plan, stage: StagePlan, dependency: str | None) -> dict[str, Any]:
    """submitit parameters for one stage job. `dependency` is e.g. "afterok:123" or None."""
    s = stage.slurm
    params: dict[str, Any] = {
        "job_name": f"{plan.run_name}.{stage.name}",  # both validated names: safe as a job name
        "time": stage.time_limit_min,
        "nodes": s.nodes,
        "ntasks_per_node": s.tasks_per_node,
        "cpus_per_task": s.cpus_per_task,
        "signal_delay_s": s.signal_delay,
        "stderr_to_stdout": False,
    }
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem:
        params["mem"] = f"{s.mem}M"
    if dependency:
        params["dependency"] = dependency
    if s.nodes * s.tasks_per_node > 1:
        # One rank dying must end the others at once, not leave them blocked in a collective
        # until the process-group timeout (srun's default lets the other tasks run on; gloo
        # notices a peer that exited, NCCL may not).
        params["srun_args"] = ["--kill-on-bad-exit=1"]
    setup = [f"export SUBMITIT_PREEMPT_SIGNAL={s.signal}"]
    if s.gpus_per_node:
        # Fewer OOMs from fragmentation when bucket sizes change between stages.
        setup.append("export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    if stage.train.deterministic:
        # cuBLAS reads it when CUDA starts: too late to set from inside the trainer on every site.
        setup.append(f"export CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE}")
    params["setup"] = setup + list(s.setup)
    # Our signal and delay (submitit's own is fixed at import), requeue-able on node
    # failure, and the extra options the user asked for, last so they win.
    extra: dict[str, Any] = {"signal": f"{s.signal}@{s.signal_delay}", "requeue": True}
    extra.update(s.extra)
    params["additional_parameters"] = extra
    return params


def executor(plan: Plan, stage: StagePlan, dependency: str | None = None) -> "submitit.SlurmExecutor":
    """The submitit executor configured for `stage` (shared by render and submit)."""
    ex = _executor_class()(folder=plan.layout.submitit_folder, max_num_timeout=stage.slurm.max_requeues)
    ex.update_parameters(**sbatch_parameters(plan, stage, dependency))
    return ex


def symbolic_dependency(stage: StagePlan) -> str | None:
    """The afterok dependency with parents' job ids shown as <stage> (for dry-runs)."""
    return "afterok:" + ":".join(f"<{p}>" for p in stage.depends_on) if stage.depends_on else None


def render_script(plan: Plan, stage: StagePlan) -> str:
    """The exact sbatch script of `stage`, its dependency shown as afterok:<parent> (what submit binds)."""
    ex = executor(plan, stage, symbolic_dependency(stage))
    return ex._make_submission_file_text(ex._submitit_command_str, uid="render")


def with_dependency(script: str, dependency: str | None) -> str:
    """`script` with its dependency line set to `dependency` (removed for None); nothing else changes."""
    line = f"#SBATCH --dependency={shlex.quote(dependency)}\n" if dependency else ""  # as submitit writes it
    if DEPENDENCY_RE.search(script):
        return DEPENDENCY_RE.sub(lambda _: line, script, count=1)
    if not line:
        return script
    # No parents at render time, one now (a resume chaining behind a live job): first #SBATCH line.
    head, sep, rest = script.partition("#SBATCH ")
    return head + line + sep + rest


def submit_script(plan: Plan, stage: StagePlan, script: str) -> str:
    """Submit `script` (rendered by `render_script`) as `stage`'s job; return its job id or raise SlurmError."""
    if not slurm_available():
        raise SlurmError("Slurm is not available on this machine (no sbatch/srun on PATH)",
                         hint="run the graph here with `progressive submit --local`")
    from submitit.core import utils as submitit_utils

    from progressive.job import run_stage_job

    ex = executor(plan, stage)
    ex.script = script  # type: ignore[attr-defined]
    # submitit prints sbatch's stderr itself; we report it once, in our own words.
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            job = ex.submit(run_stage_job, plan.run_dir, stage.name)
        except submitit_utils.FailedJobError as exc:
            cause = exc.__cause__
            cmd = list(getattr(cause, "cmd", ["sbatch"]))
            out = getattr(cause, "stderr", "") or str(exc)
            raise SlurmError(f"sbatch refused stage {stage.name!r}", cmd=[str(c) for c in cmd], output=out) from None
        except submitit_utils.FailedSubmissionError as exc:
            raise SlurmError(f"could not read sbatch's answer for stage {stage.name!r}", cmd=["sbatch"], output=str(exc)) from None
    return str(job.job_id)


def run(cmd: Sequence[str], *, timeout: float = 30, check: bool = True) -> str:
    """Run a Slurm command (argument list, no shell) and return stdout; SlurmError with its words on failure."""
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found", cmd=list(cmd), hint="is Slurm installed and on PATH?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{cmd[0]} did not answer within {timeout:.0f} s", cmd=list(cmd)) from None
    if check and res.returncode != 0:
        raise SlurmError(f"{cmd[0]} failed (exit {res.returncode})", cmd=list(cmd), output=res.stderr or res.stdout)
    return res.stdout


def cancel(job_ids: Sequence[str]) -> None:
    """scancel these jobs (ignoring ones Slurm no longer knows)."""
    if job_ids:
        run(["scancel", *job_ids], check=False)


def requeue(job_id: str) -> None:
    """Put a running job back in the queue under the same id (keeps afterok edges valid)."""
    run(["scontrol", "requeue", job_id], timeout=60)


def being_preempted(job_id: str) -> bool:
    """True while Slurm is preempting this running job (inside the partition's GraceTime).

    Measured on Slurm 22.05: a job being preempted shows `JobState=RUNNING` with a
    `PreemptTime`; after `scancel` it shows `JobState=COMPLETING` (or CANCELLED) with
    `PreemptTime=None`; an administrator's `scontrol requeue` also leaves it COMPLETING.
    So this tells a preemption from a cancel without any marker of our own.
    Raises SlurmError (with Slurm's words) when scontrol does not answer.
    """
    fields = _parse_fields(run(["scontrol", "show", "job", "-o", job_id], timeout=20))
    return fields.get("JobState") == "RUNNING" and fields.get("PreemptTime", "None") not in ("None", "", "Unknown")


def query(job_ids: Sequence[str]) -> dict[str, JobInfo]:
    """States of these jobs: sacct first, squeue/scontrol where accounting is off or lagging."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    infos = _from_sacct(ids)
    missing = [j for j in ids if j not in infos or infos[j].state in (StageState.PENDING, StageState.UNKNOWN)]
    if missing:
        infos.update(_from_squeue(missing))
    still = [j for j in ids if j not in infos]
    for j in still:
        info = _from_scontrol(j)
        if info:
            infos[j] = info
    return infos


def parse_rows(out: str, source: str) -> Iterator[JobInfo]:
    """JobInfos from `JobID|State|Reason|Elapsed` rows (sacct -P, or squeue -o "%i|%T|%r|%M")."""
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) >= 4:
            jid, st, reason, elapsed = parts[:4]
            yield _info(jid, st, reason, elapsed, source)


def _from_sacct(ids: Sequence[str]) -> dict[str, JobInfo]:
    try:
        out = run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "--format", "JobID,State,Reason,Elapsed"], timeout=20)
    except SlurmError:
        return {}  # accounting off or slurmdbd down: fall back
    return {i.job_id: i for i in parse_rows(out, "sacct") if i.job_id in ids}


def _from_squeue(ids: Sequence[str]) -> dict[str, JobInfo]:
    try:
        out = run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r|%M"], timeout=20)
    except SlurmError:
        return {}  # squeue errors for ids that have left the queue
    return {i.job_id: i for i in parse_rows(out, "squeue") if i.job_id in ids}


def _scontrol_fields(job_id: str) -> dict[str, str]:
    try:
        out = run(["scontrol", "show", "job", "-o", job_id], timeout=20)
    except SlurmError:
        return {}
    return _parse_fields(out)


def _parse_fields(out: str) -> dict[str, str]:
    """`Key=Value` tokens of `scontrol show job -o` (the first of a repeated key wins)."""
    fields: dict[str, str] = {}
    for tok in out.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            fields.setdefault(k, v)
    return fields


def _from_scontrol(job_id: str) -> JobInfo | None:
    f = _scontrol_fields(job_id)
    if not f.get("JobState"):
        return None
    st, reason = f["JobState"], f.get("Reason", "")
    return _info(job_id, st, reason, f.get("RunTime", ""), "scontrol")


def _info(job_id: str, st: str, reason: str, elapsed: str, source: str) -> JobInfo:
    """One JobInfo from any source: Slurm's "None" reason dropped, elapsed as [D-]H:MM:SS."""
    reason = "" if reason in ("None", "(null)") else reason
    return JobInfo(job_id=job_id, state=from_slurm(st, reason), native_state=st, reason=reason, elapsed=hms(elapsed),
                   source=source)


def job_env() -> Mapping[str, Any]:
    """Inside a Slurm job started by submitit: rank, world size and the master host for DDP."""
    import submitit

    env = submitit.JobEnvironment()
    return {
        "job_id": env.job_id,
        "global_rank": env.global_rank,
        "local_rank": env.local_rank,
        "num_tasks": env.num_tasks,
        "hostnames": list(env.hostnames),
    }
