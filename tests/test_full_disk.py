"""A full disk or a failing write: one line naming the path, a distinct exit code, no traceback; the
manifest and the last good checkpoint intact; the rerun, once there is space, completes with the outputs
of a run that never hit the fault.

Two ways to fill the disk: a real one (a 3 MB tmpfs, where the test may mount one: root), and a write
failure injected at the one atomic writer (``os.write`` raising ``ENOSPC`` for the files under test).
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.io import WriteError
from tests.conftest import tiny_overrides
from tests.predict import builders as B

ROOT = Path(__file__).resolve().parents[1]
CASES = 4


@pytest.fixture(scope="module")
def oracle() -> Iterator[None]:
    B.register()
    yield
    B.unregister()


@pytest.fixture(scope="module")
def cases(oracle: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four 256×256 noisy PNG images (their overlays do not compress: ~100 KB each), a model, and the
    outputs of a run that never hit a fault."""
    tmp = tmp_path_factory.mktemp("full_disk")
    rng = np.random.default_rng(2)
    (tmp / "in").mkdir()
    for i in range(CASES):
        img = rng.integers(0, 150, (256, 256)).astype(np.uint8)
        img[40 + 10 * i: 90 + 10 * i, 60:130] = 255
        cv2.imwrite(str(tmp / "in" / f"img_{i}.png"), img)
    ckpt = B.write_checkpoint(tmp / "m.pt", window="dicom")
    assert main(["predict", "--model", str(ckpt), str(tmp / "in"), str(tmp / "clean"), "--no-progress"]) == 0
    return {"in": tmp / "in", "ckpt": ckpt, "clean": tmp / "clean"}


def _outputs(out: Path) -> dict[str, str]:
    """Each case's mask, lesion table and overlays (series.json holds timings: left out)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix in (".png", ".csv")}


def _statuses(out: Path) -> dict[str, int]:
    with sqlite3.connect(out / "manifest.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return dict(db.execute("SELECT status, COUNT(*) FROM series GROUP BY status").fetchall())


def _one_error_line(err: str) -> str:
    """The one line of the failure: stderr's last, the only one saying ``error`` (progress bars aside)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert "Traceback" not in err and sum("error" in ln for ln in lines) == 1 and "error" in lines[-1], err
    return lines[-1]


def _fail_writes(monkeypatch: pytest.MonkeyPatch, under: Path, after: int = 0) -> list[str]:
    """``os.write`` raises ENOSPC for files under ``under`` once ``after`` such writes went through."""
    real, seen = os.write, []

    def write(fd: int, data: bytes) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(under)):
            seen.append(target)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return seen


def test_predict_on_a_full_disk_injected(cases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["predict", "--model", str(cases["ckpt"]), str(cases["in"]), str(out), "--no-progress"]
    _fail_writes(monkeypatch, out, after=6)  # the first case or so goes through, then the disk is full
    capsys.readouterr()
    assert main(args) == 28
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("medseg predict: error: no space left on device writing " + str(out)) and "needed" in line
    st = _statuses(out)
    assert st.get("failed", 0) == 0 and st.get("done", 0) < CASES  # not recorded as failed: the rerun does it
    assert not list(out.glob(".tmp-*")) and not list(out.rglob(".*tmp*"))  # nothing half-written is left
    monkeypatch.undo()  # space freed
    assert main(args) == 0
    assert _statuses(out) == {"done": CASES}
    assert _outputs(out) == _outputs(cases["clean"])


def test_predict_on_a_real_full_filesystem(cases: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected variant covers the same path")
    try:
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 160 * 1024))  # 160 KB left
        out = mnt / "out"
        args = ["predict", "--model", str(cases["ckpt"]), str(cases["in"]), str(out), "--no-progress"]
        capsys.readouterr()
        assert main(args) == 28
        line = _one_error_line(capsys.readouterr().err)
        assert "no space left on device writing " + str(mnt) in line, line
        if (out / "manifest.sqlite").is_file():
            assert _statuses(out).get("failed", 0) == 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        assert main(args) == 0
        assert _statuses(out) == {"done": CASES}
        assert _outputs(out) == _outputs(cases["clean"])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_train_and_evaluate_on_a_full_disk_keep_the_last_good_checkpoint(demo_root: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    ov = tiny_overrides(demo_root, out, **{"tracking.enabled": False, "train.overlay_count": 0})
    args = ["train", str(ROOT / "pipelines" / "quickstart.yaml")] + [a for o in ov for a in ("--set", o)]
    seen = _fail_writes(monkeypatch, out, after=1)  # the first write under out: last.pt before the first step
    capsys.readouterr()
    assert main(args) == 28
    line = _one_error_line(capsys.readouterr().err)
    assert "medseg train: error: no space left on device writing " in line and "/checkpoints/" in line
    assert "MB needed" in line
    (last,) = out.glob("*/*/checkpoints/last.pt")
    assert len(seen) == 2 and seen[0].endswith(".last.pt.tmp" + str(os.getpid()))
    assert torch.load(last, weights_only=True)["step"] == 0  # the last good checkpoint, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temporary left
    monkeypatch.undo()  # space freed: the resume completes
    capsys.readouterr()
    assert main(["train", str(ROOT / "pipelines" / "quickstart.yaml"), "--resume", str(last.parent.parent)]) == 0
    assert torch.load(last, weights_only=True)["step"] == 2

    # evaluate: a prediction or the lesion table on a full disk, the same one line; the rerun completes
    preds = tmp_path / "preds"
    args = ["evaluate", str(ROOT / "pipelines" / "quickstart.yaml"), "--model", str(last), "--split", "val",
            "--save-predictions", str(preds)] + [a for o in ov for a in ("--set", o)]
    _fail_writes(monkeypatch, preds, after=1)
    capsys.readouterr()
    assert main(args) == 28
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("medseg evaluate: error: no space left on device writing " + str(preds)), line
    monkeypatch.undo()
    assert main(args) == 0 and (preds / "lesions_val.csv").is_file()


def test_the_first_failing_write_is_reported_when_a_clean_up_fails_again(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """A failure path that writes to the same full disk (an SQLite store recording the failure) raises
    again: the command still ends with the first failure's one line and code."""
    import medseg.cli

    def predict(args: object) -> int:
        try:
            raise WriteError("/data/out/case/mask.png", errno.ENOSPC, needed=4096)
        finally:
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(medseg.cli, "cmd_predict", predict)
    assert main(["predict", "--model", "m.pt", "in", "out"]) == 28
    line = _one_error_line(capsys.readouterr().err)
    assert "no space left on device writing /data/out/case/mask.png (4.0 KB needed" in line
    monkeypatch.setattr(medseg.cli, "cmd_predict",
                        lambda a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system", "/ro/x")))
    assert main(["predict", "--model", "m.pt", "in", "out"]) == 30
    assert "read-only file system writing /ro/x" in _one_error_line(capsys.readouterr().err)


def test_train_with_the_journal_on_a_full_disk(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """The run's tracking journal cannot grow (``os.write`` raising ENOSPC for it after its first records):
    one line naming the journal, exit 28, the journal whole; ``--resume`` completes and journals the rest."""
    from medseg.tracking.journal import read_journal

    out = tmp_path / "out"
    ov = tiny_overrides(demo_root, out, **{"train.overlay_count": 0, "train.log_every": 1})
    real, seen = os.write, []

    def write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/tracking/journal.jsonl"):
            seen.append(data)
            if len(seen) > 6:  # tags, params, config, pipeline, environment, step 1: then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    capsys.readouterr()
    assert main(["train", str(ROOT / "pipelines" / "quickstart.yaml"), *[a for o in ov for a in ("--set", o)]]) == 28
    line = _one_error_line(capsys.readouterr().err)
    assert "medseg train: error: no space left on device writing " in line and "tracking/journal.jsonl" in line
    (run_dir,) = (out / "quickstart").iterdir()
    _, records, _ = read_journal(run_dir)  # whole: every line a record, none torn
    assert (run_dir / "tracking" / "journal.jsonl").read_text().count("\n") == len(records) + 1
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 0
    monkeypatch.undo()  # space freed: the resume completes
    assert main(["train", str(ROOT / "pipelines" / "quickstart.yaml"), "--resume", str(run_dir)]) == 0
    _, records, sent = read_journal(run_dir)
    assert records[-1]["kind"] == "status" and records[-1]["status"] == "FINISHED"
    assert {r["step"] for r in records if r["kind"] == "metrics" and "train/loss" in r["data"]} == {1, 2}
