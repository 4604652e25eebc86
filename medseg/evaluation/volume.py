"""The volume protocol: a model run on every slice of each series, the way ``medseg predict`` runs it.

``evaluation.protocol`` chooses what ``medseg evaluate`` (and ``calibrate``) score:

* ``key`` — DeepLesion's key-slice protocol (:mod:`medseg.evaluation.evaluate`): the key slices only;
  the only one possible on real DeepLesion, which has no masks off the key slices;
* ``volume`` — this module: every slice of every block (:mod:`medseg.data.deeplesion.volume`), scored
  in 3-D by :class:`medseg.metrics.volume.VolumeMetrics` against the true masks;
* ``both``; ``auto`` (the default) — ``both`` where true masks exist on every slice (generated
  DeepLesion-format data writes ``Masks_png/``), else ``key``.

Each slice is built by the dataset exactly as its key slice (same 2.5-D context clamped to the
block, same window rule, same resampling), predicted by the same :func:`predict_logits` and
post-processed at the same operating point as ``medseg predict``; class maps and probabilities go
back to the source grid (:func:`medseg.data.base.to_source_grid`, as predict writes them) and are
scored there against the source-grid true masks. So a DICOM export of the same blocks through
``medseg predict`` gives the same class maps (``tests/evaluation/test_volume_protocol.py``).

Example:
    >>> res = evaluate_volumes(model, DeepLesionDataset(cfg.data, "test"), cfg, torch.device("cpu"))
    >>> res.metrics["vol_lesion_dice"], res.metrics["vol_slice_dice_nonkey"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.config import Config, ConfigError
from medseg.data.base import DataError, to_source_grid
from medseg.data.deeplesion.volume import VolumeBlock, has_full_masks, volume_blocks, volume_slices
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import foreground_probability, predict_logits
from medseg.io import atomic_write_bytes
from medseg.metrics.volume import VolumeMetrics

__all__ = ["PROTOCOLS", "PredictedVolume", "VolumeResult", "class_maps", "evaluate_volumes", "predict_volume",
           "predicted_volumes", "resolve_protocol", "score_volumes"]

#: a callback that sees each volume and its class map (source grid)
OnVolume = Callable[["PredictedVolume", np.ndarray], None]

#: the values of ``evaluation.protocol``
PROTOCOLS = ("auto", "key", "volume", "both")


def resolve_protocol(protocol: str, dataset: Any) -> tuple[bool, bool]:
    """``(key slices, volumes)``: which protocols ``evaluation.protocol`` runs on ``dataset``.

    Raises:
        ConfigError: an unknown value; ``volume`` / ``both`` on data without true masks on every slice.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"evaluation.protocol = {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    full = has_full_masks(dataset)
    if protocol in ("volume", "both") and not full:
        raise ConfigError(f"evaluation.protocol = {protocol}: the volume protocol needs true masks on every slice "
                          "(DeepLesion-format data with Masks_png/, e.g. `medseg demo-data`); real DeepLesion has "
                          "key-slice marks only — use evaluation.protocol: key (or auto)")
    if protocol == "auto":
        return True, full
    return protocol in ("key", "both"), protocol in ("volume", "both")


@dataclass
class PredictedVolume:
    """One block's network output, kept so that operating points can be tried on it (calibration).

    ``logits`` ``(Z, K, h, w)`` on the model's grid; ``images`` its inputs; ``truth`` ``(Z, H, W)`` and
    ``key`` ``(Z,)`` on the source grid.
    """

    block: VolumeBlock
    logits: torch.Tensor
    images: torch.Tensor
    spacing: list[list[float]]
    meta: dict[str, Any]
    truth: np.ndarray
    key: np.ndarray


@dataclass
class VolumeResult:
    """What :func:`evaluate_volumes` returns."""

    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    slice_rows: list[dict[str, Any]] = field(default_factory=list)
    n_volumes: int = 0


@torch.no_grad()
def predict_volume(model: nn.Module, dataset: Any, block: VolumeBlock, cfg: Config, device: torch.device,
                   compact: bool = False) -> PredictedVolume:
    """Run ``model`` (in the mode it is in) on every slice of one block, ``evaluation.batch_size`` slices at a
    time. ``compact``: as :func:`predicted_volumes`."""
    samples = list(volume_slices(dataset, block))
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))
    spacing = [list(s["meta"]["spacing"]) for s in samples]
    bs = max(1, int(cfg.evaluation.batch_size))
    logits = torch.cat([predict_logits(model, images[i: i + bs], cfg, device).cpu() for i in range(0, len(images), bs)])
    if compact:
        logits = logits.half()
        images = images if cfg.inference.crf.enabled else images[:, :0]
    return PredictedVolume(block, logits, images, spacing, samples[0]["meta"],
                           np.stack([s["source_truth"] for s in samples]),
                           np.array([bool(s["meta"]["key"]) for s in samples]))


def predicted_volumes(model: nn.Module, dataset: Any, cfg: Config, device: torch.device,
                      progress: str | None = None, compact: bool = False) -> Iterator[PredictedVolume]:
    """Run ``model`` on every slice of every block of ``dataset`` (:func:`predict_volume`, in eval mode).

    ``compact``: keep the logits as float16 and the images only when the dense CRF needs them (for
    calibration, which keeps every volume of the split in memory to try operating points on).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        for block in tqdm(volume_blocks(dataset), desc=progress, unit="volume", disable=progress is None,
                          dynamic_ncols=True):
            yield predict_volume(model, dataset, block, cfg, device, compact)
    finally:
        model.train(was_training)


def class_maps(vol: PredictedVolume, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Class map and foreground probability ``(Z, H, W)`` on the source grid at ``cfg``'s operating point."""
    logits = vol.logits.float()
    pred = postprocess(logits, vol.images, cfg, vol.spacing, volume=True).cpu().numpy()  # hysteresis in 3-D
    prob = foreground_probability(logits).cpu().numpy()
    return to_source_grid(pred, vol.meta), to_source_grid(prob, vol.meta)


def score_volumes(volumes: list[PredictedVolume] | Iterator[PredictedVolume], cfg: Config,
                  intervals: bool = False, on_volume: OnVolume | None = None) -> VolumeResult:
    """Post-process each volume at ``cfg``'s operating point and score it (:class:`VolumeMetrics`).

    ``on_volume`` sees each volume and its source-grid class map ``(Z, H, W)`` (e.g. to write it).
    """
    vm = VolumeMetrics.from_config(cfg.metrics, cfg.predict.connectivity)
    n = 0
    for vol in volumes:
        pred, prob = class_maps(vol, cfg)
        if on_volume is not None:
            on_volume(vol, pred)
        vm.update(pred, vol.truth, vol.key, vol.block.name, prob=prob, unit=f"patient {vol.block.patient}")
        n += 1
    metrics = vm.compute()
    if intervals and n and cfg.metrics.bootstrap_resamples > 0:
        m = cfg.metrics
        metrics.update(vm.intervals(m.bootstrap_resamples, m.bootstrap_seed, m.ci_level))
    return VolumeResult(metrics, vm.rows(), vm.slice_rows(), n)


def evaluate_volumes(model: nn.Module, dataset: Any, cfg: Config, device: torch.device, progress: str | None = None,
                     intervals: bool = False, save_dir: Path | None = None) -> VolumeResult:
    """The volume protocol on ``dataset`` (a :class:`~medseg.data.deeplesion.DeepLesionDataset` with true masks).

    Volumes are predicted and scored one at a time (memory: one block's logits). ``save_dir``: write
    every slice's class map as ``save_dir/<series>/<slice>.png`` (uint8, source grid, atomically).
    """
    return score_volumes(predicted_volumes(model, dataset, cfg, device, progress), cfg, intervals,
                         on_volume=_volume_writer(save_dir) if save_dir is not None else None)


def _volume_writer(save_dir: Path) -> OnVolume:
    import cv2

    def write(vol: PredictedVolume, pred: np.ndarray) -> None:
        for k, n in enumerate(range(vol.block.first, vol.block.last + 1)):
            ok, png = cv2.imencode(".png", pred[k].astype(np.uint8))
            if not ok:
                raise DataError(f"{vol.block.name}: could not encode slice {n}'s class map as PNG")
            atomic_write_bytes(save_dir / vol.block.series / f"{n:03d}.png", png.tobytes())

    return write
