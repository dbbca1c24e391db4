"""Checkpoint files: atomic writes, torn and corrupt files, keep-last-K, fingerprints, RNG capture."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from progressive import checkpoint as ck
from progressive.atomic import TMP_MARK
from progressive.errors import CheckpointError


def state(step: int) -> dict:
    return {"format": ck.FORMAT, "step": step, "model": {"w": torch.full((64, 64), float(step))},
            "fingerprint": {"bucket": 16, "lr": 0.001}}


def test_save_atomic_round_trip_leaves_no_temp_file(tmp_path: Path) -> None:
    path = ck.save_atomic(state(3), tmp_path / "sub" / "step_00000003.pt")
    assert ck.load_checkpoint(path)["step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["step_00000003.pt"]


def test_crash_between_temp_write_and_rename_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck.save_atomic(state(1), ck.step_path(tmp_path, 1))

    def die(*args: object) -> None:
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        ck.save_atomic(state(2), ck.step_path(tmp_path, 2))
    monkeypatch.undo()
    assert ck.latest_checkpoint(tmp_path) == ck.step_path(tmp_path, 1)
    assert ck.load_checkpoint(ck.step_path(tmp_path, 1))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt"]  # the temp file was removed


def test_temp_file_of_a_killed_writer_is_ignored_then_cleaned(tmp_path: Path) -> None:
    ck.save_atomic(state(1), ck.step_path(tmp_path, 1))
    torn = tmp_path / f".step_00000002.pt{TMP_MARK}4242"  # what SIGKILL mid-write leaves behind
    torn.write_bytes(b"PK\x03\x04 half a zip")
    assert ck.latest_checkpoint(tmp_path) == ck.step_path(tmp_path, 1)
    assert ck.clean_temp_files(tmp_path) == [torn] and not torn.exists()


def test_truncated_file_is_refused_and_skipped(tmp_path: Path) -> None:
    ck.save_atomic(state(1), ck.step_path(tmp_path, 1))
    newest = ck.save_atomic(state(2), ck.step_path(tmp_path, 2))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # e.g. a copy cut short
    with pytest.raises(CheckpointError, match="truncated") as err:
        ck.load_checkpoint(newest)
    assert str(newest) in str(err.value) and "move it aside (rename it to <name>.corrupt)" in str(err.value)
    assert ck.latest_checkpoint(tmp_path) == ck.step_path(tmp_path, 1)
    ck.step_path(tmp_path, 1).write_bytes(b"")
    with pytest.raises(CheckpointError, match="every checkpoint is truncated or corrupt"):
        ck.latest_checkpoint(tmp_path)


def test_corrupt_payload_and_missing_file(tmp_path: Path) -> None:
    path = ck.save_atomic(state(1), tmp_path / "a.pt")
    raw = bytearray(path.read_bytes())
    start = raw.find(b"data.pkl") + 40  # scribble over the pickle, keep the zip directory intact
    raw[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt|refused"):
        ck.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        ck.load_checkpoint(tmp_path / "nope.pt")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": Path("/x")}, path)  # a class weights_only rejects
    with pytest.raises(CheckpointError, match="beyond tensors and plain data"):
        ck.load_checkpoint(path)


def test_keep_last_k_never_touches_final(tmp_path: Path) -> None:
    for step in (1, 2, 3, 10, 11):
        ck.save_atomic(state(step), ck.step_path(tmp_path, step))
    ck.save_atomic(state(99), tmp_path / ck.FINAL_NAME)
    deleted = ck.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["step_00000001.pt", "step_00000002.pt", "step_00000003.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "step_00000010.pt", "step_00000011.pt"]
    assert ck.latest_checkpoint(tmp_path) == ck.step_path(tmp_path, 11)  # final.pt holds no trainer state


def test_latest_checkpoint_of_missing_or_empty_folder(tmp_path: Path) -> None:
    assert ck.latest_checkpoint(tmp_path / "absent") is None
    assert ck.latest_checkpoint(tmp_path) is None


def test_fingerprint_mismatch_names_each_key_old_and_new(tmp_path: Path) -> None:
    saved = {"fingerprint": {"bucket": 16, "lr": 0.001, "world_size": 2, "epochs": 3}}
    now = {"bucket": 16, "lr": 0.002, "world_size": 1, "epochs": 3, "grad_accum": 2}
    with pytest.raises(CheckpointError) as err:
        ck.check_fingerprint(saved, now, tmp_path / "step_00000005.pt")
    text = str(err.value)
    assert "lr: 0.001 -> 0.002" in text and "world_size: 2 -> 1" in text and "grad_accum: '<absent>' -> 2" in text
    assert "bucket" not in text and "epochs" not in text
    assert "step_00000005.pt" in text and "--run-name" in text
    ck.check_fingerprint({"fingerprint": dict(now)}, now, "x")  # equal: no error
    with pytest.raises(CheckpointError, match="no stage fingerprint"):
        ck.check_fingerprint({}, now, "x")


def test_load_weights_accepts_ours_and_plain_state_dicts(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    ck.save_atomic({"format": ck.FORMAT, "model": model.state_dict()}, tmp_path / "ours.pt")
    for name in ("plain.pt", "ours.pt"):
        w = ck.load_weights(tmp_path / name)
        assert set(w) == {"weight", "bias"} and torch.equal(w["weight"], model.weight)
    torch.save({"lr": 0.1}, tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="no model weights"):
        ck.load_weights(tmp_path / "nothing.pt")


def test_rng_capture_restore_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ck.save_atomic({"rng": ck.capture_rng(gen)}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=gen), np.random.randn())
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    ck.restore_rng(ck.load_checkpoint(tmp_path / "rng.pt")["rng"], gen)
    got = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=gen), np.random.randn())
    assert got[0] == expected[0] and got[1] == expected[1] and got[4] == expected[4]
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


# --------------------------------------------------------------------------- corrupt files: moved aside, never deleted


def flip_a_tensor_byte(path: Path) -> bytes:
    """A bad block inside the largest tensor record: the zip directory stays intact and torch.load would load
    the wrong value silently. Returns the damaged file's bytes."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return bytes(raw)


def test_corrupt_newest_is_moved_aside_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for step in (1, 2, 3):
        ck.save_atomic(state(step), ck.step_path(tmp_path, step))
    flip_a_tensor_byte(ck.step_path(tmp_path, 3))
    ck.step_path(tmp_path, 2).write_bytes(ck.step_path(tmp_path, 2).read_bytes()[:300])  # cut short
    before = ck.step_path(tmp_path, 3).read_bytes()
    assert ck.latest_checkpoint(tmp_path, resuming=False) == ck.step_path(tmp_path, 3)  # status: cheap check only
    assert ck.torn_files(tmp_path) == [ck.step_path(tmp_path, 2)]
    with caplog.at_level("WARNING", "progressive.checkpoint"):
        assert ck.latest_checkpoint(tmp_path) == ck.step_path(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000001.pt", "step_00000002.pt.corrupt", "step_00000003.pt.corrupt"]
    assert (tmp_path / "step_00000003.pt.corrupt").read_bytes() == before  # moved, not changed or deleted
    assert "step_00000003.pt is corrupt: the CRC of its record" in caplog.text
    assert "moved aside to step_00000003.pt.corrupt (kept, not deleted)" in caplog.text
    assert "step_00000002.pt is truncated" in caplog.text
    assert [p.name for p in ck.corrupt_files(tmp_path)] == ["step_00000002.pt.corrupt", "step_00000003.pt.corrupt"]


def test_moving_aside_never_overwrites_an_earlier_corrupt_file(tmp_path: Path) -> None:
    ck.save_atomic(state(1), ck.step_path(tmp_path, 1))
    (tmp_path / "step_00000002.pt.corrupt").write_bytes(b"the first torn copy")
    ck.step_path(tmp_path, 2).write_bytes(b"the second torn copy")
    assert ck.latest_checkpoint(tmp_path) == ck.step_path(tmp_path, 1)
    assert (tmp_path / "step_00000002.pt.corrupt").read_bytes() == b"the first torn copy"
    assert (tmp_path / "step_00000002.pt.corrupt.1").read_bytes() == b"the second torn copy"


def test_every_checkpoint_corrupt_says_where_they_are_and_how_to_restart(tmp_path: Path) -> None:
    for step in (1, 2):
        ck.save_atomic(state(step), ck.step_path(tmp_path, step))
        flip_a_tensor_byte(ck.step_path(tmp_path, step))
    for _ in range(2):  # and again at the next resume: the stage never restarts from scratch silently
        with pytest.raises(CheckpointError) as err:
            ck.latest_checkpoint(tmp_path)
        text = str(err.value)
        assert "every checkpoint is truncated or corrupt (step_00000001.pt.corrupt, step_00000002.pt.corrupt)" in text
        assert f"nothing was deleted: the files are kept in {tmp_path} (those moved aside end in .corrupt)" in text
        assert "copy an intact step_XXXXXXXX.pt into that folder" in text
        assert "to restart the stage from its init, move the corrupt files out of it" in text
        assert "progressive resume" in text
    assert len(list(tmp_path.iterdir())) == 2  # both kept
    for p in ck.corrupt_files(tmp_path):
        p.rename(tmp_path.parent / p.name)
    assert ck.latest_checkpoint(tmp_path) is None  # the user moved them out: restart from the init


def test_rotation_keeps_the_newest_intact_and_leaves_torn_files_alone(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        ck.save_atomic(state(step), ck.step_path(tmp_path, step))
    torn = ck.step_path(tmp_path, 4)
    torn.write_bytes(ck.step_path(tmp_path, 3).read_bytes()[:500])  # newer than every intact one
    deleted = ck.prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in deleted) == ["step_00000001.pt", "step_00000002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003.pt", "step_00000004.pt"]  # torn not counted
    assert ck.latest_checkpoint(tmp_path) == ck.step_path(tmp_path, 3)
    assert ck.prune_checkpoints(tmp_path, 1) == []  # the moved-aside file is no step checkpoint: kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003.pt", "step_00000004.pt.corrupt"]
