"""The model-zoo comparison: every model trained for the same wall-clock budget, the table read from MLflow.

Each model trains on the quick start's data with the quick start's crop, batch size, augmentation,
loss, optimizer and inference settings (``pipelines/quickstart.yaml``); only the model differs. The
U-Net is the quick start itself; every other model comes from ``pipelines/deeplesion_<model>.yaml``
with the quick-start settings applied as ``--set`` overrides (only the keys that differ, so the
logged override list reads as the difference). Where the published configuration is too slow to
train on a CPU the model is reduced, and the reduction is recorded in the run (``zoo/reduction``,
and the resolved ``model.params.*``):

==============  ==========================================================================
unet            the quick-start U-Net: 16 base channels instead of 64 (1.9 M vs 31 M params)
deeplabv1       as published (VGG-16 LargeFOV, 20.5 M params)
deeplabv2       ResNet-18 backbone instead of ResNet-101 (output stride 8, ASPP-L kept)
deeplabv3       ResNet-18 backbone instead of ResNet-101
deeplabv3plus   ResNet-18 backbone instead of ResNet-101
fcn8s           fc6 / fc7 with 1024 channels instead of 4096 (41 M vs 134 M params)
pspnet          ResNet-18 backbone instead of ResNet-50 (output stride 8 kept)
stdc            as published (STDC1-Seg, 8.6 M params)
==============  ==========================================================================

Measured on a shared 2-core CPU (batch 8 of 3×96×96, one Adam step): ResNet-101 DeepLab v3+ took
≈ 3× as long per step as its ResNet-18 version and FCN-8s with 4096-channel fc layers ≈ 3× as long
as with 1024, so the published sizes would get a third of the optimizer steps in the same budget.

The budget (``train.time_limit_min``) is wall-clock time; the Trainer checks it after each epoch,
so an epoch here is ``--steps-per-epoch`` steps (20) and a run overshoots by at most one epoch. A
budget has no known last step, so the learning rate is constant (not the quick start's poly decay),
and nothing is validated mid-run (``train.val_every`` beyond the last epoch): the whole budget
goes to training and the test split scores the final weights (``train.evaluate_splits: [test]``
logs ``test/*`` into the run). Then this script adds to the same MLflow run:

* ``zoo/params`` — the parameter count;
* ``zoo/train_images_per_s`` — training images over training-loop seconds, from the end-of-epoch
  ``train/images_per_s`` values the Trainer logged (each is that epoch's mean; data loading and
  augmentation included, checkpoint writes excluded);
* ``zoo/infer_ms_512`` — the median time of one ``predict_logits`` call on a 3-channel 512×512
  slice, batch 1, eval mode, no grad, after warm-up;
* ``zoo/steps``, ``zoo/train_min``; params ``zoo/model``, ``zoo/label``, ``zoo/reduction``,
  ``zoo/budget_min`` …; the override list as ``zoo/command.txt``; and last the tag ``zoo=1``, so a
  run that failed half-way never reaches the table.

The table is built only from MLflow: the latest finished run per model with tag ``zoo=1`` in the
experiment (``--table-only`` rebuilds it without training).

Usage:
    python benchmarks/compare_models.py --budget-min 10            # all models, ≈ 1.5–2 h on 2 cores
    python benchmarks/compare_models.py --models unet,stdc --budget-min 3
    python benchmarks/compare_models.py --table-only               # rebuild docs/model_zoo.md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.evaluation.compare import Column
from medseg.evaluation.compare import markdown_table as table

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "model-zoo"
#: the pipeline whose data / transforms / loss / train / inference settings every model shares
QUICKSTART = "pipelines/quickstart.yaml"
SHARED_SECTIONS = ("data", "transforms", "loss", "train", "inference")
#: with a wall-clock budget the epoch count only has to be out of reach
ZOO_EPOCHS = 10_000
INFER_SIZE = 512

log = logging.getLogger("medseg.benchmarks.compare_models")


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: its pipeline and what was reduced to train it on a CPU."""

    key: str
    pipeline: str
    label: str
    #: ``model.params`` overrides that make it CPU-trainable (empty = as the pipeline has it)
    reduce: dict[str, Any] = field(default_factory=dict)
    #: what differs from the published model, for the table's notes ("" = as published)
    reduction: str = ""


ZOO: tuple[ZooModel, ...] = (
    ZooModel("unet", QUICKSTART, "U-Net (16 base channels)",
             reduction="quick-start U-Net: base_channels 16 instead of 64 (1.9 M instead of 31.0 M parameters)"),
    ZooModel("deeplabv1", "pipelines/deeplesion_deeplabv1.yaml", "DeepLab v1 LargeFOV (VGG-16)"),
    ZooModel("deeplabv2", "pipelines/deeplesion_deeplabv2.yaml", "DeepLab v2 (ResNet-18, OS 8)",
             {"backbone": "resnet18"}, "backbone resnet18 instead of resnet101"),
    ZooModel("deeplabv3", "pipelines/deeplesion_deeplabv3.yaml", "DeepLab v3 (ResNet-18, OS 16)",
             {"backbone": "resnet18"}, "backbone resnet18 instead of resnet101"),
    ZooModel("deeplabv3plus", "pipelines/deeplesion_deeplabv3plus.yaml", "DeepLab v3+ (ResNet-18, OS 16)",
             {"backbone": "resnet18"}, "backbone resnet18 instead of resnet101"),
    ZooModel("fcn8s", "pipelines/deeplesion_fcn8s.yaml", "FCN-8s (VGG-16, fc 1024)",
             {"fc_channels": 1024}, "fc6/fc7 1024 channels instead of 4096 (41 M instead of 134 M parameters)"),
    ZooModel("pspnet", "pipelines/deeplesion_pspnet.yaml", "PSPNet (ResNet-18, OS 8)",
             {"depth": 18}, "backbone ResNet-18 (depth 18) instead of ResNet-50"),
    ZooModel("stdc", "pipelines/deeplesion_stdc.yaml", "STDC1-Seg"),
)
ZOO_BY_KEY = {m.key: m for m in ZOO}


# ----------------------------------------------------------------------------- configuration


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a config dict to ``a.b.c -> value``; ``params`` mappings stay whole values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and k != "params":
            out.update(_leaves(v, key))
        else:
            out[key] = v
    return out


def _override(key: str, value: Any) -> str:
    """``key=value`` with the value as JSON (valid YAML, so ``--set`` parses it back exactly)."""
    return f"{key}={json.dumps(value)}"


def zoo_overrides(
    model: ZooModel,
    budget_min: float,
    data_root: str | Path | None = None,
    output_dir: str | Path = "outputs/compare",
    tracking_uri: str | None = None,
    steps_per_epoch: int = 20,
    extra: list[str] | None = None,
    experiment: str = EXPERIMENT,
) -> list[str]:
    """The ``--set`` overrides that turn ``model.pipeline`` into its zoo run.

    Args:
        model: the zoo entry.
        budget_min: wall-clock training budget in minutes (``train.time_limit_min``).
        data_root: ``data.root`` (None keeps the quick start's ``data/demo``).
        output_dir: where run folders and the default MLflow store go.
        tracking_uri: MLflow tracking URI (None = ``sqlite:///<output_dir>/mlflow.db``).
        steps_per_epoch: optimizer steps between time-limit checks.
        extra: further ``key=value`` overrides for every model (applied last).
        experiment: the MLflow experiment.

    Returns:
        Override strings for :func:`medseg.config.load_config` / ``medseg train --set``.
    """
    from medseg.config import load_config, read_yaml, to_dict

    quick = to_dict(load_config(ROOT / QUICKSTART))
    base = _leaves(to_dict(load_config(ROOT / model.pipeline)))
    target = _leaves({s: quick[s] for s in SHARED_SECTIONS})
    # only the keys whose value differs from the model's own pipeline
    ov: dict[str, Any] = {k: v for k, v in target.items() if k not in base or base[k] != v}
    pipeline_params = read_yaml(ROOT / model.pipeline).get("model", {}).get("params", {})
    ov.update({f"model.params.{k}": v for k, v in model.reduce.items() if pipeline_params.get(k) != v})
    ov.update({
        "train.epochs": ZOO_EPOCHS,
        "train.max_steps": None,
        "train.steps_per_epoch": steps_per_epoch,
        "train.time_limit_min": float(budget_min),
        "train.schedule": "constant",
        "train.val_every": ZOO_EPOCHS + 1,
        "train.early_stop_patience": None,
        "train.evaluate_splits": ["test"],
        "tracking.enabled": True,
        "tracking.uri": tracking_uri,
        "tracking.experiment": experiment,
        "output_dir": str(output_dir),
    })
    if data_root is not None:
        ov["data.root"] = str(data_root)
    # a key that equals the pipeline's own value is no override at all
    strings = [_override(k, v) for k, v in ov.items() if k not in base or base[k] != v]
    return strings + list(extra or [])


# ----------------------------------------------------------------------------- measurements


def training_throughput(client: Any, run_id: str) -> tuple[float, float]:
    """``(images per second, training-loop seconds)`` of a run, from its MLflow metric history.

    The Trainer logs ``train/images_per_s`` at the last step of every epoch as that epoch's images
    over its seconds, and ``train/epoch_loss`` at the same step; so epoch ``e`` spanning steps
    ``(s_{e-1}, s_e]`` took ``(s_e − s_{e-1}) · batch / rate_e`` seconds.
    """
    run = client.get_run(run_id)
    batch = int(run.data.params["train.batch_size"])
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "train/images_per_s")}
    ends = sorted({m.step for m in client.get_metric_history(run_id, "train/epoch_loss")})
    images = seconds = 0.0
    prev = 0
    for step in ends:
        if step in rates and rates[step] > 0:
            n = (step - prev) * batch
            images += n
            seconds += n / rates[step]
        prev = step
    if seconds == 0:
        raise RuntimeError(f"MLflow run {run_id}: no end-of-epoch train/images_per_s values to average")
    return images / seconds, seconds


def inference_ms(model: Any, cfg: Any, in_channels: int = 3, size: int = INFER_SIZE,
                 warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of one ``predict_logits`` call on a random ``(1, in_channels, size, size)`` slice.

    The model is in eval mode and ``predict_logits`` runs without grad (and with AMP on CUDA when
    ``train.amp`` says so, as evaluation does); CUDA is synchronised around every call.
    """
    import torch

    from medseg.inference.predictor import predict_logits
    from medseg.runtime import resolve_device

    device = resolve_device(cfg.train.device)
    model = model.to(device).eval()
    x = torch.rand(1, in_channels, size, size, generator=torch.Generator().manual_seed(0))
    times: list[float] = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        predict_logits(model, x, cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


@dataclass
class ZooRun:
    """What :func:`run_model` returns."""

    model: str
    run_id: str
    run_dir: Path
    metrics: dict[str, float]


def run_model(
    model: ZooModel, overrides: list[str], budget_min: float, warmup: int = 3, repeats: int = 10
) -> ZooRun:
    """Train one zoo model with ``overrides``, evaluate it on the test split and log the zoo metrics.

    Returns:
        The MLflow run id, the run folder and the ``zoo/*`` metrics logged.

    Raises:
        medseg.runtime.TrainingError / ConfigError / DataError: as ``medseg train`` would.
    """
    import torch
    from mlflow.tracking import MlflowClient

    from medseg.config import load_config
    from medseg.models.checkpoint import load_model
    from medseg.tracking import build_tracker, resolve_tracking_uri
    from medseg.training.run import run_training

    pipeline = ROOT / model.pipeline
    cfg = load_config(pipeline, overrides)
    result, _ = run_training(cfg, pipeline_path=pipeline)
    if result.run_id is None:
        raise RuntimeError(f"{model.key}: the run was not tracked (tracking.enabled must stay true)")
    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.output_dir)
    client = MlflowClient(tracking_uri=uri)
    images_per_s, train_s = training_throughput(client, result.run_id)
    in_channels = int(client.get_run(result.run_id).data.params["data.in_channels"])

    net, _ = load_model(result.best_checkpoint or result.last_checkpoint)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ms = inference_ms(net, cfg, in_channels, INFER_SIZE, warmup, repeats)
    metrics = {
        "zoo/params": float(sum(p.numel() for p in net.parameters())),
        "zoo/train_images_per_s": images_per_s,
        "zoo/infer_ms_512": ms,
        "zoo/steps": float(result.steps_done),
        "zoo/train_min": train_s / 60.0,
    }
    tracker = build_tracker(True, cfg.tracking.uri, cfg.output_dir)
    tracker.start("", "", run_id=result.run_id)
    try:
        tracker.log_params({
            "zoo/model": model.key,
            "zoo/label": model.label,
            "zoo/pipeline": model.pipeline,
            "zoo/reduction": model.reduction or "none (as published)",
            "zoo/budget_min": budget_min,
            "zoo/stopped": result.stopped_reason,
            "zoo/infer_device": str(next(net.parameters()).device),
            "zoo/infer_threads": torch.get_num_threads(),
            "zoo/infer_repeats": f"{repeats} after {warmup} warm-up",
        })
        tracker.log_metrics(metrics, result.steps_done)
        command = " \\\n  ".join([f"medseg train {model.pipeline}", *(f"--set '{o}'" for o in overrides)])
        tracker.log_text(command + "\n", "zoo/command.txt")
        # the tag comes last: only a complete run reaches the table
        tracker.set_tags({"zoo": "1"})
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return ZooRun(model.key, result.run_id, result.run_dir, metrics)


# ----------------------------------------------------------------------------- the table (from MLflow)


def latest_zoo_runs(tracking_uri: str, experiment: str = EXPERIMENT) -> list[Any]:
    """The latest finished run per model with tag ``zoo=1`` (MLflow ``Run`` objects, zoo order).

    Raises:
        LookupError: the experiment does not exist in this store.
    """
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        # opening a missing SQLite store would create an empty one
        raise LookupError(f"no MLflow store at {tracking_uri[len('sqlite:///'):]}; run without --table-only first "
                          f"or pass --output-dir / --tracking-uri of an earlier comparison")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} in {tracking_uri}; run without --table-only first")
    latest: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_runs(
            [exp.experiment_id], filter_string="tags.zoo = '1' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1000, page_token=token,
        )
        for run in page:
            latest.setdefault(run.data.params.get("zoo/model", run.data.tags.get("medseg.model", "?")), run)
        token = page.token
        if not token:
            break
    order = {m.key: i for i, m in enumerate(ZOO)}
    return [latest[k] for k in sorted(latest, key=lambda k: (order.get(k, len(order)), k))]


def table_rows(runs: list[Any]) -> list[dict[str, Any]]:
    """One dict per run with the table's numbers (None where MLflow has no value)."""
    rows = []
    for run in runs:
        m, p = run.data.metrics, run.data.params
        params = m.get("zoo/params")
        rows.append({
            "model": p.get("zoo/model"),
            "label": p.get("zoo/label", p.get("zoo/model")),
            "run_id": run.info.run_id,
            "dice": m.get("test/dice"),
            "lesion_dice": m.get("test/lesion_dice"),
            "hd95_mm": m.get("test/hd95"),
            "params_m": params / 1e6 if params is not None else None,
            "train_images_per_s": m.get("zoo/train_images_per_s"),
            "infer_ms_512": m.get("zoo/infer_ms_512"),
            "budget_min": float(p["zoo/budget_min"]) if "zoo/budget_min" in p else None,
            "steps": int(m["zoo/steps"]) if "zoo/steps" in m else None,
            "reduction": p.get("zoo/reduction", ""),
            "device": p.get("zoo/infer_device", ""),
            "threads": p.get("zoo/infer_threads", ""),
            "data_root": p.get("data.root", ""),
            "setup": (f"{p.get('transforms.crop_size', '?')} crops, batch {p.get('train.batch_size', '?')}, "
                      f"{p.get('train.steps_per_epoch', '?')}-step epochs, lr {p.get('train.lr', '?')} "
                      f"{p.get('train.schedule', '?')}, {p.get('train.optimizer', '?')}"),
            "start_time": run.info.start_time,
        })
    return rows


#: the table's columns (the table builder is medseg.compare's, shared with ``medseg compare``)
COLUMNS: tuple[Column, ...] = (
    Column("model", "label", "{}", numeric=False),
    Column("Dice", "dice", "{:.3f}"),
    Column("lesion Dice", "lesion_dice", "{:.3f}"),
    Column("HD95 (mm)", "hd95_mm", "{:.1f}"),
    Column("params (M)", "params_m", "{:.2f}"),
    Column("train img/s", "train_images_per_s", "{:.1f}"),
    Column("ms / 512² slice", "infer_ms_512", "{:.0f}"),
    Column("budget (min)", "budget_min", "{:g}"),
    Column("steps", "steps", "{}"),
)


def markdown_table(rows: list[dict[str, Any]], rebuild: str = "python benchmarks/compare_models.py --table-only") -> str:
    """The model-zoo table as markdown, with the notes that make its numbers readable.

    Args:
        rows: from :func:`table_rows`.
        rebuild: the command that rebuilds the table, quoted in the notes.
    """
    lines = table(rows, COLUMNS).rstrip("\n").split("\n")
    notes = [
        "",
        "Every model trained from scratch on the same data with the quick start's crop, batch size, "
        "augmentation, loss and optimizer, for the same wall-clock budget (stopping after the epoch in "
        f"which it ran out; {'; '.join(sorted({r['setup'] for r in rows}))}); the final weights are "
        "scored on the test split. Dice: pixel Dice of the lesion class "
        "over the split; lesion Dice: mean over true lesions (missed = 0); HD95: mean over slices with "
        "lesion in both truth and prediction. train img/s: training throughput including data loading "
        "and augmentation; ms / 512² slice: median model time for one 3-channel 512×512 slice "
        "(batch 1, eval, no grad, after warm-up).",
    ]
    reduced = [r for r in rows if r["reduction"] and not r["reduction"].startswith("none")]
    if reduced:
        notes += ["", "Reduced to train on a CPU: " + "; ".join(f"{r['model']}: {r['reduction']}" for r in reduced)
                  + "."]
    devices = sorted({f"{r['device']} ({r['threads']} threads)" if r["threads"] else r["device"] for r in rows})
    roots = sorted({r["data_root"] for r in rows})
    stamp = time.strftime("%Y-%m-%d", time.localtime(max((r["start_time"] for r in rows), default=0) / 1000))
    notes += ["", f"Measured on {', '.join(devices)}; data.root {', '.join(roots)}; latest runs {stamp}. "
              f"Rebuild from the MLflow runs: `{rebuild}`."]
    return "\n".join(lines + notes) + "\n"


def build_table(
    tracking_uri: str, experiment: str = EXPERIMENT, out: str | Path | None = None,
    rebuild: str = "python benchmarks/compare_models.py --table-only",
) -> str:
    """Read the latest zoo runs from MLflow, format the table and (atomically) write it to ``out``."""
    from medseg.io import atomic_write_text

    rows = table_rows(latest_zoo_runs(tracking_uri, experiment))
    if not rows:
        raise LookupError(f"no finished runs tagged zoo=1 in experiment {experiment!r} of {tracking_uri}")
    text = markdown_table(rows, rebuild)
    if out is not None:
        atomic_write_text(Path(out), text)
    return text


# ----------------------------------------------------------------------------- entry point


def run_zoo(
    models: list[str],
    budget_min: float,
    data_root: str | Path | None = None,
    output_dir: str | Path = "outputs/compare",
    tracking_uri: str | None = None,
    steps_per_epoch: int = 20,
    extra: list[str] | None = None,
    warmup: int = 3,
    repeats: int = 10,
    experiment: str = EXPERIMENT,
) -> tuple[list[ZooRun], dict[str, str]]:
    """Train every model in ``models`` (zoo keys) for ``budget_min`` minutes each; go on after a failure.

    Returns:
        ``(finished runs, {model: error message} for the models that failed)``.
    """
    from tqdm.auto import tqdm

    done: list[ZooRun] = []
    failed: dict[str, str] = {}
    bar = tqdm(models, desc="model zoo", unit="model", dynamic_ncols=True)
    for key in bar:
        bar.set_description(f"model zoo: {key}")
        model = ZOO_BY_KEY[key]
        ov = zoo_overrides(model, budget_min, data_root, output_dir, tracking_uri, steps_per_epoch, extra,
                           experiment)
        t0 = time.monotonic()
        try:
            run = run_model(model, ov, budget_min, warmup, repeats)
        except Exception as e:  # noqa: BLE001 — one model's failure must not cost the others' runs
            failed[key] = f"{e.__class__.__name__}: {e}"
            tqdm.write(f"{key}: FAILED after {(time.monotonic() - t0) / 60:.1f} min — {failed[key]}")
            log.debug("zoo model %s failed", key, exc_info=True)
            continue
        done.append(run)
        m = run.metrics
        tqdm.write(f"{key}: {int(m['zoo/steps'])} steps in {m['zoo/train_min']:.1f} min, "
                   f"{m['zoo/train_images_per_s']:.1f} img/s, {m['zoo/infer_ms_512']:.0f} ms/512² slice, "
                   f"{m['zoo/params'] / 1e6:.2f} M params (run {run.run_id}, "
                   f"{(time.monotonic() - t0) / 60:.1f} min in all)")
    bar.close()
    return done, failed


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(m.key for m in ZOO),
                   help=f"comma-separated zoo models (default: all of {', '.join(m.key for m in ZOO)})")
    p.add_argument("--budget-min", type=float, default=3.0, help="wall-clock training minutes per model")
    p.add_argument("--data", default=None, help="data.root (default: the quick start's data/demo, generated if absent)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///<output-dir>/mlflow.db)")
    p.add_argument("--output-dir", default="outputs/compare", help="run folders and the default MLflow store")
    p.add_argument("--steps-per-epoch", type=int, default=20, help="steps between checks of the time budget")
    p.add_argument("--infer-repeats", type=int, default=10, help="timed 512² inference calls (median reported)")
    p.add_argument("--infer-warmup", type=int, default=3, help="untimed inference calls before timing")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every model (repeatable), e.g. --set train.threads=1")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from existing MLflow runs")
    p.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment name")
    p.add_argument("--out", default="docs/model_zoo.md", help="markdown file the table is written to")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (unless ``--table-only``), then write and print the table."""
    from medseg.tracking import resolve_tracking_uri

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    uri = resolve_tracking_uri(args.tracking_uri, args.output_dir)
    failed: dict[str, str] = {}
    if not args.table_only:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in ZOO_BY_KEY]
        if unknown or not models:
            print(f"compare_models: unknown model(s) {', '.join(unknown) or '(none given)'}; "
                  f"valid: {', '.join(ZOO_BY_KEY)}", file=sys.stderr)
            return 2
        if args.budget_min <= 0:
            print("compare_models: --budget-min must be > 0", file=sys.stderr)
            return 2
        _, failed = run_zoo(models, args.budget_min, args.data, args.output_dir, args.tracking_uri,
                            args.steps_per_epoch, args.overrides, args.infer_warmup, args.infer_repeats,
                            args.experiment)
    rebuild = ["python benchmarks/compare_models.py --table-only"]
    defaults = build_parser().parse_args([])
    for opt in ("tracking_uri", "output_dir", "experiment", "out"):
        if getattr(args, opt) != getattr(defaults, opt) and not (opt == "output_dir" and args.tracking_uri):
            rebuild.append(f"--{opt.replace('_', '-')} {getattr(args, opt)}")
    try:
        text = build_table(uri, args.experiment, args.out, " ".join(rebuild))
    except LookupError as e:
        print(f"compare_models: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"table written to {args.out}")
    print(f"MLflow: mlflow ui --backend-store-uri {uri}  (experiment {args.experiment!r})")
    if failed:
        print("failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
