"""The dictionary transforms, the built pipelines and the augmentation presets."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medseg.config import ConfigError, ElasticConfig, TransformsConfig, WeightMapConfig, load_config
from medseg.transforms import (
    BorderWeightd,
    ElasticDeformd,
    RandCropAroundLesiond,
    border_weight_map,
    build_transforms,
)

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "augment"
ALL_ON = TransformsConfig(
    crop_size=None,
    elastic=ElasticConfig(prob=1.0),
    flip_prob=0.5,
    rotate_prob=1.0,
    intensity_scale=0.1,
    intensity_shift=0.1,
    noise_std=0.05,
)


def make_sample(h: int = 96, w: int = 128, truth: bool = True) -> dict[str, Any]:
    """A realistic sample: 3 context channels, two elliptic lesions close together, meta."""
    yy, xx = np.mgrid[:h, :w]
    inst = np.zeros((1, h, w), np.int32)
    inst[0][((yy - 40) / 12.0) ** 2 + ((xx - 50) / 9.0) ** 2 <= 1] = 1
    inst[0][((yy - 44) / 10.0) ** 2 + ((xx - 70) / 8.0) ** 2 <= 1] = 2
    rng = np.random.RandomState(0)
    body = (((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 <= 1).astype(np.float32)
    image = np.clip(0.4 * body + 0.3 * (inst > 0) + 0.05 * rng.rand(3, h, w), 0, 1).astype(np.float32)
    s: dict[str, Any] = {
        "image": image,
        "label": (inst > 0).astype(np.int64),
        "instance": inst,
        "meta": {"id": "case1_slice7", "spacing": [0.8, 0.8], "lesions": [{"bbox": [1, 2, 3, 4]}]},
    }
    if truth:
        s["truth"] = inst.copy()
    return s


def assert_contract(out: dict[str, Any], sample: dict[str, Any], shape: tuple[int, int]) -> None:
    """The sample contract of medseg.data.base after a pipeline."""
    assert set(out) == set(sample) | {"weight"}
    dtypes = {
        "image": np.float32,
        "label": np.int64,
        "instance": np.int32,
        "truth": np.int32,
        "weight": np.float32,
    }
    for key, dtype in dtypes.items():
        if key in out:
            assert type(out[key]) is np.ndarray, key
            assert out[key].dtype == dtype, key
            assert out[key].shape == ((3,) if key == "image" else (1,)) + shape, key
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    assert set(np.unique(out["label"])) <= {0, 1}
    np.testing.assert_array_equal(out["instance"] > 0, out["label"] > 0)
    assert np.isfinite(out["weight"]).all() and out["weight"].min() > 0


def as_bytes(out: dict[str, Any]) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in out.items() if k != "meta"}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- the pipelines


@pytest.mark.parametrize("crop", [None, [64, 48]])
def test_train_pipeline_keeps_the_sample_contract(crop: list[int] | None) -> None:
    sample = make_sample()
    meta_before = copy.deepcopy(sample["meta"])
    cfg = copy.deepcopy(ALL_ON)
    cfg.crop_size = crop
    t = build_transforms(cfg, train=True)
    for seed in range(3):
        out = t.set_random_state(seed=seed)(sample)
        assert_contract(out, sample, (96, 128) if crop is None else (64, 48))
        assert out["meta"] is sample["meta"] and out["meta"] == meta_before
        # the weight map is computed after the geometric augmentation: it fits the output mask
        expected = border_weight_map(out["instance"][0], out["label"][0], 10.0, 5.0, True)
        np.testing.assert_array_equal(out["weight"][0], expected)
        np.testing.assert_array_equal(out["truth"], out["instance"])  # moved with the same field
    np.testing.assert_array_equal(sample["instance"], make_sample()["instance"])  # input untouched


def test_same_seed_gives_byte_identical_samples_different_seed_differs() -> None:
    sample = make_sample()
    cfg = copy.deepcopy(ALL_ON)
    cfg.crop_size = [64, 64]
    t = build_transforms(cfg, train=True)
    np.random.seed(1)
    torch.manual_seed(1)  # global generators must not matter
    first = as_bytes(t.set_random_state(seed=1234)(sample))
    t.set_random_state(seed=99)(sample)  # other samples in between
    np.random.seed(2)
    torch.manual_seed(2)
    again = as_bytes(t.set_random_state(seed=1234)(sample))
    fresh = as_bytes(build_transforms(cfg, train=True).set_random_state(seed=1234)(sample))  # a resumed run
    assert first == again == fresh
    other = as_bytes(t.set_random_state(seed=1235)(sample))
    assert other["image"] != first["image"]


def test_eval_pipeline_is_deterministic_does_not_crop_and_keeps_truth() -> None:
    sample = make_sample()
    cfg = copy.deepcopy(ALL_ON)
    cfg.crop_size = [32, 32]
    t = build_transforms(cfg, train=False)
    a = t.set_random_state(seed=1)(sample)
    b = t.set_random_state(seed=2)(sample)
    assert as_bytes(a) == as_bytes(b)
    assert_contract(a, sample, (96, 128))
    for key in ("image", "label", "instance", "truth"):
        np.testing.assert_array_equal(a[key], sample[key])
    expected = border_weight_map(sample["instance"][0], sample["label"][0], 10.0, 5.0, True)
    np.testing.assert_array_equal(a["weight"][0], expected)
    # the two lesions are 2-3 px apart: the gap carries the border term
    assert a["weight"].max() > expected[sample["label"][0] == 0].min() + 5


def test_weight_map_off_gives_ones_and_none_preset_changes_nothing() -> None:
    cfg = load_config(None, []).transforms
    cfg.elastic.enabled = False
    cfg.flip_prob = 0.0
    cfg.weight_map = WeightMapConfig(enabled=False)
    sample = make_sample(truth=False)
    out = build_transforms(cfg, train=True).set_random_state(seed=3)(sample)
    np.testing.assert_array_equal(out["weight"], np.ones((1, 96, 128), np.float32))
    for key in ("image", "label", "instance"):
        np.testing.assert_array_equal(out[key], sample[key])


def test_bad_transform_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match="transforms.flip_prob"):
        build_transforms(TransformsConfig(flip_prob=1.5), train=True)
    with pytest.raises(ConfigError, match="transforms.crop_size"):
        build_transforms(TransformsConfig(crop_size=[64]), train=True)


# ----------------------------------------------------------------------------- single transforms


def test_elastic_deformd_identity_at_sigma_zero_and_shared_field() -> None:
    sample = make_sample()
    keys = ["image", "label", "instance", "truth"]
    same = ElasticDeformd(keys, sigma=0.0, order=[3, 0, 0, 0]).set_random_state(seed=0)(sample)
    np.testing.assert_array_equal(same["label"], sample["label"])
    np.testing.assert_allclose(same["image"], sample["image"], atol=1e-5)
    t = ElasticDeformd(keys, sigma=10.0, order=[3, 0, 0, 0])
    out = t.set_random_state(seed=4)(sample)
    assert (out["label"] != sample["label"]).any()
    np.testing.assert_array_equal(out["instance"] > 0, out["label"] > 0)
    np.testing.assert_array_equal(out["truth"], out["instance"])
    assert as_bytes(t.set_random_state(seed=4)(sample)) == as_bytes(out)
    assert as_bytes(t.set_random_state(seed=5)(sample))["label"] != as_bytes(out)["label"]
    off = ElasticDeformd(keys, sigma=10.0, prob=0.0, order=[3, 0, 0, 0])(sample)
    assert all(off[k] is sample[k] for k in keys)


def test_crop_around_lesion_always_holds_a_lesion_off_centre() -> None:
    h, w = 200, 240
    inst = np.zeros((1, h, w), np.int32)
    inst[0, 5:9, 200:205] = 1  # small lesions near the border
    inst[0, 180:186, 10:14] = 2
    image = (inst > 0).astype(np.float32) * 0.5 + 0.25
    sample = {
        "image": np.repeat(image, 3, 0),
        "label": (inst > 0).astype(np.int64),
        "instance": inst,
        "meta": {},
    }
    t = RandCropAroundLesiond(["image", "label", "instance"], (40, 48), lesion_prob=1.0)
    positions = set()
    for seed in range(30):
        out = t.set_random_state(seed=seed)(sample)
        assert out["image"].shape == (3, 40, 48) and out["instance"].shape == (1, 40, 48)
        assert (out["instance"] > 0).any()
        np.testing.assert_array_equal(
            out["image"][0] > 0.5, out["instance"][0] > 0
        )  # one window for all keys
        positions.add(tuple(np.argwhere(out["instance"][0] > 0).min(0)))
    assert len(positions) > 5
    # a one-pixel lesion mid-image: without jitter it would always sit at the crop centre (20, 24)
    dot = np.zeros((1, h, w), np.int32)
    dot[0, 100, 120] = 1
    t1 = RandCropAroundLesiond(["instance"], (40, 48), lesion_prob=1.0)
    spots = [
        tuple(np.argwhere(t1.set_random_state(seed=s)({"instance": dot})["instance"][0])[0])
        for s in range(20)
    ]
    assert len(set(spots)) > 10
    assert all(abs(y - 20) <= 10 and abs(x - 24) <= 12 for y, x in spots)  # jitter ≤ 0.25 · size
    # lesion_prob 0: windows anywhere, so most miss these tiny lesions
    t0 = RandCropAroundLesiond(["image", "instance"], (40, 48), lesion_prob=0.0)
    hits = [(t0.set_random_state(seed=s)(sample)["instance"] > 0).any() for s in range(30)]
    assert sum(hits) < 15


def test_crop_pads_an_image_smaller_than_the_crop() -> None:
    sample = make_sample(20, 30, truth=False)
    t = RandCropAroundLesiond(["image", "label", "instance"], (32, 40), lesion_prob=0.5)
    out = t.set_random_state(seed=0)(sample)
    assert out["image"].shape == (3, 32, 40)
    np.testing.assert_array_equal(out["image"][:, 6:26, 5:35], sample["image"])
    np.testing.assert_array_equal(out["label"][:, 6:26, 5:35], sample["label"])
    pad = np.ones((32, 40), bool)
    pad[6:26, 5:35] = False
    assert (out["image"][:, pad] == 0).all() and (out["instance"][:, pad] == 0).all()


def test_border_weightd_writes_the_functional_map() -> None:
    sample = make_sample()
    out = BorderWeightd(w0=8.0, sigma=3.0, class_balance=False)(sample)
    expected = border_weight_map(sample["instance"][0], sample["label"][0], 8.0, 3.0, False)
    assert out["weight"].shape == (1, 96, 128)
    np.testing.assert_array_equal(out["weight"][0], expected)


# ----------------------------------------------------------------------------- presets


def test_presets_load_through_an_including_pipeline(tmp_path: Path) -> None:
    sample = make_sample()
    cfgs = {}
    for name in ("unet_paper", "none", "default"):
        pipe = tmp_path / f"{name}.yaml"
        pipe.write_text(f"include: [{PRESETS / (name + '.yaml')}]\ntrain:\n  epochs: 1\n")
        cfgs[name] = load_config(pipe).transforms
        for train in (True, False):
            out = build_transforms(cfgs[name], train).set_random_state(seed=0)(sample)
            shape = tuple(cfgs[name].crop_size) if train and cfgs[name].crop_size else (96, 128)
            assert_contract(out, sample, shape)
    unet = cfgs["unet_paper"]
    assert (unet.elastic.enabled, unet.elastic.sigma, unet.elastic.points) == (True, 10.0, 3)
    assert unet.flip_prob > 0 and unet.crop_size is None
    assert (unet.weight_map.enabled, unet.weight_map.w0, unet.weight_map.sigma) == (True, 10.0, 5.0)
    none = cfgs["none"]
    assert not none.elastic.enabled and not none.weight_map.enabled
    assert none.flip_prob == none.rotate_prob == none.noise_std == 0.0
    assert cfgs["default"].crop_size == [256, 256]


def _ramp_sample(h: int, w: int) -> dict[str, Any]:
    """Image channels = the pixels' own y and x positions (÷ 1000), so a warped image shows the field."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    inst = np.zeros((1, h, w), np.int32)
    inst[0, 100:140, 200:260] = 1
    inst[0, 300:330, 300:350] = 2
    return {"image": np.stack([yy, xx]) / 1000.0, "label": (inst > 0).astype(np.int64), "instance": inst,
            "truth": inst.copy(), "meta": {}}


def test_elastic_field_of_a_crop_is_the_window_of_the_whole_slice_field() -> None:
    """Paper scale: the same seed deforms a 128² crop by the crop's window of the whole slice's field."""
    from medseg.transforms import RandElasticCropd

    h = w = 512
    sample = _ramp_sample(h, w)
    keys = ["image", "label", "instance", "truth"]
    whole = RandElasticCropd(keys, None, sigma=10.0, points=3, order=[3, 0, 0, 0])
    crop = RandElasticCropd(keys, (128, 128), lesion_prob=0.5, sigma=10.0, points=3, order=[3, 0, 0, 0])
    ramp = sample["image"]
    windows = set()
    for seed in range(6):
        full = whole.set_random_state(seed=seed)(sample)
        part = crop.set_random_state(seed=seed)(sample)
        np.testing.assert_array_equal(whole._displacement, crop._displacement)
        (y0, x0) = crop._start
        windows.add((y0, x0))
        win = (slice(None), slice(y0, y0 + 128), slice(x0, x0 + 128))
        field_whole = (full["image"] - ramp) * 1000.0
        field_crop = (part["image"] - ramp[win]) * 1000.0
        assert np.abs(field_whole).max() > 3.0  # a real deformation (σ = 10 px), not the identity
        # the field in pixels; mirrored borders aside (excluded), cubic splines reproduce the ramp
        inner = (slice(None), slice(24, 104), slice(24, 104))
        np.testing.assert_allclose(field_crop[inner], field_whole[win][inner], atol=1e-3)
        for k in ("label", "instance", "truth"):  # one field for every key, nearest neighbour
            np.testing.assert_array_equal(part[k], full[k][win])
    assert len(windows) > 1


def test_elastic_grid_options_and_pipeline() -> None:
    from medseg.transforms import RandElasticCropd

    sample = _ramp_sample(256, 256)
    # crop-relative (the old default) is an option named as such; slice is the default
    assert ElasticConfig().grid == "slice"
    slice_t = build_transforms(TransformsConfig(crop_size=[64, 64], flip_prob=0.0), train=True)
    assert isinstance(slice_t.transforms[0], RandElasticCropd) and slice_t.transforms[0].extent is None
    crop_cfg = TransformsConfig(crop_size=[64, 64], elastic=ElasticConfig(grid="crop"))
    assert any(isinstance(t, ElasticDeformd) for t in build_transforms(crop_cfg, train=True).transforms)
    ext = build_transforms(TransformsConfig(crop_size=[64, 64], elastic=ElasticConfig(grid="extent", extent=[100, 90])),
                           train=True).transforms[0]
    assert ext.extent == (100, 90)
    out = ext.set_random_state(seed=1)(sample)
    assert out["image"].shape == (2, 64, 64)
    # a slice smaller than the crop is zero-padded (centred), then cut
    small = RandElasticCropd(["image", "label", "instance"], (300, 280), sigma=5.0)
    out = small.set_random_state(seed=0)(_ramp_sample(256, 256))
    assert out["image"].shape == (2, 300, 280) and out["label"].shape == (1, 300, 280)
    with pytest.raises(ConfigError, match="transforms.elastic.extent"):
        build_transforms(TransformsConfig(elastic=ElasticConfig(grid="extent", extent=[5])), train=True)
