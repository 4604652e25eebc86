"""DICOMweb faults against a real Orthanc behind a fault-injecting HTTP proxy: a WADO-RS retrieve that breaks
mid-way (retried, then recorded when it keeps breaking) and a STOW-RS rejection (recorded; local outputs stay;
a later run stores it)."""

from __future__ import annotations

import base64
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from medseg.predict.dicomweb import run_dicomweb
from tests.orthanc_server import PASSWORD, USER, Orthanc, orthanc_server
from tests.predict import builders as B
from tests.predict.pacs_builders import write_ct

pytestmark = pytest.mark.slow


class Faults:
    """How many WADO-RS series retrieves to cut in half, and whether STOW-RS is refused."""

    def __init__(self) -> None:
        self.break_retrieves = 0
        self.reject_stow = False
        self.retrieves = 0
        #: a bearer token the proxy accepts in place of Orthanc's basic credentials (a token-checking gateway)
        self.token = "medseg-test-token"
        self.auth_seen: set[str] = set()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, made with ``cryptography``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    crt, pem = folder / "server.crt", folder / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def _proxy(target: str, faults: Faults, tls: tuple[Path, Path] | None = None) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def _forward(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
            if method == "POST" and faults.reject_stow:
                self.send_response(409)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            auth = self.headers.get("Authorization", "")
            faults.auth_seen.add(auth.split(" ")[0])
            if auth.startswith("Bearer "):
                if auth != f"Bearer {faults.token}":
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers["Authorization"] = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            r = requests.request(method, target + self.path, headers=headers, data=body, timeout=60)
            data = r.content
            parts = self.path.split("?")[0].rstrip("/").split("/")
            retrieve = method == "GET" and len(parts) >= 6 and parts[-2] == "series" and parts[-4] == "studies"
            if retrieve:
                faults.retrieves += 1
            cut = retrieve and faults.break_retrieves > 0
            if cut:
                faults.break_retrieves -= 1
            self.send_response(r.status_code)
            for k, v in r.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if cut else data)
            if cut:
                self.close_connection = True

        def do_GET(self) -> None:
            self._forward("GET")

        def do_POST(self) -> None:
            self._forward("POST")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    B.register()
    tmp = tmp_path_factory.mktemp("faults")
    with orthanc_server() as o:
        faults = Faults()
        proxy = _proxy(o.url, faults)
        yield {"orthanc": o, "faults": faults, "url": f"dicomweb+http://127.0.0.1:{proxy.server_port}/dicom-web",
               "ckpt": B.write_checkpoint(tmp / "m" / "best.pt"), "tmp": tmp}
        proxy.shutdown()
    B.unregister()


@pytest.fixture(autouse=True)
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", PASSWORD)


def _rows(out: Path) -> dict[str, tuple]:
    with sqlite3.connect(out / "manifest.sqlite") as db:
        return {k: (s, r, a) for k, s, r, a in db.execute("SELECT key, status, reason, store_answer FROM series")}


def test_a_retrieve_that_breaks_is_retried_then_recorded(setup: dict, tmp_path: Path) -> None:
    o: Orthanc = setup["orthanc"]
    faults: Faults = setup["faults"]
    _dss, study, _se = write_ct(tmp_path / "ct")
    o.upload(sorted((tmp_path / "ct").iterdir()))
    faults.break_retrieves, faults.retrieves = 1, 0  # the first attempt breaks, the second works
    res = run_dicomweb(setup["ckpt"], setup["url"], tmp_path / "a", [study], progress=False, retry_wait_s=0.05)
    assert faults.retrieves == 2 and not res.failed and len(res.processed) == 1
    faults.break_retrieves, faults.retrieves = 99, 0  # it keeps breaking: recorded, nothing predicted
    res = run_dicomweb(setup["ckpt"], setup["url"], tmp_path / "b", [study], progress=False, retry_wait_s=0.05)
    faults.break_retrieves = 0
    assert faults.retrieves == 3 and not res.processed
    rows = [v for k, v in _rows(tmp_path / "b").items() if k.startswith("dicomweb:")]
    assert len(rows) == 1 and rows[0][0] == "failed" and rows[0][1].startswith("retrieve failed after 3 attempts: "), rows
    # the rerun retrieves it
    res = run_dicomweb(setup["ckpt"], setup["url"], tmp_path / "b", [study], progress=False, retry_wait_s=0.05)
    assert len(res.processed) == 1


def test_a_stow_rejection_is_recorded_and_a_later_run_stores(setup: dict, tmp_path: Path) -> None:
    o: Orthanc = setup["orthanc"]
    faults: Faults = setup["faults"]
    _dss, study, _se = write_ct(tmp_path / "ct")
    o.upload(sorted((tmp_path / "ct").iterdir()))
    out = tmp_path / "out"
    faults.reject_stow = True
    try:
        run_dicomweb(setup["ckpt"], setup["url"], out, [study], store=True, progress=False)
    finally:
        faults.reject_stow = False
    answers = [a for _s, _r, a in _rows(out).values() if a]
    assert answers == ["failed: STOW-RS rejected (HTTP 409)"]
    assert len(list(out.glob("study-*/series-*/sr.dcm"))) == 1  # the local outputs stay
    assert not [s for s in o.series_of_study(study) if s["modality"] in ("SEG", "SR")]
    run_dicomweb(setup["ckpt"], setup["url"], out, [study], store=True, progress=False)
    assert sorted(s["modality"] for s in o.series_of_study(study) if s["modality"] in ("SEG", "SR")) == ["SEG", "SR"]
    assert [a for _s, _r, a in _rows(out).values() if a] == ["ok: STOW-RS: 2 instance(s) stored"]


def test_a_bearer_token_from_the_environment_authenticates(setup: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    from medseg.cli import main

    o: Orthanc = setup["orthanc"]
    faults: Faults = setup["faults"]
    _dss, study, _se = write_ct(tmp_path / "ct")
    o.upload(sorted((tmp_path / "ct").iterdir()))
    monkeypatch.delenv("MEDSEG_DICOMWEB_USER")
    monkeypatch.setenv("MEDSEG_DICOMWEB_TOKEN", faults.token)
    faults.auth_seen.clear()
    res = run_dicomweb(setup["ckpt"], setup["url"], tmp_path / "a", [study], progress=False)
    assert len(res.processed) == 1 and faults.auth_seen == {"Bearer"}
    monkeypatch.setenv("MEDSEG_DICOMWEB_TOKEN", "not-the-token")
    rc = main(["predict", "--model", str(setup["ckpt"]), setup["url"], str(tmp_path / "b"), "--study", study,
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "(HTTP 403)" in err[0] and "not-the-token" not in err[0]
    # credentials in the URL are refused before anything is sent
    url = setup["url"].replace("http://", f"http://{USER}:{PASSWORD}@")
    rc = main(["predict", "--model", str(setup["ckpt"]), url, str(tmp_path / "c"), "--study", study, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "credentials in the DICOMweb URL are refused" in err[0] and PASSWORD not in err[0]


def test_tls_is_verified_and_a_ca_bundle_is_accepted(setup: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    from medseg.cli import main

    o: Orthanc = setup["orthanc"]
    crt, key = _self_signed(tmp_path)
    proxy = _proxy(o.url, Faults(), tls=(crt, key))
    try:
        _dss, study, _se = write_ct(tmp_path / "ct")
        o.upload(sorted((tmp_path / "ct").iterdir()))
        url = f"dicomweb+https://127.0.0.1:{proxy.server_port}/dicom-web"
        rc = main(["predict", "--model", str(setup["ckpt"]), url, str(tmp_path / "a"), "--study", study, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "TLS certificate is not trusted" in err[0]
        assert not (tmp_path / "a").exists()
        rc = main(["predict", "--model", str(setup["ckpt"]), url, str(tmp_path / "b"), "--study", study,
                   "--ca-bundle", str(crt), "--no-progress"])
        assert rc == 0 and len(list((tmp_path / "b").glob("study-*/series-*/sr.dcm"))) == 1
    finally:
        proxy.shutdown()
