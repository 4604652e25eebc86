"""medseg against a real PACS: Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) on loopback.

DICOMweb pull with ``--store-back`` (exactly one SEG and one SR in the study, also after a rerun),
the SR's values equal ``lesions.csv`` (highdicom and dcmqi's ``tid1500reader``), push by C-STORE to
``medseg listen`` (Orthanc told over REST to send the study), a listener killed with -9 after it
acknowledged instances and before predicting (the restart predicts, nothing re-sent), a refused
calling AE title, an unreachable server and a 401 (one line each).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from medseg.cli import main
from medseg.predict.sr import MEASURES, read_sr_measurements
from tests.mlflow_server import free_port
from tests.orthanc_server import AE_TITLE, PASSWORD, USER, Orthanc, orthanc_server
from tests.predict import builders as B
from tests.predict.pacs_builders import write_ct
from tests.predict.test_sr import tid1500reader

pytestmark = pytest.mark.slow
LISTEN_AET = "MEDSEG"


@pytest.fixture(scope="module")
def oracle():
    B.register()
    yield
    B.unregister()


@pytest.fixture(scope="module")
def listen_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(listen_port: int) -> Orthanc:
    with orthanc_server({"medseg": (LISTEN_AET, listen_port)}) as o:
        yield o


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return B.write_checkpoint(tmp_path_factory.mktemp("model") / "best.pt")


@pytest.fixture()
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", PASSWORD)


def _medseg_series(orthanc: Orthanc, study: str) -> dict[str, int]:
    """Modality → number of series in the study made by medseg (SEG / SR)."""
    counts: dict[str, int] = {}
    for s in orthanc.series_of_study(study):
        if s["modality"] in ("SEG", "SR"):
            counts[s["modality"]] = counts.get(s["modality"], 0) + s["instances"]
    return counts


def test_dicomweb_pull_predict_store_back_once(orthanc: Orthanc, oracle: None, ckpt: Path, creds: None,
                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dss, study, series = write_ct(tmp_path / "ct")
    orthanc.upload(sorted((tmp_path / "ct").iterdir()))
    out = tmp_path / "out"
    argv = ["predict", "--model", str(ckpt), f"dicomweb+{orthanc.dicomweb}", str(out), "--study", study,
            "--store-back", "--no-progress"]
    assert main(argv) == 0
    assert _medseg_series(orthanc, study) == {"SEG": 1, "SR": 1}
    assert not list((out / ".dicomweb-staging").rglob("*.dcm"))  # staged files removed once committed
    case = next(out.glob("study-*/series-*"))
    with sqlite3.connect(out / "manifest.sqlite") as db:
        stored = db.execute("SELECT stored, store_answer FROM series WHERE stored IS NOT NULL").fetchall()
    assert len(stored) == 1 and stored[0][1].startswith("ok: STOW-RS: 2 instance(s) stored")
    assert set(json.loads(stored[0][0])["instances"]) == {"seg.dcm", "sr.dcm"}
    # the SR Orthanc holds is the one written, its values those of lesions.csv, referencing the SEG
    sr_uid = str(pydicom.dcmread(case / "sr.dcm").SOPInstanceUID)
    got = orthanc.rest("POST", "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sr_uid}}).json()
    (tmp_path / "sr_back.dcm").write_bytes(orthanc.rest("GET", f"/instances/{got[0]}/file").content)
    rows = list(csv.DictReader((case / "lesions.csv").open()))
    back = read_sr_measurements(tmp_path / "sr_back.dcm")
    assert len(back) == len(rows) == 2
    for g, r in zip(back, rows):
        assert {c: g[c] for c in MEASURES} == {c: float(r[c]) for c in MEASURES}
        assert g["seg_sop_uid"] == str(pydicom.dcmread(case / "seg.dcm").SOPInstanceUID)
    subprocess.run([tid1500reader(), "--inputDICOM", str(tmp_path / "sr_back.dcm"), "--outputMetadata",
                    str(tmp_path / "m.json")], check=True, capture_output=True, timeout=120)
    assert len(json.loads((tmp_path / "m.json").read_text())["Measurements"]) == 2
    # rerun: nothing predicted, nothing stored twice
    capsys.readouterr()
    assert main(argv) == 0
    assert _medseg_series(orthanc, study) == {"SEG": 1, "SR": 1}
    with sqlite3.connect(out / "manifest.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM series WHERE stored IS NOT NULL").fetchone()[0] == 1
        # the study now holds our SEG and SR: not images, skipped with the reason
        skipped = sorted(r for (r,) in db.execute("SELECT reason FROM series WHERE status = 'skipped'"))
    assert skipped == ["not an image series (Modality SEG)", "not an image series (Modality SR)"]
    printed = capsys.readouterr()
    assert "0 case(s) predicted" in printed.out and PASSWORD not in printed.out + printed.err
    assert PASSWORD not in (out / "medseg-predict.log").read_text()
    assert PASSWORD.encode() not in (out / "manifest.sqlite").read_bytes()
    # a QIDO-RS query finds the study; another output folder stores the same UIDs again: Orthanc replaces them
    other = tmp_path / "other"
    assert main(["predict", "--model", str(ckpt), f"dicomweb+{orthanc.dicomweb}", str(other), "--query",
                 f"StudyInstanceUID={study}&ModalitiesInStudy=CT", "--store-back", "--no-progress"]) == 0
    assert len(list(other.glob("study-*/series-*/sr.dcm"))) == 1
    assert _medseg_series(orthanc, study) == {"SEG": 1, "SR": 1}


def test_unknown_study_and_non_image_series_are_recorded(orthanc: Orthanc, oracle: None, ckpt: Path, creds: None,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["predict", "--model", str(ckpt), f"dicomweb+{orthanc.dicomweb}", str(out), "--study", "1.2.3.4.5.999",
                 "--no-progress"]) == 0
    with sqlite3.connect(out / "manifest.sqlite") as db:
        rows = db.execute("SELECT status, reason FROM series WHERE kind = 'dicomweb'").fetchall()
    assert rows == [("skipped", "unknown study: the server holds no series of it")]


def test_unreachable_server_and_401_are_one_line_each(oracle: None, ckpt: Path, orthanc: Orthanc, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", "wrong-password")
    rc = main(["predict", "--model", str(ckpt), f"dicomweb+{orthanc.dicomweb}", str(tmp_path / "a"), "--study", "1.2.3",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "refused the credentials (HTTP 401)" in err[0] and "wrong-password" not in err[0]
    assert not (tmp_path / "a").exists()
    port = free_port()
    rc = main(["predict", "--model", str(ckpt), f"dicomweb+http://127.0.0.1:{port}/dicom-web", str(tmp_path / "b"),
               "--study", "1.2.3", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"127.0.0.1:{port}/dicom-web is unreachable" in err[0]
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- push: medseg listen


def _start_listener(ckpt: Path, out: Path, port: int, orthanc: Orthanc, *extra: str, **popen: Any) -> subprocess.Popen:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.predict import builders as B; B.register(); "
            "from medseg.cli import main; sys.exit(main(sys.argv[2:]))")
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen(
        [sys.executable, "-c", code, root, "listen", "--model", str(ckpt), str(out), "--ae-title", LISTEN_AET,
         "--port", str(port), "--host", "127.0.0.1", "--calling-aet", AE_TITLE, "--min-free-mb", "1", *extra,
         "--set", f"predict.store.ae_title={AE_TITLE}", "--set", "predict.store.host=127.0.0.1",
         "--set", f"predict.store.port={orthanc.dicom_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **popen)
    _wait_echo(port, proc)
    return proc


def _stop(proc: subprocess.Popen, timeout: float = 120) -> str:
    """SIGINT the listener and return its output; one that outlives ``timeout`` is killed (so it cannot keep
    the module's port and answer the next test's associations) and fails the test."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the listener did not stop within {timeout:.0f} s of SIGINT:\n{proc.communicate()[0]}")


def _wait_echo(port: int, proc: subprocess.Popen, aet: str = AE_TITLE) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        ae = AE(ae_title=aet)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title=LISTEN_AET)
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            return bool(status) and status.Status == 0
        if assoc.is_rejected:
            return False
        time.sleep(0.3)
    raise AssertionError("medseg listen did not answer C-ECHO")


def _wait(cond, timeout: float = 90.0) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.3)


def test_orthanc_pushes_to_the_listener_which_stores_back(orthanc: Orthanc, oracle: None, ckpt: Path,
                                                          listen_port: int, tmp_path: Path) -> None:
    dss, study, _series = write_ct(tmp_path / "ct")
    orthanc.upload(sorted((tmp_path / "ct").iterdir()))
    out = tmp_path / "out"
    proc = _start_listener(ckpt, out, listen_port, orthanc, "--store-back", "--quiet-s", "60")
    try:
        sid = orthanc.rest("POST", "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study}}).json()[0]
        orthanc.rest("POST", "/modalities/medseg/store", json={"Resources": [sid], "Synchronous": True})
        _wait(lambda: _medseg_series(orthanc, study) == {"SEG": 1, "SR": 1})
        assert not _wait_echo(listen_port, proc, aet="INTRUDER")  # a calling AE title not allowed is refused
    finally:
        text = _stop(proc)
    lines = [ln for ln in text.splitlines() if "series " in ln and "instances" in ln]
    assert len(lines) == 1 and "6 instances, 1 case(s) predicted, 2 lesion(s); stored back: ok" in lines[0], text
    assert B.PATIENT_NAME.split("^")[0] not in text and B.PATIENT_ID not in text
    assert not list((out / ".incoming").rglob("*.dcm"))


def test_listener_stops_on_sigint_and_sigterm_even_when_its_parent_ignores_sigint(
        orthanc: Orthanc, ckpt: Path, listen_port: int, tmp_path: Path) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = _start_listener(ckpt, tmp_path / sig.name, listen_port, orthanc,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        proc.send_signal(sig)
        try:
            text = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the listener ignored {sig.name}:\n{proc.communicate()[0]}")
        assert proc.returncode == 0 and f"stopping ({sig.name})" in text, text


def test_listener_killed_after_ack_predicts_on_restart(orthanc: Orthanc, oracle: None, ckpt: Path, listen_port: int,
                                                       tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    dss, study, _series = write_ct(tmp_path / "ct")
    out = tmp_path / "out"
    proc = _start_listener(ckpt, out, listen_port, orthanc, "--store-back", "--quiet-s", "600")
    ae = AE(ae_title=AE_TITLE)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", listen_port, ae_title=LISTEN_AET)
    assert assoc.is_established
    for p in sorted((tmp_path / "ct").iterdir()):
        assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0  # acknowledged
    os.kill(proc.pid, signal.SIGKILL)  # before the association is released: nothing predicted yet
    proc.wait(timeout=30)
    assoc.abort()
    assert len(list((out / ".incoming").rglob("*.dcm"))) == 6 and not list(out.glob("study-*"))
    proc = _start_listener(ckpt, out, listen_port, orthanc, "--store-back", "--quiet-s", "600")
    try:
        _wait(lambda: _medseg_series(orthanc, study) == {"SEG": 1, "SR": 1})
    finally:
        _stop(proc)
    assert len(list(out.glob("study-*/series-*/sr.dcm"))) == 1 and not list((out / ".incoming").rglob("*.dcm"))
