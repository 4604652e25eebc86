"""``medseg predict`` end to end on a hospital-like export written from the generated demo data.

The model is an oracle (see :mod:`tests.predict.builders`), so the predicted mask is the truth and
what is tested is everything around it: reading, geometry, outputs, measurements, the manifest,
resume, kill -9, privacy. Outputs are re-read with independent readers (nibabel, highdicom, pydicom,
csv, sqlite3, dcmqi where it installs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from scipy import ndimage

from medseg.cli import main
from medseg.config import Config, to_dict
from medseg.data.folder import normalise_2d
from medseg.evaluation.calibrate import store_operating_point
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import Predictor, predict_logits
from medseg.lesion import axes_mm, measure_recist
from medseg.predict import run_predict
from medseg.registry import MODELS
from tests.predict import builders as B

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def oracle():
    B.register()
    yield
    B.unregister()


@pytest.fixture(scope="module")
def hospital(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return B.build_hospital(demo_root, tmp_path_factory.mktemp("hospital"))


@pytest.fixture(scope="module")
def run(hospital: dict, oracle: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``medseg predict`` run over the export (through the CLI), with its log."""
    tmp = tmp_path_factory.mktemp("predict")
    ckpt = B.write_checkpoint(tmp / "model" / "best.pt")
    out = tmp / "out"
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    try:
        rc = main(["predict", "--model", str(ckpt), str(hospital["root"]), str(out), "--no-progress"])
    finally:
        logging.getLogger().removeHandler(handler)
    return {"rc": rc, "out": out, "ckpt": ckpt, "log": "\n".join(handler.lines)}


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _series_dirs(out: Path) -> dict[str, Path]:
    """SeriesInstanceUID (from our SEG's reference) → output folder."""
    found = {}
    for js in out.glob("study-*/series-*/series.json"):
        seg = js.parent / "seg.dcm"
        if seg.is_file():
            ds = pydicom.dcmread(seg)
            found[str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)] = js.parent
    return found


def _digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.name in ("mask.nii.gz", "seg.dcm")}


# ----------------------------------------------------------------------------- manifest


def test_every_input_file_is_in_the_manifest_with_its_status(hospital: dict, run: dict) -> None:
    assert run["rc"] == 0
    with sqlite3.connect(run["out"] / "manifest.sqlite") as db:
        files = {p: (s, r or "") for p, s, r in db.execute("SELECT path, status, reason FROM files")}
        series = dict(db.execute("SELECT key, status FROM series").fetchall())
    on_disk = {str(p.relative_to(hospital["root"])) for p in hospital["root"].rglob("*") if p.is_file()}
    assert set(files) == on_disk
    for b in hospital["built"].values():
        for p in b.files:
            assert files[str(p.relative_to(hospital["root"]))][0] == "done", p
    expect = {"README.txt": "not a DICOM file", "TRUNCATED": "truncated", "REPORT": "structured report",
              "RTSTRUCT": "RTSTRUCT object", "rtplan.dcm": "radiotherapy", "waveform_ecg.dcm": "waveform",
              "emri_small_jpeg_2k_lossless.dcm": "without per-frame positions",
              "JPGExtended.dcm": "without geometry"}
    for name, why in expect.items():
        if name in {p.name for p in hospital["misc"].iterdir()}:
            status, reason = files[f"misc/{name}"]
            assert status == "skipped" and why in reason, (name, reason)
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "eCT_Supplemental.dcm"):
        if name in hospital["corpus"]:
            assert files[f"misc/{name}"][0] == "done"
    assert set(series.values()) == {"done"} and len(series) == len(hospital["built"]) + sum(
        n in hospital["corpus"] for n in ("CT_small.dcm", "MR_small_RLE.dcm", "eCT_Supplemental.dcm"))


def test_second_run_does_no_work(hospital: dict, run: dict) -> None:
    from medseg.predict import run_predict

    before = {p: p.stat().st_mtime_ns for p in run["out"].rglob("*") if p.is_file() and not p.name.startswith("manifest")}
    result = run_predict(run["ckpt"], hospital["root"], run["out"], progress=False)
    assert result.processed == [] and result.failed == {} and len(result.already_done) >= len(hospital["built"])
    after = {p: p.stat().st_mtime_ns for p in run["out"].rglob("*") if p.is_file() and not p.name.startswith("manifest")}
    assert after == before


# ----------------------------------------------------------------------------- geometry and SEG


def test_nifti_voxel_centres_map_to_image_position_patient(hospital: dict, run: dict) -> None:
    dirs = _series_dirs(run["out"])
    for b in hospital["built"].values():
        img = nib.load(str(dirs[b.series_uid] / "mask.nii.gz"))
        data = np.asanyarray(img.dataobj)
        np.testing.assert_array_equal(np.transpose(data, (2, 1, 0)) > 0, b.truth)
        info = json.loads((dirs[b.series_uid] / "series.json").read_text())
        if not b.regular and b.name != "tilted":
            assert info["nifti"]["exact"] is False and info["nifti"]["max_error_mm"] > 1.0
            continue
        for k, pos in enumerate(b.positions):
            ras = img.affine @ np.array([0.0, 0.0, k, 1.0])
            lps = ras[:3] * np.array([-1.0, -1.0, 1.0])
            assert np.abs(lps - pos).max() < 0.01, (b.name, k)
        # a pixel away from the origin too: column 5, row 7 of the last slice
        sy, sx = b.spacing
        iop = np.array(b.iop)
        want = b.positions[-1] + 5 * sx * iop[:3] + 7 * sy * iop[3:]
        ras = img.affine @ np.array([5.0, 7.0, len(b.positions) - 1, 1.0])
        assert np.abs(ras[:3] * [-1, -1, 1] - want).max() < 0.01


def test_seg_equals_the_mask_frame_by_frame_and_references_the_sources(hospital: dict, run: dict) -> None:
    dirs = _series_dirs(run["out"])
    for b in hospital["built"].values():
        seg_path = dirs[b.series_uid] / "seg.dcm"
        raw = pydicom.dcmread(seg_path)
        # one segment per lesion (lesions.csv's lesion_id), only the frames that hold it
        n_lesions = len((dirs[b.series_uid] / "lesions.csv").read_text().splitlines()) - 1
        assert raw.SegmentationType == "BINARY" and len(raw.SegmentSequence) == max(n_lesions, 1)
        mask = np.transpose(np.asanyarray(nib.load(str(dirs[b.series_uid] / "mask.nii.gz")).dataobj), (2, 1, 0))
        pix = raw.pixel_array.reshape(int(raw.NumberOfFrames), *b.truth.shape[1:])
        covered = np.zeros(b.truth.shape, np.int32)
        order: dict[int, list[int]] = {}
        for f, item in enumerate(raw.PerFrameFunctionalGroupsSequence):
            src = item.DerivationImageSequence[0].SourceImageSequence[0]
            if b.multiframe:
                assert src.ReferencedSOPInstanceUID == b.sop_uids[0]
                k = _slice_of_frame(b, int(src.ReferencedFrameNumber) - 1)
            else:
                k = b.sop_uids.index(src.ReferencedSOPInstanceUID)
            ident = item.get("SegmentIdentificationSequence") or raw.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
            order.setdefault(int(ident[0].ReferencedSegmentNumber), []).append(k)
            assert pix[f].any() and not (pix[f] > 0)[mask[k] == 0].any()
            covered[k] += pix[f] > 0
            pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
            assert np.abs(np.array(pos) - b.positions[k]).max() < 1e-3, (b.name, f)
        np.testing.assert_array_equal(covered > 0, b.truth)
        assert covered.max() <= 1  # lesions do not overlap
        # each lesion's frames ordered along the slice normal (highdicom sorts them)
        for ks in order.values():
            assert ks in (sorted(ks), sorted(ks)[::-1]), (b.name, ks)
        seg = hd.seg.segread(seg_path)
        if not b.multiframe:
            back = seg.get_pixels_by_source_instance(b.sop_uids, combine_segments=True,
                                                     assert_missing_frames_are_empty=True)
            np.testing.assert_array_equal(back > 0, b.truth)
        assert str(raw.PatientName) == str(pydicom.dcmread(b.files[0], stop_before_pixels=True).PatientName)


def _slice_of_frame(b: B.Built, frame: int) -> int:
    ds = pydicom.dcmread(b.files[0], stop_before_pixels=True)
    z = float(ds.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient[2])
    return int(np.argmin(np.abs(b.positions[:, 2] - z)))


@pytest.mark.slow
def test_dcmqi_reads_our_seg_back_as_the_mask(hospital: dict, run: dict, tmp_path: Path) -> None:
    tool = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")
    if not Path(tool).exists():
        pytest.skip("dcmqi is not installed")
    b = hospital["built"]["plain"]
    d = _series_dirs(run["out"])[b.series_uid]
    subprocess.run([tool, "--inputDICOM", str(d / "seg.dcm"), "--outputDirectory", str(tmp_path),
                    "--outputType", "nifti", "--prefix", "dcmqi"], check=True, capture_output=True, timeout=120)
    outs = sorted(tmp_path.glob("dcmqi*.nii*"))
    assert outs, "segimage2itkimage wrote no image"
    theirs = nib.as_closest_canonical(nib.load(str(outs[0])))
    ours = nib.as_closest_canonical(nib.load(str(d / "mask.nii.gz")))
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asanyarray(theirs.dataobj) > 0, np.asanyarray(ours.dataobj) > 0)


# ----------------------------------------------------------------------------- lesions


def test_lesion_diameters_match_the_generated_truth(hospital: dict, run: dict) -> None:
    checked = 0
    dirs = _series_dirs(run["out"])
    for b in hospital["built"].values():
        if b.name not in ("plain", "rle", "jpegls", "j2k"):
            continue
        rows = list(csv.DictReader((dirs[b.series_uid] / "lesions.csv").open()))
        tol = max(b.spacing)
        for rec in hospital["demo"][b.demo_series]:
            if rec.noisy or rec.key_slice not in b.slices:
                continue
            k = b.slices.index(rec.key_slice)
            long_mm, short_mm = rec.diameters_px[0] * rec.spacing[0], rec.diameters_px[1] * rec.spacing[0]
            # the truth component under the RECIST long axis' midpoint, on the key slice
            comp, _ = ndimage.label(b.truth[k], ndimage.generate_binary_structure(2, 2))
            x, y = (np.array(rec.coords[:2]) + np.array(rec.coords[2:4])) / 2
            cid, iid = comp[int(round(y)), int(round(x))], b.ids[k][int(round(y)), int(round(x))]
            if cid == 0 or not np.array_equal(comp == cid, b.ids[k] == iid):
                continue  # touches another lesion on its key slice: one predicted object, two true ones
            area = float((comp == cid).sum() * b.spacing[0] * b.spacing[1])
            # the 3-D lesion whose largest slice is the key slice and whose cross-section there is exactly it
            match = [r for r in rows if int(r["largest_slice"]) == k and abs(float(r["largest_area_mm2"]) - area) < 0.01]
            if not match:
                continue  # joined in 3-D with another lesion: its cross-section there is larger
            r = match[0]
            assert abs(float(r["recist_long_mm"]) - long_mm) <= tol, (b.name, rec.key_slice, r, long_mm)
            assert abs(float(r["recist_short_mm"]) - short_mm) <= tol, (b.name, rec.key_slice, r, short_mm)
            checked += 1
        for r in rows:  # an independent measurement of the largest slice's truth component
            k = int(r["largest_slice"])
            sy, sx = b.spacing
            assert float(r["largest_area_mm2"]) == pytest.approx(
                float(r["area_mm2_per_slice"].split(";")[[int(x.split(":")[0]) for x in
                                                          r["area_mm2_per_slice"].split(";")].index(k)].split(":")[1]))
            assert float(r["mean_hu"]) == pytest.approx(B.SENTINEL_HU) and float(r["mean_probability"]) > 0.99
            comp, _ = ndimage.label(b.truth[k], ndimage.generate_binary_structure(2, 2))
            ids = [i for i in range(1, comp.max() + 1)
                   if abs((comp == i).sum() * sy * sx - float(r["largest_area_mm2"])) < 1e-6]
            if len(ids) == 1:
                ax = measure_recist(comp == ids[0])
                lm, sm = axes_mm(ax, (sy, sx))
                assert abs(float(r["recist_long_mm"]) - lm) <= tol and abs(float(r["recist_short_mm"]) - sm) <= tol
    assert checked >= 2


# ----------------------------------------------------------------------------- safety and privacy


def test_hostile_header_stays_inside_the_output_dir(hospital: dict, run: dict) -> None:
    out = run["out"].resolve()
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out)
        assert all(ch.isalnum() or ch in "._-" for ch in p.name), p.name
    assert not (out.parent / "escaped").exists()
    for p in out.rglob("lesions.csv"):
        rows = list(csv.reader(p.open()))
        assert rows[0][0] == "lesion_id" and all(len(r) == len(rows[0]) for r in rows)
    b = hospital["built"]["hostile"]
    d = _series_dirs(run["out"])[b.series_uid]
    assert (d / "mask.nii.gz").is_file() and d.parent.name.startswith("study-")


def test_no_patient_name_id_or_birth_date_in_any_text_output(hospital: dict, run: dict) -> None:
    secrets = [B.PATIENT_NAME, B.PATIENT_NAME.split("^")[0], B.PATIENT_ID, B.BIRTH_DATE]
    for p in run["out"].rglob("*"):
        if p.is_file() and p.suffix != ".dcm":
            data = p.read_bytes()
            for s in secrets:
                assert s.encode() not in data, (p, s)
        for s in secrets:
            assert s not in p.name
    for s in secrets:
        assert s not in run["log"]


# ----------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_mid_run_then_restart_gives_identical_outputs(hospital: dict, run: dict, tmp_path: Path) -> None:
    slow = B.write_checkpoint(tmp_path / "slow.pt", delay_s=0.05)  # same weights, so the same fingerprint
    out = tmp_path / "out"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.predict import builders as B; B.register(); "
            "from medseg.cli import main; sys.exit(main(sys.argv[1:]))")
    args = [sys.executable, "-c", code, "predict", "--model", str(slow), str(hospital["root"]), str(out),
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with sqlite3.connect(out / "manifest.sqlite", timeout=1) as db:
                done = db.execute("SELECT COUNT(*) FROM series WHERE status = 'done'").fetchone()[0]
        except sqlite3.Error:
            continue
        if done >= 2:
            break
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = [p for p in out.glob("study-*/series-*") if p.is_dir()]
    assert 0 < len(finished) < len(list(run["out"].glob("study-*/series-*")))
    for d in finished:  # whatever was renamed into place is complete
        assert {"mask.nii.gz", "lesions.csv", "series.json"} <= {p.name for p in d.iterdir()}
    rc = subprocess.run(args, env=env, capture_output=True, timeout=300).returncode
    assert rc == 0
    assert _digest(out) == _digest(run["out"])
    assert not list(out.glob(".tmp-*"))


# ----------------------------------------------------------------------------- the operating point, sliding


class Graded(torch.nn.Module):
    """Lesion logit ``scale·(x − centre)`` of each pixel's key channel: a graded probability, so a stored
    threshold above 0.5 moves the boundary and speckle survives argmax."""

    def __init__(self, in_channels: int, num_classes: int, scale: float = 10.0, centre: float = 0.5) -> None:
        super().__init__()
        self.key = (in_channels - 1) - (in_channels - 1) // 2
        self.scale, self.centre, self.num_classes = scale, centre, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:], dtype=x.dtype, device=x.device)
        out[:, 1] = self.scale * (x[:, self.key] - self.centre)
        return out


def test_sliding_predict_applies_the_stored_operating_point_as_evaluate_does(tmp_path: Path) -> None:
    """A 2-D image larger than the tile, ``inference.mode=sliding``, a calibrated threshold and min size:
    ``medseg predict`` writes the class map evaluate's path (predict_logits + postprocess) computes."""
    if "test_graded" not in MODELS:
        MODELS.register("test_graded")(Graded)
    try:
        cfg = Config()
        cfg.model.name, cfg.model.params = "test_graded", {}
        cfg.data.window, cfg.data.context_slices, cfg.data.spacing_mm = "dicom", 1, None
        cfg.inference.mode, cfg.inference.tile_size, cfg.inference.overlap = "sliding", [64, 64], 0.25
        cfg.train.threads, cfg.train.device, cfg.train.amp = 1, "cpu", "off"
        cfg.tracking.enabled = False
        ckpt = tmp_path / "model" / "best.pt"
        ckpt.parent.mkdir()
        torch.save({"version": 1, "model": Graded(1, 2).state_dict(), "config": to_dict(cfg), "in_channels": 1,
                    "num_classes": 2}, ckpt)
        store_operating_point(ckpt, {"threshold": [0.8], "min_object_mm2": 20.0, "metric": "dice", "split": "val",
                                     "score": 0.0, "argmax_score": 0.0})
        rng = np.random.default_rng(5)
        img = rng.integers(0, 175, (200, 170)).astype(np.uint8)  # speckle with p₁ up to 0.8: argmax keeps it
        img[40:90, 30:100] = 240  # a lesion under any operating point (p₁ ≈ 0.99)
        img[120:160, 60:120] = 150  # p₁ ≈ 0.71: lesion for argmax, background at the threshold 0.8
        for y, x in [(20, 140), (110, 20), (180, 150)]:  # 3×3 = 9 px² objects: below min_object_mm2
            img[y: y + 3, x: x + 3] = 240
        (tmp_path / "imgs").mkdir()
        cv2.imwrite(str(tmp_path / "imgs" / "large.png"), img)

        res = run_predict(ckpt, tmp_path / "imgs", tmp_path / "out", progress=False)
        assert res.failed == {} and len(res.processed) == 1
        (png,) = list((tmp_path / "out" / "images").glob("*/large.png"))
        got = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)

        predictor = Predictor.from_ref(ckpt, device="cpu")  # evaluate's path: the model's stored point
        assert predictor.cfg.inference.threshold == [0.8] and predictor.cfg.inference.min_object_mm2 == 20.0
        x = torch.from_numpy(normalise_2d(img, "dicom", [0.0, 1.0]))[None, None]
        logits = predict_logits(predictor.model, x, predictor.cfg, torch.device("cpu"))
        expected = postprocess(logits, x, predictor.cfg, [[1.0, 1.0]])[0].numpy().astype(np.uint8)
        assert not np.array_equal(expected, logits.argmax(1)[0].numpy())  # the point changes this image
        assert expected[60, 60] == 1 and expected[140, 90] == 0 and expected[21, 141] == 0
        np.testing.assert_array_equal(got, expected)
    finally:
        MODELS._entries.pop("test_graded", None)


def test_a_case_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """``medseg.io.atomic_dir``, which ``process_case`` writes each case through: a failure leaves the old
    folder and no temporary one; success replaces the old folder with the whole new one."""
    from medseg.io import atomic_dir, atomic_write_text

    final, tmp = tmp_path / "out" / "study-1" / "series-1", tmp_path / "out" / ".tmp-part0" / "k"
    final.mkdir(parents=True)
    atomic_write_text(final / "series.json", "old")
    with pytest.raises(RuntimeError), atomic_dir(final, tmp) as d:
        atomic_write_text(d / "mask.png", "half")
        raise RuntimeError("killed mid-case")
    assert not tmp.exists() and sorted(p.name for p in final.iterdir()) == ["series.json"]
    with atomic_dir(final, tmp) as d:
        atomic_write_text(d / "series.json", "new")
        atomic_write_text(d / "lesions.csv", "")
        assert (final / "series.json").read_text() == "old"  # nothing visible until the rename
    assert not tmp.exists() and (final / "series.json").read_text() == "new" and (final / "lesions.csv").is_file()
