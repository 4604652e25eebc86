"""The Trainer (fit / validate / checkpoint / resume) and model evaluation.

One :class:`Trainer`, configured by the :class:`~medseg.config.Config` tree — never subclassed.

Reproducibility: every random choice in an epoch is a function of ``(train.seed, epoch, index)``:
the sample order comes from :class:`EpochSampler`, the augmentation of each sample from
``Compose.set_random_state(seed=sample_seed(seed, epoch, index))``, and torch's RNG (dropout) is
saved in each checkpoint. So a run killed at any point and resumed from its last checkpoint replays
the same batches and ends with the same weights as an uninterrupted run (on the CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import medseg.losses  # noqa: F401  (registers the losses)
from medseg.config import Config, from_dict, save_config, to_dict
from medseg.data import build_dataset, collate
from medseg.registry import LOSSES
from medseg.tracking import Tracker

log = logging.getLogger("medseg.engine")

CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable checkpoint, ...)."""


# ----------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device={name!r} but CUDA is not available; use train.device=auto")
    return dev


def use_amp(setting: str, device: torch.device) -> bool:
    """Mixed precision: ``auto`` = on for CUDA only; ``on`` = also on the CPU (bfloat16); ``off``."""
    if setting == "auto":
        return device.type == "cuda"
    if setting not in ("on", "off"):
        raise TrainingError(f"train.amp must be auto, on or off, got {setting!r}")
    return setting == "on"


def amp_dtype(device: torch.device) -> torch.dtype:
    """float16 (with loss scaling) on CUDA; bfloat16 on the CPU, where it needs no scaling."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def init_distributed() -> tuple[int, int, int]:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): (rank, world, local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """The seed of sample ``index`` in ``epoch`` (stable across runs and resumes).

    ``stream`` separates independent uses: 0 = augmentation, 1 = the epoch's sample order.
    """
    return int(np.random.SeedSequence([stream, seed, epoch, index]).generate_state(1)[0])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to ``path`` via a temp file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class EpochSampler(Sampler[int]):
    """Deterministic sample order for one epoch: concatenated permutations seeded by (seed, epoch).

    Args:
        n: dataset size.
        num_samples: indices per epoch (may exceed ``n``: further permutations follow).
        seed: ``train.seed``.
        start: skip this many indices (resuming inside an epoch).
        rank, world: under DDP each process takes every ``world``-th index from ``rank`` on
            (``num_samples`` and ``start`` then count all processes' samples).
    """

    def __init__(
        self, n: int, num_samples: int, seed: int, epoch: int = 0, start: int = 0, rank: int = 0, world: int = 1
    ) -> None:
        self.n, self.num_samples, self.seed, self.epoch, self.start = n, num_samples, seed, epoch, start
        self.rank, self.world = rank, world

    def indices(self) -> list[int]:
        """All indices of the epoch, before skipping ``start``."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0, stream=1))
        out: list[int] = []
        while len(out) < self.num_samples:
            out.extend(torch.randperm(self.n, generator=g).tolist())
        return out[: self.num_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :][self.rank :: self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples - self.start, self.world))


class CachedDataset(Dataset):
    """Keeps each decoded sample (before augmentation) in memory after its first read."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        if i not in self._cache:
            self._cache[i] = self.base[i]
        return self._cache[i]


class TransformedDataset(Dataset):
    """Applies a MONAI ``Compose`` to each sample with a per-(epoch, index) seed."""

    def __init__(self, base: Dataset, transform: Any, seed: int) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        sample = self.base[i]
        if sample is None:
            return None
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=sample_seed(self.seed, self.epoch, i))
        return self.transform(dict(sample))


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    """Adam or SGD from ``train.*``."""
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    raise TrainingError(f"train.optimizer must be adam or sgd, got {t.optimizer!r}")


def lr_factor(schedule: str, step: int, total: int, power: float = 0.9) -> float:
    """Learning-rate multiplier at ``step`` of ``total``: poly ``(1 − step/total)^power``, cosine or constant."""
    frac = min(step / max(total, 1), 1.0)
    if schedule == "poly":
        return (1.0 - frac) ** power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "constant":
        return 1.0
    raise TrainingError(f"train.schedule must be poly, cosine or constant, got {schedule!r}")


def environment_info() -> dict[str, Any]:
    """Package versions and the git commit (for the run's environment artifact)."""
    import platform
    import subprocess
    from importlib import metadata

    pkgs = {}
    for name in ("medseg", "torch", "monai", "numpy", "scipy", "mlflow", "pydicom", "highdicom",
                 "nibabel", "SimpleITK", "elasticdeform", "opencv-python-headless"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    commit = None
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": pkgs,
        "git_commit": commit,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


# ----------------------------------------------------------------------------- model I/O


def load_model(ref: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained model from a checkpoint file, a ``medseg train`` run folder or an MLflow URI.

    Args:
        ref: ``.../best.pt``, a run folder (its ``checkpoints/best.pt``, else ``last.pt``), or an
            MLflow model URI (``runs:/<run_id>/model``, ``models:/<name>/<version>``).

    Returns:
        ``(model in eval mode, info)`` where info holds ``config`` (a dict) when known.
    """
    from medseg.models import build_model

    ref_s = str(ref)
    if ref_s.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow.pytorch

        model = mlflow.pytorch.load_model(ref_s, map_location=torch.device(device))
        return model.eval(), {"config": None, "source": ref_s}
    path = Path(ref_s)
    if path.is_dir():
        for cand in ("checkpoints/best.pt", "checkpoints/last.pt", "best.pt", "last.pt"):
            if (path / cand).is_file():
                path = path / cand
                break
        else:
            raise TrainingError(f"{ref}: no checkpoints/best.pt or checkpoints/last.pt in this folder")
    if not path.is_file():
        raise TrainingError(
            f"--model {ref}: not a checkpoint file, a run folder or an MLflow model URI (runs:/<id>/model)"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise TrainingError(f"{path}: not a medseg checkpoint (expected keys 'model' and 'config')")
    cfg = from_dict(ckpt["config"])
    model = build_model(cfg.model.name, ckpt["in_channels"], ckpt["num_classes"], cfg.model.params)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), {"config": ckpt["config"], "source": str(path), "epoch": ckpt.get("epoch")}


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` for images ``(B, C, H, W)``: whole-slice or sliding-window (MONAI)."""
    image = image.to(device)
    inf = cfg.inference
    amp = use_amp(cfg.train.amp, device)
    with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
        if inf.mode == "whole":
            out = model(image)
        elif inf.mode == "sliding":
            from monai.inferers import sliding_window_inference

            from medseg.models.blocks import mirror_pad

            h, w = image.shape[-2:]
            th, tw = inf.tile_size
            # mirror the border so every tile sees real context (MONAI's reflect padding refuses
            # pads larger than the image, so pad here to at least one tile)
            ph, pw = max(th - h, 0), max(tw - w, 0)
            padded = mirror_pad(image, ph // 2, ph - ph // 2, pw // 2, pw - pw // 2) if ph or pw else image
            out = sliding_window_inference(
                padded, roi_size=(th, tw), sw_batch_size=inf.batch_size, predictor=model,
                overlap=inf.overlap, mode=inf.blend, padding_mode="reflect",
            )
            out = out[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
        else:
            raise TrainingError(f"inference.mode must be whole or sliding, got {inf.mode!r}")
    return out.float()


def postprocess(logits: torch.Tensor, image: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Class map ``(B, H, W)`` from logits, refined by the dense CRF when ``inference.crf.enabled``."""
    if not cfg.inference.crf.enabled:
        return logits.argmax(1)
    from medseg.crf import crf_labels

    probs = torch.softmax(logits, 1).cpu().numpy()
    img = image.cpu().numpy()
    out = [crf_labels(probs[b], img[b, img.shape[1] // 2], cfg.inference.crf) for b in range(len(probs))]
    return torch.as_tensor(np.stack(out)).long()


# ----------------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    run_dir: Path
    run_id: str | None
    best_metric: float | None
    best_checkpoint: Path | None
    last_checkpoint: Path
    epochs_done: int
    steps_done: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_reason: str = "completed"


class Trainer:
    """Train a registered model on a registered dataset as the config says.

    Args:
        cfg: the resolved config.
        tracker: where metrics go (``medseg.tracking``); the null tracker records nothing.
        run_dir: the run's output folder (created); resuming passes the existing folder.
        pipeline_path: the pipeline YAML (logged as an artifact).

    Example:
        >>> cfg = load_config("pipelines/quickstart.yaml", ["train.epochs=1"])
        >>> result = Trainer(cfg, build_tracker(True, None, cfg.output_dir), run_dir).fit()
    """

    def __init__(
        self,
        cfg: Config,
        tracker: Tracker | None = None,
        run_dir: str | Path | None = None,
        pipeline_path: str | Path | None = None,
    ) -> None:
        from medseg.models import build_model
        from medseg.transforms import build_transforms

        self.cfg = cfg
        self.tracker = tracker or Tracker()
        self.pipeline_path = Path(pipeline_path) if pipeline_path else None
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        seed_everything(t.seed)
        self.rank, self.world, local = init_distributed()
        self.device = resolve_device(t.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        if self.rank != 0:  # only rank 0 logs to MLflow and writes checkpoints
            self.tracker = Tracker()
        self.amp = use_amp(t.amp, self.device)

        self.train_base = build_dataset(cfg.data, "train")
        self.val_base = build_dataset(cfg.data, "val")
        if len(self.train_base) == 0:
            raise TrainingError("the training split is empty; check data.root and the data filters")
        if t.cache_samples:
            self.train_base = CachedDataset(self.train_base)
            self.val_base = CachedDataset(self.val_base)
        probe = next((s for s in (self.train_base[i] for i in range(min(len(self.train_base), 8))) if s is not None), None)
        if probe is None:
            raise TrainingError("the first training samples could not be read; see the warnings above")
        self.in_channels = int(probe["image"].shape[0])
        self.num_classes = cfg.data.num_classes

        self.train_set = TransformedDataset(self.train_base, build_transforms(cfg.transforms, train=True), t.seed)
        self.val_set = TransformedDataset(self.val_base, build_transforms(cfg.transforms, train=False), t.seed)

        self.net = build_model(cfg.model.name, self.in_channels, self.num_classes, cfg.model.params)
        if cfg.model.pretrained:
            self._load_pretrained(cfg.model.pretrained)
        self.net.to(self.device)
        self.model: nn.Module = self.net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
        self.loss_fn = LOSSES.build(cfg.loss.name, cfg.loss.params)
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        # loss scaling is for float16 on CUDA only (bfloat16 has float32's range)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.device.type == "cuda")

        self.steps_per_epoch = t.steps_per_epoch or max(
            1, math.ceil(len(self.train_set) / (t.batch_size * self.world))
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(t.schedule, step, self.total_steps, t.poly_power)
        )

        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps done
        self.batch_in_epoch = 0  # batches done inside the current (unfinished) epoch
        self.best_metric: float | None = None
        self.stale = 0  # validations without improvement
        self.history: list[dict[str, float]] = []
        self.run_id: str | None = None

        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path(cfg.output_dir) / cfg.name / f"{cfg.model.name}-{stamp}"
            n = 1
            while run_dir.exists():  # two runs started in the same second get their own folders
                n += 1
                run_dir = Path(cfg.output_dir) / cfg.name / f"{cfg.model.name}-{stamp}-{n}"
            if self.world > 1:  # every rank uses rank 0's folder
                import torch.distributed as dist

                shared = [str(run_dir)]
                dist.broadcast_object_list(shared, src=0)
                run_dir = Path(shared[0])
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # -- schedule ---------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole schedule (``train.max_steps`` caps it)."""
        total = self.cfg.train.epochs * self.steps_per_epoch
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    # -- checkpoints ------------------------------------------------------------------------

    def _load_pretrained(self, path: str) -> None:
        p = Path(path)
        if not p.is_file():
            raise TrainingError(f"model.pretrained = {path}: file not found (weights are never downloaded)")
        state = torch.load(p, map_location="cpu", weights_only=False)
        state = state.get("model", state) if isinstance(state, dict) else state
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        log.info("loaded %s (%d missing, %d unexpected keys)", p, len(missing), len(unexpected))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, optimizer, scheduler, scaler, RNG, counters."""
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "best_metric": self.best_metric,
            "stale": self.stale,
            "history": self.history,
            "run_id": self.run_id,
            "config": to_dict(self.cfg),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
        }

    def save_checkpoint(self, name: str = "last.pt") -> Path:
        """Write a checkpoint atomically (temp file + rename) under ``<run_dir>/checkpoints`` (rank 0)."""
        path = self.ckpt_dir / name
        if self.rank == 0:
            atomic_torch_save(self.state_dict(), path)
        _barrier(self.world)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (the schedule may be longer now)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise TrainingError(f"{path}: checkpoint version {ckpt.get('version')} is not supported")
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.batch_in_epoch = ckpt["batch_in_epoch"]
        self.best_metric, self.stale = ckpt["best_metric"], ckpt["stale"]
        self.history = ckpt["history"]
        self.run_id = ckpt["run_id"]
        # the LR follows the (possibly extended) schedule from the restored step
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = base * lr_factor(self.cfg.train.schedule, self.step, self.total_steps, self.cfg.train.poly_power)

    # -- tracking ---------------------------------------------------------------------------

    def _start_tracking(self) -> None:
        from medseg.config import flatten

        cfg = self.cfg
        experiment = cfg.tracking.experiment or cfg.name
        run_name = self.run_dir.name
        resumed = self.run_id is not None
        self.run_id = self.tracker.start(experiment, run_name, run_id=self.run_id)
        if resumed:
            self.tracker.set_tags({"medseg.resumed_at_step": str(self.step)})
            return
        self.tracker.set_tags({"medseg.run_dir": str(self.run_dir.resolve()), "medseg.model": cfg.model.name})
        params = flatten(to_dict(cfg))
        params["model.num_parameters"] = sum(p.numel() for p in self.net.parameters())
        params["data.in_channels"] = self.in_channels
        params["data.train_samples"] = len(self.train_set)
        params["data.val_samples"] = len(self.val_set)
        self.tracker.log_params(params)
        self.tracker.log_artifact(self.run_dir / "config.yaml", "config")
        if self.pipeline_path and self.pipeline_path.is_file():
            self.tracker.log_artifact(self.pipeline_path, "config")
        env = environment_info()
        base = getattr(self.train_base, "base", self.train_base)
        env["dataset_fingerprint"] = base.fingerprint() if hasattr(base, "fingerprint") else None
        env["device"] = str(self.device)
        env["amp"] = self.amp
        self.tracker.log_text(json.dumps(env, indent=2, default=str), "environment.json")

    # -- loops ------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, sampler: Sampler[int] | None, batch_size: int) -> DataLoader:
        nw = self.cfg.train.num_workers
        # a private generator: creating a loader must not draw from torch's global RNG, or a
        # resumed run (which creates one loader more) would see different dropout masks
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=nw, collate_fn=collate,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(self.cfg.train.seed),
        )

    def _train_step(self, batch: dict[str, Any]) -> float:
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        weight = batch.get("weight")
        weight = weight.to(self.device, non_blocking=True) if weight is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=amp_dtype(self.device), enabled=self.amp):
            logits = self.model(image)
        loss = self.loss_fn(logits.float(), label, weight)
        extra = getattr(self.net, "extra_loss", None)
        if callable(extra):
            loss = loss + extra(label)
        check = loss.detach().clone()
        if self.world > 1:  # every rank must stop together, or the others hang in all-reduce
            import torch.distributed as dist

            dist.all_reduce(check)
        value = float(check) / self.world
        if not math.isfinite(value):
            return value
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return value

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Validation loss and metrics on the val split (whole slices), plus overlay examples."""
        from medseg.metrics import MetricSuite

        self.model.eval()
        suite = MetricSuite(self.num_classes)
        losses: list[float] = []
        examples: list[dict[str, Any]] = []
        self.val_set.epoch = 0
        for batch in self._loader(self.val_set, None, 1):
            if batch is None:
                continue
            logits = predict_logits(self.net, batch["image"], self.cfg, self.device)
            label = batch["label"].to(self.device)
            w = batch.get("weight")
            losses.append(float(self.loss_fn(logits, label, w.to(self.device) if w is not None else None)))
            pred = postprocess(logits, batch["image"], self.cfg).cpu()
            target, inst = _eval_target(batch)
            suite.update(pred, target, inst, [m["spacing"] for m in batch["meta"]], batch["meta"])
            if len(examples) < self.cfg.train.overlay_count:
                examples.append({"image": batch["image"][0].numpy(), "truth": target[0].numpy(),
                                 "pred": pred[0].numpy(), "title": batch["meta"][0].get("id", "")})
        self.model.train()
        metrics = suite.compute()
        metrics["loss"] = float(np.mean(losses)) if losses else float("nan")
        return metrics, examples

    def fit(self, resume: str | Path | None = None) -> TrainResult:
        """Train until ``train.epochs`` (or ``max_steps``, early stopping, the time limit).

        Args:
            resume: a checkpoint to continue from (the run keeps its folder and MLflow run).

        Raises:
            TrainingError: on a non-finite loss (the last good checkpoint is kept).
        """
        from tqdm.auto import tqdm

        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self.load_checkpoint(resume)
            log.info("resuming from %s at epoch %d, step %d", resume, self.epoch, self.step)
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        self._start_tracking()
        # a checkpoint before the first step: a run killed early resumes from here
        if resume is None:
            self.save_checkpoint()
        started = time.monotonic()
        reason = "completed"
        status = "FINISHED"
        try:
            self.model.train()
            while self.epoch < t.epochs and (not t.max_steps or self.step < t.max_steps):
                epoch = self.epoch
                self.train_set.epoch = epoch
                n_batches = self.steps_per_epoch
                if t.max_steps:
                    n_batches = min(n_batches, t.max_steps - self.step + self.batch_in_epoch)
                per_batch = t.batch_size * self.world
                sampler = EpochSampler(len(self.train_set), n_batches * per_batch, t.seed, epoch,
                                       start=self.batch_in_epoch * per_batch, rank=self.rank, world=self.world)
                bar = tqdm(total=n_batches, initial=self.batch_in_epoch, desc=f"epoch {epoch + 1}/{t.epochs}",
                           unit="step", dynamic_ncols=True, leave=False)
                epoch_losses: list[float] = []
                tick, seen = time.monotonic(), 0
                for batch in self._loader(self.train_set, sampler, t.batch_size):
                    if batch is None:
                        self.batch_in_epoch += 1
                        bar.update(1)
                        continue
                    lr = self.optimizer.param_groups[0]["lr"]
                    loss = self._train_step(batch)
                    if not math.isfinite(loss):
                        last = self.ckpt_dir / "last.pt"
                        raise TrainingError(
                            f"non-finite loss ({loss}) at epoch {epoch + 1}, step {self.step + 1}; "
                            f"training stopped. The last good checkpoint is {last} "
                            f"(resume with --resume {self.run_dir} after lowering train.lr or enabling "
                            f"train.grad_clip)."
                        )
                    self.step += 1
                    self.batch_in_epoch += 1
                    epoch_losses.append(loss)
                    seen += len(batch["image"])
                    rate = seen / max(time.monotonic() - tick, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                    bar.update(1)
                    if self.step % t.log_every == 0 or self.step == 1 or self.batch_in_epoch == n_batches:
                        self.tracker.log_metrics({"train/loss": loss, "train/lr": lr, "train/images_per_s": rate},
                                                 self.step)
                    if t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0:
                        self.save_checkpoint()
                bar.close()
                self.epoch += 1
                self.batch_in_epoch = 0
                record: dict[str, float] = {"epoch": self.epoch, "train_loss": float(np.mean(epoch_losses))
                                            if epoch_losses else float("nan")}
                self.tracker.log_metrics({"train/epoch_loss": record["train_loss"]}, self.step)
                time_up = bool(t.time_limit_min and time.monotonic() - started > 60 * t.time_limit_min)
                last = self.epoch >= t.epochs or bool(t.max_steps and self.step >= t.max_steps) or time_up
                stop = False
                if self.epoch % t.val_every == 0 or last:  # the final weights are always validated
                    stop = self._after_validation(record)
                self.history.append(record)
                self.save_checkpoint()
                log.info("epoch %d: %s", self.epoch, {k: round(v, 4) for k, v in record.items()})
                if stop:
                    reason = "early_stopping"
                    break
                if time_up:
                    reason = "time_limit"
                    break
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            if status != "FINISHED":
                self.tracker.end(status)
        self._finish()
        self.tracker.end("FINISHED")
        best = self.ckpt_dir / "best.pt"
        return TrainResult(self.run_dir, self.run_id, self.best_metric, best if best.is_file() else None,
                           self.ckpt_dir / "last.pt", self.epoch, self.step, self.history, reason)

    def _after_validation(self, record: dict[str, float]) -> bool:
        """Validate, log, keep the best checkpoint; True when early stopping triggers."""
        t = self.cfg.train
        metrics, examples = self.validate()
        record.update({f"val_{k}": v for k, v in metrics.items()})
        self.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, self.step)
        if examples and self.rank == 0:
            path = self.run_dir / "overlays" / f"val_epoch{self.epoch:04d}.png"
            save_overlay_grid(examples, path, title=f"{self.cfg.name} epoch {self.epoch}")
            self.tracker.log_artifact(path, "overlays")
        value = metrics.get(t.monitor)
        if value is None:
            raise TrainingError(f"train.monitor = {t.monitor!r} is not a validation metric; "
                                f"choose one of {', '.join(sorted(metrics))}")
        if math.isfinite(value) and (self.best_metric is None or value > self.best_metric):
            self.best_metric, self.stale = value, 0
            self.save_checkpoint("best.pt")
        else:
            self.stale += 1
        return bool(t.early_stop_patience and self.stale >= t.early_stop_patience)

    def _finish(self) -> None:
        """Log the best checkpoint, the history and the model in MLflow's format."""
        best = self.ckpt_dir / "best.pt"
        ckpt = best if best.is_file() else self.ckpt_dir / "last.pt"
        self.tracker.log_artifact(ckpt, "checkpoints")
        if self.rank == 0:
            atomic_write_text(self.run_dir / "history.json", json.dumps(self.history, indent=2))
            self.tracker.log_artifact(self.run_dir / "history.json")
        if self.best_metric is not None:
            self.tracker.log_metrics({f"best/{self.cfg.train.monitor}": self.best_metric}, self.step)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
        self.net.load_state_dict(state)
        self.tracker.log_model(self.net.cpu().eval(), "model")
        self.net.to(self.device)


def _eval_target(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class map and instance map to score against: the true masks when present, else the label."""
    if "truth" in batch:
        inst = batch["truth"][:, 0]
        return (inst > 0).long(), inst
    inst = batch["instance"][:, 0] if "instance" in batch else None
    return batch["label"][:, 0], inst


def save_overlay_grid(examples: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """A PNG grid: one row per example with the image, the truth and the prediction outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(examples)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for row, ex in zip(axes, examples):
        img = ex["image"][ex["image"].shape[0] // 2]
        for ax, (name, mask, color) in zip(row, [("image", None, None), ("truth", ex["truth"], "lime"),
                                                  ("prediction", ex["pred"], "red")]):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if mask is not None and mask.any():
                ax.contour(mask > 0, levels=[0.5], colors=color, linewidths=1)
            ax.set_title(f"{name} {ex['title'] if name == 'image' else ''}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3 * n)))  # leave room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    cfg: Config,
    model_ref: str | Path,
    split: str = "test",
    save_predictions: str | Path | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Score a trained model on a split; optionally write each predicted key-slice mask as PNG.

    Predictions go to ``DIR/<series>/<slice>.png`` for DeepLesion (``DIR/<id>.png`` otherwise),
    0 = background, 1 = lesion (class ids for K > 2). Per-lesion rows go to
    ``<DIR or output_dir>/lesions_<split>.csv``.

    Returns:
        ``{"metrics": {...}, "lesions_csv": path, "predictions": dir or None, "n": samples}``.
    """
    import cv2
    from tqdm.auto import tqdm

    from medseg.metrics import MetricSuite
    from medseg.transforms import build_transforms

    device = resolve_device(cfg.train.device)
    model, info = load_model(model_ref, device)
    num_classes = cfg.data.num_classes
    dataset = TransformedDataset(build_dataset(cfg.data, split), build_transforms(cfg.transforms, train=False),
                                 cfg.train.seed)
    suite = MetricSuite(num_classes)
    out_dir = Path(save_predictions) if save_predictions else None
    n = 0
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate, num_workers=cfg.train.num_workers)
    for batch in tqdm(loader, desc=f"evaluate {split}", unit="slice", dynamic_ncols=True):
        if batch is None:
            continue
        logits = predict_logits(model, batch["image"], cfg, device)
        pred = postprocess(logits, batch["image"], cfg).cpu()
        target, inst = _eval_target(batch)
        suite.update(pred, target, inst, [m["spacing"] for m in batch["meta"]], batch["meta"])
        n += 1
        if out_dir is not None:
            meta = batch["meta"][0]
            if "series" in meta and "slice" in meta:
                dest = out_dir / str(meta["series"]) / f"{int(meta['slice']):03d}.png"
            else:
                dest = out_dir / f"{meta['id']}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.stem}.tmp.png")
            cv2.imwrite(str(tmp), pred[0].numpy().astype(np.uint8))
            os.replace(tmp, dest)
    if n == 0:
        raise TrainingError(f"no readable samples in split {split!r}")
    metrics = suite.compute()
    report_dir = out_dir or Path(cfg.output_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    lesions_csv = report_dir / f"lesions_{split}.csv"
    _write_rows_csv(suite.lesion_rows(), lesions_csv)
    if tracker is not None:
        tracker.log_metrics({f"{split}/{k}": v for k, v in metrics.items()}, 0)
        tracker.log_artifact(lesions_csv, "evaluation")
    return {"metrics": metrics, "lesions_csv": str(lesions_csv),
            "predictions": str(out_dir) if out_dir else None, "n": n, "model": info.get("source")}


def _write_rows_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def config_from_run(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config dict saved in a run folder (for ``--resume``)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise TrainingError(f"{run_dir}: no config.yaml — not a medseg run folder")
    return yaml.safe_load(path.read_text())


__all__ = [
    "EpochSampler", "TrainResult", "Trainer", "TrainingError", "atomic_torch_save", "evaluate",
    "load_model", "predict_logits", "resolve_device", "run_training", "save_overlay_grid",
]


# ----------------------------------------------------------------------------- entry points


def find_resume_point(ref: str | Path, cfg_uri: str | None = None, output_dir: str = "outputs") -> tuple[Path, Path]:
    """Resolve ``--resume`` (a run folder, a checkpoint file or an MLflow run id) → (run_dir, checkpoint)."""
    p = Path(ref)
    if p.is_dir():
        ckpt = p / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise TrainingError(f"--resume {ref}: no checkpoints/last.pt in this folder")
        return p, ckpt
    if p.is_file():
        return p.parent.parent, p
    from medseg.tracking import resolve_tracking_uri

    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=resolve_tracking_uri(cfg_uri, output_dir)).get_run(str(ref))
        run_dir = Path(run.data.tags["medseg.run_dir"])
    except Exception as e:  # noqa: BLE001 — any lookup failure means the same thing to the user
        raise TrainingError(
            f"--resume {ref}: not a run folder, a checkpoint file or an MLflow run id known to the "
            f"tracking store ({e.__class__.__name__})"
        ) from None
    return find_resume_point(run_dir)


def run_training(
    cfg: Config, pipeline_path: str | Path | None = None, resume: str | Path | None = None,
    overrides: list[str] | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train as configured (what ``medseg train`` runs), then evaluate ``train.evaluate_splits``.

    With ``resume``, the run's saved config is the base and ``overrides`` apply on top of it
    (e.g. ``train.epochs=20`` extends the schedule); training continues in the same run folder and
    MLflow run.

    Returns:
        ``(TrainResult, {split: evaluation result})``.
    """
    from medseg.config import apply_override
    from medseg.data.prepare import prepare_data
    from medseg.tracking import build_tracker

    ckpt = None
    run_dir = None
    if resume is not None:
        run_dir, ckpt = find_resume_point(resume, cfg.tracking.uri, cfg.output_dir)
        data = config_from_run(run_dir)
        for ov in overrides or []:
            data = apply_override(data, ov)
        cfg = from_dict(data)
    rank, world, _ = init_distributed()  # under torchrun only rank 0 prepares data and logs
    if rank == 0:
        prepare_data(cfg.data)
    _barrier(world)
    tracker = build_tracker(cfg.tracking.enabled and rank == 0, cfg.tracking.uri, cfg.output_dir)
    trainer = Trainer(cfg, tracker, run_dir=run_dir, pipeline_path=pipeline_path)
    result = trainer.fit(resume=ckpt)
    evaluations: dict[str, Any] = {}
    for split in cfg.train.evaluate_splits if rank == 0 else []:
        ref = result.best_checkpoint or result.last_checkpoint
        if result.run_id:
            tracker.start("", "", run_id=result.run_id)
        try:
            evaluations[split] = evaluate(cfg, ref, split, save_predictions=result.run_dir / f"predictions_{split}",
                                          tracker=tracker)
        except BaseException:
            if result.run_id:
                tracker.end("FAILED")
            raise
        (result.run_dir / f"metrics_{split}.json").write_text(json.dumps(evaluations[split], indent=2, default=str))
        if result.run_id:
            tracker.log_artifact(result.run_dir / f"metrics_{split}.json", "evaluation")
            tracker.end("FINISHED")
    return result, evaluations
