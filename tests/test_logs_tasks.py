"""`progressive logs --task`: which task's (DDP rank's) files of a multi-task job are shown. No Slurm needed.

The end-to-end use, on real per-task logs of a 2-node job, is in tests/test_slurm_multinode.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from progressive.layout import RunLayout
from tests.util import fake_slurm_sweep, run_cli


def test_task_logs_are_found_from_the_log_files_and_sorted_numerically(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, tmp_path / "ck")
    folder = layout.job_dir("7")
    folder.mkdir(parents=True)
    for name in ("7_0_log.out", "7_1_log.err", "7_10_log.out", "7_2_log.out", "7_2_log.err", "7_submission.sh",
                 "77_3_log.out", "7_x_log.out", "7_4_log.out.bak"):
        (folder / name).write_text("")
    assert [p.name for p in layout.job_logs("7")] == ["7_0_log.out", "7_2_log.out", "7_10_log.out"]
    assert [p.name for p in layout.job_logs("7", err=True)] == ["7_1_log.err", "7_2_log.err"]
    assert layout.job_logs("8") == []  # nothing written yet (status.log_files then names task 0's file)


def test_bad_task_is_refused_with_a_message(tmp_path: Path) -> None:
    for bad in ("one", "1.5", "-2"):
        proc = run_cli("logs", "somerun", "somestage", f"--task={bad}", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"argument --task: expected a task number (0, 1, ...) or 'all', got '{bad}'" in proc.stderr


def test_a_slurm_sweep_variants_logs_are_its_array_tasks_files(tiny_dataset: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep submitted as arrays (sbatch faked, the records real): `logs VARIANT STAGE --jobs jobs/<sweep>`
    prints jobs/<sweep>/slurm/<array>_<task>.out, the file the array's sbatch script names."""
    from progressive import record
    from progressive.record import Submission

    sweep_dir = fake_slurm_sweep(tmp_path, tiny_dataset, monkeypatch)
    script = (sweep_dir / "slurm" / "a0.sbatch").read_text()
    assert f"#SBATCH --output={sweep_dir}/slurm/%A_%a.out" in script
    logs = sweep_dir / "slurm"
    (logs / "500_1.out").write_text("v001 s16, first attempt\nrequeued, appended\n")
    (logs / "500_1.err").write_text("a warning\n")
    (logs / "501_1.out").write_text("v001 s32\n")
    jobs = ["--jobs", str(sweep_dir)]
    assert run_cli("logs", "v001", "s16", *jobs, check=True).stdout == "v001 s16, first attempt\nrequeued, appended\n"
    assert run_cli("logs", "v001", "s16", "--err", *jobs, check=True).stdout == "a warning\n"
    assert run_cli("logs", "v001", "s32", *jobs, check=True).stdout == "v001 s32\n"
    # A resumed stage is a new array: its file follows the first one's.
    run = record.load(sweep_dir / "v001")
    run.stages["s16"].submissions.append(Submission(job_id="503_1", submitted_at="now", reason="resume"))
    record.save(run)
    (logs / "503_1.out").write_text("v001 s16, resumed\n")
    assert run_cli("logs", "v001", "s16", *jobs, check=True).stdout.endswith("appended\nv001 s16, resumed\n")
    every = run_cli("logs", "v001", "s16", "--task", "all", *jobs, check=True).stdout
    assert every.startswith("==> 500_1.out <==\n") and "==> 503_1.out <==\nv001 s16, resumed\n" in every
    # One file per array task holds every rank: there is no task 1 file to pick, and `logs` says so.
    other = run_cli("logs", "v001", "s16", "--task", "1", *jobs)
    assert other.returncode == 1 and "job 500_1 is a sweep's array task: all its tasks (DDP ranks) write to one" \
                                      in " ".join(other.stderr.split()), other.stderr
    # v000 has written nothing yet: the hint names the variant as a command takes it.
    none = run_cli("logs", "v000", "s16", *jobs)
    assert none.returncode == 1 and "stage 's16' has no output of task 0 yet" in none.stderr
    assert f"progressive status v000 --jobs {sweep_dir}" in " ".join(none.stderr.split()), none.stderr
