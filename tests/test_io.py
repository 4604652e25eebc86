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


def test_chunks_stream_through_os_write_and_a_full_disk_midway_keeps_the_old_file(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """A streamed file (lesions.csv, a band-encoded overlay) goes through the same ``os.write`` as every
    other file: the disk filling after some chunks leaves the old file, no temporary, and an error naming
    the file."""
    target = tmp_path / "lesions.csv"
    io.atomic_write_text(target, "old\n")
    made: list[int] = []

    def chunks():
        for n in range(5):
            made.append(n)
            yield f"chunk {n}\n".encode()

    assert io.atomic_write_chunks(target, chunks()) == 5 * len(b"chunk 0\n")
    assert target.read_text() == "".join(f"chunk {n}\n" for n in range(5)) and made == [0, 1, 2, 3, 4]
    real, calls = os.write, []

    def write(fd: int, data) -> int:
        calls.append(len(data))
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError) as err:
        io.atomic_write_chunks(target, chunks())
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and "lesions.csv" in str(err.value)
    assert len(calls) == 3  # one os.write a chunk, as they came: the third failed
    assert target.read_text() == "".join(f"chunk {n}\n" for n in range(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesions.csv"]


def test_rows_csv_streams_the_given_columns_in_chunks(tmp_path: Path) -> None:
    rows = [{"b": n, "a": f"x{n}", "_private": object()} for n in range(10)]
    io.write_rows_csv(iter(rows), tmp_path / "r.csv", fieldnames=["a", "b"], chunk_rows=3)
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b"] + [f"x{n},{n}" for n in range(10)]
    io.write_rows_csv([], tmp_path / "h.csv", fieldnames=["a", "b"])
    assert (tmp_path / "h.csv").read_bytes() == b"a,b\r\n"
    io.write_rows_csv([], tmp_path / "e.csv")
    assert (tmp_path / "e.csv").read_bytes() == b""
