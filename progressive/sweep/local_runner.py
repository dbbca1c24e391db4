"""`sweep submit --local`: run the variants on this machine, `parallel` at once, in the foreground.

Each stage of each variant runs in its own process (`python -m progressive.sweep.task local`),
so variants train side by side and a crash stays in its variant. Without pruning each variant
goes on by itself; with pruning the runner waits for every variant to finish a stage and
applies the same decision function as the Slurm prune job. Ctrl-C (or SIGTERM, or SIGHUP) stops the
workers after their current step with a checkpoint; `sweep resume` continues.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from progressive import record
from progressive.backends.local import this_runner
from progressive.layout import STAGES_DIR, WORKER_LOG, is_complete
from progressive.record import Runner
from progressive.signals import INTERRUPT_SIGNALS
from progressive.sweep import record as srecord
from progressive.sweep.record import SweepRecord
from progressive.sweep.task import EXIT_STOPPED

Event = Callable[[str, str, str], None]  # (variant, stage, "start" | "completed" | "stopped" | "failed" | "pruned")


class _Runner:
    def __init__(self, rec: SweepRecord, on_event: Optional[Event]) -> None:
        self.rec = rec
        self.on_event = on_event or (lambda v, s, e: None)
        self.stop = threading.Event()
        self.procs: set[subprocess.Popen[bytes]] = set()
        self.lock = threading.Lock()

    def run_stage(self, variant: str, stage: str) -> str:
        """One stage in a worker process: "completed", "stopped" or "failed"."""
        if self.stop.is_set():
            return "stopped"
        self.on_event(variant, stage, "start")
        cmd = [sys.executable, "-m", "progressive.sweep.task", "local", str(self.rec.run_dir(variant)), stage]
        log = self.rec.run_dir(variant) / STAGES_DIR / stage / WORKER_LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            # Own session: Ctrl-C reaches the runner only, which forwards SIGTERM to each worker once.
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            with self.lock:
                self.procs.add(proc)
            code = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        result = "completed" if code == 0 else "stopped" if code == EXIT_STOPPED else "failed"
        self.on_event(variant, stage, result)
        return result

    def chain(self, variant: str, stages: list[str]) -> str:
        for stage in stages:
            result = self.run_stage(variant, stage)
            if result != "completed":
                return result
        return "completed"

    def interrupt(self, signum: int, frame: object) -> None:
        self.stop.set()
        with self.lock:
            for p in self.procs:
                p.send_signal(signal.SIGTERM)


def _todo(rec: SweepRecord, variant: str) -> list[str]:
    run = record.load(rec.run_dir(variant))
    return [s.name for s in run.plan.stages if not is_complete(s.final_checkpoint)]


def run_local_sweep(rec: SweepRecord, on_event: Optional[Event] = None) -> bool:
    """Run every unfinished, unpruned variant; write summary.csv and best/; True if nothing was interrupted."""
    _record_runner(rec, this_runner())
    try:
        return _run(rec, on_event)
    finally:
        _record_runner(rec, None)


def _record_runner(rec: SweepRecord, runner: Optional[Runner]) -> None:
    """Write (or clear) the process running the sweep into its record."""
    with record.locked(rec.sweep_dir):
        fresh = srecord.load(rec.sweep_dir)
        fresh.runner = runner
        srecord.save(fresh)


def _run(rec: SweepRecord, on_event: Optional[Event]) -> bool:
    from progressive.sweep.summary import write_outputs

    runner = _Runner(rec, on_event)
    previous = {s: signal.getsignal(s) for s in INTERRUPT_SIGNALS}
    for s in previous:
        signal.signal(s, runner.interrupt)
    try:
        with ThreadPoolExecutor(max_workers=rec.parallel) as pool:
            if rec.prune_keep is None:
                futures = [pool.submit(runner.chain, v.name, _todo(rec, v.name)) for v in rec.variants]
                for f in futures:
                    f.result()
            else:
                _pruned_steps(rec, runner, pool)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    fresh = srecord.load(rec.sweep_dir)
    if fresh.method == "tpe":
        from progressive.sweep.tpe import study, tell_dead

        with record.locked(fresh.sweep_dir):
            tell_dead(fresh, study(fresh))  # a failed variant's trial, told before the study is read
    write_outputs(fresh)
    try:
        from progressive.sweep.plot import write_plot

        write_plot(fresh)
    except ImportError:
        pass  # the `report` extra is optional; the CLI says so
    return not runner.stop.is_set()


def _pruned_steps(rec: SweepRecord, runner: _Runner, pool: ThreadPoolExecutor) -> None:
    """Stage by stage: run step k of every live variant, then keep the best share (same rule as on Slurm)."""
    from progressive.sweep.task import decide_step

    steps = max(len(v.stages) for v in rec.variants)
    for step in range(steps):
        rec = srecord.load(rec.sweep_dir)
        jobs = []
        for v in rec.variants:
            if v.pruned_after or len(v.stages) <= step:
                continue
            todo = _todo(rec, v.name)
            if v.stages[step] in todo and todo[0] == v.stages[step]:
                jobs.append(pool.submit(runner.run_stage, v.name, v.stages[step]))
        results = [j.result() for j in jobs]
        if runner.stop.is_set() or "stopped" in results:
            return
        if step < steps - 1:
            decide_step(rec.sweep_dir, step)
            for v in srecord.load(rec.sweep_dir).variants:
                if v.pruned_after == v.stages[step] if len(v.stages) > step else False:
                    runner.on_event(v.name, v.stages[step], "pruned")
