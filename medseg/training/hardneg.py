"""Hard-negative mining (``train.hard_negatives``): slices where the current model sees a lesion that is not
there join the training set, their crops centred on what it saw.

The quick start's remaining errors are confident false positives on structures that look like lesions
(bowel loops, muscle, vessels: docs/training.md), which random crops of lesion-free slices
(``data.negative_rate``) rarely show the model. After each fraction ``at`` of the schedule's steps a round

1. draws ``slices`` lesion-free slices of the training series (:meth:`DeepLesionDataset.negative_candidates`:
   an empty true mask on generated data, outside every lesion's extent on real DeepLesion), seeded by the
   run's seed and the round;
2. segments each whole slice with the current model (no test-time augmentation) and keeps the 8-connected
   components of foreground probability ≥ ``threshold`` with at least ``min_pixels`` pixels: every one is a
   false positive;
3. adds each slice with such components as a training sample with an empty label and the components as its
   ``focus`` map: the crop transform centres a crop on a focus blob with ``transforms.lesion_crop_prob``, as it
   centres crops on lesions elsewhere (``medseg.transforms.dictionary``). Slices found again keep the latest
   round's blobs; slices found before stay.

This is the classic bootstrapping of detector training (Sung & Poggio 1998; Shrivastava et al. 2016's OHEM
does it within a batch) applied to whole slices, with the model's own false positives as the hard examples.
The state (rounds run, the blobs as crops) is in every checkpoint, so a resumed run rebuilds the same
training set; the wall-clock budget reserves the rounds' time (:meth:`HardNegatives.reserve_s`). Each round
logs its counts (``hard_negatives/*``) and a montage (``hard_negatives/round_<k>.png``) to MLflow.

Example:
    >>> miner = HardNegatives(trainer)  # doctest: +SKIP
    >>> miner.run_round(trainer) if miner.due(trainer.step, trainer.total_steps) else None  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from medseg.config import HardNegativeConfig
from medseg.data.deeplesion.negatives import choose_negatives
from medseg.inference.predictor import predict_logits
from medseg.runtime import TrainingError, broadcast_object
from medseg.training.propagate import crop_mask, paste_mask, save_montage
from medseg.training.trainset import assemble, cached, median_after_warmup, round_inference_cfg

log = logging.getLogger("medseg.hardneg")

__all__ = ["HardNegativeSlices", "HardNegatives", "false_positive_blobs"]


def false_positive_blobs(fg_prob: np.ndarray, threshold: float, min_pixels: int) -> tuple[np.ndarray, int]:
    """The 8-connected components of ``fg_prob ≥ threshold`` with at least ``min_pixels`` pixels, as a bool
    map, and how many there are."""
    _, comp, stats, _ = cv2.connectedComponentsWithStats((fg_prob >= threshold).astype(np.uint8), connectivity=8)
    keep = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_pixels) + 1
    return np.isin(comp, keep), int(keep.size)


class HardNegativeSlices(Dataset):
    """The mined slices as training samples: the DeepLesion slice (``unlabelled_slice``: empty ``label`` and
    ``instance``) with the false positives as ``focus`` ``(1, H, W)`` int32 (``meta["hard_negative"]`` True).

    Args:
        dataset: the training :class:`~medseg.data.deeplesion.DeepLesionDataset`.
        items: ``(series, slice, row, focus map (H, W) bool on the model's grid)``.
        read: slices already read, ``(series, slice)`` → ``unlabelled_slice``'s sample (the round's own reads:
            the cache then fills without decoding them again); the others are read from disk.
    """

    def __init__(self, dataset: Any, items: list[tuple[str, int, Any, np.ndarray]],
                 read: dict[tuple[str, int], dict[str, Any]] | None = None) -> None:
        self.dataset, self.items, self.read = dataset, items, read or {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        series, n, rec, focus = self.items[idx]
        done = self.read.get((series, n))
        sample = ({**done, "meta": dict(done["meta"])} if done is not None
                  else self.dataset.unlabelled_slice(series, n, rec))
        if sample is None:
            return None
        if tuple(sample["image"].shape[-2:]) != focus.shape:
            raise TrainingError(f"{series} slice {n}: hard-negative map {focus.shape} vs image {sample['image'].shape}")
        sample["focus"] = focus.astype(np.int32)[None]
        sample["meta"].update(hard_negative=True, id=f"{series}_{n:03d}-hardneg")
        return sample


class HardNegatives:
    """Runs the hard-negative rounds of one training (configured by ``train.hard_negatives``, not subclassed).

    Args:
        trainer: the :class:`~medseg.training.trainer.Trainer` (its train data must be DeepLesion's, its
            training crops centred by ``RandCropAroundLesiond`` / ``RandElasticCropd``).
    """

    def __init__(self, trainer: Any) -> None:
        self.cfg: HardNegativeConfig = trainer.cfg.train.hard_negatives
        c, ds = self.cfg, trainer.train_data
        if not hasattr(ds, "negative_candidates"):
            raise TrainingError("train.hard_negatives needs data.name: deeplesion (lesion-free slices of the "
                                "series); set train.hard_negatives.enabled=false for other data")
        tr = trainer.cfg.transforms
        if tr.crop_size is None and not (tr.elastic.enabled and tr.elastic.grid != "crop"):
            raise TrainingError("train.hard_negatives centres training crops on the mined blobs: set "
                                "transforms.crop_size")
        if not c.at or any(not 0.0 <= a < 1.0 for a in c.at) or list(c.at) != sorted(c.at) or c.slices < 1 \
                or not 0.0 < c.threshold < 1.0 or c.min_pixels < 1:
            raise TrainingError("train.hard_negatives: at = ascending fractions in [0, 1), slices >= 1, "
                                "0 < threshold < 1, min_pixels >= 1")
        self.dataset, self.base = ds, trainer.train_set.base
        self.round = 0
        #: "series#slice" → [y0, x0, uint8 crop of the blobs] and the grid's shape
        self.found: dict[str, dict[str, Any]] = {}
        self.extra: Dataset | None = None

    # -- schedule ---------------------------------------------------------------------------

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the next round is due after ``step`` (never after the schedule's end)."""
        if self.round >= len(self.cfg.at) or step >= total_steps:
            return False
        return step >= int(np.ceil(self.cfg.at[self.round] * total_steps))

    def _draw(self, trainer: Any, round_: int) -> list[tuple[str, int, Any]]:
        return choose_negatives(self.dataset.negative_candidates(), self.cfg.slices,
                                int(trainer.cfg.train.seed) * 7919 + round_ + 1)

    def _segment(self, trainer: Any, series: str, n: int, rec: Any, icfg: Any
                 ) -> tuple[dict[str, Any], np.ndarray] | None:
        """The slice's sample and the model's foreground probability on it (None: unreadable)."""
        sample = self.dataset.unlabelled_slice(series, n, rec)
        if sample is None:
            return None
        image = np.asarray(sample["image"], np.float32)
        with torch.no_grad():
            logits = predict_logits(trainer.net, torch.as_tensor(image)[None], icfg, trainer.device)
        return sample, (1.0 - torch.softmax(logits, 1)[0, 0]).cpu().numpy()

    def reserve_s(self, trainer: Any, probes: int = 2) -> float:
        """Seconds the remaining rounds will take at most: a few slices read and segmented (the median after a
        warm-up one), times the slices of the rounds left."""
        left = len(self.cfg.at) - self.round
        if left <= 0:
            return 0.0
        icfg, was_training = round_inference_cfg(trainer), trainer.net.training
        trainer.net.eval()
        times = []
        for series, n, rec in self._draw(trainer, -1)[: probes + 1]:
            t0 = time.monotonic()
            self._segment(trainer, series, n, rec, icfg)
            times.append(time.monotonic() - t0)
        trainer.net.train(was_training)
        per_slice = median_after_warmup(times)
        return 1.1 * per_slice * self.cfg.slices * left

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint (a weights-only load reads it)."""
        return {"round": self.round, "found": copy.deepcopy(self.found)}

    def load_state_dict(self, state: dict[str, Any] | None, trainer: Any) -> None:
        """Restore :meth:`state_dict` and rebuild the trainer's training set from it."""
        if not state:
            return
        self.round, self.found = int(state["round"]), copy.deepcopy(state["found"])
        self.rebuild(trainer)

    def items(self) -> list[tuple[str, int, Any, np.ndarray]]:
        """The mined slices as :class:`HardNegativeSlices` items, in (series, slice) order."""
        rows = {(se, n): rec for se, n, rec in self.dataset.negative_candidates()}
        out = []
        for key in sorted(self.found):
            series, n = key.rsplit("#", 1)
            st = self.found[key]
            out.append((series, int(n), rows[series, int(n)], paste_mask(st["blobs"], tuple(st["shape"]))))
        return out

    def rebuild(self, trainer: Any, read: dict[tuple[str, int], dict[str, Any]] | None = None) -> int:
        """The training set with the mined slices (:func:`~medseg.training.trainset.assemble`; ``read``: the
        slices a round has just read, see :class:`HardNegativeSlices`); their count."""
        self.extra = cached(trainer, HardNegativeSlices(self.dataset, self.items(), read), os.cpu_count() or 1)
        if read:  # filled: a slice past train.cache_max_gb is read from disk each time, not held here
            read.clear()
        assemble(trainer, self.base)
        return len(self.extra)

    # -- a round ----------------------------------------------------------------------------

    def run_round(self, trainer: Any) -> dict[str, int]:
        """One round: segment the drawn slices, keep those with false positives, rebuild, log."""
        c, t0 = self.cfg, time.monotonic()
        icfg, was_training = round_inference_cfg(trainer), trainer.net.training
        trainer.net.eval()
        found: dict[str, dict[str, Any]] = {}
        read: dict[tuple[str, int], dict[str, Any]] = {}  # the found slices' samples: the cache reuses them
        counts = {"examined": 0, "unreadable": 0, "components": 0, "pixels": 0}
        montage: list[dict[str, Any]] = []
        for series, n, rec in self._draw(trainer, self.round):
            got = self._segment(trainer, series, n, rec, icfg)
            if got is None:
                counts["unreadable"] += 1
                continue
            counts["examined"] += 1
            sample, prob = got
            blobs, k = false_positive_blobs(prob, c.threshold, c.min_pixels)
            if not k:
                continue
            counts["components"] += k
            counts["pixels"] += int(blobs.sum())
            found[f"{series}#{n}"] = {"blobs": crop_mask(blobs), "shape": list(blobs.shape)}
            if trainer.cfg.train.cache_samples:
                read[series, n] = sample
            if len(montage) < 8:
                image = np.asarray(sample["image"], np.float32)
                montage.append({"image": image[image.shape[0] // 2][None], "mask": blobs, "prev": np.zeros_like(blobs),
                                "title": f"{series} #{n}: {k}"})
        trainer.net.train(was_training)
        self.found.update(broadcast_object(found))  # every rank trains on rank 0's
        self.round += 1
        slices = self.rebuild(trainer, read)  # a slice rank 0 found and this rank did not: read from disk
        out = {"round": self.round, "found": len(found), "slices": slices, **counts,
               "seconds": int(time.monotonic() - t0)}
        trainer.tracker.log_metrics({f"hard_negatives/{k}": float(v) for k, v in out.items()}, trainer.step)
        if montage and trainer.rank == 0:
            path = save_montage(montage, trainer.run_dir / "hard_negatives" / f"round_{self.round}.png",
                                f"hard negatives, round {self.round}: {len(found)} of {counts['examined']} "
                                "slices with false positives (red)")
            trainer.tracker.log_artifact(path, "hard_negatives")
        log.info("hard-negative round %d: %s", self.round, out)
        return out
