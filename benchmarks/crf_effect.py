"""What the fully-connected CRF does to a trained model: the same evaluation with and without it.

The model is scored by :func:`medseg.evaluation.evaluate` twice on one split, once with
``inference.crf.enabled: false`` and once with the DeepLab v2 CRF (the defaults of
:class:`medseg.config.CRFConfig`: 10 iterations, smoothness w = 3, σ_xy = 1, appearance w = 4,
σ_xy = 67, σ_rgb = 3). The appearance kernel's σ_rgb was chosen on 8-bit photographs; a windowed CT
slice (scaled to 0 … 255) has other contrasts, so ``--sweep`` also tries a small grid of
``bilateral_srgb`` × ``bilateral_weight``, picks the best on the *validation* split (choosing on the
split that is reported would flatter the CRF) and reports that setting on the test split next to
the default.

Time per slice is measured in a separate pass: the model's ``predict_logits`` once per slice, then
``argmax`` (no CRF) and the CRF post-processing, each timed; the median over the slices is
reported (model + argmax, model + CRF). Data loading and metric computation are not included.

Everything goes into one MLflow run (tag ``crf_effect=1``): the metrics of each variant as
``no_crf/<key>``, ``crf/<key>``, ``crf_best/<key>``, the table's differences as ``delta/<key>``,
the sweep as ``sweep/srgb<s>_w<w>/<key>``, the per-lesion CSVs and the markdown table.

Usage:
    python benchmarks/crf_effect.py --model outputs/compare/deeplesion_deeplabv2/deeplabv2-20250101-120000
    python benchmarks/crf_effect.py --model path/to/best.pt --data data/demo --split test --sweep
    python benchmarks/crf_effect.py --model runs:/<run_id>/model --config pipelines/quickstart.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

EXPERIMENT = "crf-effect"
#: (header, metric key, format, higher is better) of the table's columns
COLUMNS: tuple[tuple[str, str, str, bool], ...] = (
    ("Dice", "dice", "{:.3f}", True),
    ("lesion Dice", "lesion_dice", "{:.3f}", True),
    ("HD95 (mm)", "hd95", "{:.2f}", False),
    ("surface Dice", "surface_dice", "{:.3f}", True),
    ("diameter error (mm)", "diameter_error_mm", "{:.2f}", False),
    ("ms / slice", "ms_per_slice", "{:.0f}", False),
)
HIGHER_IS_BETTER = {k: hib for _, k, _, hib in COLUMNS}
#: the metrics a sweep point can be chosen by
SWEEP_METRICS = tuple(k for k in HIGHER_IS_BETTER if k != "ms_per_slice")
DEFAULT_SRGB = (3.0, 10.0, 20.0)
#: DeepLab v1 cross-validated the appearance weight in 3 … 5 (and σ_rgb in 3 … 6 on photographs)
DEFAULT_WEIGHTS = (3.0, 4.0, 5.0)

log = logging.getLogger("medseg.benchmarks.crf_effect")


# ----------------------------------------------------------------------------- configuration


def base_config(
    model_ref: str, config: str | None = None, data_root: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """The config dict to evaluate with: ``config`` (a pipeline YAML) or the checkpoint's own.

    Raises:
        ValueError: an MLflow model URI without ``config`` (such a model carries no medseg config).
    """
    from medseg.config import apply_override, load_config, to_dict
    from medseg.models.checkpoint import load_model

    if config is not None:
        data = to_dict(load_config(config))
    else:
        _, info = load_model(model_ref)
        if info.get("config") is None:
            raise ValueError(f"--model {model_ref}: an MLflow model carries no medseg config; pass --config PIPELINE.yaml")
        data = info["config"]
    for ov in overrides or []:
        data = apply_override(data, ov)
    if data_root is not None:
        data = apply_override(data, f"data.root={json.dumps(str(data_root))}")
    return data


def with_crf(data: dict[str, Any], enabled: bool, **params: float) -> Any:
    """A :class:`~medseg.config.Config` from ``data`` with the CRF off, or on with CRFConfig defaults + ``params``."""
    from medseg.config import CRFConfig, from_dict

    crf = dataclasses.asdict(dataclasses.replace(CRFConfig(), enabled=enabled, **params))
    out = json.loads(json.dumps(data))  # a deep copy of plain data
    out.setdefault("inference", {})["crf"] = crf
    return from_dict(out)


# ----------------------------------------------------------------------------- measurements


def slice_times(model_ref: str, cfg_off: Any, cfg_on: Any, split: str, max_slices: int = 20) -> dict[str, float]:
    """Median milliseconds per slice: ``{"no_crf": model + argmax, "crf": model + CRF}``.

    The model runs once per slice; argmax and the CRF each post-process that slice's logits.
    """
    import torch

    from medseg.data import build_dataset, collate
    from medseg.data.loading import TransformedDataset
    from medseg.inference.postprocess import postprocess
    from medseg.inference.predictor import predict_logits
    from medseg.models.checkpoint import load_model
    from medseg.runtime import resolve_device
    from medseg.transforms import build_transforms

    device = resolve_device(cfg_off.train.device)
    model, _ = load_model(model_ref, device)
    data = TransformedDataset(build_dataset(cfg_off.data, split), build_transforms(cfg_off.transforms, train=False),
                              cfg_off.train.seed)
    off: list[float] = []
    on: list[float] = []

    def timed(fn: Any) -> tuple[Any, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    warm = False
    for i in range(min(len(data), max_slices)):
        batch = collate([data[i]])
        if batch is None:
            continue
        if not warm:  # the first call pays one-off allocations
            predict_logits(model, batch["image"], cfg_off, device)
            warm = True
        logits, t_model = timed(lambda b=batch: predict_logits(model, b["image"], cfg_off, device))
        _, t_argmax = timed(lambda b=batch, lg=logits: postprocess(lg, b["image"], cfg_off))
        _, t_crf = timed(lambda b=batch, lg=logits: postprocess(lg, b["image"], cfg_on))
        off.append(t_model + t_argmax)
        on.append(t_model + t_crf)
    if not off:
        raise RuntimeError(f"no readable slices in split {split!r} to time")
    return {"no_crf": 1000 * statistics.median(off), "crf": 1000 * statistics.median(on)}


def _evaluate(cfg: Any, model_ref: str, split: str, out_dir: Path) -> dict[str, Any]:
    """:func:`medseg.evaluation.evaluate` with its per-lesion CSV written under ``out_dir``."""
    from medseg.evaluation.evaluate import evaluate

    cfg = dataclasses.replace(cfg, output_dir=str(out_dir))
    return evaluate(cfg, model_ref, split)


def _tag(srgb: float, weight: float) -> str:
    """The MLflow key part of a sweep point, e.g. ``srgb3_w4``."""
    return f"srgb{srgb:g}_w{weight:g}"


def _better(a: float | None, b: float | None, key: str) -> bool:
    """``a`` beats ``b`` on metric ``key`` (a missing value never wins)."""
    if a is None or not math.isfinite(a):
        return False
    if b is None or not math.isfinite(b):
        return True
    return a > b if HIGHER_IS_BETTER.get(key, True) else a < b


def run_crf_effect(
    model_ref: str,
    split: str = "test",
    data_root: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    output_dir: str | Path = "outputs/compare",
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    sweep: bool = False,
    srgb_values: tuple[float, ...] = DEFAULT_SRGB,
    weight_values: tuple[float, ...] = DEFAULT_WEIGHTS,
    sweep_split: str = "val",
    sweep_metric: str = "dice",
    timing_slices: int = 20,
    track: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model_ref`` without and with the CRF (and optionally sweep it); log to MLflow.

    Args:
        model_ref: checkpoint, run folder or MLflow model URI (then ``config`` is required).
        split: the split reported in the table.
        data_root: ``data.root`` (None = the model's own, from its checkpoint or ``config``).
        config: a pipeline YAML to take data / transforms / inference settings from (None = the
            checkpoint's resolved config).
        overrides: ``key=value`` config overrides.
        output_dir: per-lesion CSVs go to ``<output_dir>/crf_effect/<stamp>/``; the default MLflow store.
        tracking_uri: MLflow URI (None = ``sqlite:///<output_dir>/mlflow.db``).
        experiment: MLflow experiment.
        sweep: also try ``srgb_values`` × ``weight_values`` on ``sweep_split``.
        sweep_metric: the metric that picks the best sweep point (direction from the table's columns).
        timing_slices: slices of ``split`` the time per slice is the median over.
        track: log into MLflow (tag ``crf_effect=1``).

    Returns:
        ``{"rows": {variant: metrics}, "best": (srgb, weight) or None, "sweep": [...], "run_id": ...,
        "markdown": str, "n": slices}``; variants are ``no_crf``, ``crf`` and (with a sweep whose
        best point is not the default) ``crf_best``.
    """
    import torch

    from medseg.config import CRFConfig
    from medseg.data.prepare import prepare_data
    from medseg.tracking import build_tracker

    if sweep_metric not in SWEEP_METRICS:
        raise ValueError(f"--sweep-metric must be one of {', '.join(SWEEP_METRICS)}, got {sweep_metric!r}")
    data = base_config(model_ref, config, data_root, overrides)
    cfg_off = with_crf(data, False)
    cfg_on = with_crf(data, True)
    prepare_data(cfg_off.data)
    if cfg_off.train.threads:
        torch.set_num_threads(cfg_off.train.threads)
    out = Path(output_dir) / "crf_effect" / time.strftime("%Y%m%d-%H%M%S")

    evals = {"no_crf": _evaluate(cfg_off, model_ref, split, out / "no_crf"),
             "crf": _evaluate(cfg_on, model_ref, split, out / "crf")}
    times = slice_times(model_ref, cfg_off, cfg_on, split, timing_slices)

    default = (CRFConfig().bilateral_srgb, CRFConfig().bilateral_weight)
    points: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    if sweep:
        if sweep_split == split:
            log.warning("the sweep picks its best point on the reported split %r: the CRF row is optimistic", split)
        for s in srgb_values:
            for w in weight_values:
                ev = _evaluate(with_crf(data, True, bilateral_srgb=s, bilateral_weight=w), model_ref, sweep_split,
                               out / "sweep" / _tag(s, w))
                points.append({"srgb": s, "weight": w, "metrics": ev["metrics"]})
        # the default holds its place unless a point is strictly better (a tie is no reason to move)
        values = {(p["srgb"], p["weight"]): p["metrics"].get(sweep_metric) for p in points}
        best = default if default in values else next(iter(values))
        for point, value in values.items():
            if _better(value, values[best], sweep_metric):
                best = point
        if best is not None and best != default:
            cfg_best = with_crf(data, True, bilateral_srgb=best[0], bilateral_weight=best[1])
            evals["crf_best"] = _evaluate(cfg_best, model_ref, split, out / "crf_best")
            times["crf_best"] = times["crf"]  # same kernels, same iterations: same cost

    rows = {k: {**ev["metrics"], "ms_per_slice": times[k]} for k, ev in evals.items()}
    md = markdown(rows, split, evals["no_crf"]["n"], model_ref, best, default, points, sweep_split, sweep_metric)

    run_id = None
    if track:
        tracker = build_tracker(True, tracking_uri, output_dir)
        model_name = cfg_off.model.name
        run_id = tracker.start(experiment, f"crf-{model_name}-{out.name}")
        try:
            tracker.set_tags({"medseg.model": model_name})
            params: dict[str, Any] = {"model": model_ref, "split": split, "data.root": cfg_off.data.root,
                                      "model.name": model_name, "slices": evals["no_crf"]["n"],
                                      "timing_slices": timing_slices}
            params.update({f"crf.{k}": v for k, v in dataclasses.asdict(cfg_on.inference.crf).items()})
            if sweep:
                params.update({"sweep.srgb": list(srgb_values), "sweep.weight": list(weight_values),
                               "sweep.split": sweep_split, "sweep.metric": sweep_metric,
                               "sweep.best_srgb": best[0] if best else None,
                               "sweep.best_weight": best[1] if best else None})
            tracker.log_params(params)
            metrics: dict[str, float] = {}
            for variant, m in rows.items():
                metrics.update({f"{variant}/{k}": v for k, v in m.items()})
                if variant != "no_crf":
                    name = "delta" if variant == "crf" else "delta_best"
                    metrics.update({f"{name}/{k}": m[k] - rows["no_crf"][k] for _, k, _, _ in COLUMNS
                                    if k in m and k in rows["no_crf"]})
            for p in points:
                metrics.update({f"sweep/{_tag(p['srgb'], p['weight'])}/{k}": p["metrics"][k]
                                for _, k, _, _ in COLUMNS if k in p["metrics"]})
            tracker.log_metrics(metrics, 0)
            for variant, ev in evals.items():
                tracker.log_artifact(ev["lesions_csv"], f"evaluation/{variant}")
            tracker.log_text(md, "crf_effect.md")
            tracker.set_tags({"crf_effect": "1"})  # last: only a complete run carries the tag
        except BaseException:
            tracker.end("FAILED")
            raise
        tracker.end("FINISHED")
    return {"rows": rows, "best": best, "sweep": points, "run_id": run_id, "markdown": md,
            "n": evals["no_crf"]["n"], "dir": str(out)}


# ----------------------------------------------------------------------------- report


def _cell(value: float | None, fmt: str, signed: bool = False) -> str:
    """A formatted number; "–" when missing or not finite; an explicit sign for differences."""
    if value is None or not math.isfinite(value):
        return "–"
    return (("+" if value >= 0 else "") if signed else "") + fmt.format(value)


def markdown(
    rows: dict[str, dict[str, float]], split: str, n: int, model_ref: str, best: tuple[float, float] | None,
    default: tuple[float, float], points: list[dict[str, Any]], sweep_split: str, sweep_metric: str,
) -> str:
    """The CRF table (variants, then differences to no CRF) and, after a sweep, the sweep table."""
    names = {"no_crf": "no CRF",
             "crf": f"CRF, DeepLab v2 defaults (σ_rgb {default[0]:g}, w {default[1]:g})"}
    if best is not None:
        names["crf_best"] = f"CRF, best on {sweep_split} (σ_rgb {best[0]:g}, w {best[1]:g})"
    head = "| | " + " | ".join(h for h, _, _, _ in COLUMNS) + " |"
    lines = [f"CRF effect on the {split} split ({n} slice{'' if n == 1 else 's'}) of `{model_ref}`", "", head,
             "|---|" + "---:|" * len(COLUMNS)]
    for variant, m in rows.items():
        lines.append(f"| {names[variant]} | " + " | ".join(_cell(m.get(k), f) for _, k, f, _ in COLUMNS) + " |")
    for variant, m in rows.items():
        if variant == "no_crf":
            continue
        base = rows["no_crf"]
        diffs = [(m[k] - base[k]) if k in m and k in base else None for _, k, _, _ in COLUMNS]
        label = "Δ default CRF − no CRF" if variant == "crf" else "Δ best CRF − no CRF"
        lines.append(f"| {label} | " + " | ".join(_cell(d, f, True) for d, (_, _, f, _) in zip(diffs, COLUMNS))
                     + " |")
    lines += ["", "HD95 and diameter error: lower is better. ms / slice: median model time + argmax or CRF "
              "(10 mean-field iterations) per slice, data loading excluded."]
    if points:
        lines += ["", f"Sweep on the {sweep_split} split (appearance kernel; other CRF settings at their "
                  f"defaults), best by {sweep_metric}:", "",
                  "| σ_rgb | w | " + " | ".join(h for h, _, _, _ in COLUMNS[:-1]) + " |",
                  "|---:|---:|" + "---:|" * (len(COLUMNS) - 1)]
        for p in points:
            mark = (" (default)" if (p["srgb"], p["weight"]) == default else "") + \
                   (" **best**" if best == (p["srgb"], p["weight"]) else "")
            lines.append(f"| {p['srgb']:g}{mark} | {p['weight']:g} | "
                         + " | ".join(_cell(p["metrics"].get(k), f) for _, k, f, _ in COLUMNS[:-1]) + " |")
        if best == default:
            lines += ["", "The DeepLab v2 default was the best point of the sweep."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- entry point


def _floats(text: str) -> tuple[float, ...]:
    """``"3,10,20"`` → ``(3.0, 10.0, 20.0)``."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="checkpoint file, medseg run folder, or MLflow model URI (runs:/ID/model, with --config)")
    p.add_argument("--data", default=None, help="data.root (default: the one the model was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--config", default=None, help="pipeline YAML (default: the checkpoint's resolved config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable), e.g. --set inference.mode=sliding")
    p.add_argument("--sweep", action="store_true", help="also sweep bilateral_srgb × bilateral_weight")
    p.add_argument("--srgb", type=_floats, default=DEFAULT_SRGB, help="sweep σ_rgb values (default 3,10,20)")
    p.add_argument("--weights", type=_floats, default=DEFAULT_WEIGHTS,
                   help="sweep appearance weights (default 3,4,5)")
    p.add_argument("--sweep-split", default="val", choices=["train", "val", "test"],
                   help="split the best sweep point is chosen on (default val)")
    p.add_argument("--sweep-metric", default="dice", choices=list(SWEEP_METRICS))
    p.add_argument("--timing-slices", type=int, default=20, help="slices the time per slice is the median over")
    p.add_argument("--output-dir", default="outputs/compare", help="per-lesion CSVs and the default MLflow store")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite:///<output-dir>/mlflow.db)")
    p.add_argument("--experiment", default=EXPERIMENT)
    p.add_argument("--out", default=None, help="markdown file (default: <output-dir>/crf_effect.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, write and print the table."""
    from medseg.config import ConfigError
    from medseg.data.base import DataError
    from medseg.io import atomic_write_text
    from medseg.runtime import TrainingError
    from medseg.tracking import resolve_tracking_uri

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_crf_effect(
            args.model, args.split, args.data, args.config, args.overrides, args.output_dir, args.tracking_uri,
            args.experiment, args.sweep, args.srgb, args.weights, args.sweep_split, args.sweep_metric,
            args.timing_slices,
        )
    except (ConfigError, DataError, TrainingError, ValueError) as e:
        print(f"crf_effect: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.output_dir) / "crf_effect.md"
    atomic_write_text(out, result["markdown"])
    print(result["markdown"])
    print(f"table written to {out}; per-lesion CSVs under {result['dir']}")
    if result["run_id"]:
        uri = resolve_tracking_uri(args.tracking_uri, args.output_dir)
        print(f"MLflow run {result['run_id']} (experiment {args.experiment!r}): mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
