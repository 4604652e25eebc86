"""Hard-negative mining (medseg/training/hardneg.py): the blobs on hand-built probabilities, crops centred on
them, a round on generated data with a stand-in model (the slices it examines are lesion-free, what it keeps
joins the training set with empty labels), the state in checkpoints and a run that resumes with it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from medseg.config import load_config
from medseg.runtime import TrainingError
from medseg.training.hardneg import HardNegativeSlices, false_positive_blobs
from medseg.training.run import run_training
from medseg.training.trainer import Trainer
from medseg.transforms import RandCropAroundLesiond, RandElasticCropd
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "pipelines" / "quickstart.yaml"


def test_false_positive_blobs_keep_confident_components_of_enough_pixels() -> None:
    prob = np.zeros((40, 40), np.float32)
    prob[2:8, 2:8] = 0.9     # 36 px, confident: kept
    prob[20:22, 20:22] = 0.9  # 4 px: below min_pixels
    prob[30:38, 30:38] = 0.4  # large but below the threshold
    prob[10:14, 30:34] = 0.6  # 16 px: kept
    blobs, k = false_positive_blobs(prob, 0.5, 10)
    assert k == 2 and blobs.sum() == 36 + 16
    assert blobs[2:8, 2:8].all() and blobs[10:14, 30:34].all() and not blobs[20:22, 20:22].any()


def _focus_sample(lesion: bool) -> dict:
    focus = np.zeros((1, 120, 120), np.int32)
    focus[0, 90:95, 10:15] = 1
    inst = np.zeros((1, 120, 120), np.int32)
    if lesion:
        inst[0, 10:15, 90:95] = 1
    return {"image": np.random.default_rng(0).random((3, 120, 120)).astype(np.float32), "label": inst.astype(np.int64),
            "instance": inst, "focus": focus}


@pytest.mark.parametrize("crop_cls", [RandCropAroundLesiond, RandElasticCropd])
def test_a_crop_of_a_lesion_free_slice_is_centred_on_its_focus(crop_cls: type) -> None:
    keys = ["image", "label", "instance"]
    crop = crop_cls(keys, (32, 32), lesion_prob=1.0, allow_missing_keys=True)
    crop.set_random_state(0)
    for _ in range(20):  # the focus blob (rows 90-94, cols 10-14) is in every crop; a lesion, when there is one
        sample = _focus_sample(lesion=False)
        out = crop(sample)
        assert "focus" not in out and "focus" in sample  # taken out of the output, the input untouched
        start = crop._start
        assert start[0] <= 90 and start[0] + 32 >= 95 and start[1] <= 10 and start[1] + 32 >= 15, start
        crop(_focus_sample(lesion=True))
        start = crop._start
        assert start[0] <= 10 and start[0] + 32 >= 15 and start[1] <= 90 and start[1] + 32 >= 95, start


class BlobNet(nn.Module):
    """A stand-in network that sees a 'lesion' (a 6×6 square) on every slice it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], 2, *x.shape[-2:]))
        out[:, 0] = 5.0
        out[:, 0, 20:26, 30:36] = -5.0
        return out + 0 * self.anchor


def _trainer(demo_root: Path, out: Path, **extra: object) -> Trainer:
    ov = tiny_overrides(demo_root, out, **{"tracking.enabled": False, "train.overlay_count": 0,
                                           "train.propagate.enabled": False, "data.negative_rate": 0.0,
                                           "train.hard_negatives.enabled": True, "train.hard_negatives.slices": 6,
                                           "train.hard_negatives.min_pixels": 10, **extra})
    return Trainer(load_config(QUICK, ov))


def test_a_round_adds_lesion_free_slices_centred_on_the_false_positives(demo_root: Path, tmp_path: Path) -> None:
    trainer = _trainer(demo_root, tmp_path)
    miner = trainer.miner
    assert miner is not None
    real, trainer.net = trainer.net, BlobNet()
    n_before = len(trainer.train_set)
    reads: list[tuple[str, int]] = []
    read_slice = trainer.train_data.unlabelled_slice

    def counted(series: str, n: int, rec: object) -> object:
        reads.append((series, n))
        return read_slice(series, n, rec)

    trainer.train_data.unlabelled_slice = counted  # type: ignore[method-assign]
    out = miner.run_round(trainer)
    del trainer.train_data.unlabelled_slice
    assert out["round"] == 1 and out["examined"] == 6 and out["found"] == 6 and out["components"] == 6
    assert len(reads) == len(set(reads)) == 6  # each slice read once: the cache reuses the round's reads
    assert out["pixels"] == 6 * 36 and len(trainer.train_set) == n_before + 6 == trainer.sampler.n + 0
    montage = cv2.imread(str(trainer.run_dir / "hard_negatives" / "round_1.png"))
    assert montage is not None and montage.shape[0] > 100
    items = miner.items()
    assert len(items) == 6
    for series, n, _, focus in items:
        # a lesion-free slice: its true mask (the generator's) is empty
        assert not (demo_root / "Masks_png" / series / f"{n:03d}.png").is_file() or not cv2.imread(
            str(demo_root / "Masks_png" / series / f"{n:03d}.png"), cv2.IMREAD_UNCHANGED).any()
        assert focus.sum() == 36 and focus[20:26, 30:36].all()
    extra = trainer.train_set.base.datasets[1]
    from monai.data import CacheDataset

    assert isinstance(extra, CacheDataset)  # held in memory like the key slices
    from_disk = HardNegativeSlices(trainer.train_data, items)
    for i in (0, 5):
        smp = extra[i]
        assert smp["meta"]["hard_negative"] and not smp["label"].any() and not smp["instance"].any()
        for k in ("image", "focus", "truth"):
            np.testing.assert_array_equal(smp[k], from_disk[i][k])
    augmented = trainer.train_set[(0, n_before)]  # through the training transforms: a crop, no focus left
    assert augmented["label"].shape[-2:] == tuple(trainer.cfg.transforms.crop_size) and "focus" not in augmented

    # the state round-trips through a checkpoint into a fresh trainer: the same training set
    blob, trainer.net = trainer.net, real
    path = trainer.save_checkpoint("h.pt")
    trainer.net = blob
    fresh = _trainer(demo_root, tmp_path / "fresh")
    fresh.load_checkpoint(path)
    assert fresh.miner.round == 1 and len(fresh.train_set) == len(trainer.train_set)
    for a, b in zip(fresh.miner.items(), items):
        assert a[:2] == b[:2] and np.array_equal(a[3], b[3])

    # a second round draws other slices and keeps the first round's
    out2 = miner.run_round(trainer)
    assert out2["round"] == 2 and out2["slices"] > 6


def test_a_model_without_false_positives_adds_nothing(demo_root: Path, tmp_path: Path) -> None:
    trainer = _trainer(demo_root, tmp_path)

    class Background(BlobNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            out[:, 0] = 5.0  # confident background everywhere (the square's foreground probability ≈ 5e-5)
            return out

    n_before = len(trainer.train_set)
    trainer.net = Background()
    out = trainer.miner.run_round(trainer)
    assert out["found"] == 0 and out["examined"] == 6 and len(trainer.train_set) == n_before


def test_bad_hard_negative_settings_are_named(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="ascending fractions"):
        _trainer(demo_root, tmp_path, **{"train.hard_negatives.at": [0.7, 0.3]})
    with pytest.raises(TrainingError, match="0 < threshold < 1"):
        _trainer(demo_root, tmp_path, **{"train.hard_negatives.threshold": 1.0})


def test_rounds_follow_the_schedule(demo_root: Path, tmp_path: Path) -> None:
    miner = _trainer(demo_root, tmp_path, **{"train.hard_negatives.at": [0.3, 0.6]}).miner
    assert not miner.due(29, 100) and miner.due(30, 100)
    miner.round = 1
    assert not miner.due(59, 100) and miner.due(60, 100)
    miner.round = 2
    assert not miner.due(99, 100)


@pytest.mark.slow
def test_training_with_hard_negatives_resumes_with_them(demo_root: Path, tmp_path: Path) -> None:
    ov = tiny_overrides(demo_root, tmp_path, **{
        "tracking.enabled": False, "train.epochs": 4, "train.max_steps": None, "train.steps_per_epoch": 2,
        "train.hard_negatives.enabled": True, "train.hard_negatives.at": [0.25], "train.hard_negatives.slices": 8,
        "train.hard_negatives.threshold": 0.05, "train.hard_negatives.min_pixels": 1, "train.val_every": 4})
    result, _ = run_training(load_config(QUICK, ov))
    assert result.steps_done == 8
    ck = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert ck["hard_negatives"]["round"] == 1  # after step 2
    longer, _ = run_training(load_config(QUICK, ov), resume=result.run_dir, overrides=["train.epochs=5"])
    assert longer.steps_done == 10
    ck2 = torch.load(longer.last_checkpoint, map_location="cpu", weights_only=True)
    found, found2 = ck["hard_negatives"]["found"], ck2["hard_negatives"]["found"]
    assert found and ck2["hard_negatives"]["round"] == 1 and found2.keys() == found.keys()  # no second round
    for key, st in found.items():
        y0, x0, blobs = st["blobs"]
        assert found2[key]["blobs"][:2] == [y0, x0] and torch.equal(found2[key]["blobs"][2], blobs)
