"""`progressive report SWEEP`: a real tiny local sweep, then its report compared with summary.csv and best/."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.util import REPO, run_cli

pytest.importorskip("matplotlib", reason="the `report` extra (scripts/setup.sh installs it)")

ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
PNG = b"\x89PNG\r\n\x1a\n"

GRAPH = ('[run]\nname = "g"\ndata = "{data}"\nseed = 1\n[slurm]\ntime = "5m"\n'
         '[train]\nlr = 0.003\ncheckpoint_every = 50\neval_samples = 2\n'
         '[model.options]\nhidden = 4\nlayers = 1\n'
         '[[stage]]\nname = "s16"\nbucket = 16\nbatch_size = 4\nepochs = 1\ninit_from = "none"\n'
         '[[stage]]\nname = "s32"\nbucket = 32\nbatch_size = 4\nepochs = 1\n')
SWEEP = ('[sweep]\nname = "gs"\nmethod = "grid"\nmetric = "learned_iters"\nparallel = 2\n[sweep.prune]\nkeep = 0.5\n'
         '[sweep.params]\n"train.lr" = [0.003, 0.01]\n"model.options.hidden" = [4, 8]\n')


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots, except inside report/ folders."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and "report" not in p.relative_to(root).parts:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def swept(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished four-variant local grid sweep (two stages each, half pruned after the first) in its own folder."""
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "stages.toml").write_text(GRAPH.format(data=tiny_dataset))
    (tmp / "sweep.toml").write_text(SWEEP)
    proc = run_cli("sweep", "submit", "--local", cwd=tmp, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp


def test_report_of_a_sweep_compares_its_variants(swept: Path) -> None:
    jobs, sweep_dir = swept / "jobs", swept / "jobs" / "gs"
    before = hashes(jobs, swept / "checkpoints")
    proc = run_cli("report", "--jobs", str(jobs), cwd=swept, env=ENV)  # no name: the newest entry is the sweep
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "report: " in proc.stdout and "variant 1/4" in proc.stderr  # location on stdout, progress on stderr
    assert hashes(jobs, swept / "checkpoints") == before  # the sweep is never changed
    index = sweep_dir / "report" / "index.md"
    text = index.read_text()

    with (sweep_dir / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert sorted(r["state"] for r in summary) == ["completed", "completed", "pruned", "pruned"]
    # The table's rows are summary.csv's: same variants in the same order, same metrics per stage and final.
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[1:]]
    assert [b[0].strip("*") for b in body] == [r["variant"] for r in summary]
    for b, r in zip(body, summary):
        row = dict(zip(header, b))
        assert row["`train.lr`"] == f"{float(r['train.lr']):.4g}" and row["`model.options.hidden`"] == r["model.options.hidden"]
        assert row["state"] == (f"pruned after {r['pruned_after']}" if r["state"] == "pruned" else r["state"])
        for stage, key in (("s16", "s16.learned_iters"), ("s32", "s32.learned_iters"), ("final", "final.learned_iters")):
            if r[key] == "":  # pruned: no metric after the stage it never ran, no final metric
                assert row[f"{stage} learned_iters"] == "-"
            else:
                assert float(row[f"{stage} learned_iters"]) == pytest.approx(float(r[key]), rel=1e-3)
        assert float(row["CPU hours"]) == pytest.approx(float(r["cpu_hours"]), abs=1e-4)
        # Each variant's own report exists and is linked from its row and from the list.
        link = re.fullmatch(r"\[report\]\((.+)\)", row["report"])
        assert link and link.group(1) == f"../{r['variant']}/report/index.md"
        own = (index.parent / link.group(1)).resolve()
        assert own == (sweep_dir / r["variant"] / "report" / "index.md").resolve() and own.is_file()
        assert f"- [{r['variant']}]({link.group(1)})" in text
        assert "Transfer matrix" in own.read_text() and not (own.parent / "transfer.json").exists()  # no transfer
    best = json.loads((sweep_dir / "best" / "best.json").read_text())
    assert f"**Best variant: `{best['variant']}`**" in text
    for name in ("sweep_metric.png", "sweep_loss.png"):
        assert f"]({name})" in text
        assert (index.parent / name).read_bytes()[:8] == PNG and (index.parent / name).stat().st_size > 1000

    # By name, again, with --transfer: refreshed in place, a transfer matrix per variant, still nothing else changed.
    again = run_cli("report", "gs", "--jobs", str(jobs), "--transfer", cwd=swept, env=ENV)
    assert again.returncode == 0, again.stderr
    assert f"best variant: {best['variant']}" in again.stdout
    assert hashes(jobs, swept / "checkpoints") == before
    for r in summary:
        cells = json.loads((sweep_dir / r["variant"] / "report" / "transfer.json").read_text())
        assert cells and (sweep_dir / r["variant"] / "report" / "transfer.png").read_bytes()[:8] == PNG
    assert "evaluated for each variant" in index.read_text()


def test_report_data_of_a_sweep(swept: Path) -> None:
    """The library's view: summary's own rows and best, the top variants' curves from their runs' series."""
    from progressive import record
    from progressive.report.data import read_run
    from progressive.report.figures import sweep_loss_points
    from progressive.report.series import curves
    from progressive.report.sweep import build_sweep_report, find_target
    from progressive.sweep import summary
    from progressive.sweep.record import SweepRecord

    rec = find_target(swept / "jobs", "gs")
    assert isinstance(rec, SweepRecord)
    rep = build_sweep_report(rec)
    assert summary.summary_csv(rec, rep.table) == (swept / "jobs" / "gs" / "summary.csv").read_bytes().decode()
    best = json.loads((swept / "jobs" / "gs" / "best" / "best.json").read_text())
    assert rep.best is not None and rep.best.name == best["variant"] == rep.top[0]
    completed = sorted((r for r in rep.table if r.state == "completed"), key=lambda r: (r.final_metric, r.name))
    assert rep.top == [r.name for r in completed] and len(rep.top) == 2  # pruned ones have no final metric
    assert sorted(rep.variants) == sorted(r.name for r in rep.table)  # every variant started: each has a report
    for name in rep.top:
        xs, ys = sweep_loss_points(rep.variants[name].curves)
        run = read_run(record.load(rec.run_dir(name)))
        assert len(xs) == sum(len(st.steps) for st in run.stages) > 0 and xs == sorted(xs)
        assert (xs, ys) == sweep_loss_points(curves(run))


def test_report_of_a_sweep_with_no_variant_started(swept: Path, tmp_path: Path) -> None:
    """The same sweep's records, moved to fresh roots before any variant ran: one clear error, nothing written."""
    old_jobs, old_ck = str(swept / "jobs"), str(swept / "checkpoints")
    jobs = tmp_path / "jobs"
    for src in [swept / "jobs" / "gs" / "sweep.json", *(swept / "jobs" / "gs").glob("*/run.json")]:
        dst = jobs / src.relative_to(swept / "jobs")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text().replace(old_ck, str(tmp_path / "checkpoints")).replace(old_jobs, str(jobs)))
    (tmp_path / "checkpoints").mkdir()
    before = hashes(jobs)
    proc = run_cli("report", "gs", "--jobs", str(jobs), cwd=tmp_path, env=ENV)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no variant that started training yet" in proc.stderr and "Traceback" not in proc.stderr
    assert hashes(jobs) == before and not list(jobs.rglob("report"))
    shutil.rmtree(jobs)
