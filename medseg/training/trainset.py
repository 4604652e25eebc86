"""The training set between rounds: the key slices (and negatives) the run started with, then what each
round added — the propagated slices (:mod:`medseg.training.propagate`) and the hard negatives
(:mod:`medseg.training.hardneg`). A round sets its ``extra`` dataset and calls :func:`assemble`, which gives
the trainer a new set, sampler and loader (the same for a resumed run that restored the rounds' states).
Both kinds of round predict with :func:`round_inference_cfg` and time their budget reserve with
:func:`median_after_warmup`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from medseg.data.loading import EpochSampler, TransformedDataset, cache_dataset, first_readable, make_loader

__all__ = ["assemble", "cached", "median_after_warmup", "round_inference_cfg"]


def round_inference_cfg(trainer: Any) -> Any:
    """The trainer's config for a round's predictions: whole slices, no test-time augmentation."""
    icfg = copy.deepcopy(trainer.cfg)
    icfg.inference.tta_flips, icfg.inference.tta_scales, icfg.inference.mode = False, [1.0], "whole"
    return icfg


def median_after_warmup(times: list[float]) -> float:
    """The median of timed repetitions without the first (a warm-up) when there are others; 0 for none."""
    if not times:
        return 0.0
    return float(np.median(times[1:] if len(times) > 1 else times))


def cached(trainer: Any, extra: Dataset, threads: int) -> Dataset:
    """``extra`` read once, now, into memory when the run caches its samples (``train.cache_samples``, within
    ``train.cache_max_gb``): a slice read decodes 3-4 PNGs, which cost the DataLoader worker more than a step."""
    t = trainer.cfg.train
    if len(extra) and t.cache_samples:
        return cache_dataset(extra, t.cache_max_gb, first_readable(extra), threads, trainer.rank == 0)
    return extra


def assemble(trainer: Any, base: Dataset) -> None:
    """``trainer.train_set`` = ``base`` + the ``extra`` of the trainer's rounds (``propagator``, ``miner``), in
    that order; a new sampler and loader with the old loader's settings (pinning, the collate)."""
    t = trainer.cfg.train
    extras = [r.extra for r in (getattr(trainer, "propagator", None), getattr(trainer, "miner", None))
              if r is not None and r.extra is not None and len(r.extra)]
    whole = ConcatDataset([base, *extras]) if extras else base
    trainer.train_set = TransformedDataset(whole, trainer.train_set.transform, t.seed)
    trainer.sampler = EpochSampler(len(trainer.train_set), 0, t.seed, rank=trainer.rank, world=trainer.world)
    old = trainer.train_loader
    trainer.train_loader = make_loader(trainer.train_set, t, trainer.sampler, t.batch_size,
                                       pin_memory=old.pin_memory, collate_fn=old.collate_fn)
