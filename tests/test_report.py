"""`progressive report` on real local runs: a run stopped by Ctrl-C, killed, then resumed to the end.

The checks read the data behind the figures (series, markers, time account, transfer
cells) and compare it with the run's own metrics; the PNGs are checked as real PNG files,
index.md by its sections. A report never changes the run: every file of it is hashed
before and after.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from progressive.metrics import read_metrics
from progressive.report.accounting import account_slurm, parse_sacct
from progressive.report.data import Segment, StageData
from tests.util import REPO, run_cli

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def graph(tmp_path: Path, data: Path, run: str) -> Path:
    text = (f'[run]\nname = "{run}"\ndata = "{data}"\nseed = 5\n'
            '[train]\nlr = 0.003\ncheckpoint_every = 5\neval_samples = 2\n'
            '[model]\ntask = "tests.tasks:SlowTask"\n[model.options]\nhidden = 8\nlayers = 1\nstep_sleep = 0.1\n'
            '[[stage]]\nname = "a"\nbucket = 16\nbatch_size = 2\nepochs = 4\ninit_from = "none"\n'
            '[[stage]]\nname = "b"\nbucket = 32\nbatch_size = 2\nepochs = 1\n')
    path = tmp_path / f"{run}.toml"
    path.write_text(text)
    return path


def step_count(metrics: Path) -> int:
    return metrics.read_text().count('"event": "step"') if metrics.is_file() else 0


def run_until(cmd: list[str], cwd: Path, metrics: Path, steps: int, sig: int) -> subprocess.CompletedProcess[str]:
    """Start `progressive CMD`, wait until `metrics` holds `steps` step lines, send `sig`, wait for the exit."""
    proc = subprocess.Popen([sys.executable, "-m", "progressive", *cmd], cwd=cwd, env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and step_count(metrics) < steps and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def tree_hashes(*roots: Path, skip: str = "report") -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and skip not in p.relative_to(root).parts:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict[str, Any]:
    """A local run: stage a stopped by Ctrl-C, resumed, SIGKILLed mid-way (steps after its last checkpoint
    are lost), resumed again to the end; stage b straight through."""
    tmp = tmp_path_factory.mktemp("report")
    import shutil

    from progressive.data.format import index_path

    data = tmp / "tiny.h5"  # a private copy: one test moves it away
    shutil.copy2(tiny_dataset, data)
    shutil.copy2(index_path(tiny_dataset), index_path(data))
    cfg = graph(tmp, data, "rep")
    metrics = tmp / "jobs" / "rep" / "stages" / "a" / "metrics.jsonl"
    first = run_until(["submit", "--local", "-c", str(cfg)], tmp, metrics, 8, signal.SIGINT)
    assert first.returncode == 130 and "stopped a at step" in first.stdout, first.stdout + first.stderr
    unfinished = run_cli("report", "rep", cwd=tmp, env=ENV)  # a report of the run as it stands now
    assert unfinished.returncode == 0, unfinished.stdout + unfinished.stderr
    early = (tmp / "jobs" / "rep" / "report" / "index.md").read_text()
    # Killed without warning 3 steps after a periodic checkpoint (every 5 steps): steps are redone.
    proc = subprocess.Popen([sys.executable, "-m", "progressive", "resume", "rep"], cwd=tmp, env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    target = None
    while time.monotonic() < deadline and proc.poll() is None:
        events = read_metrics(metrics)
        begun = [i for i, e in enumerate(events) if e.get("event") == "start"]
        if len(begun) < 2:  # the resumed process has not started training yet
            time.sleep(0.05)
            continue
        mine = events[begun[1]:]
        ckpts = [e["step"] for e in mine if e.get("event") == "checkpoint" and e.get("reason") == "periodic"]
        last = max((e["step"] for e in mine if e.get("event") == "step"), default=0)
        if ckpts and target is None:
            target = ckpts[-1] + 2
        if target is not None and last >= target:
            break
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    assert target is not None, "the resumed run never reached a periodic checkpoint"
    done = run_cli("resume", "rep", cwd=tmp, env=ENV)
    assert done.returncode == 0 and "completed b" in done.stdout, done.stdout + done.stderr
    return {"tmp": tmp, "cfg": cfg, "data": data, "metrics": metrics, "early": early}


def test_report_of_an_unfinished_run(interrupted_run: dict[str, Any]) -> None:
    """Reported right after the Ctrl-C: stage a stopped, stage b never started, no final weights anywhere."""
    early: str = interrupted_run["early"]
    assert "| a | 16 | stopped | " in early and "| b | 32 | not started | 0/" in early
    assert "No stage has completed yet." in early and "No stage has final weights yet." in early
    assert "**Effective training time ratio: " in early and "](loss_step.png)" in early
    assert "| a | 0 | - | 0.00 s | 0 -> " in early and "| checkpoint | " not in early.split("## Segments")[1]


def _events(tmp: Path, stage: str) -> list[dict[str, Any]]:
    return read_metrics(tmp / "jobs" / "rep" / "stages" / stage / "metrics.jsonl")


def test_report_of_an_interrupted_local_run(interrupted_run: dict[str, Any]) -> None:
    tmp: Path = interrupted_run["tmp"]
    before = tree_hashes(tmp / "jobs" / "rep", tmp / "checkpoints" / "rep")
    proc = run_cli("report", "rep", cwd=tmp, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "report: jobs/rep/report/index.md" in proc.stdout
    assert "transfer matrix: 4 cell(s) evaluated, 0 from the cache" in proc.stdout
    assert tree_hashes(tmp / "jobs" / "rep", tmp / "checkpoints" / "rep") == before  # the run is unchanged

    # ---- the data behind the figures, against the metrics themselves
    from progressive import record
    from progressive.report.build import collect
    from progressive.report.series import curves

    rec = record.load(tmp / "jobs" / "rep")
    run, acc = collect(rec)
    a, b = run.stages
    ev_a, ev_b = _events(tmp, "a"), _events(tmp, "b")
    starts = [e for e in ev_a if e.get("event") == "start"]
    assert [s.end for s in a.segments] == ["stopped", "interrupted", "completed"]
    assert [s.start_step for s in a.segments] == [e["step"] for e in starts]
    assert [s.end for s in b.segments] == ["completed"]
    steps_a = [e["step"] for e in ev_a if e.get("event") == "step"]
    assert len(a.steps) == len(steps_a) and [p.step for p in a.steps] == steps_a
    redone = a.segments[1].last_step - a.segments[2].start_step
    assert redone > 0 and a.segments[2].redone_steps == redone == len(steps_a) - len(set(steps_a))
    assert a.segments[0].redone_steps == a.segments[1].redone_steps == 0  # Ctrl-C saved: nothing lost

    data = curves(run)
    total_a = rec.plan.stage("a").total_steps
    assert [len(s.values) for s in data.loss] == [len(steps_a), sum(e.get("event") == "step" for e in ev_b)]
    assert data.loss[1].global_step[0] == total_a + 1 and data.loss[1].global_step[-1] == total_a + b.total_steps
    assert data.loss[0].values == [e["loss"] for e in ev_a if e.get("event") == "step"]
    assert data.lr[0].values == [e["lr"] for e in ev_a if e.get("event") == "step"]
    marks = {(m.kind, m.stage, m.global_step) for m in data.markers}
    assert ("boundary", "a", 0) in marks and ("boundary", "b", total_a) in marks
    assert [m.global_step for m in data.markers if m.kind == "restart"] == [s["step"] for s in starts[1:]]
    stops = [m for m in data.markers if m.kind == "stop"]
    assert [m.global_step for m in stops] == [a.segments[0].last_step, a.segments[1].last_step]
    done_a = next(e for e in ev_a if e.get("event") == "completed")
    assert a.eval == done_a["eval"]
    assert data.val_loss[0][:2] == ("a", total_a) and data.val_loss[0][3] == done_a["eval"]["loss"]

    # ---- the time account: the restart and the crash are in it, and it adds up
    ta, tb = acc.stages["a"], acc.stages["b"]
    assert acc.source == "metrics" and ta.segments == 3 and tb.segments == 1
    assert ta.redone_steps == redone and ta.redone_s > 0 and tb.redone_s == 0
    assert ta.queue_wait_s > 0  # the pauses until each `resume`
    assert ta.startup_s >= sum(e["setup_s"] for e in starts) > 0  # each process's set-up before its first step
    assert ta.checkpoint_s == pytest.approx(sum(e["seconds"] for e in ev_a if e.get("event") == "checkpoint")
                                            + done_a["final_save_s"])
    assert ta.eval_s == pytest.approx(done_a["eval_s"])
    for t in (ta, tb, acc.total):
        parts = t.useful_s + t.startup_s + t.checkpoint_s + t.eval_s + t.redone_s + t.shutdown_s + t.other_s
        assert parts == pytest.approx(t.allocated_s) and 0 < t.useful_s < t.allocated_s
    assert acc.total.ratio == pytest.approx((ta.useful_s + tb.useful_s) / (ta.allocated_s + tb.allocated_s))
    assert f"{acc.total.ratio:.3f}" in proc.stdout

    # ---- the files a user opens
    out = tmp / "jobs" / "rep" / "report"
    for name in ("loss_step.png", "loss_time.png", "lr.png", "time.png", "transfer.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 5000, name
    index = (out / "index.md").read_text()
    for section in ("# Report: run `rep`", "## Stages", "## Loss across the curriculum", "## Learning rate",
                    "## Evaluation per stage", "## Transfer matrix", "## Where the time went", "## Segments"):
        assert section in index
    for name in ("loss_step.png", "loss_time.png", "lr.png", "time.png", "transfer.png"):
        assert f"]({name})" in index
    assert f"| a | 16 | completed | {total_a}/{total_a} | 3 | 2 |" in index
    assert f"**Effective training time ratio: {acc.total.ratio:.3f}**" in index
    assert "| steps redone | " + str(redone) + " | 0 | " + str(redone) + " |" in index


def test_transfer_matrix_and_refresh(interrupted_run: dict[str, Any]) -> None:
    tmp: Path = interrupted_run["tmp"]
    first = run_cli("report", "rep", cwd=tmp, env=ENV, check=True)
    again = run_cli("report", "rep", cwd=tmp, env=ENV, check=True)  # refresh: cells come from the cache
    assert "0 cell(s) evaluated, 4 from the cache" in again.stdout, first.stdout + again.stdout
    from progressive import record
    from progressive.report.transfer import evaluate_transfer

    rec = record.load(tmp / "jobs" / "rep")
    tr = evaluate_transfer(rec, tmp / "jobs" / "rep" / "report", max_samples=2)
    assert tr.evaluated == 0 and tr.metric == "learned_iters" and tr.buckets == [16, 32]
    assert set(tr.cells) == {("a", 16), ("a", 32), ("b", 16), ("b", 32)}
    # The diagonal is each stage's own end-of-stage evaluation (same weights, matrices and sketch).
    for st, n in (("a", 16), ("b", 32)):
        own = next(e for e in _events(tmp, st) if e.get("event") == "completed")["eval"]
        for key in ("learned_iters", "jacobi_iters", "cg_iters", "ic0_iters", "loss"):
            assert tr.cells[(st, n)][key] == pytest.approx(own[key]), (st, key)
    index = (tmp / "jobs" / "rep" / "report" / "index.md").read_text()
    assert "| weights \\ bucket | n=16 | n=32 |" in index and "| bucket | cg | jacobi | ic0 | best learned_iters |" in index

    # --no-transfer drops the section's figure; the run's data file is then not needed at all.
    moved = interrupted_run["data"].rename(tmp / "elsewhere.h5")
    try:
        gone = run_cli("report", "rep", cwd=tmp, env=ENV)
        assert gone.returncode == 2 and "the run's data file is missing" in gone.stderr and "--no-transfer" in gone.stderr
        skip = run_cli("report", "rep", "--no-transfer", cwd=tmp, env=ENV, check=True)
        assert "transfer matrix" not in skip.stdout
    finally:
        moved.rename(interrupted_run["data"])
    assert not (tmp / "jobs" / "rep" / "report" / "transfer.png").exists()
    assert "Not evaluated (`--no-transfer`)" in (tmp / "jobs" / "rep" / "report" / "index.md").read_text()


def test_report_refuses_bad_input(tmp_path: Path, tiny_dataset: Path) -> None:
    unknown = run_cli("report", "ghost", cwd=tmp_path)
    assert unknown.returncode == 1 and "no run record here" in unknown.stderr and "jobs/ghost/run.json" in unknown.stderr
    none = run_cli("report", cwd=tmp_path)
    assert none.returncode == 1 and "no runs under jobs" in none.stderr
    bad = run_cli("report", "x", "--transfer-samples", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "expected a positive whole number, got '0'" in bad.stderr

    # A recorded run that has not started training: nothing to report, and nothing written.
    from progressive import runs
    from progressive.backends import get_backend
    from progressive.data.format import bucket_counts
    from progressive.config import load_config
    from progressive.plan import build_plan

    cfg = graph(tmp_path, tiny_dataset, "fresh")
    plan = build_plan(load_config(cfg), cfg, counts=lambda p: bucket_counts(p, refresh_sidecar=False))
    runs.submit(plan, cfg.read_text(), get_backend("local"))
    empty = run_cli("report", "fresh", cwd=tmp_path)
    assert empty.returncode == 1 and "run 'fresh' has no metrics yet" in empty.stderr
    assert "progressive status fresh" in empty.stderr
    assert not (tmp_path / "jobs" / "fresh" / "report").exists()
    by_config = run_cli("report", "-c", str(cfg), cwd=tmp_path)  # the graph names the run
    assert by_config.returncode == 1 and "run 'fresh' has no metrics yet" in by_config.stderr
    chosen = run_cli("report", cwd=tmp_path)
    assert chosen.stderr.startswith("run fresh (the only run under jobs; name one with RUN or -c FILE)\n")

    # Without matplotlib (an import that fails, as in an environment without the extra): the extra is named.
    fake = tmp_path / "nompl"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\")\n")
    nompl = run_cli("report", "fresh", cwd=tmp_path, env={"PYTHONPATH": f"{fake}{os.pathsep}{REPO}"})
    assert nompl.returncode == 1, nompl.stderr
    assert "need matplotlib" in nompl.stderr and "pip install 'progressive[report]'" in nompl.stderr


def test_report_without_transfer_does_not_import_torch(interrupted_run: dict[str, Any]) -> None:
    run_dir = interrupted_run["tmp"] / "jobs" / "rep"
    code = ("import sys; from progressive.cli import build_parser; build_parser();"
            "from progressive import record; from progressive.report.build import build_report;"
            f"rep = build_report(record.load({str(run_dir)!r}), transfer=False);"
            "print(rep.index.is_file(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={**os.environ, **ENV})
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr


# ------------------------------------------------------------------ pure logic: sacct attempts -> time account

SACCT = """\
101|REQUEUED|2026-11-22T10:00:00|2026-11-22T10:00:00|2026-11-22T10:00:05|2026-11-22T10:00:50|45|1|billing=1,cpu=1,gres/gpu=2,mem=1G,node=1|1
101|COMPLETED|2026-11-22T10:00:50|2026-11-22T10:01:02|2026-11-22T10:01:02|2026-11-22T10:01:30|28|1|billing=1,cpu=1,gres/gpu=2,mem=1G,node=1|1
102|PENDING|2026-11-22T10:00:01|Unknown|Unknown|Unknown|0|0||1
garbage line
"""


def test_sacct_attempts_and_requeue_accounting() -> None:
    attempts = parse_sacct(SACCT)
    assert [(a.job_id, a.state, a.elapsed_s, a.cpus, a.gpus, a.time_limit_s) for a in attempts] == [
        ("101", "REQUEUED", 45.0, 1, 2, 60.0), ("101", "COMPLETED", 28.0, 1, 2, 60.0), ("102", "PENDING", 0.0, 0, 0, 60.0)]
    assert attempts[2].start is None and attempts[2].end is None
    t = attempts[0].start
    assert t is not None and attempts[1].start == t + 57
    # Segment 0 starts 3 s into the first attempt, steps 0 -> 20, stopped at 40 s; segment 1 resumes at 20.
    st = StageData("s", 0, 16, 30, True, job_ids=["101"])
    st.segments = [Segment(0, t + 3, 0, None, end="stopped", end_time=t + 41, first_step_time=t + 4, last_step=20,
                           train_s=33.0, checkpoint_s=1.0, stop_time=t + 41),
                   Segment(1, t + 60, 20, "ck", end="completed", end_time=t + 82, first_step_time=t + 61, last_step=30,
                           train_s=17.0, checkpoint_s=0.5, eval_s=2.0, final_save_s=0.5)]
    acc = account_slurm(st, attempts, now=t + 1000)
    assert acc.allocated_s == 73 and acc.segments == 2 and acc.cpu_s == 73 and acc.gpu_s == 146
    assert acc.useful_s == 50 and acc.startup_s == 4 + 4 and acc.checkpoint_s == 2 and acc.eval_s == 2
    assert acc.shutdown_s == (45 - 41) + (85 - 82)  # stop -> requeue, finish -> exit
    assert acc.queue_wait_s == 57 - 45  # the requeued job waited 12 s for its second start
    assert acc.before_limit_s == 60 - 45  # stopped by the signal 15 s before its 1-minute limit
    assert acc.other_s == pytest.approx(73 - 50 - 8 - 2 - 2 - 7)
    assert acc.ratio == pytest.approx(50 / 73)
