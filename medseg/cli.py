"""The ``medseg`` command: a thin argparse layer over library functions.

Commands: ``train``, ``evaluate``, ``predict``, ``demo-data``. Each ends by printing where its results are.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from medseg import __version__


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=2 (repeatable; the value is YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``medseg`` command."""
    parser = argparse.ArgumentParser(prog="medseg", description="Medical-image lesion segmentation.")
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a pipeline YAML")
    p.add_argument("config", help="pipeline YAML, e.g. pipelines/deeplesion.yaml")
    _add_set(p)
    p.add_argument("--resume", metavar="RUN_OR_DIR",
                   help="continue a run: its folder, a checkpoint file or its MLflow run id")

    p = sub.add_parser("evaluate", help="score a trained model on a split")
    p.add_argument("config", help="pipeline YAML (data, transforms and inference settings)")
    p.add_argument("--model", required=True,
                   help="checkpoint file, medseg train output folder or MLflow model URI (runs:/ID/model)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--save-predictions", metavar="DIR", help="write predicted masks as DIR/<series>/<slice>.png, on each source slice's pixel grid")
    _add_set(p)

    p = sub.add_parser("predict", help="batch inference over DICOM series, NIfTI volumes or PNG/TIFF images")
    p.add_argument("--model", required=True,
                   help="checkpoint file, medseg train output folder or MLflow model URI (runs:/ID/model)")
    p.add_argument("input", help="DICOM folder (any nesting), NIfTI file or folder, or PNG/TIFF folder")
    p.add_argument("output_dir", help="where masks, SEGs, lesion tables, overlays and the manifest go")
    p.add_argument("--num-parts", type=int, default=1, help="split the cases into N parts (deterministic)")
    p.add_argument("--part-id", type=int, default=0, help="the part this process predicts (0..N-1)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when present, else the CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_set(p)

    p = sub.add_parser("demo-data", help="write a generated DeepLesion-format dataset")
    p.add_argument("out_dir")
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    """``medseg train``."""
    from medseg.config import load_config
    from medseg.engine import run_training
    from medseg.tracking import resolve_tracking_uri

    cfg = load_config(args.config, [] if args.resume else args.overrides)
    result, evaluations = run_training(cfg, pipeline_path=args.config, resume=args.resume,
                                       overrides=args.overrides)
    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.output_dir)
    print(f"\ntraining {result.stopped_reason}: {result.epochs_done} epochs, {result.steps_done} steps")
    if result.best_metric is not None:
        print(f"best val {cfg.train.monitor}: {result.best_metric:.4f}")
    for split, ev in evaluations.items():
        m = ev["metrics"]
        print(f"{split}: " + ", ".join(f"{k}={m[k]:.4f}" for k in sorted(m) if k in
                                        ("dice", "lesion_dice", "miou", "hd95", "lesion_sensitivity")))
    print(f"run folder:   {result.run_dir}")
    print(f"checkpoint:   {result.best_checkpoint or result.last_checkpoint}")
    if result.run_id:
        print(f"MLflow run:   {result.run_id}")
        print(f"MLflow UI:    mlflow ui --backend-store-uri {uri}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``medseg evaluate``."""
    from medseg.config import load_config
    from medseg.data.prepare import prepare_data
    from medseg.evaluation import evaluate
    from medseg.tracking import build_tracker

    cfg = load_config(args.config, args.overrides)
    prepare_data(cfg.data)
    tracker = build_tracker(cfg.tracking.enabled, cfg.tracking.uri, cfg.output_dir)
    run_id = None
    status = "FAILED"
    try:
        if cfg.tracking.enabled:
            run_id = tracker.start(cfg.tracking.experiment or cfg.name, f"evaluate-{args.split}")
            tracker.log_params({"model": str(args.model), "split": args.split})
        result = evaluate(cfg, args.model, args.split, args.save_predictions, tracker=tracker)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)  # the MLflow run never stays RUNNING
    print(json.dumps(result["metrics"], indent=2, sort_keys=True))
    print(f"per-lesion table: {result['lesions_csv']}")
    if result["predictions"]:
        print(f"predictions:      {result['predictions']}")
    if run_id:
        print(f"MLflow run:       {run_id}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``medseg predict``."""
    from medseg.predict import run_predict

    result = run_predict(args.model, args.input, args.output_dir, args.overrides, args.num_parts, args.part_id,
                         args.device, progress=not args.no_progress)
    print(result.summary)
    print(f"outputs:  {result.output_dir}")
    print(f"manifest: {result.manifest}")
    return 1 if result.failed else 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    """``medseg demo-data``."""
    from medseg.data.synthetic import generate_demo_data

    out = generate_demo_data(args.out_dir, patients=args.patients, seed=args.seed)
    print(f"DeepLesion-format demo data written to {out}")
    print(f"train on it: medseg train pipelines/quickstart.yaml --set data.root={out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from medseg.config import ConfigError
    from medseg.data.base import DataError
    from medseg.registry import RegistryError
    from medseg.runtime import TrainingError

    handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "demo-data": cmd_demo_data}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, TrainingError, RegistryError) as e:
        print(f"medseg {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main", "Path"]
