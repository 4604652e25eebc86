"""``medseg predict … dicomweb+http(s)://HOST/dicom-web OUTPUT_DIR``: studies pulled over DICOMweb.

Series are found with QIDO-RS (``--study UID``, repeatable, or ``--query "ModalitiesInStudy=CT&…"``)
and retrieved with WADO-RS (``dicomweb-client``) into ``OUTPUT_DIR/.dicomweb-staging/``, which the
folder reader then reads: from the files onward it is the same run as a folder's. A series' staged
files are removed once its case is committed (``done``); a rerun retrieves only what is not done.

Authentication comes from the environment, never from the command line or the URL:
``MEDSEG_DICOMWEB_TOKEN`` (a bearer token) or ``MEDSEG_DICOMWEB_USER`` / ``MEDSEG_DICOMWEB_PASSWORD``
(basic). TLS is verified by default; ``MEDSEG_DICOMWEB_CA_BUNDLE`` (or ``--ca-bundle``) names a CA
bundle for a hospital's own CA. Credentials never reach logs, outputs, the manifest or MLflow: only
the URL without user information or query is recorded.

Faults are one line each: an unreachable server, a 401 / 403 (:class:`~medseg.predict.store.PacsError`,
nothing done); an unknown study UID or a non-image series (SR, KO, PR, SEG …) is a manifest row with
the reason; a retrieve that breaks mid-way is retried (``RETRIES`` times) and then recorded as failed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from medseg.io import atomic_write_bytes
from medseg.predict.manifest import Manifest, manifest_name
from medseg.predict.run import PredictResult, run_predict, summary_table
from medseg.predict.store import PacsError, store_back, stow_sender

__all__ = ["NON_IMAGE", "RETRIES", "connect", "find_series", "is_dicomweb", "public_url", "run_dicomweb",
           "stage_series"]

log = logging.getLogger("medseg.predict")

PREFIX = "dicomweb+"
#: modalities that are not images: skipped with the reason
NON_IMAGE = {"SR", "KO", "PR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG", "DOC", "PLAN", "FID", "AU",
             "ECG", "HD"}
#: retrieve attempts of a series before it is recorded as failed
RETRIES = 3
STAGING = ".dicomweb-staging"


def is_dicomweb(source: str | Path) -> bool:
    """Whether an INPUT names a DICOMweb server (``dicomweb+http://`` or ``dicomweb+https://``)."""
    return str(source).startswith((PREFIX + "http://", PREFIX + "https://"))


def public_url(url: str) -> str:
    """The server URL as logs and the manifest may show it: scheme, host, port and path only."""
    parts = urlsplit(url[len(PREFIX):] if url.startswith(PREFIX) else url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _hash(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def connect(url: str, ca_bundle: str | None = None) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for ``dicomweb+http(s)://…`` with the environment's credentials."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    base = url[len(PREFIX):] if url.startswith(PREFIX) else url
    parts = urlsplit(base)
    if parts.username or parts.password:
        raise PacsError("credentials in the DICOMweb URL are refused: set MEDSEG_DICOMWEB_TOKEN or "
                        "MEDSEG_DICOMWEB_USER / MEDSEG_DICOMWEB_PASSWORD")
    ca = ca_bundle or os.environ.get("MEDSEG_DICOMWEB_CA_BUNDLE")

    class Session(requests.Session):
        def merge_environment_settings(self, *args: Any, **kw: Any) -> dict[str, Any]:
            merged = super().merge_environment_settings(*args, **kw)
            if ca:  # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override session.verify: ours wins
                merged["verify"] = ca
            return merged

    session = Session()
    token = os.environ.get("MEDSEG_DICOMWEB_TOKEN")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif os.environ.get("MEDSEG_DICOMWEB_USER"):
        session.auth = (os.environ["MEDSEG_DICOMWEB_USER"], os.environ.get("MEDSEG_DICOMWEB_PASSWORD", ""))
    session.verify = ca or True
    client = DICOMwebClient(base.rstrip("/"), session=session)
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)  # 429 / 503 / 504: briefly
    return client


def _call(url: str, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    """Run a client call; an unreachable server or refused credentials → :class:`PacsError` (one line)."""
    import requests

    try:
        return fn(*args, **kw)
    except requests.HTTPError as e:
        code = e.response.status_code if e.response is not None else 0
        if code in (401, 403):
            raise PacsError(f"DICOMweb server {public_url(url)} refused the credentials (HTTP {code}) during {what}: "
                            f"check MEDSEG_DICOMWEB_TOKEN or MEDSEG_DICOMWEB_USER / MEDSEG_DICOMWEB_PASSWORD") from None
        raise
    except requests.exceptions.SSLError:
        raise PacsError(f"DICOMweb server {public_url(url)}: the TLS certificate is not trusted "
                        f"(give the hospital's CA with --ca-bundle)") from None
    except requests.ConnectionError:
        raise PacsError(f"DICOMweb server {public_url(url)} is unreachable ({what})") from None


def _value(item: dict, tag: str) -> str:
    vals = (item.get(tag) or {}).get("Value") or [""]
    return str(vals[0])


def find_series(client: Any, url: str, studies: list[str], query: str | None
                ) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """QIDO-RS: ``(series to pull [(study, series, modality)], skipped [(study, series or "", reason)])``."""
    import requests

    study_uids = list(dict.fromkeys(studies))
    if query:
        found = _call(url, "QIDO-RS study search", client.search_for_studies, search_filters=dict(parse_qsl(query)))
        study_uids += [u for u in (_value(s, "0020000D") for s in found) if u and u not in study_uids]
    pull, skipped = [], []
    for st in study_uids:
        try:
            series = _call(url, "QIDO-RS series search", client.search_for_series, study_instance_uid=st)
        except requests.HTTPError as e:
            if e.response is None or e.response.status_code != 404:
                raise
            series = []
        if not series:
            skipped.append((st, "", "unknown study: the server holds no series of it"))
        for s in series:
            uid, modality = _value(s, "0020000E"), _value(s, "00080060").upper()
            if modality in NON_IMAGE:
                skipped.append((st, uid, f"not an image series (Modality {modality})"))
            else:
                pull.append((st, uid, modality))
    return pull, skipped


def stage_series(client: Any, url: str, study: str, series: str, folder: Path, retries: int = RETRIES,
                 wait_s: float = 1.0) -> int:
    """WADO-RS retrieve of one series into ``folder`` (one file per instance, fsync'd); retried on a break.

    Instances already staged (an earlier attempt or run) are kept, not written again.

    Raises:
        PacsError: unreachable / refused credentials (not retried).
        requests.RequestException: the retrieve kept failing after ``retries`` attempts.
    """
    import requests
    import urllib3
    from pydicom import dcmwrite

    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, retries + 1):
        n = 0
        try:
            for ds in _call(url, "WADO-RS retrieve", client.iter_series, study, series):
                target = folder / f"{_hash(str(ds.SOPInstanceUID))}.dcm"
                n += 1
                if target.exists():
                    continue
                buf = io.BytesIO()
                dcmwrite(buf, ds, enforce_file_format=True)
                atomic_write_bytes(target, buf.getvalue())
            return n
        except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError, OSError) as e:
            if isinstance(e, PacsError) or attempt == retries:
                raise
            log.debug("retrieve of a series broke (%s); attempt %d of %d", type(e).__name__, attempt + 1, retries)
            time.sleep(wait_s * attempt)
    return 0


def run_dicomweb(model: str | Path, url: str, output_dir: str | Path, studies: list[str] | None = None,
                 query: str | None = None, overrides: list[str] | None = None, store: bool = False,
                 ca_bundle: str | None = None, device: str | None = None, progress: bool = True,
                 retries: int = RETRIES, retry_wait_s: float = 1.0) -> PredictResult:
    """Pull the series of ``studies`` / ``query``, predict them as a folder, optionally STOW-RS the results back.

    One study at a time: its series are staged, predicted (:func:`~medseg.predict.run.run_predict` over
    the study's staging folder) and their staged files removed once committed, so the staging area
    holds one study whatever the query matches. Pulled series get manifest rows keyed
    ``dicomweb:<hash of the series UID>`` (``done`` once their case is committed, ``skipped`` /
    ``failed`` with the reason); the cases themselves are the folder run's rows.
    """
    if not studies and not query:
        raise PacsError("a DICOMweb input needs --study UID or --query")
    start = time.perf_counter()
    out = Path(output_dir)
    client = connect(url, ca_bundle)
    pull, skipped = find_series(client, url, list(studies or []), query)  # an unusable server: nothing written
    out.mkdir(parents=True, exist_ok=True)
    stage = out / STAGING
    total = PredictResult(out, out / manifest_name())
    manifest = Manifest(out / manifest_name())
    for st, se, why in skipped:
        key = f"dicomweb:{_hash(se or st)}"
        manifest.set_series(key, kind="dicomweb", status="skipped", reason=why)
        log.info("series %s skipped: %s", key, why)
    manifest.close()
    by_study: dict[str, list[str]] = {}
    for st, se, _mod in pull:
        by_study.setdefault(st, []).append(se)
    for st, series in by_study.items():
        _pull_study(model, client, url, out, stage / _hash(st), st, series, total, overrides, device, progress,
                    retries, retry_wait_s)
    if stage.is_dir() and not any(stage.iterdir()):
        stage.rmdir()
    manifest = Manifest(out / manifest_name())
    if store:
        wanted = set(by_study)
        store_back(out, manifest, lambda study: stow_sender(client, study, public_url(url)) if study in wanted else None)
    total.counts = manifest.counts()
    total.seconds = time.perf_counter() - start
    total.summary = summary_table(manifest, total)
    manifest.close()
    return total


def _pull_study(model: str | Path, client: Any, url: str, out: Path, root: Path, study: str, series: list[str],
                total: PredictResult, overrides: list[str] | None, device: str | None, progress: bool,
                retries: int, retry_wait_s: float) -> None:
    """Stage the not-yet-done series of one study under ``root``, predict them, record and clean up."""
    manifest = Manifest(out / manifest_name())
    staged: dict[str, Path] = {}
    try:
        for se in series:
            key = f"dicomweb:{_hash(se)}"
            if manifest.status(key) == "done":
                continue
            folder = root / _hash(se)
            try:
                n = stage_series(client, url, study, se, folder, retries, retry_wait_s)
            except PacsError:
                raise
            except Exception as e:  # noqa: BLE001 — a series that cannot be retrieved is recorded, the rest go on
                msg = f"retrieve failed after {retries} attempts: {type(e).__name__}"
                manifest.set_series(key, kind="dicomweb", status="failed", reason=msg)
                log.warning("series %s: %s", key, msg)
                total.failed[key] = msg
                continue
            manifest.set_series(key, kind="dicomweb", status="pending", n_files=n, reason=None)
            staged[key] = folder
    finally:
        manifest.close()
    if not staged:
        return
    res = run_predict(model, root, out, overrides, device=device, progress=progress)
    total.processed += res.processed
    total.already_done += res.already_done
    total.failed.update(res.failed)
    total.slices += res.slices
    total.config = res.config
    manifest = Manifest(out / manifest_name())
    files = manifest.rows("files")
    for key, folder in staged.items():
        mine = [f for f in files if f["path"].startswith(folder.name + "/")]
        if mine and all(f["status"] == "done" for f in mine):
            manifest.set_series(key, status="done", reason=None)
            shutil.rmtree(folder, ignore_errors=True)  # committed: the staged copy goes
        else:
            why = next((f["reason"] for f in mine if f["reason"]), None) or "not predicted"
            manifest.set_series(key, status="failed", reason=why)
    manifest.close()
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
