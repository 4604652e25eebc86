"""Ablation of the U-Net paper's two training ideas on the quick start, read back from MLflow.

Four runs of ``pipelines/quickstart.yaml`` with the same data, schedule and budget:

* ``full``         — border weight map (w0 = 10, σ = 5 px) + 3×3 elastic deformation (σ = 10 px)
* ``no_border``    — ``transforms.weight_map.w0=0`` (the class-balancing term w_c stays)
* ``no_elastic``   — ``transforms.elastic.enabled=false``
* ``neither``      — both off

Each run is tagged ``ablation=<variant>`` (in the ``ablation`` experiment; a quick-start run may be
tagged ``ablation=full`` by hand with ``--tag-run RUN_ID``); the table is built only from MLflow (the
newest finished run per variant, any experiment of the store), so ``--table-only`` rebuilds it.

Usage::

    python benchmarks/ablation.py [--variants full,no_border] [--threads 2] [--out docs/ablation.md]
    python benchmarks/ablation.py --table-only
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medseg.compare import Column, markdown_table

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "ablation"
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_border": ["transforms.weight_map.w0=0"],
    "no_elastic": ["transforms.elastic.enabled=false"],
    "neither": ["transforms.weight_map.w0=0", "transforms.elastic.enabled=false"],
}
#: the table's columns: test-split metrics with their bootstrap intervals (medseg.compare's table builder)
COLUMNS = [
    Column("variant", "variant", "{}", numeric=False),
    Column("test Dice", "test/dice", interval=True),
    Column("lesion Dice", "test/lesion_dice", interval=True),
    Column("ROI Dice", "test/roi_dice", interval=True),
    Column("HD95 (mm)", "test/hd95", "{:.1f}", interval=True),
    Column("sensitivity", "test/lesion_sensitivity", interval=True),
    Column("FP / image", "test/fp_per_image", interval=True),
    Column("best val Dice", "best/dice"),
    Column("steps", "steps", "{}"),
    Column("run", "run", "`{}`", numeric=False),
]


def tracking_uri(output_dir: Path) -> str:
    """The MLflow store the ablation runs log into."""
    from medseg.tracking import default_tracking_uri

    return default_tracking_uri(output_dir)


def run_variant(name: str, output_dir: Path, extra: list[str]) -> str:
    """Train and evaluate one variant; returns its MLflow run id."""
    from mlflow.tracking import MlflowClient

    from medseg.config import load_config
    from medseg.engine import run_training

    overrides = [f"output_dir={output_dir}", f"tracking.experiment={EXPERIMENT}", *VARIANTS[name], *extra]
    result, _ = run_training(load_config(ROOT / "pipelines" / "quickstart.yaml", overrides),
                             pipeline_path=ROOT / "pipelines" / "quickstart.yaml")
    client = MlflowClient(tracking_uri=tracking_uri(output_dir))
    client.set_tag(result.run_id, "ablation", name)
    client.log_text(result.run_id, "\n".join(overrides), "ablation/overrides.txt")
    return result.run_id


def table(output_dir: Path) -> str:
    """Markdown table of the newest finished run per variant, read from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(output_dir))
    # every experiment of the store: the quick start's own run may be tagged ablation=full
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    rows = []
    for name in VARIANTS:
        runs = client.search_runs(exp_ids, f"tags.ablation = '{name}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            rows.append((name, runs[0]))
    body = []
    for name, run in rows:
        steps = max((h.step for h in client.get_metric_history(run.info.run_id, "train/loss")), default=0)
        body.append({"variant": name, **run.data.metrics, "steps": steps, "run": run.info.run_id[:8]})
    return markdown_table(body, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--output-dir", default=str(ROOT / "outputs" / "ablation"))
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (train.threads)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--tag-run", metavar="RUN_ID", help="tag an existing quick-start run as the 'full' variant")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    out_dir = Path(args.output_dir)
    if args.tag_run:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking_uri(out_dir)).set_tag(args.tag_run, "ablation", "full")
    if not args.table_only:
        extra = list(args.overrides) + ([f"train.threads={args.threads}"] if args.threads else [])
        for name in args.variants.split(","):
            if name not in VARIANTS:
                raise SystemExit(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
            print(f"== {name}", flush=True)
            run_variant(name, out_dir, extra)
    text = table(out_dir)
    print(text)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
