"""``medseg calibrate``: choose the operating point on the validation split and store it with the model.

On data with true masks on every slice the point is chosen on the volume protocol
(:mod:`medseg.evaluation.volume`: whole series, as ``medseg predict`` runs; a whole-series
false-positive rate differs from a key-slice one), else on the key slices.

The model predicts every validation slice once; then each candidate operating point
(``calibration.thresholds`` × ``calibration.min_object_mm2``, and hysteresis with each of
``calibration.low_thresholds`` below a threshold) is applied to the kept logits by the
same :func:`medseg.inference.postprocess` that validation, ``medseg evaluate`` and the
``Predictor`` use, and scored with the run's metric suite. The best point by
``calibration.metric`` is written into the checkpoint (``operating_point`` and the stored config's
``inference.threshold`` / ``min_object_mm2`` / ``low_threshold``) and into the run folder's ``config.yaml``.
The test split is never looked at.

Example:
    >>> result = calibrate(load_config("pipelines/quickstart.yaml"), "outputs/quickstart/unet-20261130-101500")
    >>> result["threshold"], result["min_object_mm2"]
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from medseg.config import Config, ConfigError
from medseg.data import build_dataset
from medseg.data.loading import TransformedDataset
from medseg.data.windowing import model_window_rule
from medseg.evaluation.evaluate import eval_loader, eval_target, validation_metric_names
from medseg.evaluation.volume import predicted_volumes, resolve_protocol, score_volumes
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import predict_logits
from medseg.io import atomic_torch_save, atomic_write_text
from medseg.metrics import MetricSuite
from medseg.metrics.em import SegmentationErrors
from medseg.metrics.volume import VOLUME_PREFIX, volume_metric_names
from medseg.models.checkpoint import load_model, read_checkpoint
from medseg.runtime import TrainingError, resolve_device
from medseg.tracking import Tracker, reopened_run

log = logging.getLogger("medseg.calibration")

__all__ = ["calibrate", "checkpoint_path", "volume_metric"]

#: the split an operating point is chosen on (never test)
SPLIT = "val"


def checkpoint_path(ref: str | Path) -> Path:
    """The checkpoint file a model reference names (a run folder → its best, else last, checkpoint)."""
    p = Path(ref)
    if str(ref).startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        raise TrainingError(f"{ref}: calibrate needs a checkpoint file or a run folder (it stores the "
                            "operating point in the checkpoint)")
    if p.is_dir():
        for cand in ("checkpoints/best.pt", "checkpoints/last.pt", "best.pt", "last.pt"):
            if (p / cand).is_file():
                return p / cand
        raise TrainingError(f"{ref}: no checkpoints/best.pt or checkpoints/last.pt in this folder")
    if not p.is_file():
        raise TrainingError(f"--model {ref}: not a checkpoint file or a run folder")
    return p


#: one candidate operating point: (thresholds or None = argmax, min size mm², hysteresis low thresholds or None)
Candidate = tuple[list[float] | None, float, list[float] | None]


def _candidates(cfg: Config) -> list[Candidate]:
    """Every (thresholds, min size, low thresholds) to try; thresholds None = argmax (the CRF: its own labels).

    Each of ``calibration.low_thresholds`` is tried with every larger threshold of the grid (hysteresis,
    :func:`medseg.inference.postprocess.keep_seeded`), beside the plain thresholds.
    """
    k = cfg.data.num_classes
    c = cfg.calibration
    thresholds: list[list[float] | None] = [[float(t)] * (k - 1) for t in c.thresholds]
    crf = cfg.inference.crf.enabled
    if crf or not thresholds:
        thresholds = [None]  # the CRF decides the labels; only the size filter is calibrated
    sizes = [float(m) for m in c.min_object_mm2] or [0.0]
    lows: list[float | None] = [None] + ([] if crf else [float(lo) for lo in c.low_thresholds])
    return [(t, m, None if lo is None else [lo] * (k - 1)) for t in thresholds for lo in lows for m in sizes
            if lo is None or (t is not None and lo < t[0])]


def grid_edge(threshold: list[float] | None, grid: list[float]) -> str | None:
    """``"smallest"`` / ``"largest"`` when the chosen threshold is at that end of a grid of 3+ values, else None.

    A best value at the end of the grid means the search stopped short: the optimum may lie beyond.
    """
    if not threshold or len(grid) < 3:
        return None
    t = threshold[0]
    return "smallest" if t <= min(grid) else "largest" if t >= max(grid) else None


def _better(a: float, b: float | None, mode: str) -> bool:
    if not math.isfinite(a):
        return False
    return b is None or (a < b if mode == "min" else a > b)


@torch.no_grad()
def calibrate(cfg: Config, model_ref: str | Path, tracker: Tracker | None = None, write: bool = True) -> dict[str, Any]:
    """Choose the operating point on the validation split; store it with the model (``write``).

    Args:
        cfg: the pipeline config (data, transforms, inference, metrics, calibration).
        model_ref: a checkpoint file or a ``medseg train`` run folder.
        tracker: also log the chosen point and its validation score (e.g. into the training run).
        write: store the point in the checkpoint and the run folder's ``config.yaml``.

    Where the volume protocol runs (``evaluation.protocol``; ``auto``: true masks on every slice) the
    point is chosen on it — every slice of each validation series, as ``medseg predict`` runs — with
    the volume counterpart of ``calibration.metric`` (:func:`volume_metric`).

    Returns:
        ``{"threshold", "min_object_mm2", "low_threshold", "metric", "protocol", "max_fp", "fp_key", "score",
        "argmax_score", "grid", "checkpoint", "at_grid_edge"}``; ``grid`` holds one ``{"threshold",
        "min_object_mm2", "low_threshold", <metric>, <fp_key>}`` row per candidate (``fp_key``: false-positive components per series on volumes, per
        image on key slices; ``calibration.max_fp`` limits the points chosen); ``at_grid_edge`` is true
        (and a warning is logged) when the chosen threshold is the grid's smallest or largest value.
    """
    c = cfg.calibration
    names = [n for n in validation_metric_names(cfg) if n != "loss"]
    if c.metric not in names + volume_metric_names():
        raise ConfigError(f"calibration.metric = {c.metric!r} is not a validation metric; choose one of "
                          f"{', '.join(names)} (or a volume-protocol key: {', '.join(volume_metric_names())})")
    ckpt_path = checkpoint_path(model_ref)
    device = resolve_device(cfg.train.device)
    model, info = load_model(ckpt_path, device)
    cfg = copy.deepcopy(cfg)
    cfg.data, note = model_window_rule(cfg.data, info.get("config"))  # the model's window rule, as evaluate / predict
    if note:
        log.warning("%s", note)
    base = build_dataset(cfg.data, SPLIT)
    metric, volumes = volume_metric(cfg, base)
    if volumes:  # the operating point chosen on every slice of each series, as predict runs
        kept_volumes = list(predicted_volumes(model, base, cfg, device, progress=f"calibrate {SPLIT} volumes",
                                              compact=True))
        if not kept_volumes:
            raise TrainingError(f"calibrate: the {SPLIT} split has no volumes")
    else:
        kept = _key_slice_logits(model, base, cfg, device)

    def score(threshold: list[float] | None, min_mm2: float, low: list[float] | None = None) -> dict[str, float]:
        trial = copy.deepcopy(cfg)
        trial.inference.threshold, trial.inference.min_object_mm2 = (threshold or []), min_mm2
        trial.inference.low_threshold = low or []
        if volumes:
            trial.metrics.froc = "froc" in metric  # 3-D FROC candidates only when they are the target
            return score_volumes(kept_volumes, trial).metrics
        suite = MetricSuite.from_config(cfg.metrics, cfg.data.num_classes)
        errors = SegmentationErrors.from_config(cfg.metrics)
        for b in kept:
            pred = postprocess(b["logits"], b["image"], trial, b["spacing"])
            suite.update(pred, b["target"], b["inst"], b["spacing"], b["meta"])
            if errors is not None:
                errors.update(pred, b["target"], b["inst"])
        return {**suite.compute(), **(errors.compute() if errors is not None else {})}

    argmax = score(None, 0.0).get(metric, math.nan)
    fp_key = "vol_fp_per_volume" if volumes else "fp_per_image"
    grid: list[dict[str, Any]] = []
    best: Candidate = (None, 0.0, None)
    best_value: float | None = None
    for threshold, min_mm2, low in _candidates(cfg):
        res = score(threshold, min_mm2, low)
        value, fp = res.get(metric, math.nan), res.get(fp_key, math.nan)
        grid.append({"threshold": threshold, "min_object_mm2": min_mm2, "low_threshold": low, metric: value,
                     fp_key: fp})
        if c.max_fp is not None and not fp <= c.max_fp:  # above the limit (or not measured): not a candidate
            continue
        if _better(value, best_value, c.mode):
            best, best_value = (threshold, min_mm2, low), value
    if c.max_fp is not None and best_value is None:
        row = min(grid, key=lambda r: r[fp_key] if math.isfinite(r[fp_key]) else math.inf)
        best, best_value = (row["threshold"], row["min_object_mm2"], row["low_threshold"]), row[metric]
        log.warning("calibrate: no point of the grid has at most calibration.max_fp = %g %s; the one with the "
                    "fewest (%.2f) is chosen — add larger thresholds or minimum sizes to the grid, or raise the "
                    "limit", c.max_fp, fp_key, row[fp_key])
    threshold, min_mm2, low = best
    result = {"threshold": threshold or [], "min_object_mm2": min_mm2, "low_threshold": low or [],
              "metric": metric, "split": SPLIT,
              "protocol": "volume" if volumes else "key", "max_fp": c.max_fp, "fp_key": fp_key,
              "score": best_value, "argmax_score": argmax, "grid": grid, "checkpoint": str(ckpt_path)}
    log.info("operating point on %s (%s protocol): threshold %s, low threshold %s, min object %.1f mm² → %s %.4f "
             "(argmax %.4f)", SPLIT, result["protocol"], result["threshold"], result["low_threshold"] or "-", min_mm2,
             metric,
             best_value if best_value is not None else math.nan, argmax)
    edge = grid_edge(threshold, [float(t) for t in c.thresholds])
    result["at_grid_edge"] = edge is not None
    if edge is not None:
        log.warning("calibrate: the best threshold %g is the %s value of calibration.thresholds %s — the best "
                    "operating point may lie beyond it: widen the grid (--set calibration.thresholds=[...]) "
                    "and calibrate again", threshold[0] if threshold else math.nan, edge, list(c.thresholds))
    if write:
        store_operating_point(ckpt_path, result)
    if tracker is not None:
        tracker.log_metrics({f"calibration/{metric}": best_value if best_value is not None else math.nan,
                             f"calibration/{metric}_argmax": argmax,
                             "calibration/min_object_mm2": min_mm2,
                             **{f"calibration/threshold_class_{i + 1}": t for i, t in enumerate(result["threshold"])},
                             **{f"calibration/low_threshold_class_{i + 1}": t
                                for i, t in enumerate(result["low_threshold"])}}, 0)
    return result


def volume_metric(cfg: Config, dataset: Any) -> tuple[str, bool]:
    """``(metric, on volumes)``: what calibration optimises, and whether on the volume protocol.

    The volume protocol is used when ``evaluation.protocol`` runs it on ``dataset`` (``auto``: where true
    masks exist on every slice) and ``calibration.metric`` has a volume counterpart: a ``vol_*`` key
    itself, else ``vol_<metric>`` (``lesion_dice`` → ``vol_lesion_dice``, ``dice`` → ``vol_dice``).
    Otherwise the key-slice protocol and ``calibration.metric`` as it is.

    Raises:
        ConfigError: a ``vol_*`` metric where the volume protocol does not run.
    """
    metric = cfg.calibration.metric
    _, use_volume = resolve_protocol(cfg.evaluation.protocol, dataset)
    counterpart = metric if metric.startswith(VOLUME_PREFIX) else VOLUME_PREFIX + metric
    if use_volume and counterpart in volume_metric_names():
        return counterpart, True
    if metric.startswith(VOLUME_PREFIX):
        raise ConfigError(f"calibration.metric = {metric}: the volume protocol does not run on this data "
                          f"(evaluation.protocol = {cfg.evaluation.protocol}; it needs true masks on every slice)")
    if use_volume:
        log.warning("calibrate: %s has no volume-protocol counterpart; choosing the operating point on key slices",
                    metric)
    return metric, False


def _key_slice_logits(model: torch.nn.Module, base: Any, cfg: Config, device: torch.device) -> list[dict[str, Any]]:
    """The key-slice protocol's logits of every batch of the split, with what scoring needs."""
    from medseg.transforms import build_transforms

    dataset = TransformedDataset(base, build_transforms(cfg.transforms, train=False), cfg.train.seed)
    kept: list[dict[str, Any]] = []
    for groups in eval_loader(dataset, cfg):
        for batch in groups:
            target, inst = eval_target(batch)
            kept.append({"logits": predict_logits(model, batch["image"], cfg, device).cpu(), "image": batch["image"],
                         "target": target, "inst": inst, "meta": batch["meta"],
                         "spacing": [m["spacing"] for m in batch["meta"]]})
    if not kept:
        raise TrainingError(f"calibrate: the {SPLIT} split has no readable samples")
    return kept


def store_operating_point(ckpt_path: Path, result: dict[str, Any]) -> None:
    """Write the operating point into the checkpoint and, in a run folder, into its ``config.yaml``."""
    ckpt = read_checkpoint(ckpt_path)
    point = {k: result[k] for k in ("threshold", "min_object_mm2", "metric", "split", "score", "argmax_score")}
    point["protocol"] = result.get("protocol", "key")
    point["low_threshold"] = list(result.get("low_threshold") or [])
    ckpt["operating_point"] = point
    stored = {k: point[k] for k in ("threshold", "min_object_mm2", "low_threshold")}
    ckpt["config"].setdefault("inference", {}).update(stored)
    atomic_torch_save(ckpt, ckpt_path)
    run_cfg = ckpt_path.parent.parent / "config.yaml"
    if ckpt_path.parent.name == "checkpoints" and run_cfg.is_file():
        data = yaml.safe_load(run_cfg.read_text()) or {}
        data.setdefault("inference", {}).update(stored)
        atomic_write_text(run_cfg, yaml.safe_dump(data, sort_keys=False))


def calibrate_run(cfg: Config, ckpt: Path, run_dir: Path, run_id: str | None, tracker: Tracker) -> dict[str, Any]:
    """After training: calibrate ``ckpt`` into the training run (its MLflow run gets the point and config)."""
    with reopened_run(tracker, run_id):
        result = calibrate(cfg, ckpt, tracker=tracker)
        tracker.log_artifact(run_dir / "config.yaml", "config")  # the logged config carries the point too
    return result
