"""The accelerator elastic path reproduces elasticdeform: same dense field, same warped labels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import elasticdeform
import numpy as np
import pytest
import torch

from medseg.transforms.accelerated import bspline_matrix, dense_field, random_displacements, warp

QUICK = Path(__file__).resolve().parents[2] / "pipelines" / "quickstart.yaml"


def _reference_field(disp: np.ndarray, shape: tuple[int, int], crop: tuple[slice, slice]) -> np.ndarray:
    """elasticdeform's dense field, read back by deforming coordinate ramps (linear is exact on a ramp)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    dy = elasticdeform.deform_grid(yy, disp, order=1, mode="nearest", crop=list(crop)) - yy[crop]
    dx = elasticdeform.deform_grid(xx, disp, order=1, mode="nearest", crop=list(crop)) - xx[crop]
    return np.stack([dy, dx])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_field_equals_elasticdeform(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape, (y0, x0), size = (300, 280), (40 + seed, 100 - seed), (128, 96)
    crop = (slice(y0, y0 + size[0]), slice(x0, x0 + size[1]))
    disp = rng.normal(0, 10, (2, 3, 3))
    ref = _reference_field(disp, shape, crop)
    got = dense_field(torch.tensor(disp)[None], shape, size, [[y0, x0]])[0].numpy()
    # the ramp trick is exact where the displaced position stays inside the image
    yy, xx = np.mgrid[y0 : y0 + size[0], x0 : x0 + size[1]]
    inside = (yy + got[0] >= 0) & (yy + got[0] <= shape[0] - 1) & (xx + got[1] >= 0) & (xx + got[1] <= shape[1] - 1)
    assert inside.mean() > 0.9
    assert np.abs(got - ref)[:, inside].max() < 0.05  # the bound; in fact ~1e-13


def test_field_over_crop_is_window_of_whole_field() -> None:
    disp = torch.randn(1, 2, 3, 3, dtype=torch.float64) * 10
    whole = dense_field(disp, (200, 240), (200, 240))
    crop = dense_field(disp, (200, 240), (64, 80), [[30, 50]])
    assert torch.allclose(crop, whole[..., 30:94, 50:130], atol=1e-12)


def test_batched_offsets_match_one_by_one() -> None:
    disp = random_displacements(3, 10.0, 3, torch.Generator().manual_seed(0))
    offs = [[0, 0], [10, 5], [33, 7]]
    batch = dense_field(disp, (100, 90), (40, 50), offs)
    for i, o in enumerate(offs):
        assert torch.allclose(batch[i], dense_field(disp[i : i + 1], (100, 90), (40, 50), [o])[0], atol=1e-12)


def test_warped_labels_match_elasticdeform() -> None:
    rng = np.random.default_rng(5)
    shape = (256, 256)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    label = np.zeros(shape, np.int64)
    for k in range(40):
        cy, cx, r = rng.integers(0, 256), rng.integers(0, 256), rng.integers(4, 25)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k % 4 + 1
    crop = (slice(64, 192), slice(32, 160))
    disp = rng.normal(0, 10, (2, 3, 3))
    ref = elasticdeform.deform_grid(label.astype(np.float64), disp, order=0, mode="mirror", crop=list(crop))
    field = dense_field(torch.tensor(disp)[None], shape, (128, 128), [[64, 32]])
    got = warp(torch.tensor(label)[None, None].double(), field, "nearest", [[64, 32]])[0, 0].numpy()
    assert (np.rint(ref) != got).mean() <= 0.01
    img = rng.random(shape)
    ref_img = elasticdeform.deform_grid(img, disp, order=1, mode="mirror", crop=list(crop))
    got_img = warp(torch.tensor(img)[None, None], field, "bilinear", [[64, 32]])[0, 0].numpy()
    assert np.abs(ref_img - got_img).max() < 1e-6  # bilinear = elasticdeform's order 1, mirror borders


def test_bspline_matrix_interpolates_control_points() -> None:
    a = bspline_matrix(3, 101, 0, 101)
    assert np.allclose(a[[0, 50, 100]], np.eye(3), atol=1e-12)  # the field passes through the points
    assert np.allclose(a.sum(1), 1.0)  # a constant displacement stays constant


def _datasets(root: Path, **extra: str) -> tuple[Any, Any, Any]:
    from medseg.config import load_config
    from medseg.data import build_dataset
    from medseg.data.loading import TransformedDataset
    from medseg.transforms import build_transforms

    ov = [f"data.root={root}", "data.generate_if_missing=false", "data.spacing_mm=null", "transforms.crop_size=[64,64]",
          "transforms.flip_prob=0", *(f"{k}={v}" for k, v in extra.items())]
    cpu = load_config(QUICK, ov)
    acc = load_config(QUICK, [*ov, "transforms.accelerator=true"])
    base = build_dataset(cpu.data, "train")
    return (TransformedDataset(base, build_transforms(cpu.transforms, True), 0),
            TransformedDataset(base, build_transforms(acc.transforms, True), 0), acc)


def test_device_path_equals_cpu_chain(demo_root: Path) -> None:
    """Same seed → same crop window and field: labels and weight maps as the CPU chain's; images to interpolation."""
    from medseg.data.base import collate
    from medseg.transforms.accelerated import DeviceAugment

    cpu, acc, cfg = _datasets(demo_root)
    keys = [(1, i) for i in range(min(6, len(cpu)))]
    ref = [cpu[k] for k in keys]
    batch = collate([acc[k] for k in keys])
    m = DeviceAugment(cfg.transforms).margin
    assert batch["image"].shape[-2:] == (64 + 2 * m, 64 + 2 * m)  # the crop grown by the warp's margin
    out = DeviceAugment(cfg.transforms)(batch)
    assert out["image"].shape[-2:] == (64, 64) and "elastic_wy" not in out
    for i, r in enumerate(ref):
        for key in ("label", "instance", "truth"):
            assert (out[key][i].numpy() != r[key]).mean() <= 0.01, key
        if np.array_equal(out["instance"][i].numpy(), r["instance"]):  # same masks → the same weight map
            assert np.abs(out["weight"][i].numpy() - r["weight"]).max() < 1e-5
        # bilinear on the device, cubic B-spline on the CPU: the same geometry, slightly other intensities
        assert np.abs(out["image"][i].numpy() - r["image"]).mean() < 0.02


def test_device_flips_and_intensity_are_drawn_per_sample(demo_root: Path) -> None:
    from medseg.data.base import collate
    from medseg.transforms.accelerated import DeviceAugment

    _, acc, cfg = _datasets(demo_root, **{"transforms.flip_prob": "1.0", "transforms.intensity_shift": "0.1"})
    s = acc[(0, 0)]
    assert s["device_aug"][:2].tolist() == [1.0, 1.0] and abs(s["device_aug"][3]) <= 0.1
    assert np.array_equal(acc[(0, 0)]["device_aug"], s["device_aug"])  # seeded per (epoch, index): resumable
    out = DeviceAugment(cfg.transforms)(collate([s]))
    _, plain, cfg0 = _datasets(demo_root)
    ref = DeviceAugment(cfg0.transforms)(collate([plain[(0, 0)]]))
    assert torch.equal(out["label"][0], ref["label"][0].flip(-1).flip(-2))  # both flips, nothing else


def test_trainer_trains_with_device_augmentation(demo_root: Path, tmp_path: Path) -> None:
    from medseg.config import load_config
    from medseg.training.trainer import Trainer
    from tests.conftest import tiny_overrides

    cfg = load_config(QUICK, tiny_overrides(demo_root, tmp_path, **{"transforms.accelerator": True,
                                                                   "tracking.enabled": False}))
    result = Trainer(cfg).fit()
    assert result.steps_done == 2 and math.isfinite(result.history[-1]["train_loss"])


def test_on_the_cpu_the_batch_is_augmented_in_the_loaders_worker(demo_root: Path, tmp_path: Path) -> None:
    """``train.device: cpu`` with workers: the accelerator's part runs in the worker (the loader's collate),
    not in the training process between steps — and gives the batch the training process would have made."""
    from medseg.config import load_config
    from medseg.data.loading import CollateThen
    from medseg.training.trainer import Trainer
    from tests.conftest import tiny_overrides

    def first_batch(workers: int) -> tuple[Trainer, dict[str, Any]]:
        cfg = load_config(QUICK, tiny_overrides(demo_root, tmp_path / str(workers), **{
            "transforms.accelerator": True, "tracking.enabled": False, "train.num_workers": workers}))
        trainer = Trainer(cfg)
        trainer.sampler.set_epoch(0, num_samples=2)
        batch = next(iter(trainer.train_loader))
        if trainer.device_augment is not None:
            batch = trainer.device_augment(batch)
        return trainer, batch

    in_process, ref = first_batch(0)
    in_worker, got = first_batch(1)
    assert isinstance(in_worker.train_loader.collate_fn, CollateThen) and in_worker.device_augment is None
    assert in_process.device_augment is not None and not isinstance(in_process.train_loader.collate_fn, CollateThen)
    assert set(got) == set(ref) and "elastic_disp" not in got
    torch.testing.assert_close(got["image"], ref["image"], rtol=0, atol=1e-5)
    assert torch.equal(got["label"], ref["label"])
    torch.testing.assert_close(got["weight"], ref["weight"], rtol=1e-5, atol=1e-5)
    # slice propagation rebuilds the loader with its new training set: the augmentation stays in the worker
    assert in_worker.propagator is not None
    in_worker.propagator.rebuild(in_worker)
    assert isinstance(in_worker.train_loader.collate_fn, CollateThen)
    result = in_worker.fit()
    assert result.steps_done == 2 and math.isfinite(result.history[-1]["train_loss"])


def test_accelerator_needs_a_crop() -> None:
    from medseg.config import ConfigError, TransformsConfig
    from medseg.transforms import build_transforms

    with pytest.raises(ConfigError, match="transforms.accelerator needs transforms.crop_size"):
        build_transforms(TransformsConfig(accelerator=True, crop_size=None), train=True)


def _lesion_maps(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Discs, some touching, with two lesion classes."""
    inst = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(1, 6):
        cy, cx, r = *rng.uniform(8, size - 8, 2), rng.uniform(3, 9)
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    cy, cx = rng.uniform(12, size - 12, 2)  # a touching pair
    inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 6
    inst[(yy - cy) ** 2 + (xx - cx - 9) ** 2 <= 16] = 7
    label = np.where(inst > 0, 1 + inst % 2, 0).astype(np.int64)
    return inst, label


@pytest.mark.parametrize("w0,class_balance", [(10.0, True), (10.0, False), (0.0, True)])
def test_device_weight_map_equals_the_cpu_map(w0: float, class_balance: bool) -> None:
    """Exact distances from boundary pixels on the device = the CPU's windowed EDTs (touching lesions,
    densely packed cells, one object, none); the CPU drops terms below BORDER_TOLERANCE."""
    from medseg.data.synthetic import render_cells
    from medseg.transforms.accelerated import border_weight_map_torch
    from medseg.transforms.functional import BORDER_TOLERANCE, border_weight_map

    rng = np.random.default_rng(0)
    cells = render_cells(rng, 128)[1][:96, :80]
    maps = [_lesion_maps(rng, 96)[0][:, :80] for _ in range(2)]
    samples = [(m, np.where(m > 0, 1 + m % 2, 0)) for m in maps]
    samples.append((cells, (cells > 0).astype(np.int64)))  # cells: the membranes (0) are the background
    one = np.zeros((96, 80), np.int32)
    one[20:30, 30:50] = 3
    samples += [(one, (one > 0).astype(np.int64)), (np.zeros((96, 80), np.int32), np.zeros((96, 80), np.int64))]
    inst = torch.as_tensor(np.stack([s[0] for s in samples]))
    label = torch.as_tensor(np.stack([s[1] for s in samples]))
    got = border_weight_map_torch(inst, label, w0, 5.0, class_balance).numpy()
    assert got.dtype == np.float32 and got.shape == inst.shape
    for i, (m, lab) in enumerate(samples):
        ref = border_weight_map(m, lab, w0, 5.0, class_balance)
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=2 * BORDER_TOLERANCE)
    border = got - border_weight_map(np.zeros_like(cells), samples[2][1], 0.0, 5.0, class_balance)
    assert (border[2].max() > 5) == (w0 > 0)  # the border term is really there between the cells
