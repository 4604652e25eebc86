"""Ablation of the U-Net paper's two training ideas, several seeds per arm, resumable, read back from MLflow.

Four variants of a pipeline, trained on the same data for the same wall-clock budget
(``train.time_limit_min``: the budget-shaped schedule ends every run's learning rate at the budget):

* ``full``         — border weight map (w0 = 10, σ = 5 px) + 3×3 elastic deformation (σ = 10 px)
* ``no_border``    — ``transforms.weight_map.w0=0`` (the class-balancing term w_c stays)
* ``no_elastic``   — ``transforms.elastic.enabled=false``
* ``neither``      — both off

and, named with ``--variants`` (quickstart only; issue 23): ``no_propagate`` (``train.propagate.enabled=false``),
``no_negatives`` (``data.negative_rate=0``), ``window_fixed`` (the wide window −1024…3071 alone, the
default until 2026-12-06), ``no_growth`` (propagation one slice a round, no growth: the earlier rules),
``window_dicom`` (each lesion's annotated window), ``no_hard_negatives`` (``train.hard_negatives.enabled=false``:
without the model's false positives on lesion-free slices mined at half the schedule) and ``context_5`` (five slices of
context instead of three: 15 input channels) against ``full`` (wide + soft-tissue + lung windows as
channels, negatives, slice propagation and hard negatives, as shipped)

each with ``--seeds`` (default 0, 1, 2: ``train.seed`` — initialisation, sample order and
augmentation; the data and its split stay fixed). Pipelines: ``quickstart`` (generated
DeepLesion-format CT) and ``cells`` (generated EM-like cells). For the quick start, the test
split's lesions are also scored in two groups, **touching** (the lesion's true mask touches another
lesion's, 8-neighbourhood — where the border term should matter) and **isolated**.

Every arm is one MLflow run in the ``ablation`` experiment. When an arm has trained, been
calibrated and evaluated, the run gets the tags ``ablation_pipeline``, ``ablation_variant``,
``ablation_seed`` and, last, ``ablation_key`` (a hash of pipeline, variant, seed, budget and extra
overrides). A rerun of the same command skips every arm whose key has a FINISHED run, so an
interrupted ablation resumes where it stopped; the table is built from MLflow alone
(``--table-only``). A finished arm is recalibrated and re-evaluated from its checkpoint, not retrained,
when the pipeline's calibration grid has changed since it ran, or with ``--refresh`` (after a measure
was added). Rows give mean ± standard deviation over seeds (n = seeds found) and, for the
pipeline's main measure, the difference to ``full`` with its standard error — a difference smaller
than about two standard errors is not one the runs can tell from seed noise.

Usage::

    python benchmarks/ablation.py --pipeline quickstart --seeds 0,1,2 --out docs/ablation.md   # ≈ 2 h
    python benchmarks/ablation.py --pipeline cells --budget-min 8                               # ≈ 1.8 h
    python benchmarks/ablation.py --pipeline quickstart --table-only
    python benchmarks/ablation.py --pipeline quickstart --variants full,no_propagate,window_fixed,window_dicom
    python benchmarks/ablation.py --pipeline quickstart --budget-min 0.33 --seeds 0   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "ablation"
PIPELINES = {"quickstart": ROOT / "pipelines" / "quickstart.yaml", "cells": ROOT / "pipelines" / "cells.yaml"}
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_border": ["transforms.weight_map.w0=0"],
    "no_elastic": ["transforms.elastic.enabled=false"],
    "neither": ["transforms.weight_map.w0=0", "transforms.elastic.enabled=false"],
    # issue 23's arms (quickstart only; not in the default --variants): propagation, negatives, window rule
    "no_propagate": ["train.propagate.enabled=false"],
    "no_negatives": ["data.negative_rate=0"],
    "window_fixed": ["data.window=fixed"],
    "no_growth": ["train.propagate.slices_per_round=1", "train.propagate.max_area_ratio=1.0"],
    "window_dicom": ["data.window=dicom"],
    "no_hard_negatives": ["train.hard_negatives.enabled=false"],
    "context_5": ["data.context_slices=5"],
}
#: what a plain run trains (the U-Net paper's ablation); name the others with --variants
DEFAULT_VARIANTS = ["full", "no_border", "no_elastic", "neither"]
#: per pipeline: (metric key, column title, lower is better), the first is the main measure
COLUMNS: dict[str, list[tuple[str, str, bool]]] = {
    "quickstart": [("test/lesion_dice", "lesion Dice", False),
                   ("test/lesion_dice_touching", "touching lesions: Dice", False),
                   ("test/lesion_dice_isolated", "isolated lesions: Dice", False),
                   ("test/lesion_sensitivity_touching", "touching: sensitivity", False),
                   ("test/dice", "pixel Dice", False),
                   ("test/lesion_sensitivity", "sensitivity", False),
                   ("test/fp_per_image", "FP / image", True),
                   ("test/lesion_hd95", "lesion HD95 (mm)", True)],
    "cells": [("test/rand_error", "Rand error", True),
              ("test/pixel_error", "pixel error", True),
              ("test/split_merge_error", "split/merge error", True),
              ("test/dice", "cell Dice", False)],
}


@dataclass(frozen=True)
class Arm:
    """One training run of the benchmark: a pipeline, a named variant (its overrides) and a seed."""

    pipeline: str
    variant: str
    seed: int
    overrides: tuple[str, ...] = ()
    budget_min: float | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        """What makes two runs the same arm (hash of everything that shapes the run): its name, seed,
        overrides and budget, and the training recipe its pipeline resolves to today (:meth:`recipe`), so
        a finished arm is not reused after the pipeline's files changed what that arm trains."""
        blob = json.dumps([self.pipeline, self.variant, self.seed, sorted(self.overrides), self.budget_min,
                           sorted(self.extra), self.recipe()])
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def recipe(self) -> str:
        """A hash of the resolved config sections that shape training (data, transforms, model, loss,
        train). Calibration, evaluation, inference and metrics are left out: a finished arm is
        recalibrated / re-evaluated for those (:func:`recalibrate`), not retrained."""
        import dataclasses

        from medseg.config import load_config

        cfg = load_config(PIPELINES[self.pipeline], self.all_overrides(Path("ablation")))
        shaped = {k: dataclasses.asdict(getattr(cfg, k)) for k in ("data", "transforms", "model", "loss", "train")}
        return hashlib.sha1(json.dumps(shaped, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def all_overrides(self, output_dir: Path) -> list[str]:
        """The ``--set`` list of this arm's run."""
        ov = [f"output_dir={output_dir}", f"tracking.experiment={EXPERIMENT}", f"train.seed={self.seed}"]
        if self.budget_min is not None:
            ov.append(f"train.time_limit_min={self.budget_min}")
        return ov + list(self.overrides) + list(self.extra)


def tracking_uri(output_dir: Path) -> str:
    """The MLflow store the runs log into."""
    from medseg.tracking import default_tracking_uri

    return default_tracking_uri(output_dir)


# ----------------------------------------------------------------------------- touching lesions


def touching_ids(truth: Any) -> set[int]:
    """Ids of the instances in an ``(H, W)`` map whose pixels touch another instance (8-neighbourhood)."""
    import numpy as np
    from scipy import ndimage

    t = np.asarray(truth)
    out: set[int] = set()
    for i in np.unique(t[t > 0]).tolist():
        grown = ndimage.binary_dilation(t == i, structure=np.ones((3, 3), bool))
        if np.any((t[grown] > 0) & (t[grown] != i)):
            out.add(int(i))
    return out


def lesion_groups(cfg: Any, split: str = "test") -> dict[tuple[str, int], str]:
    """``(image_id, lesion_id) → "touching" | "isolated"`` for every true lesion of the split."""
    from medseg.data import build_dataset

    data = build_dataset(cfg.data, split)
    groups: dict[tuple[str, int], str] = {}
    for i in range(len(data)):
        s = data[i]
        if s is None:
            continue
        truth = s.get("truth", s["instance"])[0]
        touch = touching_ids(truth)
        for lid in {int(v) for v in truth[truth > 0].ravel().tolist()}:
            groups[(str(s["meta"]["id"]), lid)] = "touching" if lid in touch else "isolated"
    return groups


def group_metrics(rows: list[dict[str, str]], groups: dict[tuple[str, int], str]) -> dict[str, float]:
    """Lesion Dice, sensitivity and count per group from the per-lesion CSV rows of an evaluation."""
    by: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        g = groups.get((r["image_id"], int(r["lesion_id"])))
        if g is not None:
            by.setdefault(g, []).append(r)
    out: dict[str, float] = {}
    for g, rs in by.items():
        out[f"lesion_dice_{g}"] = statistics.fmean(float(r["dice"]) for r in rs)
        out[f"lesion_sensitivity_{g}"] = statistics.fmean(r["detected"] in ("True", "1", "true") for r in rs)
        out[f"lesion_count_{g}"] = float(len(rs))
    return out


# ----------------------------------------------------------------------------- running


def finished_run(client: Any, key: str) -> Any | None:
    """The newest FINISHED run of an arm (by its ``ablation_key`` tag), or None."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id],
                              f"tags.ablation_key = '{key}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def calibration_key(cfg: Any) -> str:
    """A hash of the pipeline's calibration grid: a finished arm calibrated on another grid is recalibrated."""
    c = cfg.calibration
    blob = json.dumps([[float(t) for t in c.thresholds], [float(m) for m in c.min_object_mm2], c.metric, c.mode])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def arm_config(arm: Arm, output_dir: Path) -> tuple[Any, list[str]]:
    """The arm's config (test is always among ``train.evaluate_splits``) and its ``--set`` list."""
    from medseg.config import load_config

    overrides = arm.all_overrides(output_dir)
    cfg = load_config(PIPELINES[arm.pipeline], overrides)
    if "test" not in cfg.train.evaluate_splits:
        overrides.append("train.evaluate_splits=[test]")
        cfg = load_config(PIPELINES[arm.pipeline], overrides)
    return cfg, overrides


def log_arm_metrics(client: Any, run_id: str, cfg: Any, evaluations: dict[str, Any]) -> None:
    """Log the touching / isolated lesion groups of the test evaluation (lesion pipelines only)."""
    if cfg.metrics.lesion_metrics and "test" in evaluations:
        with open(evaluations["test"]["lesions_csv"], newline="") as f:
            rows = list(csv.DictReader(f))
        for k, v in group_metrics(rows, lesion_groups(cfg)).items():
            client.log_metric(run_id, f"test/{k}", v)


def recalibrate(client: Any, run: Any, cfg: Any) -> bool:
    """Choose a finished arm's operating point again on the current grid (val) and re-evaluate it on test.

    Training is the expensive part of an arm; the operating point is not. When a pipeline's
    ``calibration`` grid changes, the finished runs are recalibrated from their checkpoints instead of
    retrained: ``medseg calibrate``'s choice on the val split, then the test evaluation, both logged
    into the arm's MLflow run (the newest value of each metric is what the table reads). Returns False
    (and says why) when the run's folder is gone.
    """
    from medseg.evaluation.calibrate import calibrate_run, checkpoint_path
    from medseg.evaluation.evaluate import evaluate_after_training
    from medseg.tracking import build_tracker

    run_id = run.info.run_id
    tag = run.data.tags.get("medseg.run_dir")
    run_dir = Path(tag) if tag else None
    if run_dir is None or not run_dir.is_dir():
        print(f"   run {run_id[:8]}: its folder {tag} is gone; kept its old operating point", flush=True)
        return False
    ckpt = checkpoint_path(run_dir)
    tracker = build_tracker(True, cfg.tracking.uri, cfg.output_dir)
    point = calibrate_run(cfg, ckpt, run_dir, run_id, tracker)
    evaluations = evaluate_after_training(cfg, ckpt, run_dir, run_id, tracker)
    log_arm_metrics(client, run_id, cfg, evaluations)
    client.set_tag(run_id, "ablation_calibration", calibration_key(cfg))
    print(f"   recalibrated run {run_id[:8]}: threshold {point['threshold']} (val {point['metric']} "
          f"{point['score']:.4f})", flush=True)
    return True


def run_arm(arm: Arm, output_dir: Path, refresh: bool = False) -> str:
    """Train, calibrate and evaluate one arm (unless already finished); returns its MLflow run id.

    A finished arm whose operating point was chosen on another calibration grid than the
    pipeline's current one — or every finished arm with ``refresh`` (``--refresh``: e.g. after a
    measure was added) — is recalibrated and re-evaluated (:func:`recalibrate`), not retrained.
    """
    from mlflow.tracking import MlflowClient

    from medseg.training.run import run_training

    client = MlflowClient(tracking_uri=tracking_uri(output_dir))
    cfg, overrides = arm_config(arm, output_dir)
    done = finished_run(client, arm.key)
    if done is not None:
        print(f"   already done: run {done.info.run_id[:8]}", flush=True)
        if refresh or done.data.tags.get("ablation_calibration") != calibration_key(cfg):
            recalibrate(client, done, cfg)
        return done.info.run_id
    result, evaluations = run_training(cfg, pipeline_path=PIPELINES[arm.pipeline])
    run_id = result.run_id
    if run_id is None:
        raise SystemExit("the ablation needs MLflow tracking (tracking.enabled: true)")
    client.log_metric(run_id, "ablation/steps", float(result.steps_done))
    log_arm_metrics(client, run_id, cfg, evaluations)
    client.log_text(run_id, "\n".join(overrides), "ablation/overrides.txt")
    for k, v in {"ablation_pipeline": arm.pipeline, "ablation_variant": arm.variant,
                 "ablation_seed": str(arm.seed), "ablation_calibration": calibration_key(cfg)}.items():
        client.set_tag(run_id, k, v)
    client.set_tag(run_id, "ablation_key", arm.key)  # last: only a complete arm is ever skipped
    return run_id


# ----------------------------------------------------------------------------- the table


#: columns whose values are too small for three decimals
DIGITS = {"test/split_merge_error": 4}


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± sd`` (or the single value), ``–`` for none."""
    if not values:
        return "–"
    m, sd = mean_sd(values)
    return f"{m:.{digits}f}" if sd is None else f"{m:.{digits}f} ± {sd:.{digits}f}"


def diff_with_se(a: Sequence[float], b: Sequence[float]) -> str:
    """``mean(a) − mean(b)`` with the standard error of the difference (Welch), or ``–``."""
    if not a or not b:
        return "–"
    d = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return f"{d:+.3f}"
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return f"{d:+.3f} ± {se:.3f}"


def collect(output_dir: Path, arms: Sequence[Arm]) -> dict[str, list[dict[str, float]]]:
    """Per arm label (variant): the metrics of each finished seed's run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(output_dir))
    out: dict[str, list[dict[str, float]]] = {}
    for arm in arms:
        run = finished_run(client, arm.key)
        out.setdefault(arm.variant, [])
        if run is not None:
            out[arm.variant].append({**run.data.metrics, "_run": run.info.run_id})  # type: ignore[dict-item]
    return out


def markdown(pipeline: str, found: dict[str, list[dict[str, float]]], reference: str = "full",
             columns: list[tuple[str, str, bool]] | None = None) -> str:
    """Mean ± SD per arm and column; Δ of the main measure against ``reference`` (± its standard error).

    The table is rendered by :func:`medseg.compare.markdown_table`, the builder ``medseg compare`` and
    ``compare_models.py`` use; its cells are the mean ± SD texts.
    """
    from medseg.evaluation.compare import Column, markdown_table

    cols = columns or COLUMNS[pipeline]
    main_key, main_title, lower = cols[0]
    delta = f"Δ {main_title} vs {reference}"
    table_cols = [Column(h, h, "{}", numeric=False) for h in ["arm", "seeds", *(c[1] for c in cols), delta, "steps"]]
    ref_vals = [m[main_key] for m in found.get(reference, []) if main_key in m]
    rows = []
    for name, runs in found.items():
        row = {"arm": name, "seeds": str(len(runs))}
        row.update({title: fmt([m[key] for m in runs if key in m], DIGITS.get(key, 3)) for key, title, _ in cols})
        vals = [m[main_key] for m in runs if main_key in m]
        row[delta] = "–" if name == reference else diff_with_se(vals, ref_vals)
        row["steps"] = fmt([m["ablation/steps"] for m in runs if "ablation/steps" in m], 0)
        rows.append(row)
    direction = "lower" if lower else "higher"
    return markdown_table(rows, table_cols) + f"\nMean ± standard deviation over seeds; {main_title}: {direction} is better.\n"


def arms_for(pipeline: str, variants: Sequence[str], seeds: Sequence[int], budget: float | None,
             extra: Sequence[str]) -> list[Arm]:
    """The ablation's arms of one pipeline."""
    return [Arm(pipeline, v, s, tuple(VARIANTS[v]), budget, tuple(extra)) for s in seeds for v in variants]


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and rename."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", choices=[*PIPELINES, "both"], default="quickstart")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="train.seed values, comma-separated (>= 3 to see the noise)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="wall-clock minutes per arm (train.time_limit_min); default: the pipeline's own")
    p.add_argument("--output-dir", default=str(ROOT / "outputs" / "ablation"))
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (train.threads)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from MLflow")
    p.add_argument("--refresh", action="store_true",
                   help="recalibrate and re-evaluate every finished arm from its checkpoint (no retraining)")
    p.add_argument("--out", default=None, help="also write the table(s) to this markdown file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every arm (part of the arm's identity)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.output_dir)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
    extra = list(args.overrides) + ([f"train.threads={args.threads}"] if args.threads else [])
    pipelines = list(PIPELINES) if args.pipeline == "both" else [args.pipeline]
    texts = []
    for pipeline in pipelines:
        arms = arms_for(pipeline, variants, seeds, args.budget_min, extra)
        if not args.table_only:
            for i, arm in enumerate(arms, 1):  # one after another: arms never share the CPU
                print(f"== {pipeline} {arm.variant} seed {arm.seed} ({i}/{len(arms)})", flush=True)
                run_arm(arm, out_dir, refresh=args.refresh)
        budget = f"{args.budget_min} min" if args.budget_min is not None else "the pipeline's time limit"
        texts.append(f"### {pipeline} (budget {budget} per arm, seeds {args.seeds})\n\n"
                     + markdown(pipeline, collect(out_dir, arms)))
    text = "\n".join(texts)
    print(text)
    if args.out:
        write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
