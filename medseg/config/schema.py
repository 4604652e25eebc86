"""The config schema: one dataclass per section of the typed config tree (:class:`Config` is the root).

Every field has a default; comments above a field are its documentation (docs/configuration.md's config
reference table lists every key, and a test checks that it does). Loading, ``--set`` overrides and type
checks live in :mod:`medseg.config`, which re-exports these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DataConfig:
    """Where the data is and how slices become samples.

    ``name`` picks the dataset (``deeplesion``, ``folder``, ``nifti``, ``dicom``).
    """

    name: str = "deeplesion"
    root: str = "data/demo"
    #: quick start only: write ``medseg demo-data`` output to ``root`` when it is missing
    generate_if_missing: bool = False
    #: patients of the generated DeepLesion-format demo data — the one place this number lives
    #: (``medseg demo-data`` and ``generate_demo_data`` default to it); 90 gives a test split of
    #: 24 key slices with 37 lesions
    demo_patients: int = 90
    demo_seed: int = 0
    #: input channels: key slice ± neighbours (1 = 2-D)
    context_slices: int = 3
    #: physical distance between neighbouring context slices, in mm (DeepLesion / DICOM / NIfTI)
    slice_offset_mm: float = 2.0
    #: the window rule (medseg/data/windowing.py): "fixed": window_range everywhere; "multi": each of
    #: `windows` as input channels (window-major × context); "dicom": DeepLesion rows' DICOM_windows / a
    #: DICOM series' first WindowCenter/WindowWidth — annotation information, warned about at predict
    #: (PNG/TIFF folders: the dtype's range). The shipped DeepLesion configs set "fixed".
    window: Literal["dicom", "fixed", "multi"] = "dicom"
    window_range: list[float] = field(default_factory=lambda: [-1024.0, 3071.0])
    windows: list[list[float]] = field(
        default_factory=lambda: [[-1024.0, 3071.0], [-175.0, 275.0], [-1500.0, 500.0]])
    #: training only: added slices without a lesion, per key slice (DeepLesion; 0 = none)
    negative_rate: float = 0.0
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
    #: displacement standard deviation in pixels of the training grid (after data.spacing_mm)
    sigma: float = 10.0
    points: int = 3
    prob: float = 1.0
    #: what the coarse grid spans: "slice" = the whole slice (the paper: its whole input tile),
    #: "extent" = ``extent`` pixels centred on the crop, "crop" = the crop itself (crop-relative:
    #: the same sigma deforms a small crop more)
    grid: Literal["slice", "extent", "crop"] = "slice"
    #: [h, w] pixels the grid spans when grid = "extent" (the paper's input tile: 572)
    extent: list[int] = field(default_factory=lambda: [572, 572])


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
    #: run elastic deformation, flips, intensity and noise batched on the training device (the CPU
    #: workers only cut crops and draw the random numbers); the CPU chain stays the reference
    accelerator: bool = False


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
class PropagateConfig:
    """Slice-propagated training (medseg/training/propagate.py, docs/training.md): after the key-slice
    stage the model segments each lesion's neighbouring slices; consistent masks join the training set."""

    enabled: bool = False
    #: propagation rounds, at fractions start, start + (1 - start)/rounds, … of the schedule's steps
    rounds: int = 3
    start: float = 0.4
    #: slices added outward per direction and round (each predicted by the current model)
    slices_per_round: int = 1
    #: acceptance: |new ∩ previous| / |new| at least this
    min_overlap: float = 0.5
    #: acceptance: area at most this × the previous slice's (1.0 = no larger)
    max_area_ratio: float = 1.0
    #: acceptance: inside the lesion's RECIST box grown by this fraction of its longer side
    box_margin: float = 0.2
    #: acceptance: at least this many pixels (smaller: the lesion ended)
    min_area_px: int = 4
    #: "none" or "grabcut" (OpenCV GrabCut in the grown box, seeded by the propagated mask)
    refine: Literal["none", "grabcut"] = "none"
    #: where a slice's candidate mask comes from: "model" (the current model's prediction) or "grabcut"
    #: (GrabCut in the grown box seeded by the previous slice's mask; needs no model, so start can be 0)
    source: Literal["model", "grabcut"] = "model"
    #: acceptance (0 = off): the mask's mean intensity differs from the previous mask's by less than this
    #: × the difference of its surrounding 3-pixel ring (past the lesion's end the mask looks like its ring)
    min_contrast: float = 0.0
    #: lesions extended at once with ``source: grabcut`` (threads; 0 = one per CPU core; the model source: 1)
    workers: int = 0
    #: accepted slices drawn in the MLflow montage per round
    montage: int = 8


@dataclass
class HardNegativeConfig:
    """Hard-negative mining (medseg/training/hardneg.py, docs/training.md): at fractions of the schedule the
    current model segments lesion-free slices of the training series; slices where it finds lesions join the
    training set with an empty label, their crops centred on what it found."""

    enabled: bool = False
    #: rounds after these fractions of the schedule's optimizer steps
    at: list[float] = field(default_factory=lambda: [0.5])
    #: lesion-free slices of the training series the model segments per round (drawn seeded)
    slices: int = 64
    #: a pixel is a false positive at this foreground probability or above
    threshold: float = 0.5
    #: components smaller than this (pixels on the model's grid) are left alone
    min_pixels: int = 10


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
    #: glibc: freed blocks up to this many MiB stay in the heap (medseg.runtime.hold_freed_memory; 0 = default)
    hold_freed_mib: int = 1024
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
    #: a wall-clock budget in minutes: after ``budget_probe_steps`` steps and one timed validation
    #: it becomes a step count (stored in checkpoints) that the schedule is laid over (None = none)
    time_limit_min: float | None = None
    #: optimizer steps measured before the budget is converted into a step count
    budget_probe_steps: int = 20
    #: slice-propagated training (PropagateConfig; on in the DeepLesion pipelines)
    propagate: PropagateConfig = field(default_factory=PropagateConfig)
    #: hard-negative mining (HardNegativeConfig)
    hard_negatives: HardNegativeConfig = field(default_factory=HardNegativeConfig)
    #: wrap the model with torch.compile for the training steps (needs a C++ compiler; validation runs eager)
    compile: bool = False


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
    #: the operating point (medseg.inference.postprocess): one probability threshold per foreground
    #: class; None = the model's calibrated one if it has one, else argmax; [] = argmax
    threshold: list[float] | None = None
    #: connected components smaller than this (mm²) become background; None = the model's calibrated
    #: value if it has one, else 0 (keep all)
    min_object_mm2: float | None = None
    #: hysteresis (one per foreground class, each below its ``threshold``): a lesion's pixels down to
    #: this probability are kept when its connected component — 3-D within a series (``predict.connectivity``),
    #: 2-D on a single image — reaches ``threshold`` somewhere; components that never do are dropped.
    #: None = the model's calibrated value if it has one, else off; [] = off
    low_threshold: list[float] | None = None


@dataclass
class CalibrationConfig:
    """How ``medseg calibrate`` chooses the operating point on the validation split (never on test)."""

    #: calibrate best.pt on the val split after training, before ``train.evaluate_splits``
    after_training: bool = False
    #: the validation metric to optimise (any key validation reports) and its direction
    metric: str = "dice"
    mode: Literal["max", "min"] = "max"
    #: foreground probability thresholds tried (the same for every foreground class)
    thresholds: list[float] = field(default_factory=lambda: [round(0.1 + 0.05 * i, 2) for i in range(17)])
    #: minimum object sizes tried, in mm²
    min_object_mm2: list[float] = field(default_factory=lambda: [0.0, 10.0, 25.0, 50.0, 100.0])
    #: hysteresis low thresholds tried beside plain thresholding (``inference.low_threshold``; each paired
    #: with every larger threshold of the grid); [] = plain thresholds only
    low_thresholds: list[float] = field(default_factory=list)
    #: the most false-positive components allowed at the chosen point — per series on the volume protocol
    #: (vol_fp_per_volume), per image on key slices (fp_per_image); points above it are not chosen (none
    #: within it: the point with the fewest, with a warning). None = no limit
    max_fp: float | None = None


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
    connectivity: Literal[1, 2] = 2
    #: surface Dice tolerance in mm
    nsd_tolerance_mm: float = 2.0
    #: also report the ISBI 2012 EM measures pixel_error and rand_error, and split_merge_error (medseg.metrics.em)
    segmentation_errors: bool = False
    #: the lesion-ROI protocol (``roi_*`` keys, :mod:`medseg.metrics.roi`) beside the whole-slice one
    roi_protocol: bool = True
    #: ROI = the lesion's box enlarged on each side by this fraction of the box's width / height
    roi_margin: float = 0.5
    #: predicted pixels on another true lesion inside a ROI: "background" = they count as false
    #: positives of this lesion (the single-lesion crop protocol); "ignore" = left out of the score
    roi_other_lesions: Literal["background", "ignore"] = "background"
    #: FROC on whole slices (``froc_*`` keys, :mod:`medseg.metrics.froc`)
    froc: bool = True
    #: FROC candidates: connected components of the foreground probability above this (low) value
    froc_threshold: float = 0.1
    #: bootstrap resamples for the confidence intervals of ``medseg evaluate`` (0 = no intervals)
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0
    #: what is resampled: "auto" = patients where the data has them, else series, else images
    bootstrap_unit: Literal["auto", "patient", "series", "image"] = "auto"
    #: confidence level of the intervals
    ci_level: float = 0.95


@dataclass
class EvaluationConfig:
    """How validation and ``medseg evaluate`` run (not what they measure: that is ``metrics``)."""

    #: slices per forward pass (slices of different sizes go in separate batches, never padded)
    batch_size: int = 4
    #: ``medseg evaluate``: write and log the PNG plots (FROC, Dice by type, long axis, worst lesions)
    plots: bool = True
    #: lesions in the worst-lesions overlay (lowest ROI Dice, else lowest lesion Dice)
    worst_lesions: int = 10
    #: what evaluate / calibrate score: "key" slices (DeepLesion's protocol), every slice of each series
    #: ("volume", needs true masks on every slice), "both", or "auto" = both where such masks exist, else key
    protocol: Literal["auto", "key", "volume", "both"] = "auto"


@dataclass
class StoreConfig:
    """``medseg predict --store-back`` / ``medseg listen``: the DICOM node (C-STORE SCP) results are sent to."""

    #: its AE title ("" = no C-STORE destination; DICOMweb input stores back by STOW-RS)
    ae_title: str = ""
    host: str = ""
    port: int = 104
    #: the AE title medseg calls it with
    calling_ae_title: str = "MEDSEG"


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
    #: ``--engine ray``: model actors when the cluster has no GPU (with GPUs: one actor per GPU)
    actors: int = 1
    #: write the DICOM SEG (``seg.dcm``) for DICOM input
    write_seg: bool = True
    #: write the TID 1500 measurement report (``sr.dcm``, one group per lesion) beside the SEG
    write_sr: bool = True
    #: where --store-back sends the SEG and SR by C-STORE (docs/pacs.md)
    store: StoreConfig = field(default_factory=StoreConfig)
    #: write overlay PNGs of the slices that hold lesions
    overlays: bool = True
    #: lesions: 3-D connectivity of voxels (1 = faces, 2 = + edges, 3 = + corners)
    connectivity: int = 3
    #: torch CPU threads while predicting (None = every core this process may use); never ``train.threads``
    threads: int | None = None
    #: glibc: freed blocks up to this many MiB stay in the heap for the next forward instead of being
    #: unmapped and faulted back in (medseg.runtime.hold_freed_memory; process-wide; 0 = glibc's default)
    hold_freed_mib: int = 1024
    #: wrap the model with torch.compile (needs a C++ compiler; first forward of each shape compiles)
    compile: bool = False


@dataclass
class TrackingConfig:
    """MLflow tracking. ``uri`` None = a local SQLite store, ``<output_dir>/mlflow.db``.

    A remote ``uri`` (``http(s)://``) is probed at the start of ``train`` / ``evaluate`` / ``calibrate``
    (a few seconds at most). ``offline`` says what happens when it does not answer:

    - ``false`` (the default): stop with one line naming the URI and the ways forward. A server that is
      configured but does not answer is most often a typo or a server not started yet; recording
      somewhere else without being asked would leave the run where nobody looks for it.
    - ``"auto"``: warn in one line and record into the local store instead.
    - ``true``: never contact the server; record into the local store.

    Credentials belong in ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or
    ``MLFLOW_TRACKING_TOKEN``); a password given in ``uri`` is moved there for the process and
    redacted (``***``) wherever medseg writes or prints the URI (docs/tracking.md).
    """

    enabled: bool = True
    uri: str | None = None
    #: false / "auto" / true: what an unreachable remote ``uri`` means (see above)
    offline: bool | Literal["auto"] = False
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
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    output_dir: str = "outputs"
    #: the pipeline's name (defaults to the YAML file's stem)
    name: str = "medseg"
