"""Slice-propagated training (medseg/training/propagate.py): the acceptance rules on hand-built masks,
a round on generated data (accepted masks lie on the true lesions and join the training set), the
state in checkpoints, and a run that resumes with its propagated slices."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from medseg.config import PropagateConfig, load_config
from medseg.runtime import TrainingError
from medseg.training.propagate import (
    PropagatedSlices,
    Propagator,
    accept_mask,
    grabcut_from,
    grown_box,
    lesion_window,
    looks_like,
)
from medseg.training.run import run_training
from medseg.training.trainer import Trainer
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "pipelines" / "quickstart.yaml"


def _disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# ----------------------------------------------------------------------------- the rules

BOX = (20.0, 20.0, 40.0, 40.0)  # the RECIST box of a lesion of radius 10 centred at (30, 30)
CFG = PropagateConfig(min_overlap=0.5, max_area_ratio=1.0, box_margin=0.2, min_area_px=4)


def test_grown_box() -> None:
    assert grown_box(BOX, 0.2, (64, 64)) == (16, 16, 44, 44)  # 20 ± 0.2·20
    assert grown_box((0, 0, 10, 63), 0.5, (64, 64)) == (0, 0, 42, 63)  # clipped to the image


def test_a_smaller_overlapping_mask_is_accepted_and_other_blobs_dropped() -> None:
    prev = _disk((64, 64), 30, 30, 10)
    pred = _disk((64, 64), 31, 30, 8) | _disk((64, 64), 5, 55, 3)  # the lesion, shrunk, and a far blob
    mask, why = accept_mask(pred, prev, BOX, CFG)
    assert why == "accepted"
    np.testing.assert_array_equal(mask, _disk((64, 64), 31, 30, 8))


@pytest.mark.parametrize("pred,why", [
    (_disk((64, 64), 5, 55, 6), "no_overlap"),                                  # nothing touches the lesion
    (_disk((64, 64), 30, 30, 0.9), "too_small"),                               # 1 px < min_area_px
    (_disk((64, 64), 30, 30, 11), "grew"),                                     # larger than the previous slice
    # a ring around the lesion (r 9.5…13): touches it, smaller, inside the box, but ≈ 25 % on the previous mask
    (_disk((64, 64), 30, 30, 13) & ~_disk((64, 64), 30, 30, 9.5), "low_overlap"),
])
def test_rejections(pred: np.ndarray, why: str) -> None:
    prev = _disk((64, 64), 30, 30, 10)
    mask, got = accept_mask(pred, prev, BOX, CFG)
    assert (mask, got) == (None, why)


def test_outside_the_grown_box_is_rejected() -> None:
    prev = _disk((64, 64), 30, 30, 10)
    pred = _disk((64, 64), 30, 30, 5).copy()
    pred[30, 30:50] = True  # a tendril reaching x = 49 > 44
    assert accept_mask(pred, prev, BOX, CFG) == (None, "outside_box")
    loose = PropagateConfig(box_margin=0.5, max_area_ratio=1.0, min_overlap=0.5)  # grown to x = 50: inside
    assert accept_mask(pred, prev, BOX, loose)[1] == "accepted"


# ----------------------------------------------------------------------------- a round on generated data


class TruthNet(nn.Module):
    """A stand-in network that answers each window with its generated true mask (looked up by the key
    channel's bytes): the propagation, not a network, is under test."""

    def __init__(self, table: dict[str, np.ndarray], key: int) -> None:
        super().__init__()
        self.table, self.key = table, key
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((x.shape[0], 2, *x.shape[-2:]), -10.0)
        for b in range(x.shape[0]):
            fg = self.table.get(_hash(x[b, self.key].numpy()))
            if fg is not None:
                out[b, 1] = torch.from_numpy(np.where(fg, 10.0, -10.0).astype(np.float32))
        return out + 0 * self.anchor


def _hash(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def _truth(root: Path, series: str, n: int, shape: tuple[int, int]) -> np.ndarray:
    path = root / "Masks_png" / series / f"{n:03d}.png"
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED) > 0 if path.is_file() else np.zeros(shape, bool)


def _trainer(demo_root: Path, out: Path, **extra: object) -> Trainer:
    ov = tiny_overrides(demo_root, out, **{"tracking.enabled": False, "train.overlay_count": 0,
                                           "train.propagate.enabled": True, "train.propagate.rounds": 2,
                                           "train.propagate.max_area_ratio": 3.0, "data.negative_rate": 0.0,
                                           "train.propagate.source": "model", "train.propagate.start": 0.4,
                                           "train.propagate.slices_per_round": 1,
                                           "train.propagate.min_contrast": 0.0, **extra})
    return Trainer(load_config(QUICK, ov))


def test_a_round_accepts_masks_on_the_true_lesions_and_they_join_training(demo_root: Path, tmp_path: Path) -> None:
    trainer = _trainer(demo_root, tmp_path)
    prop = trainer.propagator
    assert prop is not None
    ds = trainer.train_data
    table = {}  # the windows the lesions are predicted in (lesion_window), keyed by their key channel
    crop = trainer.cfg.transforms.crop_size
    for i, s in enumerate(ds.samples):
        boxes = [les["bbox"] for les in ds[i]["meta"]["lesions"]]
        for n in range(s.rows[0].slice_range[0], s.rows[0].slice_range[1] + 1):
            smp = ds.unlabelled_slice(s.series, n, s.rows[0])
            truth = _truth(demo_root, s.series, n, smp["image"].shape[-2:])
            for box in boxes:
                (y0, y1), (x0, x1) = lesion_window(box, CFG.box_margin, crop, truth.shape)
                table[_hash(smp["image"][1, y0:y1, x0:x1])] = truth[y0:y1, x0:x1]
    real, trainer.net = trainer.net, TruthNet(table, 1)
    n_before = len(trainer.train_set)
    out = prop.run_round(trainer)
    assert out["round"] == 1 and out["accepted"] > 0
    montage = cv2.imread(str(trainer.run_dir / "propagate" / "round_1.png"))
    assert montage is not None and montage.shape[0] > 100  # the round's montage PNG (logged to MLflow)
    items = prop.items()
    assert len(items) == out["propagated_slices"] > 0
    assert len(trainer.train_set) == n_before + len(items) and trainer.sampler.n == len(trainer.train_set)
    for series, n, _, inst in items:
        truth = _truth(demo_root, series, n, inst.shape)
        assert (inst > 0).any() and not ((inst > 0) & ~truth).any()  # every accepted pixel is a true lesion pixel
    # slices_per_round outward per direction and round: every accepted slice is that close to its key slice
    keys = {(s.series, s.key) for s in ds.samples}
    k = trainer.cfg.train.propagate.slices_per_round
    assert all(any((se, n + d) in keys for d in range(-k, k + 1) if d) for se, n, _, _ in items)
    # the propagated samples are the slices with their masks as labels
    extra = trainer.train_set.base.datasets[1]
    smp = extra[0]
    np.testing.assert_array_equal(smp["label"][0], items[0][3] > 0)
    assert smp["meta"]["propagated"] and smp["meta"]["slice"] == items[0][1]
    np.testing.assert_array_equal(smp["truth"][0] > 0, _truth(demo_root, items[0][0], items[0][1], items[0][3].shape))
    # held in memory (train.cache_samples, the default): what a read from disk gives, read once
    from monai.data import CacheDataset

    assert isinstance(extra, CacheDataset) and len(extra) == len(items)
    from_disk = PropagatedSlices(ds, items)
    for i in (0, len(items) - 1):
        for k in ("image", "label", "instance", "truth"):
            np.testing.assert_array_equal(extra[i][k], from_disk[i][k])
    augmented = trainer.train_set[(0, n_before)]  # through the training transforms (crop, elastic warp, weights)
    assert augmented["label"].shape[-2:] == tuple(trainer.cfg.transforms.crop_size) and "weight" in augmented

    # the state round-trips through a checkpoint into a fresh trainer: the same training set
    truth_net, trainer.net = trainer.net, real
    path = trainer.save_checkpoint("p.pt")
    trainer.net = truth_net
    fresh = _trainer(demo_root, tmp_path / "fresh")
    fresh.load_checkpoint(path)
    assert fresh.propagator.round == 1 and len(fresh.train_set) == len(trainer.train_set)
    for (a, b) in zip(fresh.propagator.items(), items):
        assert a[:2] == b[:2] and np.array_equal(a[3], b[3])

    # round 2 goes one slice further out, from the accepted masks
    out2 = prop.run_round(trainer)
    assert out2["round"] == 2 and out2["propagated_slices"] >= out["propagated_slices"]


def _noisy(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.6, 0.03, shape).astype(np.float32)  # host tissue, 0.6 ± 0.03


def test_grabcut_from_follows_a_lesion_and_finds_its_end() -> None:
    lesion = _disk((64, 64), 31, 29, 8)  # this slice's section: smaller and shifted against the previous one
    image = _noisy((64, 64))
    image[lesion] -= 0.25  # hypodense lesion
    prev = _disk((64, 64), 30, 30, 10)
    out = grabcut_from(image, prev, grown_box(BOX, 0.2, image.shape))
    assert 2 * (out & lesion).sum() / (out.sum() + lesion.sum()) > 0.9
    assert looks_like(image, out, image, lesion, 0.5)  # the same lesion
    # past the lesion's end: whatever GrabCut keeps of the host tissue looks like its ring, not the lesion
    host = _noisy((64, 64), 1)
    left = grabcut_from(host, prev, grown_box(BOX, 0.2, host.shape))
    assert not left.any() or not looks_like(host, left, image, lesion, 0.5)
    assert not looks_like(host, prev, image, lesion, 0.5)


def test_a_grabcut_round_needs_no_model_and_stops_where_the_lesions_end(tmp_path: Path) -> None:
    from medseg.data.synthetic import generate_demo_data

    # full-size slices (the shared 128² release's lesions are a few pixels: too small for GrabCut)
    demo_root = generate_demo_data(tmp_path / "dl", patients=5, seed=3, progress=False)
    trainer = _trainer(demo_root, tmp_path / "out", **{"train.propagate.source": "grabcut",
                                               "train.propagate.min_contrast": 0.5,
                                               "train.propagate.max_area_ratio": 1.5,
                                               "train.propagate.slices_per_round": 16,
                                               "train.propagate.workers": 3})

    class NoNet(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("a GrabCut round ran the model")

    trainer.net = NoNet()
    out = trainer.propagator.run_round(trainer)
    items = trainer.propagator.items()
    assert out["accepted"] > 0 and len(items), str(sorted(out.items()))
    assert len(items) == out["propagated_slices"]
    assert out.get("rejected_ended", 0) + out.get("rejected_low_contrast", 0) > 0  # lesions end before their range
    dices = []
    for series, n, _, inst in items:
        truth = _truth(demo_root, series, n, inst.shape)
        assert (truth & (inst > 0)).any()  # never a slice past the lesion's end
        dices.append(2 * ((inst > 0) & truth).sum() / ((inst > 0).sum() + truth.sum()))
    assert np.mean(dices) > 0.75  # against the generated true masks (the slice's every lesion)

    # three threads gave what one gives: the same masks, counts and montage
    prop = trainer.propagator
    threaded, montage = copy.deepcopy(prop.lesions), (trainer.run_dir / "propagate" / "round_1.png").read_bytes()
    prop.lesions, prop.round, prop.cfg.workers = {}, 0, 1
    again = prop.run_round(trainer)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in out.items() if k != "seconds"}
    assert prop.lesions.keys() == threaded.keys()
    for key, st in prop.lesions.items():
        assert st["slices"].keys() == threaded[key]["slices"].keys() and st["stopped"] == threaded[key]["stopped"]
        for n, (y0, x0, m) in st["slices"].items():
            ty0, tx0, tm = threaded[key]["slices"][n]
            assert (y0, x0) == (ty0, tx0) and torch.equal(m, tm), (key, n)
    assert (trainer.run_dir / "propagate" / "round_1.png").read_bytes() == montage


def test_bad_propagate_settings_are_named(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="workers >= 0"):
        _trainer(demo_root, tmp_path, **{"train.propagate.workers": -1})


def test_rounds_follow_the_schedule() -> None:
    class T:
        pass

    p = Propagator.__new__(Propagator)
    p.cfg, p.round = PropagateConfig(rounds=3, start=0.4), 0
    assert p.milestones(100) == [40, 60, 80]
    assert not p.due(39, 100) and p.due(40, 100)
    p.round = 3
    assert not p.due(99, 100)


@pytest.mark.slow
def test_training_with_propagation_resumes_with_its_slices(demo_root: Path, tmp_path: Path) -> None:
    ov = tiny_overrides(demo_root, tmp_path, **{
        "tracking.enabled": False, "train.epochs": 4, "train.max_steps": None, "train.steps_per_epoch": 2,
        "train.propagate.enabled": True, "train.propagate.rounds": 2, "train.propagate.start": 0.25,
        "train.propagate.max_area_ratio": 3.0, "train.val_every": 4, "train.propagate.source": "model",
        "train.propagate.slices_per_round": 1, "train.propagate.min_contrast": 0.0})
    result, _ = run_training(load_config(QUICK, ov))
    assert result.steps_done == 8
    ck = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert ck["propagation"]["round"] == 2  # after steps 2 and 5 → epochs ending at 2 and 6
    longer, _ = run_training(load_config(QUICK, ov), resume=result.run_dir, overrides=["train.epochs=5"])
    assert longer.steps_done == 10
    ck2 = torch.load(longer.last_checkpoint, map_location="cpu", weights_only=True)
    assert ck2["propagation"]["round"] == 2 and ck2["propagation"]["lesions"].keys() == ck["propagation"]["lesions"].keys()


@pytest.mark.slow
def test_a_round_at_start_zero_runs_before_the_first_step(demo_root: Path, tmp_path: Path) -> None:
    ov = tiny_overrides(demo_root, tmp_path, **{
        "tracking.enabled": False, "train.epochs": 1, "train.max_steps": None, "train.steps_per_epoch": 2,
        "train.propagate.enabled": True, "train.propagate.rounds": 1, "train.propagate.start": 0.0,
        "train.propagate.source": "grabcut", "train.val_every": 1})
    result, _ = run_training(load_config(QUICK, ov))
    assert result.steps_done == 2
    ck = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert ck["propagation"]["round"] == 1  # after the only epoch it would be the schedule's end: no round


def test_lesion_window_is_centred_on_the_box_and_inside_the_slice() -> None:
    # grown 16..44: 29 px + 16 = 45 > 32; centred on pixel 30: 30 − 22 … 30 + 23
    assert lesion_window(BOX, 0.2, [32, 32], (64, 64)) == ((8, 53), (8, 53))
    assert lesion_window((0, 0, 4, 4), 0.0, [16, 16], (64, 64)) == ((0, 21), (0, 21))  # at the edge: shifted in
    assert lesion_window(BOX, 0.2, [96, 96], (64, 64)) == ((0, 64), (0, 64))  # a crop larger than the slice
