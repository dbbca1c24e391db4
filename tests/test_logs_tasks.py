"""`progressive logs --task`: which task's (DDP rank's) files of a multi-task job are shown. No Slurm needed.

The end-to-end use, on real per-task logs of a 2-node job, is in tests/test_slurm_multinode.py.
"""

from __future__ import annotations

from pathlib import Path

from progressive.orchestrate import _task_numbers
from tests.util import run_cli


def test_task_numbers_are_found_from_the_log_files_and_sorted_numerically(tmp_path: Path) -> None:
    for name in ("7_0_log.out", "7_1_log.err", "7_10_log.out", "7_2_log.out", "7_2_log.err", "7_submission.sh",
                 "77_3_log.out", "7_x_log.out", "7_4_log.out.bak"):
        (tmp_path / name).write_text("")
    assert _task_numbers(tmp_path, "7") == [0, 1, 2, 10]
    assert _task_numbers(tmp_path, "8") == [0]  # nothing written yet: task 0, as for a single-task job


def test_bad_task_is_refused_with_a_message(tmp_path: Path) -> None:
    for bad in ("one", "1.5", "-2"):
        proc = run_cli("logs", "somerun", "somestage", f"--task={bad}", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"argument --task: expected a task number (0, 1, ...) or 'all', got '{bad}'" in proc.stderr
