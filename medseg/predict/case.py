"""One case of ``medseg predict``: the model input, the class map and probabilities
(:func:`predict_case`), and the case's outputs written into a temporary folder, re-read and checked
(:func:`write_case`; :func:`process_case` runs both). The local engine (:mod:`medseg.predict.run`) and the
Ray engine (:mod:`medseg.predict.cluster`) both call these: one code path per operation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg import __version__
from medseg.data.base import apply_window, to_source_grid
from medseg.data.dicom import header_window
from medseg.data.images import intensity_range
from medseg.inference.postprocess import hysteresis_on, object_labels
from medseg.inference.predictor import Predictor, predict_labels
from medseg.io import atomic_dir
from medseg.predict.lesions import lesion_table, slice_extents
from medseg.predict.readers import Loaded
from medseg.predict.sr import write_seg_and_sr
from medseg.predict.writers import (
    gray8,
    nifti_affine,
    write_csv,
    write_json,
    write_nifti,
    write_nifti_like,
    write_overlays,
    write_png_mask,
)
from medseg.runtime import release_freed_memory

__all__ = ["operating_point", "predict_case", "process_case", "write_case"]


@torch.no_grad()
def predict_case(loaded: Loaded, predictor: Predictor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Class map (uint8) and each label's probability, ``(Z, H, W)`` each, on the source grid, at the
    operating point (the same class map as ``medseg evaluate``'s volume protocol: the pixel step per batch
    of slices — in sliding mode the window reduces rows to labels as they are finished, memory bounded by
    a band — then the object step on the whole series, hysteresis in 3-D).

    The probability is uint16 fixed point (:data:`~medseg.inference.postprocess.PROB_SCALE`: 2 bytes a
    pixel, within 7.7e-6 of the float32 value; the lesion table's ``mean_probability`` is printed to
    1e-4). The batches are written into the two outputs in place (no concatenated copies).
    """
    images, model = _model_input(loaded, predictor)
    labels = prob = None
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size]
        lab, p = predict_labels(model, x, predictor.cfg, predictor.device, probabilities=True, prob_dtype=torch.uint16,
                                objects=False)
        assert p is not None
        if labels is None or prob is None:
            if len(x) == len(images):  # one batch: its own arrays are the outputs
                labels, prob = lab.numpy().astype(np.uint8, copy=False), p.numpy()
                break
            labels = np.empty((len(images), *lab.shape[1:]), np.uint8)
            prob = np.empty((len(images), *p.shape[1:]), np.uint16)
        labels[i: i + len(x)] = lab.numpy()
        prob[i: i + len(x)] = p.numpy()
    assert labels is not None and prob is not None
    # the object step on the whole series: hysteresis in 3-D, then the per-slice size filter
    labels = object_labels(torch.from_numpy(labels), predictor.cfg, [loaded.meta["spacing"]] * len(labels),
                           torch.from_numpy(prob), volume=True).numpy().astype(np.uint8, copy=False)
    return to_source_grid(labels, loaded.meta), to_source_grid(prob, loaded.meta)


def _model_input(loaded: Loaded, predictor: Predictor) -> tuple[torch.Tensor, Any]:
    """The model input of a case and the model to run on it.

    With ``loaded.input_window`` (an 8- or 16-bit signed integer image on its own grid; uint16 lacks
    torch's flip) and a window that cuts every tile
    from the image as it is (sliding on the CPU, Gaussian or constant blend, no padding, no CRF, no
    scale TTA), the input stays the stored values and the model is given each tile batch windowed
    (:func:`~medseg.data.base.apply_window`, the function the reader would have applied to the whole
    image: the same float32 values, so the same logits) — no float32 copy of the image (4 B/px).
    Otherwise the whole input is windowed here, as the reader did before."""
    model = predictor.model
    if loaded.input_window is None:
        return torch.from_numpy(loaded.images), model
    low, high = loaded.input_window
    inf = predictor.cfg.inference
    th, tw = (int(t) for t in inf.tile_size)
    # torch implements every op of the window (cat, flip) for these; uint16 only partly
    if (loaded.images.dtype in (np.uint8, np.int8, np.int16) and predictor.device.type == "cpu" and inf.mode == "sliding" and not inf.crf.enabled
            and inf.blend in ("gaussian", "constant") and [float(s) for s in inf.tta_scales] == [1.0]
            and loaded.images.shape[-2] >= th and loaded.images.shape[-1] >= tw):
        def windowed(tiles: torch.Tensor) -> torch.Tensor:
            return model(torch.from_numpy(apply_window(tiles.numpy(), low, high)))
        return torch.from_numpy(loaded.images), windowed
    return torch.from_numpy(apply_window(loaded.images, low, high)), model


def _display(loaded: Loaded, cfg: Any) -> np.ndarray:
    """``(Z, H, W)`` uint8 display gray for the overlays (:func:`~medseg.predict.writers.gray8`, a band of
    rows at a time: no float copy of the stack): the series' own display window (its first WindowCenter /
    WindowWidth pair) where it has one, else as the model saw them (an image: its
    :func:`~medseg.data.images.intensity_range`)."""
    if loaded.case.kind == "image":
        rng = intensity_range(loaded.values[0], cfg.data.window, cfg.data.window_range)
        return gray8(loaded.values, *rng) if rng is not None else np.zeros(loaded.values.shape, np.uint8)
    own = header_window(loaded.geom.windows) if loaded.geom is not None else None
    low, high = own if own is not None else loaded.info["window"]
    return gray8(loaded.values, low, high)


def _world(loaded: Loaded) -> Any:
    """Voxel (slice, row, column) → world mm for the lesion centroids."""
    if loaded.geom is not None:
        g = loaded.geom
        sy, sx = loaded.spacing

        def dicom(z: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
            return g.positions[z] + np.outer(c * sx, g.direction[0]) + np.outer(r * sy, g.direction[1])
        return dicom
    if loaded.nifti is not None:
        aff, ax = loaded.nifti["canonical_affine"], loaded.nifti["axis"]

        def nifti(z: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
            ijk = [None, None, None]
            rest = [a for a in range(3) if a != ax]
            ijk[ax], ijk[rest[0]], ijk[rest[1]] = z, r, c
            pts = np.stack([*ijk, np.ones_like(z)], 1).astype(np.float64)
            return (pts @ aff.T)[:, :3]
        return nifti
    return lambda z, r, c: np.stack([c, r, np.zeros_like(c)], 1).astype(np.float64)


def _extents(loaded: Loaded) -> np.ndarray:
    if loaded.geom is not None:
        return slice_extents(loaded.geom.slice_positions, loaded.geom.slice_thickness)
    if loaded.nifti is not None:
        return np.full(len(loaded.values), float(loaded.info["zooms"][loaded.nifti["axis"]]))
    return np.ones(1)


def process_case(loaded: Loaded, predictor: Predictor, out_dir: Path, tmp_root: Path, fingerprint: str
                 ) -> dict[str, Any]:
    """Predict one case, write and verify its outputs in a temporary folder, then rename it into place.

    The case's model inputs (``loaded.images``) are released once predicted: the writers never use them,
    and the lesion table and overlays then run without them in memory.
    """
    t0 = time.perf_counter()
    labels, prob = predict_case(loaded, predictor, predictor.cfg.predict.batch_size)
    # a new empty array: a slice such as ``images[:0]`` is a view that would keep the whole input alive
    loaded.images = np.empty((0, *loaded.images.shape[1:]), loaded.images.dtype)
    release_freed_memory()
    predict_s = time.perf_counter() - t0
    # the case's folder appears whole or not at all; one already there (renamed by a run killed before
    # its manifest said done) is replaced
    with atomic_dir(out_dir / loaded.case.out_rel, tmp_root / loaded.case.key) as tmp:
        return write_case(tmp, loaded, labels, prob, predictor.cfg, fingerprint, predict_s)


def operating_point(cfg: Any) -> dict[str, Any]:
    """The operating point a class map was made at, as ``series.json`` records it (thresholds None = argmax,
    low thresholds None = no hysteresis)."""
    inf = cfg.inference
    return {"threshold": list(inf.threshold) if inf.threshold else None,
            "low_threshold": list(inf.low_threshold) if hysteresis_on(inf) else None,
            "min_object_mm2": float(inf.min_object_mm2 or 0.0)}


def write_case(tmp: Path, loaded: Loaded, labels: np.ndarray, prob: np.ndarray, cfg: Any, fingerprint: str,
               predict_s: float) -> dict[str, Any]:
    """Post-process and write one case's outputs into the folder ``tmp`` (each writer re-reads what it
    wrote); the caller renames ``tmp`` into place. Returns the case's statistics for the manifest."""
    case = loaded.case
    t1 = time.perf_counter()
    info: dict[str, Any] = {"kind": case.kind, "key": case.key, "output": case.out_rel, "medseg_version": __version__,
                            "model": {"name": cfg.model.name, "fingerprint": fingerprint,
                                      "operating_point": operating_point(cfg)},
                            "input": {**loaded.info, "files": len(case.files)}, "warnings": loaded.warnings,
                            "shape": list(labels.shape), "spacing_yx": list(loaded.spacing)}
    num_classes = int(cfg.data.num_classes)
    rows, note = None, None
    if case.kind == "dicom":
        g = loaded.geom
        assert g is not None
        affine, err = nifti_affine(g.positions, g.direction, g.spacing, g.slice_thickness)
        write_nifti(tmp / "mask.nii.gz", labels, affine)
        tilted = any("gantry tilt" in w for w in g.warnings)
        info["geometry"] = {"spacing_zyx": list(g.spacing), "origin_lps": g.origin.tolist(),
                            "direction": g.direction.tolist(), "slice_positions_lps": g.positions.tolist(),
                            "sop_instance_uids": list(g.sop_instance_uids),
                            "frames": [f for f in g.frames] if any(f is not None for f in g.frames) else None}
        info["nifti"] = {"affine_ras": affine.tolist(), "max_error_mm": err, "exact": err < 0.01,
                         "holds": "the acquired slices; " + (
                             "affine exact" if err < 0.01 and not tilted else
                             "sheared affine following the tilted slice positions" if err < 0.01 else
                             "irregular slice positions: the slice axis steps by the mean interval "
                             "(seg.dcm is exact)")}
        if cfg.predict.write_seg:
            rows = lesion_table(labels, prob, loaded.values, loaded.spacing, _extents(loaded), _world(loaded),
                                cfg.predict.connectivity)
            dic = write_seg_and_sr(tmp, labels, rows, g, num_classes, fingerprint, cfg.model.name,
                                   cfg.predict.connectivity, cfg.predict.write_sr)
            info.update(dic)
            note = dic.get("skipped")
    elif case.kind == "nifti":
        assert loaded.nifti is not None
        write_nifti_like(tmp / "mask.nii.gz", labels, loaded.nifti)
        info["nifti"] = {"affine": np.asarray(loaded.nifti["affine"]).tolist(), "holds": "the input's affine"}
    else:
        write_png_mask(tmp / f"{case.name.rsplit('-', 1)[0]}.png", labels[0])
    if rows is None:
        rows = lesion_table(labels, prob, loaded.values, loaded.spacing, _extents(loaded), _world(loaded),
                            cfg.predict.connectivity)
    write_csv(tmp / "lesions.csv", rows)
    if cfg.predict.overlays and rows:
        info["overlays"] = write_overlays(tmp / "overlays", _display(loaded, cfg), labels, rows)
    t2 = time.perf_counter()
    info["lesions"] = len(rows)
    info["timings_s"] = {"read": round(loaded.read_s, 4), "predict": round(predict_s, 4), "write": round(t2 - t1, 4)}
    write_json(tmp / "series.json", info)
    return {"n_slices": int(labels.shape[0]), "n_lesions": len(rows), "predict_s": predict_s, "write_s": t2 - t1,
            "note": note}
