"""What runs inside a stage's Slurm job: signals, DDP set-up, the trainer, the requeue.

submitit starts `run_stage_job(run_dir, stage)` on every task of the allocation. We
replace submitit's own signal handlers (they checkpoint from inside the handler, in
the middle of an optimizer step) with a flag the trainer polls after each step: on
the pre-timeout signal the trainer finishes its step, rank 0 saves a checkpoint, and
rank 0 requeues the job under the same id, so the `afterok` chain holds. A restarted
job finds that checkpoint and continues from exactly that step.

SIGTERM (scancel, preemption, an administrator's requeue) also stops the trainer with
a checkpoint. Rank 0 then asks Slurm whether the job is being preempted: if so it
requeues the job itself, at once, and counts a preemption (not a time-out). Ending by
itself inside GraceTime would make Slurm record FAILED and block the dependents;
waiting for the kill at the end of GraceTime would leave the node idle that long.
Anything else (a cancel) ends the job: a cancel stays a cancel.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from progressive import record, requeues
from progressive.errors import SlurmError
from progressive.plan import StagePlan
from progressive.signals import StopFlag, signal_number

log = logging.getLogger("progressive.job")


def _ddp_env(env: dict[str, Any]) -> None:
    """Set torch.distributed's variables from Slurm's view of the allocation, and from nothing else.

    sbatch exports the submitting shell's environment: a RANK or WORLD_SIZE left there (a
    notebook, a torchrun session, a test) must not make a single-task stage wait for peers
    that do not exist, nor a multi-task one use the wrong rendezvous.
    """
    from progressive.distributed import DDP_ENV

    for key in DDP_ENV:
        os.environ.pop(key, None)
    if env["num_tasks"] <= 1:
        return
    os.environ.update({
        "RANK": str(env["global_rank"]),
        "LOCAL_RANK": str(env["local_rank"]),
        "WORLD_SIZE": str(env["num_tasks"]),
        "MASTER_ADDR": env["hostnames"][0],
        "MASTER_PORT": str(master_port(env["job_id"])),
    })


def master_port(job_id: str) -> int:
    """The DDP rendezvous port: one per job, stable across its requeues.

    Taken from the allocation's own SLURM_JOB_ID, which differs between the tasks of one array
    (their shared array id would put two tasks on one node on the same port); the same for
    every rank of one allocation.
    """
    own = os.environ.get("SLURM_JOB_ID", "")
    base = int(own) if own.isdigit() else int(str(job_id).split("_")[0])
    return 20000 + base % 20000


def _wait_for_time_limit(seconds: float) -> NoReturn:
    """Let Slurm end the job itself: at its time limit (recorded TIMEOUT, when no requeue is left or
    Slurm refused one) or at the end of a preemption's GraceTime (Slurm then applies PreemptMode).

    Exiting first would record FAILED (or COMPLETED, which would start the dependents on a
    stage whose final weights do not exist).
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1)
    sys.exit(1)


def run_stage_job(run_dir: str, stage_name: str) -> dict[str, Any]:
    """Entry point of every task of a stage job (pickled by submitit at submit time)."""
    from progressive.backends import slurm

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rec = record.load(run_dir)
    plan = rec.plan
    stage = plan.stage(stage_name)
    env = dict(slurm.job_env())
    _ddp_env(env)
    timeout_sig = signal_number(stage.slurm.signal)
    flag = StopFlag()
    # SIGTERM: cancel or preemption; checkpoint too, but it is not a time-out.
    flag.install(timeout_sig, signal.SIGTERM)
    rank = env["global_rank"]
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        # Use what was allocated, no more: several tasks on one node must not oversubscribe it.
        import torch

        torch.set_num_threads(int(cpus))
    log.info("stage %s, job %s, task %d/%d on %s", stage.name, env["job_id"], rank, env["num_tasks"], env["hostnames"])

    from progressive.trainer import train_stage

    # require_gpu: a GPU stage on a node where this task sees no GPU fails at once, not hours later on the CPU.
    outcome = train_stage(plan, stage, stop_requested=flag, require_gpu=True)
    if outcome.status == "completed":
        # A pre-timeout signal that lands now must not kill us on the way out: Python restores
        # default handlers during shutdown, and USR1/USR2's default is to terminate, which
        # Slurm would record as FAILED and so block the dependents.
        signal.signal(timeout_sig, signal.SIG_IGN)
        log.info("stage %s completed at step %d", stage.name, outcome.step)
        return {"stage": stage.name, "status": "completed", "step": outcome.step}

    log.info("stage %s stopped at step %d/%d, checkpoint %s", stage.name, outcome.step, outcome.total_steps, outcome.checkpoint)
    if rank != 0:
        # Rank 0 saved the checkpoint (the trainer waited for it) and decides about the requeue;
        # the job lives until rank 0 exits.
        sys.exit(0)
    job_id = str(env["job_id"])  # "ARRAY_TASK" for an array task: requeue that task only, never the whole array
    counter = rec.layout.stage(stage.name).requeues
    if flag.signum != timeout_sig:
        _after_sigterm(job_id, counter)
    _after_time_limit_signal(job_id, counter, stage, plan.run_name)


def _after_sigterm(job_id: str, counter: Path) -> NoReturn:
    """Rank 0, checkpoint saved after SIGTERM: requeue a preempted job ourselves; end a cancelled one."""
    from progressive.backends import slurm

    try:
        preempted = slurm.being_preempted(job_id)
    except SlurmError as exc:
        log.warning("SIGTERM: could not ask Slurm whether job %s is being preempted, so ending it as a cancel "
                    "(the checkpoint is on disk): %s", job_id, exc)
        sys.exit(1)
    if not preempted:
        # scancel or `progressive cancel` (JobState CANCELLED/COMPLETING), or an administrator's requeue
        # (Slurm already has the job back): nothing to do but end; the checkpoint is on disk.
        log.info("SIGTERM and job %s is not being preempted (cancelled or requeued by Slurm): ending", job_id)
        sys.exit(1)
    n = requeues.add_preemption(counter, job_id)
    log.info("job %s is being preempted: requeueing it (preemption %d; time-out requeues unaffected)", job_id, n)
    try:
        slurm.requeue(job_id)
    except SlurmError as exc:
        # E.g. a job with requeue disabled. Exiting now would be recorded FAILED; staying until Slurm
        # kills it at the end of GraceTime lets Slurm record PREEMPTED and apply its PreemptMode.
        requeues.set_preemptions(counter, job_id, n - 1)  # it did not requeue itself: status must not say so
        log.warning("Slurm refused to requeue preempted job %s; waiting for Slurm to end it at the end of "
                    "GraceTime (it then applies the partition's PreemptMode): %s", job_id, exc)
        _wait_for_time_limit(600)
    # Slurm has the job back in its queue under the same id. Exit non-zero, as after a time-out requeue.
    sys.exit(1)


def _after_time_limit_signal(job_id: str, counter: Path, stage: StagePlan, run_name: str) -> NoReturn:
    """Rank 0, checkpoint saved after the pre-timeout signal: requeue while `max_requeues` allows."""
    from progressive.backends import slurm

    used = requeues.count(counter, job_id)
    if used < stage.slurm.max_requeues:
        requeues.set_count(counter, job_id, used + 1)
        log.info("requeueing job %s (time-out requeue %d of %d)", job_id, used + 1, stage.slurm.max_requeues)
        try:
            slurm.requeue(job_id)
        except SlurmError as exc:
            # E.g. a job submitted with --no-requeue, or a site with JobRequeue=0. Not silently: say so, keep
            # the count true, and end as TIMEOUT at the limit (status: timeout, with the resume command).
            requeues.set_count(counter, job_id, used)
            log.error("Slurm refused to requeue job %s, so this stage cannot continue by itself: the job ends as "
                      "TIMEOUT at its time limit; the checkpoint is on disk, continue with `progressive resume %s`: "
                      "%s", job_id, run_name, exc)
            _wait_for_time_limit(stage.slurm.signal_delay + 300)
        # Slurm has the job back in its queue under the same id; leaving now spares the requeue
        # Slurm's KillWait. Exit non-zero: should the requeue somehow not have taken, the job
        # must not count as COMPLETED (its dependents would start without final weights).
        sys.exit(1)
    log.warning("requeues used up (%d): the job ends as TIMEOUT; continue with `progressive resume %s`",
                used, run_name)
    _wait_for_time_limit(stage.slurm.signal_delay + 300)
