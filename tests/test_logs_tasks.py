"""`progressive logs --task`: which task's (DDP rank's) files of a multi-task job are shown. No Slurm needed.

The end-to-end use, on real per-task logs of a 2-node job, is in tests/test_slurm_multinode.py.
"""

from __future__ import annotations

from pathlib import Path

from progressive.layout import RunLayout
from tests.util import run_cli


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
