"""``medseg predict`` inputs other than a DICOM export, pre-processing rules, selection and sharding."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import tifffile

from medseg.config import Config
from medseg.inference.predictor import Predictor
from medseg.predict import run_predict
from medseg.predict.readers import discover, load_case
from medseg.predict.run import shard_of
from tests.predict import builders as B


@pytest.fixture(scope="module")
def oracle():
    B.register()
    yield
    B.unregister()


@pytest.fixture(scope="module")
def small(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three CT series (plain, RLE, tilted) written from the demo data."""
    from pydicom.uid import RLELossless

    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(3)
    demo = B._demo_series(demo_root)
    out = {}
    for i, (name, syntax) in enumerate([("a", None), ("b", RLELossless), ("c", None)]):
        nums, hu, ids = B._slices(demo_root, demo[i][0])
        sx, sy, sz = demo[i][1][0].spacing
        pos = np.array([[-100.0, -120.0, n * sz] for n in nums])
        kw = {"syntax": syntax} if syntax else {}
        B.write_series(root / "in" / name, hu, pos, [1, 0, 0, 0, 1, 0], (sy, sx), rng, **kw)
        out[name] = {"hu": hu, "truth": ids > 0, "spacing": (sy, sx, sz)}
    return {"root": root / "in", "series": out, "tmp": root}


def _ckpt(tmp: Path, name: str, **data) -> Path:
    return B.write_checkpoint(tmp / f"{name}.pt", **data)


def test_nifti_input_keeps_its_affine_and_orientation(small: dict, oracle: None, tmp_path: Path) -> None:
    s = small["series"]["a"]
    sy, sx, sz = s["spacing"]
    vol = np.transpose(s["hu"], (2, 1, 0)).astype(np.int16)  # (x, y, z) with an LPS-style affine (x, y flipped)
    affine = np.array([[-sx, 0, 0, 100.0], [0, -sy, 0, 120.0], [0, 0, sz, -30.0], [0, 0, 0, 1]])
    (tmp_path / "nii").mkdir()
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "nii" / "case 01.nii.gz"))
    res = run_predict(_ckpt(tmp_path, "m"), tmp_path / "nii", tmp_path / "out", progress=False)
    assert res.failed == {} and len(res.processed) == 1
    (mask,) = list((tmp_path / "out" / "nifti").glob("*/mask.nii.gz"))
    assert mask.parent.name.startswith("case_01-")
    img = nib.load(str(mask))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj) > 0, np.transpose(s["truth"], (2, 1, 0)))
    assert (mask.parent / "lesions.csv").read_text().startswith("lesion_id,")


def test_png_and_tiff_input_give_png_masks_named_after_the_images(oracle: None, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 170, (90, 120)).astype(np.uint8)
    truth = np.zeros(img.shape, bool)
    truth[30:50, 40:75] = True
    img[truth] = 255
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "slide_7.png"), img)
    tifffile.imwrite(tmp_path / "imgs" / "other.tif", img.T.copy())
    ckpt = _ckpt(tmp_path, "m", window="dicom")  # PNG / TIFF: "dicom" = the dtype's range, as in training
    res = run_predict(ckpt, tmp_path / "imgs", tmp_path / "out", progress=False)
    assert res.failed == {} and len(res.processed) == 2
    (png,) = list((tmp_path / "out" / "images").glob("*/slide_7.png"))
    np.testing.assert_array_equal(cv2.imread(str(png), cv2.IMREAD_UNCHANGED), truth.astype(np.uint8))
    (tif_mask,) = list((tmp_path / "out" / "images").glob("*/other.png"))
    np.testing.assert_array_equal(cv2.imread(str(tif_mask), cv2.IMREAD_UNCHANGED), truth.T.astype(np.uint8))
    rows = (png.parent / "lesions.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[9] == f"{truth.sum():.2f}"  # area in px² (spacing 1)


def test_window_rule_follows_the_model(small: dict, oracle: None, tmp_path: Path) -> None:
    cfg = Config()
    cases, _ = discover(small["root"], cfg)
    case = cases[0]
    cfg.data.window = "dicom"
    loaded = load_case(case, cfg)
    assert loaded.info["window"] == [40 - 200, 40 + 200]  # the first WindowCenter / WindowWidth pair
    cfg.data.window, cfg.data.window_range = "fixed", [-1000.0, 1000.0]
    loaded = load_case(case, cfg)
    assert loaded.info["window"] == [-1000.0, 1000.0]
    # 2.5-D: the key channel is the slice itself, its neighbours slice_offset_mm away along the normal
    cfg.data.context_slices, cfg.data.slice_offset_mm = 3, 2 * float(np.diff(loaded.geom.slice_positions)[0])
    loaded = load_case(case, cfg)
    k = 4
    ref = np.clip((loaded.values[[k - 2, k, k + 2]] + 1000) / 2000, 0, 1)
    np.testing.assert_allclose(loaded.images[k], ref, atol=1e-6)


def test_resampling_to_the_training_spacing_and_back(small: dict, oracle: None, tmp_path: Path) -> None:
    s = small["series"]["a"]
    ckpt = _ckpt(tmp_path, "m", spacing_mm=2 * s["spacing"][0])
    root = tmp_path / "in"
    shutil.copytree(small["root"] / "a", root / "a")
    res = run_predict(ckpt, root, tmp_path / "out", progress=False)
    assert res.failed == {}
    (mask,) = list((tmp_path / "out").glob("study-*/series-*/mask.nii.gz"))
    got = np.transpose(np.asanyarray(nib.load(str(mask)).dataobj), (2, 1, 0)) > 0
    assert got.shape == s["truth"].shape
    inter, union = (got & s["truth"]).sum(), (got | s["truth"]).sum()
    assert inter / union > 0.8


def test_selection_rules_skip_series_with_their_reason(small: dict) -> None:
    cfg = Config()
    cfg.predict.modalities = ["MR"]
    cases, skipped = discover(small["root"], cfg)
    assert cases == [] and all("modality 'CT' is not in predict.modalities" in r for _, r in skipped)
    cfg.predict.modalities, cfg.predict.min_slices = ["CT"], 1000
    cases, skipped = discover(small["root"], cfg)
    assert cases == [] and all("predict.min_slices" in r for _, r in skipped)
    cfg.predict.min_slices, cfg.predict.orientations = 1, ["coronal"]
    assert discover(small["root"], cfg)[0] == []
    cfg.predict.orientations, cfg.predict.body_parts = ["axial"], ["chest"]
    assert len(discover(small["root"], cfg)[0]) == 3


def test_parts_split_the_cases_deterministically_and_merge(small: dict, oracle: None, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from medseg.cli import main

    ckpt = _ckpt(tmp_path, "m")
    keys = [c.key for c in discover(small["root"], Config())[0]]
    parts = [{k for k in keys if shard_of(k, 2) == p} for p in (0, 1)]
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == set(keys)
    out = tmp_path / "out"
    for p in (0, 1):
        rc = main(["predict", "--model", str(ckpt), str(small["root"]), str(out), "--num-parts", "2",
                   "--part-id", str(p), "--no-progress", "--set", "predict.write_seg=false"])
        assert rc == 0
        with sqlite3.connect(out / f"manifest-part{p}-of-2.sqlite") as db:
            done = {k for (k,) in db.execute("SELECT key FROM series WHERE status = 'done'")}
        assert done == parts[p]
        capsys.readouterr()
        assert main(["predict", "--merge", str(out)]) == 0  # hand-started parts merged by the command
        said = capsys.readouterr().out
        assert ("parts not finished (or missing): [1] of 2" in said) == (p == 0), said
        with sqlite3.connect(out / "manifest.sqlite") as db:
            assert {k for (k,) in db.execute("SELECT key FROM series WHERE status = 'done'")} == set().union(*parts[:p + 1])
    part_files = set()
    for p in (0, 1):
        with sqlite3.connect(out / f"manifest-part{p}-of-2.sqlite") as db:
            part_files |= set(db.execute("SELECT path, status FROM files").fetchall())
    with sqlite3.connect(out / "manifest.sqlite") as db:
        merged_files = set(db.execute("SELECT path, status FROM files").fetchall())
    assert {f for f, _ in merged_files} == {f for f, _ in part_files}
    assert {f for f, s in merged_files if s == "done"} == {f for f, s in part_files if s == "done"}
    assert len(list(out.glob("study-*/series-*/mask.nii.gz"))) == 3
    assert not list(out.glob("study-*/series-*/seg.dcm"))  # --set applies on top of the model's config


def test_merge_without_parts_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from medseg.cli import main

    assert main(["predict", "--merge", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"medseg predict: error: {tmp_path}: no manifest-partK-of-N.sqlite to merge"


def test_manifest_indexes_files_by_series_and_batches_roll_back_whole(tmp_path: Path) -> None:
    from medseg.predict.manifest import Manifest

    m = Manifest(tmp_path / "m.sqlite")
    plan = " ".join(r[-1] for r in m.db.execute("EXPLAIN QUERY PLAN UPDATE files SET status = 'x' WHERE series = 'k'"))
    assert "USING INDEX files_series" in plan, plan
    with m.batch():
        m.set_series("a", status="pending")
        m.set_files([("f1", "a", "pending", None), ("f2", "a", "pending", None)])
    with pytest.raises(RuntimeError), m.batch():
        m.set_series("a", status="done")
        m.set_files_of("a", "done")
        raise RuntimeError("killed between the two updates")
    assert m.status("a") == "pending"
    assert {r["status"] for r in m.rows("files")} == {"pending"}
    m.close()


def test_predictor_applies_overrides_on_the_model_config(oracle: None, tmp_path: Path) -> None:
    p = Predictor.from_ref(_ckpt(tmp_path, "m"), overrides=["predict.batch_size=2"], device="cpu")
    assert p.cfg.predict.batch_size == 2 and p.cfg.model.name == "test_oracle"


def test_mixed_orientation_rule() -> None:
    from medseg.data.dicom import SeriesInfo
    from medseg.predict.readers import select_reason

    info = SeriesInfo("1.2.3", "CT", "1.2", None, "", Path("."), [], orientation="coronal", part="o2")
    cfg = Config()
    cfg.predict.min_slices = 0
    assert select_reason(info, cfg) is None  # split (default): each stack is a case
    cfg.predict.mixed_orientation = "skip"
    assert "mixed orientations" in select_reason(info, cfg)


def test_a_real_unet_checkpoint_predicts_with_the_sliding_window(small: dict, tmp_path: Path) -> None:
    import torch

    from medseg.config import to_dict
    from medseg.models import build_model

    cfg = Config()
    cfg.model.params = {"base_channels": 4, "depth": 2}
    cfg.train.threads, cfg.train.device = 1, "cpu"
    torch.manual_seed(0)
    net = build_model("unet", 3, 2, cfg.model.params)
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"version": 1, "model": net.state_dict(), "config": to_dict(cfg), "in_channels": 3, "num_classes": 2},
               ckpt)
    root = tmp_path / "in"
    shutil.copytree(small["root"] / "b", root / "b")
    res = run_predict(tmp_path / "run", root, tmp_path / "out", ["inference.mode=sliding", "inference.tile_size=[64,64]",
                                                                 "inference.tta_flips=true"], progress=False)
    assert res.failed == {} and len(res.processed) == 1
    (mask,) = list((tmp_path / "out").glob("study-*/series-*/mask.nii.gz"))
    assert nib.load(str(mask)).shape == tuple(reversed(small["series"]["b"]["truth"].shape))


def test_multi_window_channels_and_the_annotation_window_warning(small: dict, oracle: None, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    cfg = Config()
    case = discover(small["root"], cfg)[0][0]
    cfg.data.window, cfg.data.window_range = "fixed", [-1024.0, 3071.0]
    one = load_case(case, cfg).images
    cfg.data.window, cfg.data.windows = "multi", [[-1024.0, 3071.0], [-175.0, 275.0]]
    two = load_case(case, cfg).images
    assert two.shape[1] == 2 * one.shape[1] == 2 * cfg.data.context_slices
    np.testing.assert_array_equal(two[:, :3], one)  # window-major: the wide window's context stack first
    cfg.data.window, cfg.data.window_range = "fixed", [-175.0, 275.0]
    np.testing.assert_array_equal(two[:, 3:], load_case(case, cfg).images)  # then the soft-tissue window's
    with caplog.at_level("WARNING", logger="medseg.predict"):
        run_predict(_ckpt(tmp_path, "d", window="dicom"), small["root"] / "a", tmp_path / "o1",
                    progress=False)
    assert sum("data.window: dicom" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.predict"):
        run_predict(_ckpt(tmp_path, "f"), small["root"] / "a", tmp_path / "o2", progress=False)
    assert not any("data.window: dicom" in r.getMessage() for r in caplog.records)


def test_png_reader_keeps_the_stored_dtype_and_builds_the_model_input_once(tmp_path: Path) -> None:
    """A PNG's values stay uint8 (1 byte a pixel, not a float32 copy); the model input is normalise_2d's
    float32 image in every context channel, resampled like the training dataset."""
    from medseg.data.base import apply_window, resample_sample
    from medseg.data.images import normalise_2d

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (60, 80)).astype(np.uint8)
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.png"), img)
    for context, spacing in ((1, None), (3, 0.5)):
        cfg = Config()
        cfg.data.context_slices, cfg.data.spacing_mm, cfg.data.window = context, spacing, "dicom"
        (case,), _ = discover(tmp_path / "imgs", cfg)
        loaded = load_case(case, cfg)
        assert loaded.values.dtype == np.uint8 and loaded.values.shape == (1, 60, 80)
        np.testing.assert_array_equal(loaded.values[0], img)
        ref = resample_sample({"image": np.repeat(normalise_2d(img, "dicom", [0.0, 1.0])[None], context, 0),
                               "meta": {"spacing": [1.0, 1.0]}}, spacing)
        images = loaded.images
        if context == 1:  # the stored values, windowed by predict_case (a tile batch at a time where it can)
            assert loaded.input_window is not None and images.dtype == np.uint8
            images = apply_window(images, *loaded.input_window)
        else:
            assert loaded.input_window is None
        assert images.dtype == np.float32 and images.flags.c_contiguous
        np.testing.assert_array_equal(images[0], ref["image"])
        assert loaded.meta == ref["meta"]
