"""From datasets to batches: the epoch sampler, the sample cache, per-sample augmentation seeds, loaders.

Reproducibility: every random choice in an epoch is a function of ``(train.seed, epoch, index)``.
The sampler yields ``(epoch, index)`` pairs, so a worker process that lives across epochs
(``persistent_workers``) still seeds each sample's augmentation with the right epoch:
``Compose.set_random_state(seed=sample_seed(seed, epoch, index))``.

The cache (``train.cache_samples``) is MONAI's :class:`~monai.data.CacheDataset` over the decoded,
not yet augmented samples. It is filled once, in the main process, before any worker starts, so
workers share it (copy-on-write after ``fork``) and no epoch reads a cached file again. Its size is
bounded by ``train.cache_max_gb``: the samples past the bound are read from disk each time.

Example:
    >>> loader = make_loader(train_set, cfg.train, EpochSampler(len(train_set), 64, seed=0))
    >>> for epoch in range(3):
    ...     loader.sampler.set_epoch(epoch, num_samples=64)
    ...     for batch in loader: ...
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medseg.config import TrainConfig
from medseg.data.base import collate
from medseg.runtime import TrainingError, sample_seed

log = logging.getLogger("medseg.data")

__all__ = [
    "CollateThen", "EpochSampler", "ShardSampler", "TransformedDataset", "cache_dataset", "collate_by_shape",
    "first_readable",
    "make_loader", "sample_nbytes",
]

Key = tuple[int, int]


class EpochSampler(Sampler[Key]):
    """Deterministic sample order for one epoch: concatenated permutations seeded by (seed, epoch).

    Yields ``(epoch, index)`` pairs. One sampler serves a whole run: :meth:`set_epoch` moves it on.

    Args:
        n: dataset size.
        num_samples: indices per epoch (may exceed ``n``: further permutations follow).
        seed: ``train.seed``.
        epoch: the epoch whose order is drawn.
        start: skip this many indices (resuming inside an epoch).
        rank, world: under DDP each process takes every ``world``-th index from ``rank`` on
            (``num_samples`` and ``start`` then count all processes' samples).
    """

    def __init__(
        self, n: int, num_samples: int, seed: int, epoch: int = 0, start: int = 0, rank: int = 0, world: int = 1
    ) -> None:
        self.n, self.num_samples, self.seed, self.epoch, self.start = n, num_samples, seed, epoch, start
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int, num_samples: int | None = None, start: int = 0) -> None:
        """Draw the order of ``epoch`` next (``num_samples`` and ``start`` as in the constructor)."""
        self.epoch, self.start = epoch, start
        if num_samples is not None:
            self.num_samples = num_samples

    def indices(self) -> list[int]:
        """All indices of the epoch, before skipping ``start``."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0, stream=1))
        out: list[int] = []
        while len(out) < self.num_samples:
            out.extend(torch.randperm(self.n, generator=g).tolist())
        return out[: self.num_samples]

    def __iter__(self) -> Iterator[Key]:
        return iter((self.epoch, i) for i in self.indices()[self.start :][self.rank :: self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples - self.start, self.world))


class ShardSampler(Sampler[Key]):
    """Every index once, in order; under DDP rank ``r`` takes ``r, r + world, ...`` (no padding).

    Unlike ``DistributedSampler`` nothing is repeated to even out the shards, so the ranks' metrics
    combined equal one process's.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[Key]:
        return iter((0, i) for i in range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class TransformedDataset(Dataset):
    """Applies a MONAI ``Compose`` to each sample, seeded per ``(epoch, index)``.

    Indexed by the ``(epoch, index)`` pairs of :class:`EpochSampler` (a plain ``int`` means epoch 0).
    """

    def __init__(self, base: Dataset, transform: Any, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Key | int) -> dict[str, Any] | None:
        epoch, i = key if isinstance(key, tuple) else (0, int(key))
        sample = self.base[i]
        if sample is None:
            return None
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=sample_seed(self.seed, epoch, i))
        return self.transform(dict(sample))


def first_readable(dataset: Dataset) -> dict[str, Any]:
    """The first sample that can be read (an unreadable one is ``None``): a probe of the data's shape."""
    for i in range(len(dataset)):  # type: ignore[arg-type]
        sample = dataset[i]
        if sample is not None:
            return sample
    raise TrainingError("no training sample could be read; see the warnings above")


def sample_nbytes(sample: dict[str, Any] | None) -> int:
    """Bytes held by a sample's arrays (what caching it costs)."""
    if sample is None:
        return 0
    return sum(int(v.nbytes) for v in sample.values() if isinstance(v, (np.ndarray, torch.Tensor)))


def cache_dataset(base: Dataset, max_gb: float, probe: dict[str, Any] | None, workers: int = 1,
                  progress: bool = True) -> Dataset:
    """MONAI's ``CacheDataset`` over ``base`` (its items read once, now), bounded to ``max_gb``.

    Args:
        base: a dataset of decoded samples (``None`` for unreadable ones).
        max_gb: memory bound; the number of cached samples is ``max_gb`` over the size of ``probe``.
        probe: a representative sample (its size sets the count).
        workers: threads that fill the cache.
    """
    from monai.data import CacheDataset
    from monai.transforms import Transform

    class _Read(Transform):
        def __call__(self, i: int) -> Any:
            return base[i]

    n = len(base)  # type: ignore[arg-type]
    per = max(sample_nbytes(probe), 1)
    cache_num = min(n, int(max_gb * 1e9 // per))
    if cache_num < n:
        log.warning("train.cache_max_gb = %g holds %d of %d samples (%.1f MB each); the rest are read "
                    "from disk every epoch", max_gb, cache_num, n, per / 1e6)
    ds = CacheDataset(list(range(n)), transform=_Read(), cache_num=cache_num, num_workers=max(1, workers),
                      progress=progress and cache_num > 0, copy_cache=False, as_contiguous=False)
    return ds


def collate_by_shape(batch: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Collate samples into one batch per image shape (no padding): batched = one at a time."""
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for s in batch:
        if s is not None:
            groups.setdefault(tuple(np.shape(s["image"])), []).append(s)
    return [b for g in groups.values() if (b := collate(g)) is not None]


class CollateThen:
    """:func:`~medseg.data.base.collate`, then ``fn`` on the batch, as a DataLoader's ``collate_fn`` (in
    its workers): e.g. the accelerator's batch augmentation when the training device is the CPU, where
    it would otherwise run in the training process between optimizer steps on the cores the step uses."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        batch = collate(samples)
        return None if batch is None else self.fn(batch)


def make_loader(dataset: Dataset, cfg: TrainConfig, sampler: Sampler[Key], batch_size: int,
                pin_memory: bool = False, by_shape: bool = False, collate_fn: Any = None) -> DataLoader:
    """One DataLoader for a whole run: persistent workers, a private generator.

    Args:
        dataset: a :class:`TransformedDataset`.
        cfg: ``train.num_workers`` and ``train.seed``.
        sampler: an :class:`EpochSampler` (training) or :class:`ShardSampler` (evaluation).
        batch_size: samples per batch.
        pin_memory: page-locked batches (for CUDA).
        by_shape: yield a list of same-shape batches (evaluation of slices of different sizes).
        collate_fn: instead of :func:`~medseg.data.base.collate` (e.g. one that also augments the batch).
    """
    nw = cfg.num_workers
    # a private generator: creating a loader must not draw from torch's global RNG, or a
    # resumed run would see different dropout masks
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=nw,
        collate_fn=collate_fn or (collate_by_shape if by_shape else collate), pin_memory=pin_memory,
        persistent_workers=nw > 0, generator=torch.Generator().manual_seed(cfg.seed),
    )
