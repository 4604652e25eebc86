"""The ``medseg`` command: a thin argparse layer over library functions.

Commands: ``train``, ``evaluate``, ``predict``, ``listen``, ``calibrate``, ``compare``, ``track sync``, ``demo-data``. Each ends by printing
where its results are.

Exit codes (what a script or a scheduler can tell apart without reading the line printed before):

====  =====================================================================================
0     done
1     ``predict``: done, but some cases failed (listed in the summary and the manifest)
2     a usage, config, data, model-file or training error (one line)
28    no space left on the device (``ENOSPC``) or the disk quota is exceeded (``EDQUOT``)
30    a read-only file system (``EROFS``)
74    any other failing write (``EIO``...)
75    the output folder (or the ``--num-parts`` part) or the training run folder is in use by another
      live medseg process, named in the line: nothing was done (try again once it has ended)
====  =====================================================================================

A full disk or a failing write ends the command with one line naming the path (and the space it
needed, when known), no traceback: what was finished stays (every file is written atomically, the
predict manifest and the last good checkpoint are intact) and the same command, run again once
there is space, completes the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from medseg import __version__
from medseg.io import FolderBusy, WriteError, write_error_of

#: exit codes of a failing write, by errno (see the module doc); any other write failure is 74
WRITE_EXIT_CODES = {28: 28, 122: 28, 30: 30}  # ENOSPC, EDQUOT (Linux), EROFS
EXIT_IO_ERROR = 74
EXIT_BUSY = 75


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=2 (repeatable; the value is YAML)",
    )


def _add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-model", action="store_true",
        help="load model files that need more than weights and plain data (a pickled object, a pickled MLflow model "
             "logged by an earlier medseg): this RUNS the code the file carries — only for files you trust",
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
    _add_trust(p)

    p = sub.add_parser("evaluate", help="score a trained model on a split")
    p.add_argument("config", help="pipeline YAML (data, transforms and inference settings)")
    p.add_argument("--model", required=True,
                   help="checkpoint file, medseg train output folder or MLflow model URI (runs:/ID/model)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--save-predictions", metavar="DIR", help="write predicted masks as DIR/<series>/<slice>.png, on each source slice's pixel grid")
    _add_set(p)
    _add_trust(p)

    p = sub.add_parser("predict", help="batch inference over DICOM series, NIfTI volumes or PNG/TIFF images")
    p.add_argument("--model",
                   help="checkpoint file, medseg train output folder or MLflow model URI (runs:/ID/model)")
    p.add_argument("input", nargs="?", help="DICOM folder (any nesting), NIfTI file or folder, PNG/TIFF folder, or a "
                   "DICOMweb server dicomweb+https://HOST/dicom-web (docs/pacs.md)")
    p.add_argument("output_dir", nargs="?", help="where masks, SEGs, lesion tables, overlays and the manifest go")
    p.add_argument("--study", action="append", default=[], metavar="UID", help="DICOMweb input: a study to pull (repeatable)")
    p.add_argument("--query", help='DICOMweb input: a QIDO-RS study query, e.g. "ModalitiesInStudy=CT&StudyDate=20261101-20261130"')
    p.add_argument("--store-back", action="store_true", help="send seg.dcm and sr.dcm into the source study "
                   "(STOW-RS for DICOMweb input, else C-STORE to predict.store)")
    p.add_argument("--ca-bundle", help="DICOMweb input: CA bundle that verifies the server's TLS certificate")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: a Ray cluster (docs/cluster.md)")
    p.add_argument("--address", help="with --engine ray: auto, HOST:PORT or ray://HOST:10001 (default: start Ray here)")
    p.add_argument("--merge", metavar="OUTPUT_DIR", help="merge the part manifests of --num-parts runs, then stop")
    p.add_argument("--num-parts", type=int, default=1, help="split the cases into N parts (deterministic)")
    p.add_argument("--part-id", type=int, default=0, help="the part this process predicts (0..N-1)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when present, else the CPU; --engine ray: "
                   "the model actors', cpu or cuda, default: one per GPU when the cluster has GPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_set(p)
    _add_trust(p)

    p = sub.add_parser("listen", help="DICOM C-STORE listener: predict each pushed series (docs/pacs.md)")
    p.add_argument("--model", required=True, help="checkpoint file, medseg train output folder or MLflow model URI")
    p.add_argument("output_dir", help="where received series, outputs and the manifest go")
    p.add_argument("--ae-title", default="MEDSEG", help="the listener's AE title")
    p.add_argument("--port", type=int, default=11112, help="the DICOM port")
    p.add_argument("--host", default="0.0.0.0", help="the address to listen on")
    p.add_argument("--calling-aet", action="append", default=[], required=True,
                   help="an AE title allowed to send (repeatable; others are refused)")
    p.add_argument("--quiet-s", type=float, default=30.0, help="a series is complete after this many seconds without an instance")
    p.add_argument("--max-instance-mb", type=float, default=1024.0, help="refuse larger instances")
    p.add_argument("--min-free-mb", type=float, default=1024.0, help="refuse instances that would leave less free disk")
    p.add_argument("--store-back", action="store_true", help="C-STORE seg.dcm and sr.dcm to predict.store")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when present, else the CPU)")
    _add_set(p)
    _add_trust(p)

    p = sub.add_parser("calibrate", help="choose the operating point (thresholds, min object size) on the val split")
    p.add_argument("config", help="pipeline YAML (data, transforms, metrics and calibration settings)")
    p.add_argument("--model", required=True, help="checkpoint file or medseg train output folder (updated in place)")
    _add_set(p)
    _add_trust(p)

    p = sub.add_parser("compare", help="compare MLflow runs: metrics with intervals, differing params, paired test")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="the runs to compare (or --experiment)")
    p.add_argument("--experiment", help="compare every finished run of this MLflow experiment")
    p.add_argument("--tracking-uri", default="outputs",
                   help="MLflow store: a URI, or a folder holding mlflow.db (default: outputs)")
    p.add_argument("--split", default="test", help="the evaluated split whose metrics are compared")
    p.add_argument("--metrics", help="comma-separated metric names (default: the headline metrics the runs have)")
    p.add_argument("--paired-metrics", default="roi_dice,dice",
                   help="per-lesion columns for the paired test of two runs (default: roi_dice,dice)")
    p.add_argument("--out", default="outputs/compare", help="folder for comparison.md / .csv / .png")
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples of the paired test")
    p.add_argument("--seed", type=int, default=0, help="seed of the paired test")

    p = sub.add_parser("track", help="tracking maintenance: track sync RUN_DIR sends what a run's journal holds")
    track = p.add_subparsers(dest="track_command", required=True)
    p = track.add_parser("sync", help="send the metrics, params, tags and status a run folder's tracking journal "
                                      "holds beyond what the store has (a run that ended while the store was away)")
    p.add_argument("run_dir", help="a medseg train run folder (holds tracking/journal.jsonl)")
    p.add_argument("--tracking-uri", help="the store to send to (default: the one the run recorded into; "
                                          "credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")

    p = sub.add_parser("demo-data", help="write generated data: DeepLesion-format CT or EM-like cell images")
    p.add_argument("out_dir")
    p.add_argument("--kind", choices=["deeplesion", "cells"], default="deeplesion",
                   help="deeplesion: CT series + DL_info.csv + true masks; cells: images/ + masks/ folder of "
                        "512x512 EM-like images (the folder dataset)")
    p.add_argument("--patients", type=int, default=None, help="deeplesion: patients (default: data.demo_patients)")
    p.add_argument("--images", type=int, default=None, help="cells: images (default 30)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _with_interval(m: dict[str, float], k: str) -> str:
    """``key=value [low, high]`` (the interval where the metrics carry one)."""
    lo, hi = m.get(f"{k}_ci_low"), m.get(f"{k}_ci_high")
    return f"{k}={m[k]:.4f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def cmd_train(args: argparse.Namespace) -> int:
    """``medseg train``."""
    from medseg.config import load_config
    from medseg.tracking.connect import is_remote
    from medseg.training.run import run_training

    cfg = load_config(args.config, [] if args.resume else args.overrides)
    result, evaluations = run_training(cfg, pipeline_path=args.config, resume=args.resume,
                                       overrides=args.overrides)
    uri = result.tracking_uri  # credentials redacted
    print(f"\ntraining {result.stopped_reason}: {result.epochs_done} epochs, {result.steps_done} steps")
    if result.best_metric is not None:
        print(f"best val {cfg.train.monitor}: {result.best_metric:.4f}")
    op = result.operating_point
    if op is not None:
        print(f"operating point (val): {_point_text(op)} → val {op['metric']} {op['score']:.4f} "
              f"(argmax {op['argmax_score']:.4f})")
    for split, ev in evaluations.items():
        m = ev["metrics"]
        print(f"{split}: " + ", ".join(_with_interval(m, k) for k in ("dice", "lesion_dice", "lesion_sensitivity",
                                                                      "roi_dice", "froc_sens_fp1", "pixel_error",
                                                                      "rand_error", "split_merge_error") if k in m))
        vol = [k for k in ("vol_lesion_dice", "vol_slice_dice_key", "vol_slice_dice_nonkey", "vol_fp_per_volume") if k in m]
        if vol:  # the volume protocol (every slice of each series), where the data has true masks on every slice
            print(f"{split} (every slice of each series): " + ", ".join(_with_interval(m, k) for k in vol))
    print(f"run folder:   {result.run_dir}")
    print(f"checkpoint:   {result.best_checkpoint or result.last_checkpoint}")
    if result.run_id:
        print(f"MLflow run:   {result.run_id}")
        print(f"MLflow UI:    {uri}" if is_remote(uri) else f"MLflow UI:    mlflow ui --backend-store-uri {uri}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``medseg evaluate``."""
    from medseg.config import load_config
    from medseg.data.prepare import prepare_data
    from medseg.evaluation.evaluate import evaluate
    from medseg.tracking import build_tracker

    cfg = load_config(args.config, args.overrides)
    t = cfg.tracking  # a tracking server that does not answer stops here, in seconds (tracking.offline)
    tracker = build_tracker(t.enabled, t.uri, cfg.output_dir, t.offline)
    prepare_data(cfg.data)
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
    from medseg.evaluation.evaluate import format_report

    print(json.dumps(result["metrics"], indent=2, sort_keys=True))
    print(format_report(result["metrics"], result["intervals"]))
    print(f"per-lesion table: {result['lesions_csv']}")
    for path in result["plots"]:
        print(f"plot:             {path}")
    if result["predictions"]:
        print(f"predictions:      {result['predictions']}")
    if run_id:
        print(f"MLflow run:       {run_id}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``medseg predict``."""
    from medseg.predict import run_predict
    from medseg.predict.chatter import quiet_third_party
    from medseg.predict.dicomweb import is_dicomweb, run_dicomweb

    if args.merge:
        from medseg.predict.parts import merge_parts

        result = merge_parts(args.merge)
        print(result.summary)
        print(f"manifest: {result.manifest}")
        return 1 if result.failed else 0
    if not (args.model and args.input and args.output_dir):
        raise SystemExit("medseg predict: --model, INPUT and OUTPUT_DIR are required (or --merge OUTPUT_DIR)")
    with quiet_third_party(Path(args.output_dir) / "medseg-predict.log"):
        if is_dicomweb(args.input):
            result = run_dicomweb(args.model, args.input, args.output_dir, args.study, args.query, args.overrides,
                                  args.store_back, args.ca_bundle, args.device, progress=not args.no_progress)
        else:
            result = run_predict(args.model, args.input, args.output_dir, args.overrides, args.num_parts,
                                 args.part_id, args.device, progress=not args.no_progress, engine=args.engine,
                                 address=args.address)
            if args.store_back:
                from medseg.predict.listen import store_to_node

                store_to_node(result)
    print(result.summary)
    print(f"outputs:  {result.output_dir}")
    print(f"manifest: {result.manifest}")
    return 1 if result.failed else 0


def cmd_listen(args: argparse.Namespace) -> int:
    """``medseg listen``."""
    from medseg.predict.chatter import quiet_third_party
    from medseg.predict.listen import Listener, ListenOptions

    opts = ListenOptions(ae_title=args.ae_title, port=args.port, host=args.host, calling_aets=args.calling_aet,
                         quiet_s=args.quiet_s, max_instance_mb=args.max_instance_mb, min_free_mb=args.min_free_mb,
                         store_back=args.store_back, overrides=list(args.overrides or []), device=args.device)
    with quiet_third_party(Path(args.output_dir) / "medseg-listen.log"):
        Listener(args.model, args.output_dir, opts).serve_forever()
    return 0


def _point_text(point: dict) -> str:
    """``threshold …[, low threshold … (hysteresis)], min object … mm²`` of a calibrated operating point."""
    low = f", low threshold {point['low_threshold']} (hysteresis)" if point.get("low_threshold") else ""
    return f"threshold {point['threshold'] or 'argmax'}{low}, min object {point['min_object_mm2']:g} mm²"


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``medseg calibrate``."""
    from medseg.config import load_config
    from medseg.data.prepare import prepare_data
    from medseg.evaluation.calibrate import calibrate

    cfg = load_config(args.config, args.overrides)
    prepare_data(cfg.data)
    result = calibrate(cfg, args.model)
    for row in result["grid"]:
        low = f"  low {row['low_threshold']}" if row.get("low_threshold") else ""
        print(f"threshold {row['threshold']}{low}  min object {row['min_object_mm2']:g} mm²  "
              f"{result['metric']} {row[result['metric']]:.4f}  {result['fp_key']} {row[result['fp_key']]:.2f}")
    print(f"\noperating point (val split): {_point_text(result)} → {result['metric']} {result['score']:.4f} "
          f"(argmax, no size filter: {result['argmax_score']:.4f})")
    if result.get("at_grid_edge"):
        print("warning:      the chosen threshold is at the end of calibration.thresholds; the best point may "
              "lie beyond it: widen the grid and calibrate again")
    print(f"stored in:    {result['checkpoint']} (and its run's config.yaml); override with --set "
          f"inference.threshold=... / inference.min_object_mm2=... / inference.low_threshold=...")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``medseg compare``."""
    from medseg.evaluation.compare import CompareError, compare_runs
    from medseg.tracking import resolve_tracking_uri

    if bool(args.run_ids) == bool(args.experiment):
        print("medseg compare: error: give RUN_IDs or --experiment NAME (not both)", file=sys.stderr)
        return 2
    uri = resolve_tracking_uri(args.tracking_uri, args.tracking_uri)
    try:
        res = compare_runs(uri, args.run_ids, args.experiment, args.split,
                           [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
                           args.out, [m.strip() for m in args.paired_metrics.split(",") if m.strip()],
                           args.resamples, args.seed)
    except CompareError as e:
        print(f"medseg compare: error: {e}", file=sys.stderr)
        return 2
    print(res.markdown)
    print(f"markdown: {res.markdown_path}")
    print(f"csv:      {res.csv_path}")
    print(f"plot:     {res.plot_path}")
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    """``medseg track sync``."""
    from medseg.runtime import redact_uri
    from medseg.tracking import resolve_tracking_uri
    from medseg.tracking.connect import TrackingError, choose_uri
    from medseg.tracking.journal import read_journal, sync

    try:
        header, records, sent = read_journal(args.run_dir)
    except FileNotFoundError as e:
        raise TrackingError(str(e)) from None
    uri = choose_uri(resolve_tracking_uri(args.tracking_uri or header["uri"], args.run_dir), False, args.run_dir)
    try:
        res = sync(args.run_dir, uri)
    except Exception as e:  # noqa: BLE001 — the store refused: what it acknowledged is kept, one line
        raise TrackingError(f"{redact_uri(uri)}: {e.__class__.__name__} while sending the journal of "
                            f"{args.run_dir} ({sent} of {len(records)} records were acknowledged before)") from None
    print(f"run {res['run_id']}: {res['sent']} journal records sent to {redact_uri(uri)} "
          f"({len(records)} in all, {sent} sent before)")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    """``medseg demo-data``."""
    if args.kind == "cells":
        from medseg.data.synthetic import CELLS_IMAGES, generate_cells_data

        out = generate_cells_data(args.out_dir, images=args.images or CELLS_IMAGES, seed=args.seed)
        print(f"EM-like cell images (images/ + masks/, 0 = membrane, 255 = cell) written to {out}")
        print(f"train on them: medseg train pipelines/cells.yaml --set data.root={out}")
        return 0
    from medseg.config import DataConfig
    from medseg.data.synthetic import generate_demo_data

    patients = args.patients if args.patients is not None else DataConfig().demo_patients
    out = generate_demo_data(args.out_dir, patients=patients, seed=args.seed)
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
    from medseg.tracking.connect import TrackingError

    handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "listen": cmd_listen,
                "calibrate": cmd_calibrate,
                "compare": cmd_compare, "track": cmd_track, "demo-data": cmd_demo_data}
    from medseg.models.checkpoint import trust_model_files

    try:
        with trust_model_files(getattr(args, "trust_model", False)):  # --trust-model: for every load below
            return handlers[args.command](args)
    except (ConfigError, DataError, TrainingError, RegistryError, TrackingError) as e:
        print(f"medseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FolderBusy as e:
        print(f"medseg {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BUSY
    except Exception as e:
        we = _write_failure(e)
        if we is None:
            raise
        # a newline first: it ends the progress bar the failure cut short
        print(f"\nmedseg {args.command}: error: {we}; what was finished is kept — free space (or fix the "
              f"device) and run the same command again to complete the rest", file=sys.stderr)
        return WRITE_EXIT_CODES.get(we.errno, EXIT_IO_ERROR)


def _write_failure(e: BaseException) -> WriteError | None:
    """The failing write behind ``e`` — ``e`` itself, or one raised before it (a clean-up that then failed on
    the same full disk raised again: the first failure is what the user needs) — or None."""
    seen: set[int] = set()
    cur: BaseException | None = e
    found = None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        we = write_error_of(cur)
        if we is not None and (found is None or str(we.filename) != "?"):
            found = we  # the earliest in the chain wins, unless it names no file and a later one does (a
            # buffered file's close failing again on the full disk: its error is the one a wrapper named)
            while cur.__cause__ is not None:  # what it wraps (the OSError, a temporary's name): already said
                cur = cur.__cause__
                seen.add(id(cur))
        cur = cur.__context__
    return found


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main", "Path"]
