"""`progressive status` notes under its table on corrupt checkpoints (preemptions: test_slurm_preempt.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_local import ENV, graph
from tests.util import run_cli


def test_status_notes_corrupt_and_torn_checkpoints(tmp_path: Path, tiny_dataset: Path) -> None:
    cfg = graph(tmp_path, tiny_dataset, "notes", epochs=1)
    run_cli("submit", "--local", "-c", str(cfg), cwd=tmp_path, env=ENV, check=True)
    folder = tmp_path / "checkpoints" / "notes" / "a"
    (folder / "step_00000007.pt.corrupt").write_bytes(b"moved aside by a resume")
    (folder / "step_00000099.pt").write_bytes(b"PK\x03\x04 cut short")

    text = run_cli("status", "notes", cwd=tmp_path, check=True).stdout
    assert (f"a: 1 corrupt checkpoint(s) moved aside (kept, not deleted) in {folder}: "
            "step_00000007.pt.corrupt") in text
    assert "a: torn checkpoint(s) step_00000099.pt in" in text and "moves them aside" in text
    out = run_cli("status", "notes", "--json", cwd=tmp_path, check=True).stdout
    st = {s["name"]: s for s in json.loads(out)["stages"]}
    assert st["a"]["state"] == "completed" and len(st["a"]["notes"]) == 2
    assert st["a"]["checkpoint"].endswith("step_00000012.pt")  # the cheap check of status skips the torn file
    assert (folder / "step_00000099.pt").exists()  # status moves nothing
