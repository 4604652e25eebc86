"""The typed config tree: YAML files (composed from fragments) → dataclasses, with ``--set`` overrides.

A pipeline YAML may list fragments under ``include:`` (paths relative to the including file); they
are deep-merged in order and the file's own keys win. ``--set a.b=c`` overrides any key after
loading; the value is parsed as YAML (``--set train.epochs=2``, ``--set data.window_range=[-160,240]``).
An unknown key or a value of the wrong type raises :class:`ConfigError` naming the key.

Example:
    >>> cfg = load_config("pipelines/quickstart.yaml", ["train.epochs=2"])
    >>> cfg.train.epochs
    2
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


# ----------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    """Where the data is and how slices become samples.

    ``name`` picks the dataset (``deeplesion``, ``folder``, ``nifti``, ``dicom``).
    """

    name: str = "deeplesion"
    root: str = "data/demo"
    #: quick start only: write ``medseg demo-data`` output to ``root`` when it is missing
    generate_if_missing: bool = False
    demo_patients: int = 40
    demo_seed: int = 0
    #: input channels: key slice ± neighbours (1 = 2-D)
    context_slices: int = 3
    #: physical distance between neighbouring context slices, in mm (DeepLesion / DICOM / NIfTI)
    slice_offset_mm: float = 2.0
    #: "dicom" uses each row's DICOM window (DeepLesion); "fixed" uses window_range
    window: Literal["dicom", "fixed"] = "dicom"
    window_range: list[float] = field(default_factory=lambda: [-1024.0, 3071.0])
    #: resample in-plane to this mm/px (None keeps the native spacing)
    spacing_mm: float | None = None
    #: DeepLesion: how RECIST marks become masks ("ellipse" | "grabcut")
    recist_mask: Literal["ellipse", "grabcut"] = "ellipse"
    include_noisy: bool = False
    #: DeepLesion coarse lesion types to keep (empty = all)
    lesion_types: list[int] = field(default_factory=list)
    #: classes including background
    num_classes: int = 2
    #: nifti: the axis slices are taken along
    axis: int = 2
    #: folder / nifti / dicom datasets have no official split: fractions of cases, split by seed
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0


@dataclass
class ElasticConfig:
    """U-Net elastic deformation: random displacements on a coarse grid, bicubic interpolation."""

    enabled: bool = True
    sigma: float = 10.0
    points: int = 3
    prob: float = 1.0


@dataclass
class WeightMapConfig:
    """U-Net border weight map w = w_c + w0·exp(−(d1+d2)²/2σ²)."""

    enabled: bool = True
    w0: float = 10.0
    sigma: float = 5.0
    class_balance: bool = True


@dataclass
class TransformsConfig:
    """Preprocessing and augmentation (applied in ``medseg.transforms.build_transforms``)."""

    #: training crop (H, W) around a lesion; None trains on whole slices
    crop_size: list[int] | None = None
    #: probability that a training crop is centred near a lesion (else anywhere in the body)
    lesion_crop_prob: float = 0.8
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    flip_prob: float = 0.5
    rotate_prob: float = 0.0
    rotate_range_deg: float = 15.0
    intensity_scale: float = 0.0
    intensity_shift: float = 0.0
    noise_std: float = 0.0
    weight_map: WeightMapConfig = field(default_factory=WeightMapConfig)


@dataclass
class ModelConfig:
    """``name`` picks a registered model; ``params`` are passed to its constructor."""

    name: str = "unet"
    params: dict[str, Any] = field(default_factory=dict)
    #: optional local weights file (state dict or medseg checkpoint); never downloaded
    pretrained: str | None = None


@dataclass
class LossConfig:
    """``name`` picks a registered loss; ``params`` are passed to it."""

    name: str = "weighted_ce_dice"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation, schedule, validation and checkpointing."""

    epochs: int = 10
    #: stop after this many optimizer steps in total (None = no limit); smoke tests use 2
    max_steps: int | None = None
    #: optimizer steps per epoch (None = one pass over the training set)
    steps_per_epoch: int | None = None
    batch_size: int = 8
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.99
    weight_decay: float = 0.0
    #: "poly" (power 0.9), "cosine" or "constant"
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    grad_clip: float | None = 1.0
    #: "auto" = CUDA when present, else CPU; or "cpu", "cuda", "cuda:1"
    device: str = "auto"
    #: mixed precision: "auto" = float16 on CUDA only; "on" = also bfloat16 autocast on the CPU
    amp: Literal["auto", "on", "off"] = "auto"
    seed: int = 0
    val_every: int = 1
    #: validation metric that picks the best checkpoint (any key validation reports, e.g. dice, hd95, loss)
    monitor: str = "dice"
    #: "max" = a higher ``monitor`` is better (Dice, IoU); "min" = lower is better (HD95, loss)
    monitor_mode: Literal["max", "min"] = "max"
    #: stop when ``monitor`` has not improved for this many validations (None = never)
    early_stop_patience: int | None = None
    num_workers: int = 0
    #: torch CPU threads (None = torch's default)
    threads: int | None = None
    #: number of validation examples drawn in the overlay grid
    overlay_count: int = 8
    #: keep decoded (pre-augmentation) samples in memory (read once, before training, shared by workers)
    cache_samples: bool = True
    #: memory bound of that cache in GB; samples past it are read from disk every epoch
    cache_max_gb: float = 4.0
    #: also checkpoint every N optimizer steps inside an epoch (None = at epoch ends only)
    checkpoint_every_steps: int | None = None
    #: log loss and learning rate every N optimizer steps
    log_every: int = 10
    #: after training, evaluate the best model on these splits and log into the same run
    evaluate_splits: list[str] = field(default_factory=list)
    #: a wall-clock budget in minutes: stop after the epoch in which it runs out (None = none)
    time_limit_min: float | None = None


@dataclass
class CRFConfig:
    """Fully-connected CRF post-processing (DeepLab v2 defaults)."""

    enabled: bool = False
    iterations: int = 10
    gaussian_weight: float = 3.0
    gaussian_sxy: float = 1.0
    bilateral_weight: float = 4.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0


@dataclass
class InferenceConfig:
    """How a trained model predicts a slice."""

    #: "whole" runs the model on the whole slice; "sliding" tiles it
    mode: Literal["whole", "sliding"] = "whole"
    tile_size: list[int] = field(default_factory=lambda: [256, 256])
    overlap: float = 0.25
    #: "gaussian" blending, "constant", or "overlap_tile" (U-Net paper: keep each tile's valid centre)
    blend: Literal["gaussian", "constant", "overlap_tile"] = "gaussian"
    batch_size: int = 4
    crf: CRFConfig = field(default_factory=CRFConfig)
    #: Gaussian blending: sigma = sigma_scale × tile size (MONAI's default)
    sigma_scale: float = 0.125
    #: test-time augmentation: average the logits of each tile and its flips
    tta_flips: bool = False
    #: test-time augmentation: average over tiles resized by these factors (DeepLab's multi-scale inputs)
    tta_scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class MetricsConfig:
    """The lesion-evaluation protocol (see :func:`medseg.metrics.match_lesions`), stated per run.

    A predicted connected component matches a true lesion under ``match_rule``: ``overlap`` = they
    share at least ``min_overlap_px`` pixels; ``iou`` = their IoU is at least ``iou_threshold``.
    """

    #: per-lesion evaluation (matching, lesion Dice, RECIST errors); off = pixel metrics only
    lesion_metrics: bool = True
    match_rule: Literal["overlap", "iou"] = "overlap"
    iou_threshold: float = 0.5
    min_overlap_px: int = 1
    #: predicted components: 2 = 8-connected, 1 = 4-connected
    connectivity: int = 2
    #: surface Dice tolerance in mm
    nsd_tolerance_mm: float = 2.0


@dataclass
class EvaluationConfig:
    """How validation and ``medseg evaluate`` run (not what they measure: that is ``metrics``)."""

    #: slices per forward pass (slices of different sizes go in separate batches, never padded)
    batch_size: int = 4


@dataclass
class PredictConfig:
    """``medseg predict``: which series of an input folder to process and what to write for each."""

    #: DICOM Modality values to process (empty = any)
    modalities: list[str] = field(default_factory=lambda: ["CT", "MR"])
    #: skip stacks with fewer slices
    min_slices: int = 1
    #: stack orientations to process: axial, coronal, sagittal, oblique
    orientations: list[str] = field(default_factory=lambda: ["axial", "coronal", "sagittal", "oblique"])
    #: BodyPartExamined values to process (case-insensitive; empty = any)
    body_parts: list[str] = field(default_factory=list)
    #: a series whose slices have several orientations: "split" into one stack each, or "skip" it
    mixed_orientation: Literal["split", "skip"] = "split"
    #: slices per forward pass
    batch_size: int = 4
    #: cases read and pre-processed ahead of the one being predicted (a background thread; 0 = no overlap)
    prefetch: int = 2
    #: write the DICOM SEG (``seg.dcm``) for DICOM input
    write_seg: bool = True
    #: write overlay PNGs of the slices that hold lesions
    overlays: bool = True
    #: lesions: 3-D connectivity of voxels (1 = faces, 2 = + edges, 3 = + corners)
    connectivity: int = 3


@dataclass
class TrackingConfig:
    """MLflow tracking. ``uri`` None = a local store at ``<output_dir>/mlruns``."""

    enabled: bool = True
    uri: str | None = None
    #: experiment name (None = the pipeline file's stem)
    experiment: str | None = None


@dataclass
class Config:
    """The whole run configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    output_dir: str = "outputs"
    #: the pipeline's name (defaults to the YAML file's stem)
    name: str = "medseg"


# ----------------------------------------------------------------------------- conversion


_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (dicts → dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key} = {value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of: {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected an integer")
        return value
    if tp is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept exactly such numeric strings
        if isinstance(value, str) and _SCI.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a string")
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(
                f"unknown config key {full!r}; valid keys here: {', '.join(sorted(names))}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], full)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a plain (nested) dict."""
    return _from_dict(Config, data)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain nested dict (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins. Neither input is modified."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and resolve its ``include:`` list (relative to the file), recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    rp = path.resolve()
    if rp in _seen:
        raise ConfigError(f"include cycle: {' -> '.join(map(str, _seen + (rp,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, read_yaml(path.parent / inc, _seen + (rp,)))
    return deep_merge(merged, data)


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override to a nested dict (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value (e.g. train.epochs=2)")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    out = dict(data)
    node = out
    for p in parts[:-1]:
        child = node.get(p)
        child = dict(child) if isinstance(child, dict) else {}
        node[p] = child
        node = child
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a pipeline YAML (with includes), apply ``--set`` overrides and validate.

    Args:
        path: the pipeline YAML; None starts from the defaults.
        overrides: ``key=value`` strings, applied in order.

    Raises:
        ConfigError: missing file, bad YAML, unknown key or wrong type (the message names the key).
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if path is not None and "name" not in data:
        data["name"] = Path(path).stem
    for ov in overrides or []:
        data = apply_override(data, ov)
    return from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
