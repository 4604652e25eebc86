"""A real Orthanc PACS for tests (Debian's ``orthanc`` + ``orthanc-dicomweb``), on loopback ports.

Started as a subprocess with a temporary storage folder and JSON configuration: HTTP (REST and
DICOMweb under ``/dicom-web``) and DICOM on free 127.0.0.1 ports, one modality entry per listener the
test names; stopped at teardown. Basic authentication is on (user ``medseg``), so a test can show
what a wrong password gives.
"""

from __future__ import annotations

import contextlib
import glob
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.mlflow_server import free_port

USER, PASSWORD = "medseg", "orthanc-test-pw"
#: Orthanc's AE title in the tests
AE_TITLE = "ORTHANC"


def orthanc_binary() -> str | None:
    """``/usr/sbin/Orthanc`` (Debian's package) if installed."""
    return shutil.which("Orthanc") or next(iter(glob.glob("/usr/sbin/Orthanc")), None)


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library from Debian's ``orthanc-dicomweb``."""
    found = sorted(glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*")
                   + glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))
    return found[0] if found else None


@dataclass
class Orthanc:
    """A running Orthanc: REST root, DICOMweb root, DICOM port and the process."""

    http_port: int
    dicom_port: int
    process: subprocess.Popen
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, **kw: object) -> requests.Response:
        r = requests.request(method, self.url + path, auth=(USER, PASSWORD), timeout=60, **kw)
        r.raise_for_status()
        return r

    def upload(self, files: list[Path]) -> None:
        for p in files:
            self.rest("POST", "/instances", data=Path(p).read_bytes())

    def series_of_study(self, study_uid: str) -> list[dict]:
        """``[{"uid", "modality", "instances"}]`` of a study (empty when Orthanc does not hold it)."""
        found = self.rest("POST", "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).json()
        out = []
        for sid in found:
            for s in self.rest("GET", f"/studies/{sid}/series").json():
                out.append({"uid": s["MainDicomTags"]["SeriesInstanceUID"], "modality": s["MainDicomTags"].get("Modality"),
                            "instances": len(s["Instances"]), "id": s["ID"]})
        return out

    def clear(self) -> None:
        for sid in self.rest("GET", "/studies").json():
            self.rest("DELETE", f"/studies/{sid}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)


@contextlib.contextmanager
def orthanc_server(modalities: dict[str, tuple[str, int]] | None = None) -> Iterator[Orthanc]:
    """An Orthanc with DICOMweb on free loopback ports; ``modalities``: name → (AE title, port) on 127.0.0.1."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None or plugin is None:
        raise RuntimeError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb); `make sysdeps` installs it")
    work = Path(tempfile.mkdtemp(prefix="medseg-orthanc-"))
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "medseg-test", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": AE_TITLE, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "StudiesMetadata": "Full",
                     "SeriesMetadata": "Full"},
        "DicomModalities": {k: [ae, "127.0.0.1", port] for k, (ae, port) in (modalities or {}).items()},
        "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
        "StorageCompression": False, "HttpTimeout": 60, "DicomScuTimeout": 30, "DicomAssociationCloseDelay": 0,
        "StableAge": 1, "SaveJobs": False, "OverwriteInstances": True,
    }
    (work / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen([binary, str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    server = Orthanc(http_port, dicom_port, proc, work)
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {(work / 'orthanc.log').read_text()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(server.dicomweb + "/studies", auth=(USER, PASSWORD), timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError("Orthanc did not answer within 60 s")
            time.sleep(0.2)
        yield server
    finally:
        server.stop()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
