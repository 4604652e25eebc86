"""One writer per output folder (and per training run folder): two ``medseg predict`` runs started together
on one folder — one does every case once, the other refuses in one line naming it; a lock left by a dead
process never blocks a rerun; a second ``train --resume`` of a running folder refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from medseg.cli import EXIT_BUSY, main
from medseg.config import Config, to_dict
from medseg.io import FolderBusy, exclusive_lock
from medseg.predict import run_predict
from medseg.training.resume import lock_run_dir
from tests.predict import builders as B

ROOT = Path(__file__).resolve().parents[2]
CASES = 4


@pytest.fixture(scope="module")
def oracle():
    B.register()
    yield
    B.unregister()


def _images(folder: Path, n: int = CASES) -> Path:
    """``n`` small PNG images with one bright square each (cheap cases)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        img = rng.integers(0, 150, (48, 64)).astype(np.uint8)
        img[10 + i: 25 + i, 20:40] = 255
        cv2.imwrite(str(folder / f"img_{i}.png"), img)
    return folder


# a ``medseg predict`` process with the oracle registered and every attempt at a case logged (pid, key)
_CODE = """
import os, sys
sys.path.insert(0, {root!r})
from tests.predict import builders as B
B.register()
import medseg.predict.run as R
_orig = R.process_case
def _logged(loaded, *a, **k):
    with open({log!r}, "a") as f:
        f.write(f"{{os.getpid()}} {{loaded.case.key}}\\n")
    return _orig(loaded, *a, **k)
R.process_case = _logged
from medseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_predicts_on_one_folder_one_works_the_other_refuses(oracle: None, tmp_path: Path) -> None:
    ckpt = B.write_checkpoint(tmp_path / "m.pt", delay_s=0.6, window="dicom")  # ≥ 2.4 s of work under the lock
    inputs, out, log = _images(tmp_path / "in"), tmp_path / "out", tmp_path / "attempts.log"
    args = [sys.executable, "-c", _CODE.format(root=str(ROOT), log=str(log)), "predict", "--model", str(ckpt),
            str(inputs), str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.pid, p.wait(timeout=180), *p.communicate()) for p in procs]
    (winner,) = [r for r in results if r[1] == 0]
    (loser,) = [r for r in results if r[1] != 0]
    assert loser[1] == EXIT_BUSY
    lines = loser[3].strip().splitlines()
    assert len(lines) == 1, loser[3]
    assert "in use by another medseg predict" in lines[0] and f"pid {winner[0]}" in lines[0]
    assert "predict --model" in lines[0] and str(out) in lines[0]
    attempts = log.read_text().split()
    pids, keys = attempts[0::2], attempts[1::2]
    assert set(pids) == {str(winner[0])} and len(keys) == len(set(keys)) == CASES  # each case once, by one run
    folders = [p for p in (out / "images").iterdir() if p.is_dir()]
    assert len(folders) == CASES and all((p / "lesions.csv").is_file() for p in folders)  # nothing deleted
    import sqlite3

    with sqlite3.connect(out / "manifest.sqlite") as db:
        assert db.execute("SELECT status, COUNT(*) FROM series GROUP BY status").fetchall() == [("done", CASES)]
    assert not list(out.glob(".tmp-*"))


def test_a_lock_left_by_a_dead_process_does_not_block_a_rerun(oracle: None, tmp_path: Path) -> None:
    ckpt = B.write_checkpoint(tmp_path / "m.pt", window="dicom")
    inputs, out = _images(tmp_path / "in", 2), tmp_path / "out"
    lock = out / "manifest.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); from medseg.io import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1], 'medseg predict'):\n print('held', flush=True); time.sleep(120)",
         str(lock), str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy) as busy:  # a live holder: refused, nothing done
            run_predict(ckpt, inputs, out, progress=False)
        assert f"pid {holder.pid}" in str(busy.value) and not (out / "manifest.sqlite").exists()
        stale = out / ".tmp-part0" / "half-written-case"
        stale.mkdir(parents=True)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the dead holder's record is still there
    res = run_predict(ckpt, inputs, out, progress=False)
    assert len(res.processed) == 2 and not res.failed
    assert not (out / ".tmp-part0").exists()  # the dead run's working folder was wiped by the new holder
    assert lock.read_text() == ""  # emptied on a clean exit
    # a lock file written by hand (no flock held) is no lock either
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time(), "command": "medseg predict"}))
    res = run_predict(ckpt, inputs, out, progress=False)
    assert len(res.already_done) == 2


def test_parts_lock_separately(oracle: None, tmp_path: Path) -> None:
    """``--num-parts`` parts run side by side by design: holding part 0 does not block part 1."""
    ckpt = B.write_checkpoint(tmp_path / "m.pt", window="dicom")
    inputs, out = _images(tmp_path / "in", 3), tmp_path / "out"
    with exclusive_lock(out / "manifest-part0-of-2.lock", "medseg predict of part 0 of 2"):
        with pytest.raises(FolderBusy):
            run_predict(ckpt, inputs, out, num_parts=2, part_id=0, progress=False)
        res = run_predict(ckpt, inputs, out, num_parts=2, part_id=1, progress=False)
    assert not res.failed


def test_a_second_resume_of_a_running_folder_refuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "out" / "quickstart" / "unet-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(Config())))
    with lock_run_dir(run_dir):  # this process is the training that runs in the folder
        code = main(["train", str(ROOT / "pipelines" / "quickstart.yaml"), "--resume", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BUSY and len(err) == 1
    assert "in use by another medseg train" in err[0] and f"pid {os.getpid()}" in err[0]
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == b"a checkpoint"
    assert sorted(p.name for p in run_dir.iterdir()) == [".medseg.lock", "checkpoints", "config.yaml"]
