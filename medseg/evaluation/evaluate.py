"""Evaluation: one loop — predict → post-process → score — for validation and ``medseg evaluate``.

:func:`evaluate_loader` runs a model over a loader of whole slices in batches
(``evaluation.batch_size``; slices of different sizes go in separate batches, never padded, so a
batched evaluation equals a one-at-a-time one) and scores it with the :class:`~medseg.metrics.MetricSuite`
the ``metrics`` config section states, through :class:`~medseg.metrics.suite.EvaluationSuite`: the
whole-slice metrics, the lesion-ROI protocol and FROC (from the foreground probabilities of
:func:`~medseg.inference.foreground_probability`), and on request bootstrap confidence intervals.
Under DDP each rank scores its own shard (no sample repeated) and the confusion matrix, boundary
distances, lesion rows, candidates and losses are combined across ranks.

:func:`evaluate` is what ``medseg evaluate`` runs: a trained model on a split, with intervals, the
per-lesion table (CSV, and in MLflow as a table), the plots of :mod:`medseg.evaluation.plots`, optionally
every predicted mask written on its source slice's grid. :func:`format_report` is its printout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medseg.config import Config, ConfigError
from medseg.data import build_dataset
from medseg.data.base import to_source_grid
from medseg.data.loading import ShardSampler, TransformedDataset, make_loader
from medseg.data.windowing import annotation_window_warning, model_window_rule
from medseg.evaluation.volume import evaluate_volumes, resolve_protocol
from medseg.inference.postprocess import postprocess, resolve_operating_point
from medseg.inference.predictor import foreground_probability, predict_logits
from medseg.io import atomic_write_bytes, write_rows_csv
from medseg.metrics import FROC_FP_RATES, froc_key, metric_names
from medseg.metrics.em import ERROR_NAMES, SegmentationErrors
from medseg.metrics.suite import EvaluationSuite, Intervals
from medseg.models.checkpoint import load_model
from medseg.runtime import TrainingError, gather_objects, resolve_device
from medseg.tracking import Tracker, reopened_run

log = logging.getLogger("medseg.evaluation")

__all__ = ["EvalResult", "check_monitor", "eval_loader", "eval_target", "evaluate", "evaluate_after_training",
           "evaluate_loader", "format_report", "log_volume_protocol", "validation_metric_names"]

#: a callback that sees each batch and its predicted class maps (e.g. to write them)
OnPrediction = Callable[[dict[str, Any], torch.Tensor], None]


@dataclass
class EvalResult:
    """What :func:`evaluate_loader` returns."""

    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    n: int
    examples: list[dict[str, Any]] = field(default_factory=list)
    #: the bootstrap intervals (also in ``metrics`` as ``<key>_ci_low`` / ``_ci_high``), when asked for
    intervals: Intervals | None = None
    #: ``(FP per image, sensitivity)`` of the FROC curve
    froc: tuple[np.ndarray, np.ndarray] | None = None
    #: crops of the lowest-ROI-Dice lesions, when asked for
    worst: list[dict[str, Any]] = field(default_factory=list)


def validation_metric_names(cfg: Config) -> list[str]:
    """Every key validation can report: the metric suite's keys and ``loss``."""
    m = cfg.metrics
    errors = list(ERROR_NAMES) if m.segmentation_errors else []
    return [*metric_names(cfg.data.num_classes, m.lesion_metrics, m.roi_protocol, m.froc), *errors, "loss"]


def check_monitor(cfg: Config) -> None:
    """Raise :class:`ConfigError` when ``train.monitor`` is not a key validation can report."""
    names = validation_metric_names(cfg)
    if cfg.train.monitor not in names:
        raise ConfigError(f"train.monitor = {cfg.train.monitor!r} is not a validation metric; choose one of "
                          f"{', '.join(names)} (and set train.monitor_mode: min for losses and distances)")


def eval_target(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class map and instance map to score against: the true masks when present, else the label."""
    if "truth" in batch:
        inst = batch["truth"][:, 0]
        return (inst > 0).long(), inst
    inst = batch["instance"][:, 0] if "instance" in batch else None
    return batch["label"][:, 0], inst


def eval_loader(dataset: TransformedDataset, cfg: Config, rank: int = 0, world: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """The loader :func:`evaluate_loader` expects: this rank's shard, batches grouped by image shape."""
    return make_loader(dataset, cfg.train, ShardSampler(len(dataset), rank, world), cfg.evaluation.batch_size,
                       pin_memory=pin_memory, by_shape=True)


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader: DataLoader,
    cfg: Config,
    device: torch.device,
    loss_fn: nn.Module | None = None,
    overlay_count: int = 0,
    on_prediction: OnPrediction | None = None,
    progress: str | None = None,
    intervals: bool = False,
    worst_lesions: int = 0,
) -> EvalResult:
    """Predict, post-process and score every sample of ``loader`` (built by :func:`eval_loader`).

    Args:
        model: the network (put in eval mode here; its previous mode is restored).
        loader: yields lists of same-shape batches (``collate_by_shape``); a sampler with
            ``world > 1`` (this rank's shard) makes the ranks combine their results.
        cfg: ``inference`` (how to predict), ``metrics`` (the protocol), ``data.num_classes``.
        device: where the model runs.
        loss_fn: also report ``loss``, the mean over samples of the per-sample loss.
        overlay_count: keep this many ``{image, truth, pred, title}`` examples (for overlay grids).
        on_prediction: called with each batch and its class maps ``(B, H, W)`` (CPU).
        progress: a progress-bar label (None = no bar).
        intervals: add bootstrap confidence intervals (``metrics.bootstrap_*``) to the headline metrics.
        worst_lesions: keep crops of this many lowest-ROI-Dice lesions.

    Returns:
        The metrics (combined across DDP ranks), the per-lesion rows, the sample count, examples,
        the intervals, the FROC curve and the worst-lesion crops.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    suite = EvaluationSuite(cfg.metrics, cfg.data.num_classes, keep_worst=worst_lesions)
    errors = SegmentationErrors.from_config(cfg.metrics)  # pixel / Rand error (EM), when asked for
    losses: list[float] = []
    examples: list[dict[str, Any]] = []
    n = 0
    bar = tqdm(total=len(loader.sampler), desc=progress, unit="slice", dynamic_ncols=True,  # type: ignore[arg-type]
               disable=progress is None)
    for groups in loader:
        for batch in groups:
            image = batch["image"]
            spacing = [m["spacing"] for m in batch["meta"]]
            logits = predict_logits(model, image, cfg, device)
            pred = postprocess(logits, image, cfg, spacing).cpu()
            prob = foreground_probability(logits).cpu() if suite.needs_probabilities else None
            if loss_fn is not None:
                label = batch["label"].to(device)
                w = batch.get("weight")
                w = w.to(device) if w is not None else None
                # one sample at a time: a batch Dice term is not the mean of per-sample ones
                losses += [float(loss_fn(logits[b : b + 1], label[b : b + 1], w[b : b + 1] if w is not None else None))
                           for b in range(len(image))]
            target, inst = eval_target(batch)
            suite.update(pred, target, inst, spacing, batch["meta"], fg_prob=prob,
                         image=image if worst_lesions else None)
            if errors is not None:
                errors.update(pred, target, inst)
            for b in range(min(len(image), overlay_count - len(examples))):
                examples.append({"image": image[b].numpy(), "truth": target[b].numpy(), "pred": pred[b].numpy(),
                                 "title": batch["meta"][b].get("id", "")})
            if on_prediction is not None:
                on_prediction(batch, pred)
            n += len(image)
            bar.update(len(image))
        bar.update(0)
    bar.close()
    model.train(was_training)
    parts = [(n, losses)]
    if getattr(loader.sampler, "world", 1) > 1:  # one rank's shard: combine (not when rank 0 evaluates alone)
        suite.reduce_across_ranks()
        if errors is not None:
            errors.reduce_across_ranks()
        parts = gather_objects((n, losses))
    n = sum(p[0] for p in parts)
    if n == 0:
        return EvalResult({}, [], 0, examples)
    metrics = suite.compute()
    if errors is not None:
        metrics.update(errors.compute())
    ci = suite.intervals(metrics) if intervals else None
    if ci is not None:
        metrics.update(ci.as_metrics())
    if loss_fn is not None:
        all_losses = [v for p in parts for v in p[1]]
        metrics["loss"] = float(np.mean(all_losses)) if all_losses else float("nan")
    return EvalResult(metrics, suite.lesion_rows(), n, examples, ci, suite.froc_points(), suite.worst_lesions())


def _prediction_writer(out_dir: Path) -> OnPrediction:
    """Write each predicted class map as a PNG on its source slice's grid (atomically).

    ``DIR/<series>/<slice>.png`` for DeepLesion, ``DIR/<id>.png`` otherwise.
    """
    import cv2

    def write(batch: dict[str, Any], pred: torch.Tensor) -> None:
        for b, meta in enumerate(batch["meta"]):
            if "series" in meta and "slice" in meta:
                dest = out_dir / str(meta["series"]) / f"{int(meta['slice']):03d}.png"
            else:
                dest = out_dir / f"{meta['id']}.png"
            mask = to_source_grid(pred[b].numpy(), meta)
            ok, png = cv2.imencode(".png", mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16))
            if not ok:
                raise TrainingError(f"{dest}: could not encode the predicted mask as PNG")
            atomic_write_bytes(dest, png.tobytes())

    return write


def evaluate(
    cfg: Config,
    model_ref: str | Path,
    split: str = "test",
    save_predictions: str | Path | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Score a trained model on a split; optionally write each predicted key-slice mask as PNG.

    Predictions go to ``DIR/<series>/<slice>.png`` for DeepLesion (``DIR/<id>.png`` otherwise; the
    volume protocol's, every slice, to ``DIR/volumes/<series>/<slice>.png``),
    0 = background, 1 = lesion (class ids for K > 2), on the source slice's pixel grid (a model
    trained at ``data.spacing_mm`` predicts on the resampled grid; the mask is mapped back).
    Per-lesion rows go to ``<DIR or output_dir>/lesions_<split>.csv``.

    ``evaluation.protocol`` chooses the key-slice protocol, the volume protocol (every slice of each
    series, :mod:`medseg.evaluation.volume`: ``vol_*`` metrics, ``volume_lesions_<split>.csv``,
    ``volume_slices_<split>.csv``) or both (``auto``: both where true masks exist on every slice).

    The metrics carry bootstrap intervals (``<key>_ci_low`` / ``_ci_high``, see
    :class:`~medseg.metrics.suite.EvaluationSuite`); with ``evaluation.plots`` the PNG plots of
    :func:`medseg.evaluation.plots.save_evaluation_plots` go beside the CSV (``froc_<split>.png``, …).
    With a tracker: the metrics as ``<split>/<key>``, the tag ``medseg.<split>.ci_unit``, the
    per-lesion CSV and table (``evaluation/lesions_<split>.csv`` / ``.json``, the latter through
    ``mlflow.log_table``) and the plots (``evaluation/plots/``).

    Returns:
        ``{"metrics": {...}, "lesions_csv": path, "predictions": dir or None, "n": samples,
        "model": source, "intervals": {unit, n_units, n_resamples, seed, level} or None, "plots": [paths]}``.
    """
    from medseg.transforms import build_transforms

    device = resolve_device(cfg.train.device)
    model, info = load_model(model_ref, device)
    cfg = resolve_operating_point(cfg, info.get("config"))  # the model's calibrated point unless set
    cfg.data, note = model_window_rule(cfg.data, info.get("config"))  # the model's window rule, as predict
    for line in (note, annotation_window_warning(cfg.data)):
        if line:
            log.warning("%s", line)
    base = build_dataset(cfg.data, split)
    use_key, use_volume = resolve_protocol(cfg.evaluation.protocol, base)
    dataset = TransformedDataset(base, build_transforms(cfg.transforms, train=False), cfg.train.seed)
    out_dir = Path(save_predictions) if save_predictions else None
    plots = cfg.evaluation.plots
    result = EvalResult({}, [], 0)
    if use_key:
        loader = eval_loader(dataset, cfg, pin_memory=device.type == "cuda")
        result = evaluate_loader(model, loader, cfg, device,
                                 on_prediction=_prediction_writer(out_dir) if out_dir else None,
                                 progress=f"evaluate {split}", intervals=True,
                                 worst_lesions=cfg.evaluation.worst_lesions if plots else 0)
        if result.n == 0:
            raise TrainingError(f"no readable samples in split {split!r}")
    report_dir = out_dir or Path(cfg.output_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    lesions_csv = report_dir / f"lesions_{split}.csv"
    write_rows_csv(result.rows, lesions_csv)
    volume = (log_volume_protocol(model, base, cfg, device, split, report_dir, tracker,
                                  save_dir=out_dir / "volumes" if out_dir else None) if use_volume else None)
    if volume is not None:
        result.metrics.update(volume["metrics"])
    plot_paths: list[Path] = []
    if plots and use_key:
        from medseg.evaluation.plots import save_evaluation_plots

        plot_paths = save_evaluation_plots(result.rows, report_dir, froc=result.froc, worst=result.worst,
                                           title=f"{cfg.name} · {split}", suffix=f"_{split}")
    ci = result.intervals
    if tracker is not None:
        tracker.log_metrics({f"{split}/{k}": v for k, v in result.metrics.items()}, 0)
        tracker.set_tags({f"medseg.{split}.protocol": "+".join(p for p, on in (("key", use_key),
                                                                                ("volume", use_volume)) if on)})
        if ci is not None:
            tracker.set_tags({f"medseg.{split}.ci_unit": ci.unit, f"medseg.{split}.ci": ci.describe()})
        tracker.log_artifact(lesions_csv, "evaluation")
        if result.rows:
            tracker.log_table(result.rows, f"evaluation/lesions_{split}.json")
        for path in plot_paths:
            tracker.log_artifact(path, "evaluation/plots")
    return {"metrics": result.metrics, "lesions_csv": str(lesions_csv),
            "protocol": [p for p, on in (("key", use_key), ("volume", use_volume)) if on],
            "volume": {k: v for k, v in volume.items() if k != "metrics"} if volume is not None else None,
            "predictions": str(out_dir) if out_dir else None, "n": result.n, "model": info.get("source"),
            "intervals": ({"unit": ci.unit, "n_units": ci.n_units, "n_resamples": ci.n_resamples, "seed": ci.seed,
                           "level": ci.level} if ci is not None else None),
            "plots": [str(p) for p in plot_paths]}


def log_volume_protocol(model: nn.Module, dataset: Any, cfg: Config, device: torch.device, split: str,
                        report_dir: Path, tracker: Tracker | None, save_dir: Path | None = None) -> dict[str, Any]:
    """Run the volume protocol (:mod:`medseg.evaluation.volume`); write and log its tables.

    ``save_dir``: also write every slice's class map there (``<series>/<slice>.png``).

    ``volume_lesions_<split>.csv`` (one row per true lesion, 3-D Dice) and ``volume_slices_<split>.csv``
    (one row per slice) go to ``report_dir`` and, with a tracker, to ``evaluation/`` (the lesion rows
    also as the MLflow table ``evaluation/volume_lesions_<split>.json``).
    """
    res = evaluate_volumes(model, dataset, cfg, device, progress=f"evaluate {split} volumes", intervals=True,
                           save_dir=save_dir)
    if res.n_volumes == 0:
        raise TrainingError(f"no volumes in split {split!r}")
    lesions_csv, slices_csv = report_dir / f"volume_lesions_{split}.csv", report_dir / f"volume_slices_{split}.csv"
    write_rows_csv(res.rows, lesions_csv)
    write_rows_csv(res.slice_rows, slices_csv)
    if tracker is not None:
        tracker.log_artifact(lesions_csv, "evaluation")
        tracker.log_artifact(slices_csv, "evaluation")
        if res.rows:
            tracker.log_table(res.rows, f"evaluation/volume_lesions_{split}.json")
    return {"metrics": res.metrics, "lesions_csv": str(lesions_csv), "slices_csv": str(slices_csv),
            "n_volumes": res.n_volumes}


#: the report's sections: (title, keys in order)
_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("whole slice: pixels", ("dice", "miou", "hd95", "surface_dice")),
    ("whole slice: lesions (matched components)", ("lesion_count", "lesion_dice", "lesion_sensitivity",
                                                    "fp_per_image", "lesion_hd95", "diameter_error_mm",
                                                    "short_axis_error_mm", "sape_long",
                                                    "recist_diameter_error_mm")),
    ("lesion ROI (all predicted pixels in the crop)", ("roi_dice", "roi_iou", "roi_hd95", "roi_surface_dice",
                                                       "roi_long_error_mm", "roi_short_error_mm", "roi_sape_long",
                                                       "roi_sape_short", "roi_recist_long_error_mm",
                                                       "roi_recist_short_error_mm", "roi_empty")),
    ("FROC (whole slices)", (*(froc_key(r) for r in FROC_FP_RATES), "froc_sens_mean")),
    ("volume protocol (every slice of each series, lesions matched in 3-D)",
     ("vol_volumes", "vol_lesion_count", "vol_lesion_dice", "vol_lesion_sensitivity", "vol_dice",
      "vol_slice_dice_key", "vol_slice_dice_nonkey", "vol_fp_per_volume", "vol_empty_slices_with_fp",
      *(f"vol_{froc_key(r)}" for r in FROC_FP_RATES), "vol_froc_sens_mean")),
)
#: the keys printed as counts
_COUNTS = ("lesion_count", "roi_empty", "vol_volumes", "vol_lesion_count")


def format_report(metrics: dict[str, float], intervals: dict[str, Any] | Intervals | None = None) -> str:
    """The headline metrics as an aligned text table with their intervals (the ``medseg evaluate`` printout).

    A FROC rate the sweep never reached is printed as "not reached" with where the curve ends.
    """
    width = max(len(k) for _, keys in _SECTIONS for k in keys) + 2
    lines = [f"{'metric':<{width}}{'value':>10}   interval"]
    for title, keys in _SECTIONS:
        body = []
        for k in keys:
            if k in metrics:
                lo, hi = metrics.get(f"{k}_ci_low"), metrics.get(f"{k}_ci_high")
                iv = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
                value = f"{metrics[k]:.0f}" if k in _COUNTS else f"{metrics[k]:.3f}"
                body.append(f"  {k:<{width - 2}}{value:>10}   {iv}".rstrip())
            elif k.startswith(("froc_sens_fp", "vol_froc_sens_fp")):
                pre = "vol_" if k.startswith("vol_") else ""
                if f"{pre}froc_max_fp" in metrics:
                    body.append(f"  {k:<{width - 2}}{'not reached':>10}   (the sweep ends at "
                                f"{metrics[pre + 'froc_max_fp']:.2f} FP/{'volume' if pre else 'image'}, "
                                f"sensitivity {metrics[pre + 'froc_max_sens']:.3f})")
        if body:
            lines += [title, *body]
    if isinstance(intervals, Intervals):
        lines.append(f"interval: {intervals.describe()}")
    elif intervals:
        ci = Intervals(intervals["unit"], intervals["n_units"], intervals["n_resamples"], intervals["seed"],
                       intervals["level"])
        lines.append(f"interval: {ci.describe()}")
    return "\n".join(lines)


def evaluate_after_training(cfg: Config, ref: str | Path, run_dir: Path, run_id: str | None,
                            tracker: Tracker) -> dict[str, Any]:
    """Evaluate a trained model on ``train.evaluate_splits`` into its own MLflow run (``medseg train``'s end).

    Each split's predictions go to ``<run_dir>/predictions_<split>/`` and its result to
    ``<run_dir>/metrics_<split>.json`` (also an artifact). The run is reopened per split and always
    ends again: FINISHED, FAILED or KILLED (:func:`medseg.tracking.reopened_run`).
    """
    import json

    from medseg.io import atomic_write_text

    evaluations: dict[str, Any] = {}
    for split in cfg.train.evaluate_splits:
        with reopened_run(tracker, run_id):
            evaluations[split] = evaluate(cfg, ref, split, save_predictions=run_dir / f"predictions_{split}",
                                          tracker=tracker)
            path = run_dir / f"metrics_{split}.json"
            atomic_write_text(path, json.dumps(evaluations[split], indent=2, default=str))
            tracker.log_artifact(path, "evaluation")
    return evaluations
