"""Outputs of ``medseg predict`` for one case, each re-read and checked before the case counts as done.

* ``mask.nii.gz`` — the class map (uint8) with an affine from the DICOM geometry (LPS → RAS). Exact
  for a regular stack; for a gantry-tilted stack the affine is sheared (its slice axis follows the
  slice positions), which is exact when the tilt is uniform; for irregular slice positions (missing
  slices, uneven spacing) the third axis steps by the mean interval and ``series.json`` records the
  largest distance between a voxel centre and its slice (``nifti.max_error_mm``): use ``seg.dcm``,
  which is exact for every stack. NIfTI input gets the input's own affine and orientation.
* ``seg.dcm`` — a BINARY DICOM Segmentation (highdicom): one frame per source slice and segment, in
  source order along the normal, empty frames kept, each frame referencing its source instance
  (and frame). UIDs derive from the source SeriesInstanceUID and the model fingerprint, and the
  content date / time are the source series' own, so a rerun writes the same bytes.
* ``<image stem>.png`` for PNG / TIFF input (0 = background, 1..K−1 = classes).
* ``lesions.csv`` (:mod:`medseg.predict.lesions`), ``overlays/slice_NNNN.png``, ``series.json``.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medseg import __version__
from medseg.data.base import DataError, apply_window
from medseg.io import atomic_write_bytes, atomic_write_chunks, atomic_write_text, write_rows_csv
from medseg.predict.lesions import COLUMNS

__all__ = ["gray8", "lesion_tracking_uid", "nifti_affine", "outline", "paint_outline", "segment_property", "write_csv", "write_json", "write_nifti",
           "png_bgr_chunks", "write_overlays", "write_png_mask", "write_seg"]

_OVERLAY_COLOUR = (0, 0, 255)
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
#: display colours of the SEG's lesion segments, in turn (viewers show each lesion in its own colour)
_SEGMENT_RGB = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
#: patient / study attributes (type 2) a SEG copies from its source
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


def nifti_affine(positions: np.ndarray, direction: np.ndarray, spacing: tuple[float, float, float],
                 thickness: float | None = None) -> tuple[np.ndarray, float]:
    """RAS affine of a ``(W, H, Z)`` array and the largest voxel-centre error (mm) over the slices.

    The slice axis steps by ``(positions[-1] − positions[0]) / (Z − 1)``: exact for a regular stack,
    sheared for a uniformly tilted one, a mean step for irregular positions.
    """
    z = len(positions)
    _, sy, sx = spacing
    step = (positions[-1] - positions[0]) / (z - 1) if z > 1 else direction[2] * float(thickness or spacing[0] or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = direction[0] * sx
    lps[:3, 1] = direction[1] * sy
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    err = float(np.abs(positions - (positions[0] + np.outer(np.arange(z), step))).max()) if z else 0.0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, err


def _nifti_bytes(img: Any) -> bytes:
    """A NIfTI image as ``.nii.gz`` bytes (gzip with mtime 0: the same mask gives the same bytes)."""
    import gzip

    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6, filename="") as gz:
        gz.write(img.to_bytes())
    return out.getvalue()


def write_nifti(path: Path, labels: np.ndarray, affine: np.ndarray, header: Any = None) -> None:
    """Write ``(Z, H, W)`` labels as ``(W, H, Z)`` uint8 NIfTI with ``affine`` (also qform/sform), re-read and check."""
    import nibabel as nib

    data = np.ascontiguousarray(np.transpose(labels.astype(np.uint8), (2, 1, 0)))
    img = nib.Nifti1Image(data, affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    atomic_write_bytes(path, _nifti_bytes(img))
    back = nib.load(str(path))
    if not np.array_equal(np.asanyarray(back.dataobj), data) or not np.allclose(back.affine, affine, atol=1e-4):
        raise DataError(f"{path}: the written NIfTI does not read back as the mask")


def write_nifti_like(path: Path, labels_canonical: np.ndarray, nifti: dict[str, Any]) -> None:
    """A mask predicted on the canonical (RAS) volume, written in the input NIfTI's own orientation and affine."""
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    vol = np.moveaxis(labels_canonical, 0, nifti["axis"]).astype(np.uint8)
    canon = nib.Nifti1Image(vol, nifti["canonical_affine"])
    back = canon.as_reoriented(ornt_transform(io_orientation(nifti["canonical_affine"]),
                                              io_orientation(nifti["affine"])))
    data = np.asanyarray(back.dataobj).astype(np.uint8)
    if tuple(data.shape) != tuple(nifti["shape"]):
        raise DataError(f"{path}: reoriented mask {data.shape} does not match the input {nifti['shape']}")
    img = nib.Nifti1Image(data, nifti["affine"])
    img.set_qform(nifti["affine"], code=1)
    img.set_sform(nifti["affine"], code=1)
    atomic_write_bytes(path, _nifti_bytes(img))


def write_png_mask(path: Path, labels: np.ndarray) -> None:
    """A 2-D class map as an 8-bit PNG (0 = background, 1..K−1), re-read and checked."""
    mask = labels.astype(np.uint8, copy=False)  # no copy of a uint8 map
    ok, buf = cv2.imencode(".png", mask)
    if not ok:
        raise DataError(f"{path}: cannot encode the mask as PNG")
    atomic_write_bytes(path, buf.reshape(-1).data)  # the encoded bytes, not a tobytes() copy
    del buf
    back = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if back is None or not np.array_equal(back, mask):
        raise DataError(f"{path}: the written PNG does not read back as the mask")


def write_csv(path: Path, rows: list[dict[str, Any]], chunk_rows: int = 4096) -> None:
    """``lesions.csv``: the :data:`~medseg.predict.lesions.COLUMNS` of each row (the header even when there is
    no lesion); a row's private keys (``_anchor_yx``) are not written. Streamed a chunk of rows at a time
    (:func:`medseg.io.write_rows_csv`: no copy of every row, nor the whole text, in memory)."""
    write_rows_csv(rows, path, COLUMNS, chunk_rows)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``series.json`` (sorted keys, ASCII only: control characters and odd text are escaped)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True, default=float) + "\n")


_FONT, _FONT_SCALE, _FONT_THICK = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1
#: rows a drawn id may reach beyond its ``getTextSize`` box (anti-aliasing, the glyphs' own overhang)
_TEXT_PAD = 4


def _id_place(text: str, anchor_yx: tuple[float, float], scale: int, shape: tuple[int, int]
              ) -> tuple[int, int, int, int]:
    """Where :func:`_draw_id` puts ``text``: its origin ``(x, y)`` and the rows ``[top, bottom)`` it may
    touch (its ``getTextSize`` box with :data:`_TEXT_PAD` rows either side)."""
    (w, h), base = cv2.getTextSize(text, _FONT, _FONT_SCALE, _FONT_THICK)
    cy, cx = (float(anchor_yx[0]) + 0.5) * scale, (float(anchor_yx[1]) + 0.5) * scale
    x = int(min(max(round(cx - w / 2), 0), max(shape[1] - w, 0)))
    y = int(min(max(round(cy + h / 2), h), shape[0] - 1))
    return x, y, y - h - _TEXT_PAD, y + base + _TEXT_PAD + 1


def _draw_id(rgb: np.ndarray, text: str, anchor_yx: tuple[float, float], scale: int) -> None:
    """Draw a lesion id centred on ``anchor_yx`` (source pixels), kept inside the image."""
    x, y, _top, _bottom = _id_place(text, anchor_yx, scale, rgb.shape[:2])
    cv2.putText(rgb, text, (x, y), _FONT, _FONT_SCALE, (0, 255, 255), _FONT_THICK, cv2.LINE_AA)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


#: bytes of compressed data per IDAT chunk (libpng's default, as ``cv2.imencode`` writes them)
_IDAT_BYTES = 8192


def png_bgr_chunks(height: int, width: int, bands: Iterable[np.ndarray]) -> Iterator[bytes]:
    """An 8-bit RGB PNG of a ``(height, width, 3)`` BGR image given as consecutive bands of rows, as the
    file's consecutive pieces — the bytes ``cv2.imencode(".png", image)`` writes, without the whole image
    (:func:`medseg.io.atomic_write_chunks` writes them as they come).

    Hand-written because neither OpenCV nor Pillow encodes a PNG a band of rows at a time: for an 8192²
    overlay ``imencode`` needs the 192 MiB image and its whole encoded buffer (plus the ``tobytes`` copy)
    at once. The format is small (IHDR, IDAT chunks of a zlib stream, IEND); this writer uses OpenCV's
    default encoding — every row with PNG filter 1 ("Sub"), zlib level 1 with the ``Z_RLE`` strategy,
    IDAT chunks of 8 KiB — so that with the same zlib it writes the very same file (checked in
    ``tests/predict/test_lesion_table.py``; any decoder reads the same pixels either way).
    """
    yield (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    pending = bytearray()

    def flush(final: bool) -> bytes:
        n = len(pending) if final else len(pending) - len(pending) % _IDAT_BYTES
        out = b"".join(_png_chunk(b"IDAT", bytes(pending[i: i + _IDAT_BYTES])) for i in range(0, n, _IDAT_BYTES))
        del pending[:n]
        return out

    rows = 0
    for band in bands:
        rgb = np.ascontiguousarray(band[:, :, ::-1]).reshape(len(band), 3 * width)
        filtered = np.empty((len(band), 3 * width + 1), np.uint8)
        filtered[:, 0] = 1  # "Sub": each byte minus the byte of the pixel to its left (mod 256)
        filtered[:, 1:4] = rgb[:, :3]
        np.subtract(rgb[:, 3:], rgb[:, :-3], out=filtered[:, 4:])
        del rgb
        pending += z.compress(filtered)
        del filtered
        yield flush(False)
        rows += len(band)
    if rows != height:
        raise ValueError(f"png_bgr_chunks: {rows} rows given for a PNG of {height}")
    pending += z.flush()
    yield flush(True) + _png_chunk(b"IEND", b"")


def overlay_bands(gray: np.ndarray, labels: np.ndarray, ids: list[tuple[str, tuple[float, float]]],
                  band_rows: int = 256) -> Iterator[np.ndarray]:
    """The overlay of one slice at scale 1 — BGR gray, lesion outlines (:func:`paint_outline`), then the
    ids (:func:`_draw_id`, in order) — as consecutive bands of ``band_rows`` rows: the pixels of the whole
    slice's drawing, never its whole RGB image.

    Each band is drawn on a buffer that reaches past it to every row the band's ids may touch (their
    text boxes, :func:`_id_place`), so no id is clipped where the whole image would not clip it: its
    pixels in the band are those of the whole slice (drawing is exact under a whole-row shift; checked
    against the whole-slice drawing in ``tests/predict/test_lesion_table.py``).

    Args:
        gray: ``(H, W)`` uint8 display gray, or intensities in [0, 1] (:func:`gray8`, a band at a time).
        labels: ``(H, W)`` class map.
        ids: ``(text, anchor_yx)`` of each id drawn on the slice, in drawing order.
    """
    h, w = labels.shape
    places = [(t, *_id_place(t, yx, 1, (h, w))) for t, yx in ids]
    tops = np.array([p[3] for p in places], np.int64)
    bottoms = np.array([p[4] for p in places], np.int64)
    for a in range(0, h, band_rows):
        b = min(a + band_rows, h)
        sel = np.flatnonzero((bottoms > a) & (tops < b))
        lo = max(min(a, int(tops[sel].min())) if sel.size else a, 0)
        hi = min(max(b, int(bottoms[sel].max())) if sel.size else b, h)
        g = gray[lo:hi] if gray.dtype == np.uint8 else gray8(gray[lo:hi])
        buf = cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)
        del g
        a0, b0 = max(lo - 1, 0), min(hi + 1, h)
        edge = outline((labels[a0:b0] > 0).view(np.uint8))
        buf[edge[lo - a0: hi - a0]] = _OVERLAY_COLOUR
        del edge
        for i in sel:
            text, x, y, _top, _bottom = places[i]
            cv2.putText(buf, text, (x, y - lo), _FONT, _FONT_SCALE, (0, 255, 255), _FONT_THICK, cv2.LINE_AA)
        yield buf[a - lo: b - lo]


def gray8(values: np.ndarray, low: float = 0.0, high: float = 1.0, chunk_rows: int = 256) -> np.ndarray:
    """Display gray of ``(..., H, W)`` values: ``apply_window(values, low, high) × 255`` truncated to uint8
    (NaN counts as 0), a chunk of rows at a time — no float copy of the whole slice or stack.
    ``low, high = 0, 1`` takes intensities already in [0, 1]."""
    out = np.empty(values.shape, np.uint8)
    flat_in = values.reshape(-1, *values.shape[-2:]) if values.ndim > 2 else values[None]
    flat_out = out.reshape(flat_in.shape)
    floating = np.issubdtype(values.dtype, np.floating)
    for z in range(flat_in.shape[0]):
        for a in range(0, flat_in.shape[1], chunk_rows):
            band = flat_in[z, a: a + chunk_rows]
            if floating:
                band = np.nan_to_num(band.astype(np.float32), copy=False)
            flat_out[z, a: a + chunk_rows] = apply_window(band, low, high) * 255
    return out


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 0/1 uint8 mask: foreground with a background 4-neighbour (beyond the edge
    counts as background) — the pixels ``findContours`` traces, without its per-contour point lists."""
    inner = cv2.erode(mask, _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask > inner


def paint_outline(rgb: np.ndarray, labels: np.ndarray, band_rows: int = 512) -> None:
    """``rgb[outline(labels > 0)] = `` the overlay colour, a band of rows at a time: each band is read with
    one row of context above and below, so the pixels are the whole slice's :func:`outline`, and the
    temporaries are a band's, not three masks of the whole slice."""
    h = labels.shape[0]
    for a in range(0, h, band_rows):
        b = min(a + band_rows, h)
        a0, b0 = max(a - 1, 0), min(b + 1, h)
        edge = outline((labels[a0:b0] > 0).view(np.uint8))
        rgb[a:b][edge[a - a0: a - a0 + b - a]] = _OVERLAY_COLOUR


def write_overlays(folder: Path, images: np.ndarray, labels: np.ndarray, rows: list[dict[str, Any]]) -> list[str]:
    """``folder/slice_NNNN.png`` for every slice with a lesion: the windowed slice, lesion outlines, ids.

    Args:
        images: ``(Z, H, W)`` display intensities on the source grid: in [0, 1] (float), or 8-bit gray
            already (uint8, :func:`gray8`).
        labels: ``(Z, H, W)`` class map.
        rows: the lesion table: each id is drawn on the lesion's largest slice, centred on its pixel
            centroid there (``_anchor_yx``, set by :func:`~medseg.predict.lesions.lesion_table`).
    """
    names = []
    by_slice: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_slice.setdefault(int(r["largest_slice"]), []).append(r)
    for k in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1)):
        name = f"slice_{int(k):04d}.png"
        ids = [(str(r["lesion_id"]), r["_anchor_yx"]) for r in by_slice.get(int(k), [])]
        h, w = labels.shape[1:]
        if max(h, w) >= 256:  # scale 1: drawn and encoded a band of rows at a time
            atomic_write_chunks(folder / name, png_bgr_chunks(h, w, overlay_bands(images[k], labels[k], ids)))
            names.append(name)
            continue
        gray = images[k] if images.dtype == np.uint8 else gray8(images[k])
        rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        del gray
        scale = int(np.ceil(256 / max(rgb.shape[:2])))
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        m = cv2.resize((labels[k] > 0).view(np.uint8), (rgb.shape[1], rgb.shape[0]),
                       interpolation=cv2.INTER_NEAREST)
        rgb[outline(m)] = _OVERLAY_COLOUR
        del m
        for text, yx in ids:
            _draw_id(rgb, text, yx, scale)
        ok, buf = cv2.imencode(".png", rgb)
        atomic_write_bytes(folder / name, buf.tobytes())
        names.append(name)
    return names


# ----------------------------------------------------------------------------- DICOM SEG


def _source_datasets(geom: Any) -> tuple[list[Any], list[int | None]]:
    """Source headers in slice order (one per file) and the frame order the SEG pixel array needs."""
    import pydicom

    files = list(dict.fromkeys(geom.files))
    dss = [pydicom.dcmread(p, stop_before_pixels=True, force=True) for p in files]
    for ds in dss:  # type-2 attributes a SEG copies from its source: empty where a source lacks them
        for kw in _TYPE2:
            if kw not in ds:
                setattr(ds, kw, "")
    return dss, list(geom.frames or [None] * len(geom.files))


def _fixed_dates(seg: Any, src: Any) -> None:
    """Content / series dates and times from the source, so that a rerun writes the same bytes."""
    date = str(src.get("SeriesDate") or src.get("StudyDate") or "19000101")
    tm = str(src.get("SeriesTime") or src.get("StudyTime") or "000000")
    for kw, val in (("ContentDate", date), ("ContentTime", tm), ("SeriesDate", date), ("SeriesTime", tm),
                    ("InstanceCreationDate", date), ("InstanceCreationTime", tm)):
        if kw in seg:
            setattr(seg, kw, val)
    for item in seg.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + tm.split(".")[0]


def segment_property(cls: int, num_classes: int) -> Any:
    """The segmented property type of a lesion of class ``cls``: SNOMED CT "Lesion" for a one-class
    model, else a private code (``99MEDSEG``, "lesion class c")."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    if num_classes <= 2:
        return codes.SCT.Lesion
    return CodedConcept(f"class-{cls}", "99MEDSEG", f"lesion class {cls}")


def write_seg(path: Path, labels: np.ndarray, geom: Any, num_classes: int, fingerprint: str, model_name: str,
              lesions: list[dict[str, Any]] | None = None, lesion_map: np.ndarray | None = None) -> dict[str, Any]:
    """Write ``labels`` ``(Z, H, W)`` as a BINARY DICOM SEG of the series, re-read it and compare.

    Without ``lesions``: one segment per class, frames following the source slices in order along the
    normal, empty frames kept. With ``lesions`` (the rows of ``lesions.csv``) and ``lesion_map``
    (``(Z, H, W)``, voxel → ``lesion_id``, :func:`~medseg.predict.lesions.lesion_map`): one segment per
    lesion, segment number = ``lesion_id``, labelled ``lesion N`` with its class as the property type
    and only the frames holding it (no lesion: one empty segment ``no lesion``, every frame kept). For a
    multi-frame source the frames reference the source's frames.

    Returns:
        ``{"series_uid", "sop_uid", "frames"}`` of the SEG.

    Raises:
        DataError: the SEG does not read back frame for frame as ``labels`` or references other instances.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dss, frames = _source_datasets(geom)
    multi = any(f is not None for f in frames)
    if multi:
        if len(dss) != 1:
            raise DataError("a stack built from several multi-frame files cannot be written as one SEG")
        order = np.argsort(np.asarray(frames))  # slice order → source frame order
        pixel = labels[order]
    else:
        order, pixel = None, labels
    src_uid = str(dss[0].SeriesInstanceUID)
    seed = [src_uid, geom.series_uid, fingerprint, str(len(frames))]
    algo = hd.AlgorithmIdentificationSequence(name=f"medseg {model_name}"[:64], version=__version__,
                                              family=codes.cid7162.ArtificialIntelligence)
    per_lesion = lesion_map is not None and bool(lesions)
    if lesion_map is not None:
        pixel = (lesion_map[order] if multi else lesion_map) if lesions else np.zeros_like(pixel)
        descs = [hd.seg.SegmentDescription(
            segment_number=int(r["lesion_id"]), segment_label=f"lesion {r['lesion_id']}", algorithm_type="AUTOMATIC",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=segment_property(int(r["class"]), num_classes), algorithm_identification=algo,
            tracking_id=f"lesion {r['lesion_id']}", tracking_uid=lesion_tracking_uid(src_uid, fingerprint, r["lesion_id"]),
            display_color=hd.color.CIELabColor.from_rgb(*_SEGMENT_RGB[(int(r["lesion_id"]) - 1) % len(_SEGMENT_RGB)]),
        ) for r in lesions or []] or [hd.seg.SegmentDescription(
            segment_number=1, segment_label="no lesion", algorithm_type="AUTOMATIC",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_identification=algo)]
    else:
        descs = [hd.seg.SegmentDescription(
            segment_number=c, segment_label=f"lesion class {c}", algorithm_type="AUTOMATIC",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_identification=algo,
        ) for c in range(1, max(num_classes, 2))]
    seg = hd.seg.Segmentation(
        source_images=dss, pixel_array=pixel.astype(np.uint16 if len(descs) > 255 else np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=generate_uid(entropy_srcs=[*seed, "series"]),
        series_number=int(dss[0].get("SeriesNumber", 0) or 0) % 10000 + 9000,
        sop_instance_uid=generate_uid(entropy_srcs=[*seed, "sop"]), instance_number=1,
        manufacturer="medseg", manufacturer_model_name=model_name[:64] or "medseg",
        software_versions=__version__, device_serial_number=fingerprint[:16],
        omit_empty_frames=per_lesion, transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="LESIONS", content_description="medseg lesion segmentation",
    )
    _fixed_dates(seg, dss[0])
    if "DimensionOrganizationSequence" in seg:
        dim_uid = generate_uid(entropy_srcs=[*seed, "dimension"])
        for item in seg.DimensionOrganizationSequence:
            item.DimensionOrganizationUID = dim_uid
        for item in seg.get("DimensionIndexSequence") or []:
            item.DimensionOrganizationUID = dim_uid
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue())
    if lesion_map is not None:
        _verify_seg(path, lesion_map if lesions else np.zeros_like(labels), geom, dss, frames, len(descs) + 1,
                    per_lesion)
    else:
        _verify_seg(path, labels, geom, dss, frames, num_classes)
    return {"series_uid": str(seg.SeriesInstanceUID), "sop_uid": str(seg.SOPInstanceUID),
            "frames": int(seg.NumberOfFrames)}


def lesion_tracking_uid(source_series_uid: str, fingerprint: str, lesion_id: Any) -> str:
    """The tracking UID of a lesion (its SEG segment and its SR measurement group): deterministic."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[source_series_uid, fingerprint, "lesion", str(lesion_id)]))


def _verify_seg(path: Path, labels: np.ndarray, geom: Any, dss: list[Any], frames: list[int | None],
                num_classes: int, sparse: bool = False) -> None:
    """Re-read the SEG with highdicom and compare it with the mask (or lesion map), frame by frame."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    n_seg = max(num_classes, 2) - 1
    if sparse:
        want = sum(int(np.any(labels[k] == s)) for s in range(1, n_seg + 1) for k in range(labels.shape[0]))
        if int(seg.NumberOfFrames) != want:
            raise DataError(f"{path}: {seg.NumberOfFrames} frames; expected {want} (one per slice holding a lesion)")
    elif int(seg.NumberOfFrames) != labels.shape[0] * n_seg:
        raise DataError(f"{path}: {seg.NumberOfFrames} frames; expected {labels.shape[0] * n_seg} "
                        f"(one per source slice and segment, empty frames kept)")
    if any(f is not None for f in frames):
        sop = str(dss[0].SOPInstanceUID)
        back = seg.get_pixels_by_source_frame(sop, [int(f) + 1 for f in frames], combine_segments=True,
                                              skip_overlap_checks=True, assert_missing_frames_are_empty=sparse)
    else:
        back = seg.get_pixels_by_source_instance(geom.sop_instance_uids, combine_segments=True,
                                                 skip_overlap_checks=True, assert_missing_frames_are_empty=sparse)
    if back.shape != labels.shape or not np.array_equal(np.asarray(back), labels):
        raise DataError(f"{path}: the SEG does not read back as the mask frame by frame")
