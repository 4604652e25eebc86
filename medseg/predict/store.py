"""``--store-back``: a predicted case's ``seg.dcm`` and ``sr.dcm`` sent into the source study.

Two ways: STOW-RS to the DICOMweb server the study came from (:func:`stow_sender`), or C-STORE to
the DICOM node of ``predict.store`` (:func:`cstore_sender`, pynetdicom). :func:`store_back` walks the
manifest's ``done`` cases and records in each row what was sent (the SOP instance UIDs and the
destination, never credentials) and the server's answer. A case whose row already records the same
instances stored at the same destination is not sent again; a rejection is recorded and the local
outputs stay.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medseg.data.base import DataError

__all__ = ["PacsError", "StoreAnswer", "cstore_sender", "store_back", "stow_sender"]

log = logging.getLogger("medseg.predict")

#: (files to send) → (ok, one-line answer)
StoreAnswer = tuple[bool, str]
Sender = Callable[[list[Path]], StoreAnswer]


class PacsError(DataError):
    """A PACS / DICOMweb server cannot be used (unreachable, refused credentials, unknown study): one line."""


def cstore_sender(ae_title: str, host: str, port: int, calling_ae_title: str = "MEDSEG",
                  timeout_s: float = 30.0) -> tuple[str, Sender]:
    """``(destination, send)``: C-STORE of the files to ``ae_title@host:port`` in one association."""
    from pydicom import dcmread
    from pynetdicom import AE

    dest = f"dicom://{ae_title}@{host}:{port}"

    def send(files: list[Path]) -> StoreAnswer:
        dss = [dcmread(p) for p in files]
        ae = AE(ae_title=calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
        for sop in dict.fromkeys(str(ds.SOPClassUID) for ds in dss):
            ae.add_requested_context(sop)
        assoc = ae.associate(host, int(port), ae_title=ae_title)
        if not assoc.is_established:
            return False, f"no association with {dest} (refused, aborted or unreachable)"
        answers = []
        try:
            for p, ds in zip(files, dss):
                try:
                    status = assoc.send_c_store(ds)
                except (ValueError, RuntimeError) as e:  # the peer accepted no context for it
                    answers.append(f"{p.name}: not sent ({str(e).splitlines()[0][:120]})")
                    continue
                code = int(status.Status) if status and "Status" in status else -1
                answers.append(f"{p.name}: 0x{code:04X}" if code >= 0 else f"{p.name}: no answer")
        finally:
            assoc.release()
        ok = all(a.endswith("0x0000") for a in answers)
        return ok, "C-STORE " + ", ".join(answers)

    return dest, send


def stow_sender(client: Any, study_uid: str, display_url: str) -> tuple[str, Sender]:
    """``(destination, send)``: STOW-RS of the files into ``study_uid`` with a ``dicomweb_client`` client."""
    import pydicom
    import requests

    def send(files: list[Path]) -> StoreAnswer:
        try:
            answer = client.store_instances([pydicom.dcmread(p) for p in files], study_instance_uid=study_uid)
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            return False, f"STOW-RS rejected (HTTP {code})"
        except requests.RequestException as e:
            return False, f"STOW-RS failed: {type(e).__name__}"
        failed = answer.get("00081198", {}).get("Value") if answer is not None else None
        stored = answer.get("00081199", {}).get("Value") if answer is not None else None
        if failed:
            return False, f"STOW-RS: {len(failed)} instance(s) refused"
        return True, f"STOW-RS: {len(stored or files)} instance(s) stored"

    return display_url, send


def _outputs(case_dir: Path) -> list[Path]:
    return [case_dir / n for n in ("seg.dcm", "sr.dcm") if (case_dir / n).is_file()]


def study_of(case_dir: Path) -> str | None:
    """StudyInstanceUID of a case's SEG (its source study), or None without a SEG."""
    import pydicom

    seg = case_dir / "seg.dcm"
    if not seg.is_file():
        return None
    return str(pydicom.dcmread(seg, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)


def store_back(out_dir: Path, manifest: Any, sender_for: Callable[[str], tuple[str, Sender] | None],
               keys: list[str] | None = None) -> dict[str, str]:
    """Send the SEG / SR of every ``done`` case (of ``keys``, if given) not yet stored; record it in the manifest.

    Args:
        sender_for: a case's StudyInstanceUID → ``(destination, send)``, or None to leave the case alone.

    Returns:
        case key → one-line answer, for the cases sent in this call.
    """
    import pydicom

    done: dict[str, str] = {}
    for row in manifest.rows("series"):
        if row["status"] != "done" or (keys is not None and row["key"] not in keys):
            continue
        case_dir = Path(out_dir) / str(row["output"])
        files = _outputs(case_dir)
        study = study_of(case_dir)
        if not files or study is None:
            continue
        got = sender_for(study)
        if got is None:
            continue
        dest, send = got
        sops = [str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                for p in files]
        what = json.dumps({"to": dest, "instances": {p.name: s for p, s in zip(files, sops)}}, sort_keys=True)
        if row.get("stored") == what and str(row.get("store_answer") or "").startswith("ok"):
            continue  # the same instances are already there: a rerun sends nothing
        ok, answer = send(files)
        text = ("ok: " if ok else "failed: ") + answer
        manifest.set_series(row["key"], stored=what, store_answer=text)
        if ok:
            log.debug("case %s stored back: %s", row["key"], answer)
        else:
            log.warning("case %s not stored back: %s (the local outputs stay)", row["key"], answer)
        done[row["key"]] = text
    return done
