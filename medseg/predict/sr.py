"""``sr.dcm``: a DICOM Structured Report (TID 1500 Measurement Report) of a predicted series.

One measurement group (TID 1411, volumetric ROI) per lesion of ``lesions.csv``, in ``lesion_id``
order: its tracking identifier (``lesion N`` and the same tracking UID as the SEG segment), the SEG
segment it describes (segment number = ``lesion_id``), the finding "Lesion" and four measurements
with standard codes:

================= ===================================== =========================
lesions.csv       concept (derivation)                  unit (UCUM)
================= ===================================== =========================
recist_long_mm    SCT 103339001 Long axis               mm
recist_short_mm   SCT 103340004 Short axis              mm
volume_mm3        SCT 118565006 Volume                  mm3
mean_hu           DCM 112031 Attenuation Coefficient    [hnsf'U] (CT; {stored} for MR)
                  (SCT 373098007 Mean)
max_hu            the same (SCT 56851009 Maximum)
================= ===================================== =========================

The values are those written to ``lesions.csv`` (its rounding), so the two agree exactly. The
algorithm identification names medseg, its version and the model fingerprint. Series and instance
UIDs derive from the source series and the model fingerprint (a rerun writes the same report and a
PACS replaces rather than duplicates it); the content date / time are the source's. The file is
re-read with highdicom and compared value for value before the case counts as done.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.data.base import DataError
from medseg.io import atomic_write_bytes

__all__ = ["MEASURES", "read_sr_measurements", "seg_sr_blocker", "write_seg_and_sr", "write_sr"]

#: lesions.csv column → (concept, derivation or None, unit), as pydicom ``codes`` paths
MEASURES: dict[str, tuple[str, str | None, str]] = {
    "recist_long_mm": ("SCT.LongAxis", None, "UCUM.Millimeter"),
    "recist_short_mm": ("SCT.ShortAxis", None, "UCUM.Millimeter"),
    "volume_mm3": ("SCT.Volume", None, "UCUM.CubicMillimeter"),
    "mean_hu": ("DCM.AttenuationCoefficient", "SCT.Mean", "UCUM.HounsfieldUnit"),
    "max_hu": ("DCM.AttenuationCoefficient", "SCT.Maximum", "UCUM.HounsfieldUnit"),
}


def _code(path: str | None) -> Any:
    from pydicom.sr.codedict import codes

    if path is None:
        return None
    scheme, name = path.split(".")
    return getattr(getattr(codes, scheme), name)


def _unit(path: str, modality: str) -> Any:
    from highdicom.sr import CodedConcept

    if path == "UCUM.HounsfieldUnit" and modality != "CT":
        return CodedConcept("{stored}", "UCUM", "stored value")
    return _code(path)


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=list(parts)))


def write_sr(path: Path, rows: list[dict[str, Any]], seg_path: Path, source_files: list[Path], fingerprint: str,
             model_name: str) -> dict[str, Any]:
    """Write the TID 1500 report of ``rows`` (``lesions.csv``) for the SEG at ``seg_path``; re-read and check.

    Returns:
        ``{"series_uid", "sop_uid", "groups"}`` of the SR.

    Raises:
        DataError: the report does not read back as ``rows``.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medseg.predict.writers import lesion_tracking_uid

    seg = pydicom.dcmread(seg_path)
    srcs = [pydicom.dcmread(p, stop_before_pixels=True, force=True) for p in dict.fromkeys(source_files)]
    first = srcs[0]
    src_uid = str(first.SeriesInstanceUID)
    modality = str(first.get("Modality", "CT"))
    algo = hd.sr.AlgorithmIdentification(name=f"medseg {model_name}"[:64], version=__version__,
                                         parameters=[f"model fingerprint {fingerprint}"])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(fingerprint, "device"), name="medseg", manufacturer_name="medseg",
            model_name=model_name[:64] or "medseg", serial_number=fingerprint[:16]))
    groups = []
    for r in rows:
        lid = int(r["lesion_id"])
        measurements = [hd.sr.Measurement(name=_code(concept), value=float(r[col]), unit=_unit(unit, modality),
                                          derivation=_code(deriv), algorithm_id=algo)
                        for col, (concept, deriv, unit) in MEASURES.items()]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=lesion_tracking_uid(src_uid, fingerprint, lid),
                                                         identifier=f"lesion {lid}"),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID), segment_number=lid,
                source_series=hd.sr.SourceSeriesForSegmentation(src_uid)),
            finding_type=codes.SCT.Lesion, algorithm_id=algo, measurements=measurements))
    if not groups:  # no lesion: one group saying so (TID 1501: finding = "None", SCT 260413007)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(src_uid, fingerprint, "no lesion"),
                                                         identifier="no lesion"),
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=codes.DCM.Finding, value=hd.sr.CodedConcept("260413007", "SCT", "None"))]))
    procedure = codes.LN.CTUnspecifiedBodyRegion if modality == "CT" else hd.sr.CodedConcept(
        "25056-3", "LN", "MRI unspecified body region")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=procedure, imaging_measurements=groups)
    seed = [src_uid, fingerprint, "sr"]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*srcs, seg], content=report[0], series_instance_uid=_uid(*seed, "series"),
        series_number=int(first.get("SeriesNumber", 0) or 0) % 10000 + 9500, sop_instance_uid=_uid(*seed, "sop"),
        instance_number=1, manufacturer="medseg", is_complete=True, is_final=False,
        series_description="medseg lesion measurements")
    _fixed_dates(sr, first)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue())
    back = read_sr_measurements(path)
    want = [{"lesion_id": int(r["lesion_id"]), "segment": int(r["lesion_id"]),
             **{c: float(r[c]) for c in MEASURES}} for r in rows]
    got = [{k: v for k, v in g.items() if k != "seg_sop_uid"} for g in back]
    if got != want or any(g["seg_sop_uid"] != str(seg.SOPInstanceUID) for g in back):
        raise DataError(f"{path}: the SR does not read back as lesions.csv")
    return {"series_uid": str(sr.SeriesInstanceUID), "sop_uid": str(sr.SOPInstanceUID), "lesions": len(rows)}


def _fixed_dates(sr: Any, src: Any) -> None:
    """Content / series dates and times from the source, so that a rerun writes the same bytes."""
    date = str(src.get("SeriesDate") or src.get("StudyDate") or "19000101")
    tm = str(src.get("SeriesTime") or src.get("StudyTime") or "000000")
    for kw, val in (("ContentDate", date), ("ContentTime", tm), ("SeriesDate", date), ("SeriesTime", tm),
                    ("InstanceCreationDate", date), ("InstanceCreationTime", tm)):
        if kw in sr:
            setattr(sr, kw, val)
    for item in sr.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + tm.split(".")[0]


def read_sr_measurements(path: Path) -> list[dict[str, Any]]:
    """The lesion groups of a medseg SR, read back with highdicom: ``[{"lesion_id", "segment", "seg_sop_uid",
    <lesions.csv column>: value}]`` in the report's order."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sr = hd.sr.srread(path)
    out = []
    for g in sr.content.get_volumetric_roi_measurement_groups():
        ref = g.referenced_segment
        item: dict[str, Any] = {"lesion_id": int(str(g.tracking_identifier).split()[-1]),
                                "segment": int(ref.referenced_segment_numbers[0]) if hasattr(
                                    ref, "referenced_segment_numbers") else int(ref.segment_number),
                                "seg_sop_uid": str(ref.referenced_sop_instance_uid)}
        for m in g.get_measurements():
            deriv = m.derivation
            for col, (concept, d, _unit) in MEASURES.items():
                if m.name == _code(concept) and (d is None or (deriv is not None and deriv == _code(d))):
                    item[col] = float(m.value)
        out.append(item)
    del codes
    return out


def seg_sr_blocker(source_files: list[Path]) -> str | None:
    """Why a SEG / SR cannot be derived from these sources (None: they can): a missing
    FrameOfReferenceUID, StudyInstanceUID or SOPInstanceUID."""
    import pydicom

    for p in dict.fromkeys(source_files):
        ds = pydicom.dcmread(p, stop_before_pixels=True, force=True,
                             specific_tags=["FrameOfReferenceUID", "StudyInstanceUID", "SOPInstanceUID"])
        for kw in ("FrameOfReferenceUID", "StudyInstanceUID", "SOPInstanceUID"):
            if not str(ds.get(kw, "") or "").strip():
                return f"the source series has no {kw}"
    return None


def write_seg_and_sr(folder: Path, labels: Any, rows: list[dict[str, Any]], geom: Any, num_classes: int,
                     fingerprint: str, model_name: str, connectivity: int, write_sr_too: bool = True
                     ) -> dict[str, Any]:
    """``seg.dcm`` (one segment per lesion) and ``sr.dcm`` of a DICOM case, or why they were skipped.

    Returns:
        ``{"seg": {...}, "sr": {...}}``, or ``{"skipped": reason}`` when the sources lack what a SEG needs
        (the case's other outputs are written all the same).
    """
    from medseg.predict.lesions import lesion_map
    from medseg.predict.writers import write_seg

    files = list(dict.fromkeys(geom.files))
    why = seg_sr_blocker(files)
    if why is not None:
        return {"skipped": f"SEG/SR not written: {why}"}
    out: dict[str, Any] = {}
    try:
        out["seg"] = write_seg(folder / "seg.dcm", labels, geom, num_classes, fingerprint, model_name,
                               lesions=rows, lesion_map=lesion_map(labels, rows, connectivity))
        if write_sr_too:
            out["sr"] = write_sr(folder / "sr.dcm", rows, folder / "seg.dcm", files, fingerprint, model_name)
    except DataError:
        raise  # written but not reading back as the mask / the table: a real failure of the case
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # highdicom refused the sources
        for name in ("seg.dcm", "sr.dcm"):
            (folder / name).unlink(missing_ok=True)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return {"skipped": f"SEG/SR not written: {type(e).__name__}: {first}"}
    return out
