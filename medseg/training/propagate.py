"""Slice-propagated training (``train.propagate``; Cai et al. 2018, "Slice-propagated 3D mask generation
from 2D RECIST", arXiv 1807.01172).

DeepLesion marks each lesion on one key slice. After the key-slice stage the model segments each
lesion's neighbouring slices within its ``Slice_range``, outward from the key slice; a propagated
mask is **accepted** when it is consistent with the previous slice's mask (:func:`accept_mask`):

1. the predicted components that touch the previous mask are the lesion's (others are other
   structures or other lesions);
2. overlap: at least ``min_overlap`` of the new mask lies on the previous one (a lesion moves little
   between neighbouring slices);
3. size: its area is at most ``max_area_ratio`` × the previous one's (the radiologist marks the
   RECIST axes on the lesion's largest cross-section, so areas shrink outward);
4. extent: it lies inside the lesion's RECIST box grown by ``box_margin`` × the box's longer side;
5. at least ``min_area_px`` pixels (fewer: the lesion has ended).

With ``source: grabcut`` the candidate is not the model's: OpenCV GrabCut segments the slice inside
the grown box, seeded by the previous slice's mask (an image-driven propagation that needs no trained
model, so its one round can run at the start of training); an empty GrabCut result means the lesion
has ended. ``min_contrast`` adds a rule for either source: the candidate's mean intensity must differ
from the previous mask's mean by less than ``min_contrast`` × the difference between its surrounding
ring's mean and it (past the lesion's end GrabCut keeps a piece of the host tissue, which looks like
its surroundings, not like the lesion). A GrabCut round extends ``workers`` lesions at once in threads
(GrabCut releases the GIL; each lesion's masks depend on that lesion alone, so the round is the same).

An accepted mask is optionally refined (``refine: grabcut``, then checked again), becomes the previous mask
of the next slice outward, and joins the training set as a label; a rejection stops that lesion in that
direction. Rounds run at fixed fractions of the schedule (:meth:`Propagator.milestones`); each adds
``slices_per_round`` slices per direction and training continues on the larger set (held in memory with
``train.cache_samples`` within ``train.cache_max_gb``, like the key slices: read from disk, one cost the
DataLoader worker more than an optimizer step). The state (round, accepted masks as crops, stopped
directions) is in every checkpoint: a resumed run rebuilds the same training set. The wall-clock budget
reserves the rounds' time at its conversion (:meth:`Propagator.reserve_s`). Each round logs its counts
(``propagate/*``) and a montage PNG (``propagate/round_<k>.png``) to MLflow.

Example:
    >>> mask, why = accept_mask(pred, prev, (10, 10, 40, 40), PropagateConfig())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import io
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from medseg.config import PropagateConfig
from medseg.data.deeplesion.recist import seeded_grabcut
from medseg.inference.predictor import predict_logits
from medseg.io import atomic_write_bytes
from medseg.runtime import TrainingError
from medseg.training.trainset import assemble, cached, median_after_warmup, round_inference_cfg

log = logging.getLogger("medseg.propagate")

__all__ = ["PropagatedSlices", "Propagator", "accept_mask", "crop_mask", "grabcut_from", "grown_box", "lesion_window",
           "looks_like", "paste_mask", "refine_grabcut", "save_montage"]

_EIGHT = ndimage.generate_binary_structure(2, 2)


def grown_box(box: Sequence[float], margin: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` inclusive pixel bounds of ``box`` grown by ``margin`` × its longer side, clipped."""
    x0, y0, x1, y1 = (float(v) for v in box)
    g = margin * max(x1 - x0, y1 - y0)
    h, w = shape
    return (max(int(np.floor(x0 - g)), 0), max(int(np.floor(y0 - g)), 0),
            min(int(np.ceil(x1 + g)), w - 1), min(int(np.ceil(y1 + g)), h - 1))


def lesion_window(box: Sequence[float], margin: float, crop: Sequence[int], shape: Sequence[int]
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((y0, y1), (x0, x1))`` of the window a lesion is predicted in: centred on its RECIST box, the
    larger of the training crop and the grown box + 16 px, inside the slice."""
    gx0, gy0, gx1, gy1 = grown_box(box, margin, (int(shape[0]), int(shape[1])))
    out = []
    for lo, hi, size, n in ((gy0, gy1, crop[0], shape[0]), (gx0, gx1, crop[-1], shape[1])):
        want = min(max(int(size), hi - lo + 1 + 16), int(n))
        start = min(max((lo + hi + 1) // 2 - want // 2, 0), int(n) - want)
        out.append((start, start + want))
    return out[0], out[1]


def accept_mask(pred: np.ndarray, prev: np.ndarray, box: Sequence[float], cfg: PropagateConfig
                ) -> tuple[np.ndarray | None, str]:
    """The propagated mask of one lesion on one slice, or None, and why (see the module doc).

    Args:
        pred: ``(H, W)`` bool, the model's foreground on the slice.
        prev: ``(H, W)`` bool, the lesion's mask on the previous slice (toward the key slice).
        box: the lesion's RECIST box ``x0, y0, x1, y1`` on this grid.
        cfg: the rules' thresholds.

    Returns:
        ``(mask, "accepted")`` or ``(None, reason)`` with reason ``no_overlap``, ``too_small``,
        ``low_overlap``, ``grew`` or ``outside_box``.
    """
    pred, prev = np.asarray(pred, bool), np.asarray(prev, bool)
    comps, n = ndimage.label(pred, structure=_EIGHT)
    touching = np.unique(comps[prev & (comps > 0)])
    if touching.size == 0:
        return None, "no_overlap"
    mask = np.isin(comps, touching)
    area = int(mask.sum())
    if area < cfg.min_area_px:
        return None, "too_small"
    if (mask & prev).sum() / area < cfg.min_overlap:
        return None, "low_overlap"
    if area > cfg.max_area_ratio * int(prev.sum()):
        return None, "grew"
    x0, y0, x1, y1 = grown_box(box, cfg.box_margin, mask.shape)
    inside = np.zeros_like(mask)
    inside[y0: y1 + 1, x0: x1 + 1] = True
    if (mask & ~inside).any():
        return None, "outside_box"
    return mask, "accepted"


def grabcut_from(image: np.ndarray, seed: np.ndarray, bounds: tuple[int, int, int, int]) -> np.ndarray:
    """GrabCut seeded by ``seed`` (probable foreground) inside ``bounds`` (probable background), background
    outside; ``image`` ``(H, W)`` in [0, 1]. Returns the bool foreground, empty where GrabCut finds none
    or fails. It runs on the whole slice: its background model then learns every other tissue of the slice
    (on the generated training lesions a crop of the box + 8 or 40 pixels ended 30 % more propagations)."""
    x0, y0, x1, y1 = bounds
    gc = np.full(seed.shape, cv2.GC_BGD, np.uint8)
    gc[y0: y1 + 1, x0: x1 + 1] = cv2.GC_PR_BGD
    gc[seed] = cv2.GC_PR_FGD
    rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    try:
        seeded_grabcut(rgb, gc, np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64), 3, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return np.zeros(seed.shape, bool)
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


def refine_grabcut(image: np.ndarray, mask: np.ndarray, bounds: tuple[int, int, int, int]) -> np.ndarray:
    """:func:`grabcut_from` seeded by ``mask``; the input mask where GrabCut finds nothing."""
    out = grabcut_from(image, mask, bounds)
    return out if out.any() else mask


def looks_like(image: np.ndarray, mask: np.ndarray, prev_image: np.ndarray, prev: np.ndarray, ratio: float,
               ring_px: int = 3) -> bool:
    """Whether ``mask`` on ``image`` still looks like the lesion ``prev`` on ``prev_image``: its mean
    intensity differs from the lesion's by less than ``ratio`` × its surrounding ring's difference."""
    ring = ndimage.binary_dilation(mask, _EIGHT, iterations=ring_px) & ~mask
    if not ring.any():
        return True
    mu = float(prev_image[prev].mean())
    return abs(float(image[mask].mean()) - mu) < ratio * abs(float(image[ring].mean()) - mu)


class PropagatedSlices(Dataset):
    """The accepted slices as training samples: the DeepLesion slice (``unlabelled_slice``) with the propagated
    instance map as ``label`` / ``instance`` (``meta["propagated"]`` True; ``truth`` the slice's true mask
    where the release has one, never used in training).

    Args:
        dataset: the training :class:`~medseg.data.deeplesion.DeepLesionDataset`.
        items: ``(series, slice, row, instance map (H, W) int32 on the model's grid)``.
    """

    def __init__(self, dataset: Any, items: list[tuple[str, int, Any, np.ndarray]]) -> None:
        self.dataset, self.items = dataset, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        series, n, rec, inst = self.items[idx]
        sample = self.dataset.unlabelled_slice(series, n, rec)
        if sample is None:
            return None
        if tuple(sample["image"].shape[-2:]) != inst.shape:
            raise TrainingError(f"{series} slice {n}: propagated mask {inst.shape} vs image {sample['image'].shape}")
        sample["label"] = (inst > 0).astype(np.int64)[None]
        sample["instance"] = inst.astype(np.int32)[None]
        sample["meta"].update(negative=False, propagated=True, id=f"{series}_{n:03d}-prop")
        return sample


class Propagator:
    """Runs the propagation rounds of one training (configured by ``train.propagate``, not subclassed).

    Args:
        trainer: the :class:`~medseg.training.trainer.Trainer` (its train data must be DeepLesion's).
    """

    def __init__(self, trainer: Any) -> None:
        self.cfg: PropagateConfig = trainer.cfg.train.propagate
        c, ds = self.cfg, trainer.train_data
        if not hasattr(ds, "unlabelled_slice") or not hasattr(ds, "samples"):
            raise TrainingError("train.propagate needs data.name: deeplesion (lesions with a Slice_range); "
                                "set train.propagate.enabled=false for other data")
        if c.rounds < 1 or not 0.0 <= c.start < 1.0 or c.slices_per_round < 1 or c.workers < 0:
            raise TrainingError("train.propagate: rounds >= 1, 0 <= start < 1, slices_per_round >= 1, workers >= 0")
        self.dataset = ds
        self.base = trainer.train_set.base
        self.round = 0
        self.extra: Dataset | None = None  # the accepted slices as samples (cached), once a round ran
        #: lesion key → {"stopped": [up, down], "slices": {slice: [y0, x0, crop uint8 tensor]}}
        self.lesions: dict[str, dict[str, Any]] = {}
        self._keys: dict[str, tuple[int, int]] = {}  # lesion key → (sample index, row)
        for i, s in enumerate(ds.samples):
            for j in range(len(s.rows)):
                self._keys[f"{s.file_name}#{j}"] = (i, j)

    # -- schedule ---------------------------------------------------------------------------

    def milestones(self, total_steps: int) -> list[int]:
        """The optimizer steps after which the rounds run."""
        c = self.cfg
        return [int(np.ceil((c.start + k * (1.0 - c.start) / c.rounds) * total_steps)) for k in range(c.rounds)]

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the next round is due after ``step`` (never after the schedule's end)."""
        if self.round >= self.cfg.rounds or step >= total_steps:
            return False
        return step >= self.milestones(total_steps)[self.round]

    def threads(self) -> int:
        """``train.propagate.workers`` resolved (0: one per CPU core): the GrabCut round's and the cache fill's."""
        return self.cfg.workers or os.cpu_count() or 1

    def reserve_s(self, trainer: Any, probes: int = 4) -> float:
        """Seconds the remaining rounds will take at most (the budget sets them aside): a few slice reads
        and window predictions are timed (the median, after a warm-up one), times the predictions the
        rounds can make (each lesion, each direction, as far as its ``Slice_range`` and the rounds
        reach), plus the key slices' masks (read once, from the sample cache when there is one)."""
        net, icfg = trainer.net, round_inference_cfg(trainer)
        crop = trainer.cfg.transforms.crop_size or [96, 96]
        was_training = net.training
        net.eval()
        times = []
        for s in self.dataset.samples[: probes + 1]:
            t0 = time.monotonic()
            sample = self.dataset.unlabelled_slice(s.series, s.key, s.rows[0])
            if sample is None:
                continue
            h, w = sample["image"].shape[-2:]
            x = torch.as_tensor(np.asarray(sample["image"], np.float32)[:, : min(crop[0], h), : min(crop[-1], w)])
            if self.cfg.source == "grabcut":  # a GrabCut of a lesion-sized seed in a crop-sized box
                b = (0, 0, x.shape[-1] - 1, x.shape[-2] - 1)
                seed = np.zeros((h, w), bool)
                seed[x.shape[-2] // 4: x.shape[-2] * 3 // 4, x.shape[-1] // 4: x.shape[-1] * 3 // 4] = True
                grabcut_from(np.asarray(sample["image"][x.shape[0] // 2], np.float32), seed, b)
            else:
                with torch.no_grad():
                    predict_logits(net, x[None], icfg, trainer.device)
            times.append(time.monotonic() - t0)
        net.train(was_training)
        per_slice = median_after_warmup(times)
        reach = max(self.cfg.rounds - self.round, 0) * self.cfg.slices_per_round
        count = 0
        for key, (i, j) in self._keys.items():
            if key in self.lesions:
                continue  # already started: bounded by the same reach
            r = self.dataset.samples[i].rows[j]
            count += min(reach, r.key_slice - r.slice_range[0]) + min(reach, r.slice_range[1] - r.key_slice)
        count += sum(2 * reach for key in self.lesions)
        t1 = time.monotonic()
        if self.round == 0 and len(self.base):
            self.base[0]
        key_s = (time.monotonic() - t1) * len(self.dataset.samples) if self.round == 0 else 0.0
        return 1.1 * per_slice * count + key_s

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint (a weights-only load reads it)."""
        return {"round": self.round, "lesions": copy.deepcopy(self.lesions)}

    def load_state_dict(self, state: dict[str, Any] | None, trainer: Any) -> None:
        """Restore :meth:`state_dict` and rebuild the trainer's training set from it."""
        if not state:
            return
        self.round, self.lesions = int(state["round"]), copy.deepcopy(state["lesions"])
        self.rebuild(trainer)

    # -- a round ----------------------------------------------------------------------------

    def _key_mask(self, key: str) -> tuple[np.ndarray, list[float], tuple[int, int]]:
        """The key slice's mask of a lesion (its training label), its RECIST box and the grid's shape."""
        i, j = self._keys[key]
        sample = self.base[i]  # the key samples come first (then any negatives); cached when training caches
        if sample is None:
            raise TrainingError(f"{key}: key slice unreadable")
        inst = np.asarray(sample["instance"])[0]
        return inst == j + 1, list(sample["meta"]["lesions"][j]["bbox"]), inst.shape

    def run_round(self, trainer: Any) -> dict[str, int]:
        """One round: extend every lesion outward, rebuild the training set, log counts and a montage."""
        c, t0 = self.cfg, time.monotonic()
        net, device = trainer.net, trainer.device
        icfg = round_inference_cfg(trainer)
        was_training = net.training
        net.eval()
        images: dict[tuple[str, int], np.ndarray | None] = {}
        crop = trainer.cfg.transforms.crop_size or [96, 96]

        def read(series: str, n: int, rec: Any) -> np.ndarray | None:
            if (series, n) not in images:  # GrabCut, the contrast rule, the montage: the middle channel alone
                sample = self.dataset.unlabelled_slice(series, n, rec)
                arr = None if sample is None else np.asarray(sample["image"], np.float32)
                middle_only = arr is not None and c.source == "grabcut"
                images[series, n] = arr[arr.shape[0] // 2][None].copy() if middle_only else arr
            return images[series, n]

        def candidate(series: str, n: int, rec: Any, box: Sequence[float], prev: np.ndarray,
                      bounds: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray] | None:
            """The slice's image and its candidate foreground: GrabCut seeded by ``prev`` (``source: grabcut``)
            or the model's in a window around the lesion (at least the training crop; the rest background)."""
            image = read(series, n, rec)
            if image is None:
                return None
            if c.source == "grabcut":
                return image, grabcut_from(image[image.shape[0] // 2], prev, bounds)
            (y0, y1), (x0, x1) = lesion_window(box, c.box_margin, crop, image.shape[-2:])
            x = torch.as_tensor(np.ascontiguousarray(image[:, y0:y1, x0:x1]))[None]
            with torch.no_grad():
                logits = predict_logits(net, x, icfg, device)
            fg = np.zeros(image.shape[-2:], bool)
            fg[y0:y1, x0:x1] = logits.argmax(1)[0].cpu().numpy() > 0
            return image, fg

        def extend(key: str) -> tuple[Counter[str], list[tuple[int, int]]]:
            """Extend one lesion outward (both directions); its counts and accepted ``(slice, previous)``."""
            counts: Counter[str] = Counter()
            accepted: list[tuple[int, int]] = []
            i, j = self._keys[key]
            s = self.dataset.samples[i]
            rec = s.rows[j]
            state = self.lesions.get(key)
            if state is None:
                key_mask, box, shape = self._key_mask(key)
                state = self.lesions[key] = {"stopped": [False, False], "slices": {s.key: crop_mask(key_mask)},
                                             "box": box, "shape": list(shape), "key_slice": s.key}
            first, last = rec.slice_range
            for d, direction in enumerate((1, -1)):
                for _ in range(c.slices_per_round):
                    if state["stopped"][d]:
                        break
                    ns = [n for n in state["slices"] if (n - s.key) * direction >= 0]
                    prev_n = max(ns, key=lambda n: (n - s.key) * direction)
                    n = prev_n + direction
                    if n < first or n > last:
                        state["stopped"][d] = True
                        counts["end_of_range"] += 1
                        break
                    prev = paste_mask(state["slices"][prev_n], tuple(state["shape"]))
                    bounds = grown_box(state["box"], c.box_margin, prev.shape)
                    got = candidate(s.series, n, rec, state["box"], prev, bounds)
                    if got is None:
                        state["stopped"][d] = True
                        counts["unreadable"] += 1
                        break
                    image, pred = got
                    mid = image.shape[0] // 2
                    if c.source == "grabcut" and not pred.any():
                        mask, why = None, "ended"
                    else:
                        mask, why = accept_mask(pred, prev, state["box"], c)
                    if mask is not None and c.min_contrast > 0:
                        prev_image = read(s.series, prev_n, rec)
                        if prev_image is not None and not looks_like(image[mid], mask, prev_image[mid], prev,
                                                                     c.min_contrast):
                            mask, why = None, "low_contrast"
                    if mask is not None and c.refine == "grabcut":
                        mask, why = accept_mask(refine_grabcut(image[mid], mask, bounds), prev,
                                                state["box"], c)
                    counts[why] += 1
                    if mask is None:
                        state["stopped"][d] = True
                        break
                    state["slices"][n] = crop_mask(mask)
                    accepted.append((n, prev_n))
            return counts, accepted

        # lesions are independent and GrabCut releases the GIL: threads extend several, gathered in key order
        keys = sorted(self._keys)
        workers = self.threads() if c.source == "grabcut" else 1
        if workers > 1:
            with ThreadPoolExecutor(min(workers, len(keys) or 1)) as pool:
                results = list(pool.map(extend, keys))
        else:
            results = [extend(key) for key in keys]
        counts: Counter[str] = Counter()
        montage: list[dict[str, Any]] = []
        for key, (got, accepted) in zip(keys, results):
            counts.update(got)
            st, s = self.lesions[key], self.dataset.samples[self._keys[key][0]]
            shape = tuple(st["shape"])
            for n, prev_n in accepted[: max(c.montage - len(montage), 0)]:
                montage.append({"image": images[s.series, n], "mask": paste_mask(st["slices"][n], shape),
                                "prev": paste_mask(st["slices"][prev_n], shape), "title": f"{s.series} #{n}"})
        images.clear()  # the slices read (the montage keeps its few) before the accepted ones are cached
        net.train(was_training)
        self.round += 1
        slices = self.rebuild(trainer)
        masks = sum(len(v["slices"]) - 1 for v in self.lesions.values())
        out = {"round": self.round, "accepted": counts["accepted"], "propagated_slices": slices,
               "propagated_masks": masks, "seconds": int(time.monotonic() - t0),
               **{f"rejected_{k}": v for k, v in counts.items() if k != "accepted"}}
        trainer.tracker.log_metrics({f"propagate/{k}": float(v) for k, v in out.items()}, trainer.step)
        if montage and trainer.rank == 0:
            path = save_montage(montage, trainer.run_dir / "propagate" / f"round_{self.round}.png",
                                f"propagation round {self.round}: {counts['accepted']} accepted")
            trainer.tracker.log_artifact(path, "propagate")
        log.info("propagation round %d: %s", self.round, dict(out))
        return out

    def items(self) -> list[tuple[str, int, Any, np.ndarray]]:
        """The accepted non-key slices as ``PropagatedSlices`` items (lesions of one slice share its map)."""
        slices: dict[tuple[str, int], tuple[Any, np.ndarray]] = {}
        for key in sorted(self.lesions):
            st = self.lesions[key]
            i, j = self._keys[key]
            s = self.dataset.samples[i]
            for n in sorted(st["slices"]):
                if n == st["key_slice"]:
                    continue
                rec, inst = slices.setdefault((s.series, n), (s.rows[j], np.zeros(tuple(st["shape"]), np.int32)))
                inst[paste_mask(st["slices"][n], inst.shape)] = int(inst.max()) + 1
        return [(se, n, rec, inst) for (se, n), (rec, inst) in sorted(slices.items(), key=lambda kv: kv[0])]

    def rebuild(self, trainer: Any) -> int:
        """The training set = the key slices (and negatives) + the accepted slices (+ any hard negatives,
        :func:`~medseg.training.trainset.assemble`). Returns the number of accepted slices in it."""
        self.extra = cached(trainer, PropagatedSlices(self.dataset, self.items()), self.threads())
        assemble(trainer, self.base)
        return len(self.extra)


def crop_mask(mask: np.ndarray) -> list[Any]:
    """A bool mask as ``[y0, x0, uint8 tensor of its bounding box]`` (small in a checkpoint)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0, 0, torch.zeros((0, 0), dtype=torch.uint8)]
    y0, x0 = int(ys.min()), int(xs.min())
    return [y0, x0, torch.from_numpy(mask[y0: ys.max() + 1, x0: xs.max() + 1].astype(np.uint8))]


def paste_mask(crop: list[Any], shape: tuple[int, int]) -> np.ndarray:
    """The inverse of :func:`crop_mask`."""
    y0, x0, t = crop
    out = np.zeros(shape, bool)
    arr = t.numpy().astype(bool) if isinstance(t, torch.Tensor) else np.asarray(t, bool)
    out[y0: y0 + arr.shape[0], x0: x0 + arr.shape[1]] = arr
    return out


def save_montage(items: list[dict[str, Any]], path: Path, title: str) -> Path:
    """A PNG grid of accepted slices: the middle channel, the previous slice's mask (green, dashed) and
    the accepted one (red)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(4, len(items))
    rows = (len(items) + cols - 1) // cols
    fig = Figure(figsize=(3 * cols, 3 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, it in zip(axes.ravel(), items):
        img = it["image"][it["image"].shape[0] // 2]
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.contour(it["prev"], levels=[0.5], colors="lime", linewidths=1, linestyles="dashed")
        ax.contour(it["mask"], levels=[0.5], colors="red", linewidths=1)
        ax.set_title(it["title"], fontsize=8)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
