"""medseg.io: the one atomic writer — whole new file or the old one, never half of either."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from medseg import io


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "table.csv"
    io.atomic_write_text(target, "a\n")
    io.atomic_write_text(target, "b\n")
    assert target.read_text() == "b\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]


def test_a_failing_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "config.yaml"
    io.atomic_write_text(target, "old\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        io.atomic_write_text(target, "new\n")
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_every_write_is_fsynced_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    io.atomic_write_bytes(tmp_path / "x.bin", b"123")
    # the file's data before the rename, the folder entry after it
    assert events == ["fsync", "replace", "fsync"]


def test_atomic_path_keeps_suffixes_and_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "mask.nii.gz"
    with io.atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"ok")
    assert target.read_bytes() == b"ok"
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


def test_torch_save_and_csv_rows_round_trip(tmp_path: Path) -> None:
    io.atomic_torch_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    io.write_rows_csv([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}], tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b", "1,x", "2,y"]
