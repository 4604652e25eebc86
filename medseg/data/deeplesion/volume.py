"""Every slice of a DeepLesion-format series with its true mask: the volume protocol's input.

DeepLesion keeps, per key slice, a block of contiguous slices (its ``Slice_range``); a series folder
may hold several blocks with gaps between them. A **volume** here is one block: the stack that
``medseg predict`` would read as one series (the DICOM export of the volume-protocol test writes
each block as one series). :func:`volume_blocks` lists a split's blocks; :func:`volume_slices`
yields each slice of a block built by :meth:`DeepLesionDataset.slice_sample` — the same context
(clamped to the block), window rule and resampling as the key slice's sample — with its true
instance mask (zeros on a slice no lesion shows on).

Example:
    >>> ds = DeepLesionDataset(DataConfig(root="data/demo"), "test")  # doctest: +SKIP
    >>> for block in volume_blocks(ds):  # doctest: +SKIP
    ...     samples = list(volume_slices(ds, block))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from medseg.data.base import DataError
from medseg.data.deeplesion.dataset import DeepLesionDataset

__all__ = ["VolumeBlock", "has_full_masks", "volume_blocks", "volume_slices"]


@dataclass(frozen=True)
class VolumeBlock:
    """One block of contiguous slices of a series and the key slices it holds.

    Attributes:
        series: the series folder name.
        first, last: slice numbers of the block (inclusive).
        keys: the key slices' numbers in the block.
        sample: index of the first of its key slices' samples in the dataset (whose context and window rule
            every slice of the block uses).
        patient: the patient index (the bootstrap unit).
    """

    series: str
    first: int
    last: int
    keys: tuple[int, ...]
    sample: int
    patient: int

    @property
    def name(self) -> str:
        """``<series>_<first>-<last>``: names the volume in tables."""
        return f"{self.series}_{self.first:03d}-{self.last:03d}"


def has_full_masks(dataset: Any) -> bool:
    """True when ``dataset`` is DeepLesion-format data with true masks on every slice (``Masks_png/``)."""
    return isinstance(dataset, DeepLesionDataset) and dataset.has_masks


def volume_blocks(dataset: DeepLesionDataset) -> list[VolumeBlock]:
    """The blocks of the split's key slices, sorted by series and first slice.

    Key slices whose blocks are the same ``(first, last)`` form one volume; blocks of one series that
    overlap are merged into one volume (their slices are scored once).
    """
    by_series: dict[str, list[tuple[int, int, int, int]]] = {}
    for idx, s in enumerate(dataset.samples):
        first, last = dataset.block(idx)
        by_series.setdefault(s.series, []).append((first, last, s.key, idx))
    out = []
    for series in sorted(by_series):
        spans = sorted(by_series[series])
        group = [spans[0]]
        for span in spans[1:]:
            if span[0] <= max(g[1] for g in group):  # overlaps the current block: one volume
                group.append(span)
            else:
                out.append(_block(dataset, series, group))
                group = [span]
        out.append(_block(dataset, series, group))
    return out


def _block(dataset: DeepLesionDataset, series: str, group: list[tuple[int, int, int, int]]) -> VolumeBlock:
    first, last = min(g[0] for g in group), max(g[1] for g in group)
    sample = min(group, key=lambda g: g[2])[3]
    return VolumeBlock(series, first, last, tuple(sorted({g[2] for g in group})), sample,
                       int(dataset.samples[sample].rows[0].patient))


def volume_slices(dataset: DeepLesionDataset, block: VolumeBlock) -> Iterator[dict[str, Any]]:
    """Each slice of ``block`` in order, as a sample with ``meta["key"]`` and ``source_truth``: the true
    instance map ``(H, W)`` on the source slice's grid (``truth`` is on the sample's, resampled, grid).

    Slices are built from the block's first key slice's sample (:meth:`DeepLesionDataset.slice_sample`);
    a merged block's slices outside that key slice's range use the key slice whose range holds them.

    Raises:
        DataError: the data has no true masks, or a slice of the block cannot be read.
    """
    if not dataset.has_masks:
        raise DataError(f"{dataset.root}: the volume protocol needs true masks on every slice (Masks_png/)")
    owners = [i for i, s in enumerate(dataset.samples) if s.series == block.series and s.key in block.keys]
    for n in range(block.first, block.last + 1):
        idx = next((i for i in [block.sample, *owners] if dataset.block(i)[0] <= n <= dataset.block(i)[1]), None)
        if idx is None:
            raise DataError(f"{block.series}: slice {n} lies in no key slice's Slice_range")
        sample = dataset.slice_sample(idx, n)
        if sample is None:
            raise DataError(f"{block.series}: slice {n} of the block {block.first}-{block.last} cannot be read")
        sample["meta"]["key"] = n in block.keys
        shape = sample["meta"].get("source_shape")
        if shape is None:  # not resampled: the sample's truth is on the source grid
            source_truth = sample["truth"]
        else:
            source_truth = dataset.read_truth(block.series, n, (int(shape[0]), int(shape[1])), empty_if_absent=True)
        if source_truth is None:
            raise DataError(f"{block.series}: the true mask of slice {n} cannot be read")
        sample["source_truth"] = source_truth[0]
        yield sample
