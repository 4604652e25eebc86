"""The lesion table and overlays of ``medseg predict``: per-component work inside each bounding box.

* the table equals the per-voxel formula it replaced (computed here, independently, on small cases);
* its memory does not grow with the foreground: a 2048² map that is mostly foreground peaks no higher
  than a map with a few small lesions, by a bound far below one float per foreground pixel;
* each overlay id is drawn at its own lesion;
* predict uses ``predict.threads`` (default: every core), never the model's ``train.threads``.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from medseg.io import write_rows_csv
from medseg.lesion import axes_mm, measure_recist
from medseg.predict.lesions import COLUMNS, lesion_table, slice_extents
from medseg.predict.run import predict_threads
from medseg.predict.writers import write_csv, write_overlays

# ----------------------------------------------------------------------------- reference


def _reference_table(labels, prob, values, spacing, extents, to_world, connectivity=3):
    """The per-voxel formula: every voxel's indices mapped to world mm, values indexed by them."""
    sy, sx = spacing
    structure = ndimage.generate_binary_structure(3, connectivity)
    rows = []
    for cls in [int(c) for c in np.unique(labels) if c != 0]:
        comp, n = ndimage.label(labels == cls, structure=structure)
        for i in range(1, n + 1):
            zz, rr, cc = np.nonzero(comp == i)
            ks = sorted(set(zz.tolist()))
            areas = {k: float((zz == k).sum()) * sy * sx for k in ks}
            largest = max(ks, key=lambda k: (areas[k], -k))
            ax = measure_recist(comp[largest] == i)
            long_mm, short_mm = axes_mm(ax, (sy, sx))
            rows.append({
                "class": cls, "first_slice": ks[0], "last_slice": ks[-1],
                "centroid": to_world(zz, rr, cc).mean(0),
                "volume_mm3": sum(areas[k] * extents[k] for k in ks), "largest_slice": largest,
                "largest_area_mm2": areas[largest], "recist": (long_mm, short_mm),
                "mean_hu": float(values[zz, rr, cc].astype(np.float64).mean()),
                "max_hu": float(values[zz, rr, cc].max()),
                "mean_probability": float(prob[zz, rr, cc].astype(np.float64).mean()),
                "area_mm2_per_slice": ";".join(f"{k}:{areas[k]:.2f}" for k in ks),
                "first": (ks[0], int(rr[zz == ks[0]].min()), cls),
            })
    rows.sort(key=lambda r: r["first"])
    return rows


def _dicom_world(positions: np.ndarray, direction: np.ndarray, sy: float, sx: float):
    def world(z, r, c):
        return positions[z] + np.outer(c * sx, direction[0]) + np.outer(r * sy, direction[1])
    return world


def _case(seed: int = 0, shape=(6, 70, 90)):
    rng = np.random.default_rng(seed)
    z, h, w = shape
    zz, yy, xx = np.mgrid[:z, :h, :w]
    labels = np.zeros(shape, np.uint8)
    for _ in range(7):
        cz, cy, cx = rng.uniform(0, z), rng.uniform(0, h), rng.uniform(0, w)
        rz, ry, rx = rng.uniform(0.8, 2.5), rng.uniform(3, 14), rng.uniform(3, 14)
        blob = ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        labels[blob] = rng.integers(1, 3)
    labels[2, 5, 5] = 2  # a single voxel
    labels[0, 40:60, 2] = 1  # a sliver on the edge
    prob = rng.uniform(0.5, 1.0, shape).astype(np.float32)
    values = rng.normal(40, 300, shape).astype(np.float32)
    return labels, prob, values


@pytest.mark.parametrize("kind", ["dicom", "pixels"])
def test_table_equals_the_per_voxel_formula(kind: str) -> None:
    labels, prob, values = _case()
    sy, sx = 0.7, 0.9
    if kind == "dicom":  # oblique orientation, uneven slice positions
        d0 = np.array([0.96, 0.28, 0.0])
        d1 = np.array([-0.28 * 0.9, 0.96 * 0.9, 0.436])
        d1 /= np.linalg.norm(d1)
        normal = np.cross(d0, d1)
        z_mm = np.array([0.0, 2.5, 5.0, 8.0, 10.5, 13.0])
        positions = np.array([-100.0, 30.0, 12.0]) + z_mm[:, None] * normal
        world = _dicom_world(positions, np.stack([d0, d1]), sy, sx)
        extents = slice_extents(z_mm)
    else:
        def world(z, r, c):
            return np.stack([c, r, np.zeros_like(c)], 1).astype(np.float64)
        extents = np.ones(labels.shape[0])
    ref = _reference_table(labels, prob, values, (sy, sx), extents, world)
    got = lesion_table(labels, prob, values, (sy, sx), extents, world)
    assert len(got) == len(ref) > 5
    for n, (g, r) in enumerate(zip(got, ref, strict=True), start=1):
        assert g["lesion_id"] == n
        for key in ("class", "first_slice", "last_slice", "largest_slice", "area_mm2_per_slice"):
            assert g[key] == r[key], (key, g, r)
        centroid = [float(g[f"centroid_{a}_mm"]) for a in "xyz"]
        np.testing.assert_allclose(centroid, r["centroid"], atol=1.1e-3)
        assert float(g["volume_mm3"]) == pytest.approx(r["volume_mm3"], abs=0.011)
        assert float(g["largest_area_mm2"]) == pytest.approx(r["largest_area_mm2"], abs=0.011)
        assert float(g["recist_long_mm"]) == pytest.approx(r["recist"][0], abs=0.011)
        assert float(g["recist_short_mm"]) == pytest.approx(r["recist"][1], abs=0.011)
        assert float(g["mean_hu"]) == pytest.approx(r["mean_hu"], abs=0.051)
        assert float(g["max_hu"]) == pytest.approx(r["max_hu"], abs=0.051)
        assert float(g["mean_probability"]) == pytest.approx(r["mean_probability"], abs=1.1e-4)


def test_csv_holds_the_columns_only(tmp_path: Path) -> None:
    labels, prob, values = _case(1)
    rows = lesion_table(labels, prob, values, (1.0, 1.0), np.ones(labels.shape[0]),
                        lambda z, r, c: np.stack([c, r, np.zeros_like(c)], 1).astype(np.float64))
    write_csv(tmp_path / "lesions.csv", rows)
    lines = (tmp_path / "lesions.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == len(rows) + 1
    # written in chunks: the bytes of the whole table written at once
    rows[0]["area_mm2_per_slice"] = 'a,"b"'  # a cell the CSV quotes
    write_rows_csv([{k: r[k] for k in COLUMNS} for r in rows], tmp_path / "ref2.csv")
    for chunk in (1, 2, 1000):
        write_csv(tmp_path / "lesions.csv", rows, chunk_rows=chunk)
        assert (tmp_path / "lesions.csv").read_bytes() == (tmp_path / "ref2.csv").read_bytes()
    write_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_bytes() == (",".join(COLUMNS) + "\r\n").encode()


# ----------------------------------------------------------------------------- memory


def _table_peak(labels: np.ndarray) -> tuple[int, int]:
    """Peak bytes allocated while building the table (inputs made before tracing), and the lesion count."""
    prob = np.full(labels.shape, 0.9, np.float32)
    values = np.zeros(labels.shape, np.float32)
    world = lambda z, r, c: np.stack([c, r, np.zeros_like(c)], 1).astype(np.float64)  # noqa: E731
    tracemalloc.start()
    try:
        rows = lesion_table(labels, prob, values, (1.0, 1.0), np.ones(labels.shape[0]), world)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, len(rows)


def test_table_memory_does_not_grow_with_the_foreground() -> None:
    """Bytes per pixel of a 2048² map (tracemalloc peak while building the table; inputs excluded).

    The per-voxel formula allocated ~77 bytes per foreground pixel. Now, whatever the foreground: one
    class mask and its int32 component map (5 B/px of the image), one chunk, the rows; and for RECIST
    the largest slice's box of the lesion being measured (one bool crop, which ``measure_recist`` reads
    as a uint8 view: 1 B/px of that box — it made uint8 and float32 copies too, 7 B/px, before), and
    RECIST's sampling grid (fixed: ≤ 256 × 1024 samples).
    """
    size = 2048
    n_px = size * size
    yy, xx = np.mgrid[:size, :size]
    cells = np.zeros((1, size, size), np.uint8)  # microscopy-like: 4096 cells over ~64 % of the map
    cells[0][(yy % 32 - 15.5) ** 2 + (xx % 32 - 15.5) ** 2 < 14.5 ** 2] = 1
    del yy, xx
    one = np.zeros((1, size, size), np.uint8)  # one lesion over 86 % of the map
    one[0, :1800, :2000] = 2
    small = np.zeros((1, size, size), np.uint8)  # three small lesions
    for cy, cx in [(100, 100), (900, 1500), (1800, 400)]:
        small[0, cy - 10: cy + 10, cx - 10: cx + 10] = 1
    assert (cells > 0).mean() > 0.6 and (one > 0).mean() > 0.85
    peak_small, n_small = _table_peak(small)
    peak_cells, n_cells = _table_peak(cells)
    peak_one, n_one = _table_peak(one)
    assert (n_small, n_cells, n_one) == (3, 4096, 1)
    assert peak_small < 6 * n_px  # the mask and component map of the image
    assert peak_cells - peak_small < 1.5 * n_px  # many lesions over most of the image: the rows only
    assert peak_one < 9 * n_px  # + one RECIST box the size of the image (the per-voxel formula: ~67 B/px)


# ----------------------------------------------------------------------------- overlays


def test_overlay_ids_sit_on_their_own_lesions(tmp_path: Path) -> None:
    labels = np.zeros((1, 256, 256), np.uint8)
    labels[0, 30:60, 20:50] = 1  # top left
    labels[0, 190:230, 180:240] = 1  # bottom right, larger
    images = np.zeros(labels.shape, np.float32)
    rows = lesion_table(labels, np.ones(labels.shape, np.float32), np.zeros(labels.shape, np.float32), (1.0, 1.0),
                        np.ones(1), lambda z, r, c: np.stack([c, r, np.zeros_like(c)], 1).astype(np.float64))
    assert [r["lesion_id"] for r in rows] == [1, 2]
    (name,) = write_overlays(tmp_path, images, labels, rows)
    rgb = cv2.imread(str(tmp_path / name))
    assert rgb.shape[:2] == (256, 256)  # scale 1: overlay pixels = source pixels
    text = rgb[..., 1] > 60  # the ids are yellow (B, G, R) = (0, 255, 255); outlines are red
    found, n = ndimage.label(ndimage.binary_dilation(text, iterations=4))
    assert n == 2
    boxes = [(slice(30, 60), slice(20, 50)), (slice(190, 230), slice(180, 240))]
    centres = sorted(ndimage.center_of_mass(text, found, [1, 2]))
    for (cy, cx), (rows_, cols_) in zip(centres, boxes, strict=True):  # each id inside its own lesion's box
        assert rows_.start <= cy < rows_.stop and cols_.start <= cx < cols_.stop, (centres, boxes)


# ----------------------------------------------------------------------------- threads


def test_predict_threads_default_to_every_core_never_the_training_setting() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert predict_threads(None) == cores
    assert predict_threads(0) == cores
    assert predict_threads(3) == 3


def test_run_predict_sets_predict_threads_not_train_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from medseg.predict import run_predict
    from tests.predict import builders as B

    B.register()
    try:
        img = np.zeros((40, 50), np.uint8)
        img[10:20, 10:30] = 255
        (tmp_path / "imgs").mkdir()
        cv2.imwrite(str(tmp_path / "imgs" / "a.png"), img)
        ckpt = B.write_checkpoint(tmp_path / "m.pt", window="dicom")  # its config has train.threads = 1
        calls: list[int] = []
        monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(int(n)))
        res = run_predict(ckpt, tmp_path / "imgs", tmp_path / "out", progress=False)
        assert res.failed == {} and calls == [predict_threads(None)]
        calls.clear()
        run_predict(ckpt, tmp_path / "imgs", tmp_path / "out2", ["predict.threads=3"], progress=False)
        assert calls == [3]
    finally:
        B.unregister()


def test_overlay_outline_is_the_traced_contour() -> None:
    """The outline drawn from an erosion is, pixel for pixel, what findContours + drawContours drew."""
    from medseg.predict.writers import outline

    rng = np.random.default_rng(0)
    for _ in range(5):
        m = (cv2.GaussianBlur(rng.random((80, 90)).astype(np.float32), (0, 0), 3) > 0.5).astype(np.uint8)
        m[0, :10], m[:, -1] = 1, 1  # lesions on the image's edge
        traced = np.zeros((*m.shape, 3), np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(traced, contours, -1, (0, 0, 255), 1)
        np.testing.assert_array_equal(outline(m), traced[..., 2] > 0)


# ----------------------------------------------------------------------------- what medseg predict keeps


def _pixels(z, r, c):
    return np.stack([c, r, np.zeros_like(c)], 1).astype(np.float64)


def test_uint16_probability_gives_the_float_mean_to_the_printed_precision() -> None:
    """``medseg predict`` keeps the probability as uint16 fixed point: each ``mean_probability`` is within
    the quantisation step of the float32 map's (printed to 1e-4; a value may round the other way only
    when it lies within 8e-6 of a rounding boundary)."""
    import torch

    from medseg.inference.postprocess import PROB_SCALE, quantise_probability

    labels, prob, values = _case()
    q = quantise_probability(torch.from_numpy(prob)).numpy()
    assert q.dtype == np.uint16 and np.abs(q / PROB_SCALE - prob).max() <= 0.5 / PROB_SCALE + 1e-7
    ref = _reference_table(labels, prob, values, (1.0, 1.0), np.ones(labels.shape[0]), _pixels)
    got = lesion_table(labels, q, values, (1.0, 1.0), np.ones(labels.shape[0]), _pixels)
    flt = lesion_table(labels, prob, values, (1.0, 1.0), np.ones(labels.shape[0]), _pixels)
    assert len(got) == len(ref) > 5
    for g, f, r in zip(got, flt, ref, strict=True):
        assert abs(float(g["mean_probability"]) - r["mean_probability"]) <= 0.5e-4 + 0.5 / PROB_SCALE
        assert {k: v for k, v in g.items() if k != "mean_probability"} == \
            {k: v for k, v in f.items() if k != "mean_probability"}


def test_recist_shared_by_identical_crops_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small components, most repeating a few shapes (as cells do), some random: the table with the
    shared RECIST measurements equals the table measuring every lesion (RECIST_CACHE_PIXELS = 0), and
    each RECIST cell equals measure_recist of that lesion's own crop."""
    import medseg.predict.lesions as L

    rng = np.random.default_rng(3)
    labels = np.zeros((2, 300, 300), np.uint8)
    shapes = [np.ones((1, 1)), np.ones((1, 2)), np.ones((3, 1)), np.eye(3), np.ones((4, 5))]
    for k in range(400):
        z, y, x = rng.integers(0, 2), rng.integers(0, 290), rng.integers(0, 290)
        s = shapes[k % len(shapes)] if k % 4 else rng.random((rng.integers(2, 9), rng.integers(2, 9))) < 0.6
        labels[z, y: y + s.shape[0], x: x + s.shape[1]] = np.where(s > 0, 1 + k % 2, labels[z, y: y + s.shape[0],
                                                                                        x: x + s.shape[1]])
    prob = rng.uniform(0.5, 1.0, labels.shape).astype(np.float32)
    values = rng.normal(0, 100, labels.shape).astype(np.float32)
    args = (labels, prob, values, (0.8, 0.6), np.ones(2), _pixels, 1)
    calls = []
    real = L.measure_recist
    monkeypatch.setattr(L, "measure_recist", lambda m: calls.append(1) or real(m))
    shared = L.lesion_table(*args)
    n_shared = len(calls)
    monkeypatch.setattr(L, "RECIST_CACHE_PIXELS", 0)
    every = L.lesion_table(*args)
    assert len(shared) == len(every) > 200
    assert n_shared < len(every) / 2 and len(calls) - n_shared == len(every)  # shared: far fewer measurements
    assert shared == every
    structure = ndimage.generate_binary_structure(3, 1)
    for r in every[::17]:  # independently: measure_recist of the lesion's own crop on its largest slice
        cls, i = r["_component"]
        comp, _ = ndimage.label(labels == cls, structure=structure)
        m = comp[r["largest_slice"]] == i
        ys, xs = np.nonzero(m)
        crop = m[max(ys.min() - 1, 0): ys.max() + 2, max(xs.min() - 1, 0): xs.max() + 2]
        long_mm, short_mm = axes_mm(measure_recist(crop), (0.8, 0.6))
        assert (r["recist_long_mm"], r["recist_short_mm"]) == (f"{long_mm:.2f}", f"{short_mm:.2f}")


def test_display_gray_is_the_windowed_values_without_a_float_copy() -> None:
    """gray8 (the overlays' display, a band of rows at a time) equals ``apply_window × 255`` truncated,
    the formula the overlays used on the whole float image; NaN counts as 0 as in normalise_2d."""
    from medseg.data.base import apply_window
    from medseg.data.images import intensity_range, normalise_2d
    from medseg.predict.writers import gray8

    rng = np.random.default_rng(0)
    hu = rng.normal(40, 400, (3, 300, 70)).astype(np.float32)
    ref = (np.clip(apply_window(hu, -160, 240), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(gray8(hu, -160, 240, chunk_rows=64), ref)
    img = rng.integers(0, 256, (300, 70)).astype(np.uint8)
    rng_ = intensity_range(img, "dicom", [0.0, 1.0])
    assert rng_ == (0.0, 255.0)
    np.testing.assert_array_equal(gray8(img, *rng_), (normalise_2d(img, "dicom", [0.0, 1.0]) * 255).astype(np.uint8))
    flt = rng.normal(5, 2, (300, 70))
    flt[3, 4], flt[200, 1] = np.nan, np.inf
    lo_hi = intensity_range(flt, "dicom", [0.0, 1.0])
    finite = flt[np.isfinite(flt)]
    assert lo_hi == (finite.min(), finite.max())
    np.testing.assert_array_equal(gray8(flt, *lo_hi, chunk_rows=7),
                                  (normalise_2d(flt, "dicom", [0.0, 1.0]) * 255).astype(np.uint8))
    assert intensity_range(np.full((4, 4), 3.0), "dicom", [0.0, 1.0]) is None


def test_outline_painted_by_bands_is_the_whole_slices() -> None:
    from medseg.predict.writers import outline, paint_outline

    rng = np.random.default_rng(5)
    labels = (cv2.GaussianBlur(rng.random((157, 90)).astype(np.float32), (0, 0), 2) > 0.5).astype(np.uint8)
    labels[0, :10], labels[-1, 40:], labels[:, 0] = 1, 2, 1  # lesions on the image's edges
    ref = np.zeros((*labels.shape, 3), np.uint8)
    ref[outline((labels > 0).view(np.uint8))] = (0, 0, 255)
    for band in (1, 2, 16, 157, 1000):
        got = np.zeros_like(ref)
        paint_outline(got, labels, band_rows=band)
        np.testing.assert_array_equal(got, ref)


def _whole_slice_overlay(gray: np.ndarray, labels: np.ndarray, ids: list) -> np.ndarray:
    """The overlay drawn on the whole slice at once (the drawing the banded writer must reproduce)."""
    from medseg.predict.writers import _draw_id, paint_outline

    rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    paint_outline(rgb, labels, band_rows=labels.shape[0])
    for text, yx in ids:
        _draw_id(rgb, text, yx, 1)
    return rgb


def test_png_written_by_bands_is_imencodes_file() -> None:
    from medseg.predict.writers import png_bgr_chunks

    rng = np.random.default_rng(3)
    img = cv2.GaussianBlur(rng.integers(0, 256, (203, 131, 3), dtype=np.uint8), (0, 0), 1.5)
    img[::9, ::4] = (0, 0, 255)
    ok, ref = cv2.imencode(".png", img)
    assert ok
    for band in (1, 7, 64, 203, 1000):
        data = b"".join(png_bgr_chunks(*img.shape[:2], (img[a: a + band] for a in range(0, len(img), band))))
        back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(back, img)  # what any decoder reads
        # OpenCV's own encoding settings, so the very file (with the same zlib as OpenCV's build)
        assert data == ref.tobytes()
    with pytest.raises(ValueError, match="rows"):
        b"".join(png_bgr_chunks(204, 131, [img]))


def test_overlay_drawn_by_bands_is_the_whole_slices(tmp_path: Path) -> None:
    from medseg.predict.writers import overlay_bands

    rng = np.random.default_rng(11)
    h, w = 300, 277
    labels = (cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 4) > 0.5).astype(np.uint8)
    labels[0, :20], labels[-1, 30:], labels[:, -1] = 1, 1, 1  # lesions on the image's edges
    gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
    # ids everywhere, overlapping each other, across band boundaries and clamped at every edge
    anchors = [(float(y), float(x)) for y, x in zip(rng.uniform(-5, h + 5, 120), rng.uniform(-5, w + 5, 120), strict=True)]
    anchors += [(0.0, 0.0), (h - 1.0, w - 1.0), (63.5, 100.0), (64.0, 101.0), (127.2, 50.0)]
    ids = [(str(rng.integers(1, 10 ** rng.integers(1, 7))), yx) for yx in anchors]
    ref = _whole_slice_overlay(gray, labels, ids)
    for band in (1, 5, 16, 64, 299, 1000):
        got = np.concatenate(list(overlay_bands(gray, labels, ids, band_rows=band)))
        np.testing.assert_array_equal(got, ref, err_msg=f"band_rows={band}")
    # through write_overlays: the file imencode writes of the whole-slice drawing (float display too)
    rows = [{"lesion_id": t, "largest_slice": 0, "_anchor_yx": yx} for t, yx in ids]
    (name,) = write_overlays(tmp_path, gray[None].astype(np.float32) / 255.0, labels[None], rows)
    from medseg.predict.writers import gray8

    ref = _whole_slice_overlay(gray8(gray.astype(np.float32) / 255.0), labels, ids)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / name), cv2.IMREAD_UNCHANGED), ref)
    assert (tmp_path / name).read_bytes() == cv2.imencode(".png", ref)[1].tobytes()
