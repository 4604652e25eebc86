"""Store-back bookkeeping and the listener's limits, without a PACS: the manifest's store-back columns (and their
migration), an instance over the size limit refused with 0xA700 and nothing written, a listener without allowed
calling AE titles refused, and a quiet console (highdicom / pydicom chatter in the log file only)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from medseg.predict.listen import Listener, ListenOptions
from medseg.predict.manifest import Manifest
from medseg.predict.store import PacsError
from tests.mlflow_server import free_port
from tests.predict import builders as B
from tests.predict.pacs_builders import write_ct


def test_an_older_manifest_gains_the_store_back_columns(tmp_path: Path) -> None:
    path = tmp_path / "manifest.sqlite"
    with sqlite3.connect(path) as db:  # the schema before store-back
        db.executescript("""
            CREATE TABLE series (key TEXT PRIMARY KEY, kind TEXT, output TEXT, n_files INTEGER, n_slices INTEGER,
                status TEXT, reason TEXT, read_s REAL, predict_s REAL, write_s REAL, total_s REAL,
                n_lesions INTEGER, updated REAL);
            INSERT INTO series (key, status, output) VALUES ('abc', 'done', 'study-1/series-2');""")
    m = Manifest(path)
    m.set_series("abc", stored='{"to": "x"}', store_answer="ok: C-STORE")
    rows = m.rows("series")
    m.close()
    assert len(rows) == 1 and rows[0]["status"] == "done" and rows[0]["output"] == "study-1/series-2"
    assert (rows[0]["stored"], rows[0]["store_answer"]) == ('{"to": "x"}', "ok: C-STORE")
    Manifest(path).close()  # opening again is a no-op


def test_listener_refuses_an_oversized_instance_and_writes_nothing(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    dss, _study, _series = write_ct(tmp_path / "ct")
    port = free_port()
    lst = Listener("unused-model", tmp_path / "out", ListenOptions(port=port, calling_aets=["SENDER"],
                                                                   max_instance_mb=0.001, min_free_mb=0))
    lst.start()
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
        assert assoc.is_established
        status = assoc.send_c_store(pydicom.dcmread(next((tmp_path / "ct").iterdir())))
        assoc.release()
        assert status.Status == 0xA700
    finally:
        lst.stop()
    assert not list((tmp_path / "out" / ".incoming").rglob("*.dcm"))


def test_listener_needs_allowed_calling_ae_titles(tmp_path: Path) -> None:
    with pytest.raises(PacsError, match="--calling-aet"):
        Listener("m", tmp_path, ListenOptions())


@pytest.mark.slow
def test_console_is_quiet_and_chatter_goes_to_the_log_file(tmp_path: Path) -> None:
    write_ct(tmp_path / "in")
    ckpt = B.write_checkpoint(tmp_path / "m" / "best.pt")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.predict import builders as B; B.register(); "
            "from medseg.cli import main; sys.exit(main(sys.argv[2:]))")
    root = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", code, root, "predict", "--model", str(ckpt), str(tmp_path / "in"),
                        str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "highdicom" not in r.stderr + r.stdout and "Warning" not in r.stderr
    assert "highdicom" in (tmp_path / "out" / "medseg-predict.log").read_text()
    assert "1 case(s) predicted" in r.stdout


def _send(port: int, files: list[Path], abort: bool = False) -> list[int]:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
    assert assoc.is_established
    codes = [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in files]
    assoc.abort() if abort else assoc.release()
    return codes


def test_listener_refuses_when_the_disk_would_fill(tmp_path: Path) -> None:
    write_ct(tmp_path / "ct")
    port = free_port()
    lst = Listener("unused-model", tmp_path / "out", ListenOptions(port=port, calling_aets=["SENDER"],
                                                                   min_free_mb=10**9))
    lst.start()
    try:
        assert _send(port, sorted((tmp_path / "ct").iterdir())[:2]) == [0xA700, 0xA700]
    finally:
        lst.stop()
    assert not list((tmp_path / "out" / ".incoming").rglob("*.dcm"))


@pytest.mark.slow
def test_an_aborted_association_is_predicted_after_the_quiet_time(tmp_path: Path) -> None:
    B.register()
    try:
        write_ct(tmp_path / "ct")
        ckpt = B.write_checkpoint(tmp_path / "m" / "best.pt")
        port = free_port()
        lst = Listener(ckpt, tmp_path / "out", ListenOptions(port=port, calling_aets=["SENDER"], quiet_s=1.0,
                                                             min_free_mb=0))
        lst.start()
        try:
            assert _send(port, sorted((tmp_path / "ct").iterdir()), abort=True) == [0] * 6
            deadline = time.time() + 120
            while not lst.predicted and time.time() < deadline:
                time.sleep(0.2)
        finally:
            lst.stop()
        assert len(lst.predicted) == 1
        assert len(list((tmp_path / "out").glob("study-*/series-*/sr.dcm"))) == 1
        assert not list((tmp_path / "out" / ".incoming").rglob("*.dcm"))
    finally:
        B.unregister()
