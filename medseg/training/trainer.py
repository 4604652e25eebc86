"""Training: the :class:`Trainer` (fit / validate / checkpoint / resume) and :func:`run_training`.

One :class:`Trainer`, configured by the :class:`~medseg.config.Config` tree — never subclassed.
:meth:`Trainer.fit` reads top to bottom: an epoch loop that trains, validates, checkpoints and decides whether
to stop. Device, RNG and the heap: :mod:`medseg.runtime`; loaders: :mod:`medseg.data.loading`; checkpoints:
:mod:`medseg.models.checkpoint`; validation: :mod:`medseg.evaluation.evaluate`; LR: :mod:`medseg.training.optim`.

Reproducibility: every random choice in an epoch is a function of ``(train.seed, epoch, index)``
(:mod:`medseg.data.loading`) and each checkpoint saves torch's RNG, so a run killed anywhere and resumed
ends with the weights of an uninterrupted run (on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import medseg.training.losses  # noqa: F401  (registers the losses)
from medseg.config import Config, save_config
from medseg.data import build_dataset
from medseg.data.loading import (
    CollateThen,
    EpochSampler,
    TransformedDataset,
    cache_dataset,
    first_readable,
    make_loader,
)
from medseg.evaluation.evaluate import check_monitor, eval_loader, evaluate_loader
from medseg.evaluation.plots import save_overlay_grid
from medseg.io import atomic_torch_save, atomic_write_text
from medseg.models.checkpoint import load_pretrained, read_checkpoint, save_mlflow_model
from medseg.registry import LOSSES
from medseg.runtime import (
    TrainingError,
    amp_dtype,
    barrier,
    broadcast_buffers,
    broadcast_object,
    compile_model,
    hold_freed_memory,
    init_distributed,
    mean_over_ranks,
    resolve_device,
    seed_everything,
    use_amp,
)
from medseg.tracking import Tracker, start_training_run
from medseg.training.budget import StepBudget
from medseg.training.hardneg import HardNegatives
from medseg.training.losses import check_label_range, labels_checked
from medseg.training.losslog import HOST_CHECK_RANGE, LossLog
from medseg.training.optim import build_optimizer, lr_factor
from medseg.training.propagate import Propagator
from medseg.training.resume import new_run_dir, restore_trainer, trainer_state
from medseg.transforms.accelerated import DeviceAugment

log = logging.getLogger("medseg.engine")

__all__ = ["TrainResult", "Trainer", "TrainingError"]


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
    #: what ``calibration.after_training`` chose (see :func:`medseg.evaluation.calibrate.calibrate`)
    operating_point: dict[str, Any] | None = None
    #: the tracking store the run went to (credentials redacted), None without tracking
    tracking_uri: str | None = None


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

        check_monitor(cfg)
        self.cfg = cfg
        self.tracker = tracker or Tracker()
        self.pipeline_path = Path(pipeline_path) if pipeline_path else None
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        hold_freed_memory(t.hold_freed_mib)  # DataLoader workers forked later inherit it
        seed_everything(t.seed)
        self.rank, self.world, local = init_distributed()
        self.device = resolve_device(t.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        if self.rank != 0:  # only rank 0 logs to MLflow and writes checkpoints
            self.tracker = Tracker()
        self.amp = use_amp(t.amp, self.device)

        self.train_data = build_dataset(cfg.data, "train")
        train_base, val_base = self.train_data, build_dataset(cfg.data, "val")
        if len(train_base) == 0:
            raise TrainingError("the training split is empty; check data.root and the data filters")
        probe = first_readable(train_base)
        if t.cache_samples:
            train_base = cache_dataset(train_base, t.cache_max_gb, probe, t.num_workers, self.rank == 0)
            val_base = cache_dataset(val_base, t.cache_max_gb, probe, t.num_workers, self.rank == 0)
        self.in_channels = int(probe["image"].shape[0])
        self.num_classes = cfg.data.num_classes

        self.train_set = TransformedDataset(train_base, build_transforms(cfg.transforms, train=True), t.seed)
        self.val_set = TransformedDataset(val_base, build_transforms(cfg.transforms, train=False), t.seed)
        pin = self.device.type == "cuda"
        self.sampler = EpochSampler(len(self.train_set), 0, t.seed, rank=self.rank, world=self.world)
        augment = DeviceAugment(cfg.transforms) if cfg.transforms.accelerator else None
        # on the CPU the accelerator's part runs in the loader's workers, beside the step (not between steps)
        in_workers = augment is not None and self.device.type == "cpu" and t.num_workers > 0
        self.train_loader = make_loader(self.train_set, t, self.sampler, t.batch_size, pin_memory=pin,
                                        collate_fn=CollateThen(augment) if in_workers else None)
        self.val_loader = eval_loader(self.val_set, cfg, self.rank, self.world, pin_memory=pin)

        self.net = build_model(cfg.model.name, self.in_channels, self.num_classes, cfg.model.params)
        if cfg.model.pretrained:
            load_pretrained(self.net, cfg.model.pretrained)
        self.net.to(self.device)
        self.model: nn.Module = self.net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
        if t.compile:  # the training forward only; checkpoints and validation use self.net
            self.model = compile_model(self.model, "train.compile")
        self.loss_fn = LOSSES.build(cfg.loss.name, cfg.loss.params)
        self.device_augment = None if in_workers else augment
        # fused on CUDA: the GradScaler hands it the found-inf flag on the device (no read-back per step)
        self.optimizer = build_optimizer(cfg.train, self.model.parameters(), fused=self.device.type == "cuda")
        # loss scaling is for float16 on CUDA only (bfloat16 has float32's range)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.device.type == "cuda")

        # train.time_limit_min: the budget becomes a step count after a probe (medseg.budget)
        self.budget = StepBudget(60.0 * t.time_limit_min, t.budget_probe_steps) if t.time_limit_min else None
        self.steps_per_epoch = t.steps_per_epoch or max(1, math.ceil(len(self.train_set) / (t.batch_size * self.world)))
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
        self.loss_log = LossLog()  # per-step losses on the device, read at the log points (medseg.training.losslog)
        self._good_checkpoint: Path | None = None  # where a non-finite loss rolls back to

        # every rank uses rank 0's folder
        self.run_dir = Path(run_dir) if run_dir is not None else Path(broadcast_object(str(new_run_dir(cfg))))
        self.ckpt_dir = self.run_dir / "checkpoints"
        # the rounds that grow the training set: propagated slices, the model's false positives as hard negatives
        self.propagator = Propagator(self) if t.propagate.enabled else None
        self.miner = HardNegatives(self) if t.hard_negatives.enabled else None

    # -- schedule ---------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole schedule (``train.max_steps`` and the time budget's step count cap it)."""
        total = self._step_cap()
        return min(total, self.budget.steps) if self.budget and self.budget.steps is not None else total

    def _step_cap(self) -> int:
        """Steps of ``train.epochs`` (capped by ``train.max_steps``): the schedule without a budget."""
        total = self.cfg.train.epochs * self.steps_per_epoch
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    def _schedule_done(self) -> bool:
        return self.epoch >= self.cfg.train.epochs or self.step >= self.total_steps

    def _convert_budget(self) -> None:
        """End of the budget probe: time one validation pass, fix the step count (schedule over it)."""
        assert self.budget is not None
        tick = time.monotonic()
        if self.budget.elapsed() < self.budget.budget_s:  # else the count is the steps done: nothing to time
            metrics, _ = self.validate()
            self.model.train()
            self.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, self.step)
        val_s = time.monotonic() - tick
        for name, rounds in (("propagate", self.propagator), ("hard_negatives", self.miner)):
            if rounds is not None:  # the budget pays for the rounds too
                self.budget.budget_s -= (reserve := rounds.reserve_s(self))
                self.tracker.log_metrics({f"train/{name}_reserve_s": reserve}, self.step)
        steps = self.budget.convert(self.step, val_s, self.steps_per_epoch, self.cfg.train.val_every,
                                    self._step_cap(), other_s=time.monotonic() - tick - val_s)  # the reserve's
        self._set_lr()  # the next step already follows the new schedule (as a resumed run would)
        self.tracker.log_metrics({"train/budget_steps": steps}, self.step)

    # -- checkpoints ------------------------------------------------------------------------

    #: the counters a checkpoint stores beside the weights and states (medseg.training.resume.trainer_state)
    COUNTERS = ("epoch", "step", "batch_in_epoch", "best_metric", "stale", "history", "run_id")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, optimizer, scheduler, scaler, RNG, counters."""
        return trainer_state(self, self.COUNTERS, budget_steps=self.budget.steps if self.budget else None,
                             propagation=self.propagator.state_dict() if self.propagator else None,
                             hard_negatives=self.miner.state_dict() if self.miner else None)

    def save_checkpoint(self, name: str = "last.pt") -> Path:
        """Write a checkpoint atomically (temp file + rename) under ``<run_dir>/checkpoints`` (rank 0)."""
        self._read_losses()  # a checkpoint never holds weights updated by a non-finite step
        path = self.ckpt_dir / name
        if self.rank == 0:
            atomic_torch_save(self.state_dict(), path)
        barrier(self.world)
        if name == "last.pt":
            self._good_checkpoint = path
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (the schedule may be longer now)."""
        ckpt = restore_trainer(self, read_checkpoint(path), self.COUNTERS)
        self._good_checkpoint = Path(path)
        if self.budget is not None:  # the measured step count is reused, never measured again
            self.budget.steps = ckpt.get("budget_steps")
        for rounds, key in ((self.propagator, "propagation"), (self.miner, "hard_negatives")):
            if rounds is not None:  # the slices the rounds added join the training set again
                rounds.load_state_dict(ckpt.get(key), self)
        self._set_lr()  # the LR follows the (possibly extended) schedule from the restored step

    def _set_lr(self) -> None:
        """Set the LR of the current step from the schedule (after a resume or a changed step count)."""
        t = self.cfg.train
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = base * lr_factor(t.schedule, self.step, self.total_steps, t.poly_power)

    # -- tracking ---------------------------------------------------------------------------

    def _start_tracking(self) -> None:
        fp = getattr(self.train_data, "fingerprint", None)
        self.run_id = start_training_run(
            self.tracker, self.cfg, self.run_dir, self.run_id, self.step, self.pipeline_path,
            {"model.num_parameters": sum(p.numel() for p in self.net.parameters()), "data.in_channels": self.in_channels,
             "data.train_samples": len(self.train_set), "data.val_samples": len(self.val_set)},
            {"dataset_fingerprint": fp() if callable(fp) else None, "device": str(self.device), "amp": self.amp})

    # -- steps ------------------------------------------------------------------------------

    def _train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step; returns the loss as a 0-d tensor on the device (averaged over ranks), unread.

        Nothing here makes the host wait for the device: the loss is read back later, in one copy per
        log interval (:meth:`_read_losses`), where a non-finite one stops training and rolls back.
        """
        checked: Any = contextlib.nullcontext()
        if batch["label"].device.type == "cpu":  # the label check on the host batch: no device wait
            with torch.profiler.record_function(HOST_CHECK_RANGE):
                check_label_range(batch["label"], self.num_classes, self.cfg.loss.params.get("ignore_index"))
            checked = labels_checked()
        if self.device_augment is not None:  # transforms.accelerator: augment the batch on the device
            batch = self.device_augment({k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                                         for k, v in batch.items()})
        image = batch["image"].to(self.device, non_blocking=True)
        image = image.contiguous(memory_format=torch.channels_last) if image.dim() == 4 else image  # as the model's
        label = batch["label"].to(self.device, non_blocking=True)
        weight = batch["weight"].to(self.device, non_blocking=True) if batch.get("weight") is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=amp_dtype(self.device), enabled=self.amp):
            logits = self.model(image)
        with checked:
            loss = self.loss_fn(logits.float(), label, weight)
        extra = getattr(self.net, "extra_loss", None)
        if callable(extra):
            loss = loss + extra(label)
        check = mean_over_ranks(loss.detach(), self.world)  # every rank reads the same: they stop together
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)  # skipped by the scaler when a gradient is inf / NaN
        self.scaler.update()
        self.scheduler.step()
        return check

    def _read_losses(self) -> float | None:
        """Read the losses kept on the device since the last read (one host read); returns the latest.

        Raises:
            TrainingError: a loss was non-finite; the trainer is first rolled back to the last good
                checkpoint (every checkpoint is written after such a read, so it holds no update of a
                non-finite step), in memory as on disk.
        """
        bad = self.loss_log.read()
        if bad is None:
            return self.loss_log.last
        good = self._good_checkpoint
        self.loss_log.clear()
        if good is not None and good.is_file():
            self.load_checkpoint(good)
        raise TrainingError(
            f"non-finite loss ({bad.value}) at epoch {bad.epoch}, step {bad.step}; training stopped. "
            f"The last good checkpoint is {good or self.ckpt_dir / 'last.pt'} (resume with --resume "
            f"{self.run_dir} after lowering train.lr or enabling train.grad_clip)."
        )

    def _train_epoch(self) -> list[float]:
        """Train the rest of the current epoch; returns its losses."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        n_batches = min(self.steps_per_epoch, self.total_steps - self.step + self.batch_in_epoch)
        per_batch = t.batch_size * self.world
        self.sampler.set_epoch(self.epoch, n_batches * per_batch, start=self.batch_in_epoch * per_batch)
        bar = tqdm(total=n_batches, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{t.epochs}",
                   unit="step", dynamic_ncols=True, leave=False, disable=self.rank != 0)
        self.loss_log.take()
        tick, seen = time.monotonic(), 0
        for batch in self.train_loader:
            self.batch_in_epoch += 1
            bar.update(1)
            if batch is None:  # every sample of the batch was unreadable
                continue
            lr = self.optimizer.param_groups[0]["lr"]
            self.loss_log.add(self._train_step(batch), self.step + 1, self.epoch + 1)
            self.step += 1
            seen += len(batch["image"])
            log_now = self.step % t.log_every == 0 or self.step == 1 or self.batch_in_epoch == n_batches
            budget_now = self.budget is not None and self.budget.due(self.step)
            ckpt_now = bool(t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0)
            if log_now or budget_now or ckpt_now or self.step >= self.total_steps:
                loss = self._read_losses()  # the one host read of the interval
                rate = seen / max(time.monotonic() - tick, 1e-9)
                # refresh=False: redrawn at tqdm's own pace (mininterval), not forced here
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}", refresh=False)
                if log_now:
                    self.tracker.log_metrics({"train/loss": loss, "train/lr": lr, "train/images_per_s": rate},
                                             self.step)
            if budget_now:
                self._convert_budget()
            if ckpt_now:
                self.save_checkpoint()
            if self.step >= self.total_steps:  # the budget's step count may end an epoch early
                break
        self._read_losses()
        losses = self.loss_log.take()
        bar.close()
        self.epoch += 1
        self.batch_in_epoch = 0
        return losses

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Validation loss and metrics on the val split (whole slices, sharded across ranks), plus overlay examples."""
        broadcast_buffers(self.net)  # every rank validates with rank 0's BatchNorm statistics
        count = self.cfg.train.overlay_count if self.rank == 0 else 0
        res = evaluate_loader(self.net, self.val_loader, self.cfg, self.device, self.loss_fn, overlay_count=count)
        return res.metrics, res.examples

    def _improved(self, value: float | None) -> bool:
        """Whether ``value`` of ``train.monitor`` beats the best so far (missing or NaN: no)."""
        if value is None or not math.isfinite(value):
            return False
        if self.best_metric is None:
            return True
        return value < self.best_metric if self.cfg.train.monitor_mode == "min" else value > self.best_metric

    def _after_validation(self, record: dict[str, float]) -> bool:
        """Validate, log, keep the best checkpoint; True when early stopping triggers."""
        t = self.cfg.train
        metrics, examples = self.validate()
        record.update({f"val_{k}": v for k, v in metrics.items()})
        self.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, self.step)
        if examples:
            path = self.run_dir / "overlays" / f"val_epoch{self.epoch:04d}.png"
            save_overlay_grid(examples, path, title=f"{self.cfg.name} epoch {self.epoch}")
            self.tracker.log_artifact(path, "overlays")
        value = metrics.get(t.monitor)
        if value is None:
            log.warning("validation at epoch %d reported no %s (counted as no improvement)", self.epoch, t.monitor)
        if self._improved(value):
            self.best_metric, self.stale = value, 0
            self.save_checkpoint("best.pt")
        else:
            self.stale += 1
        return bool(t.early_stop_patience and self.stale >= t.early_stop_patience)

    def _prepare(self, resume: str | Path | None) -> None:
        """Create the run folder, restore a checkpoint, write the config, start tracking."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self.load_checkpoint(resume)
            log.info("resuming from %s at epoch %d, step %d", resume, self.epoch, self.step)
        if self.rank == 0:
            save_config(self.cfg, self.run_dir / "config.yaml")
        self._start_tracking()
        if resume is None:  # a checkpoint before the first step: a run killed early resumes from here
            self.save_checkpoint()

    def fit(self, resume: str | Path | None = None) -> TrainResult:
        """Train until ``train.epochs`` (or ``max_steps``, early stopping, the time limit).

        The MLflow run always ends: FINISHED, FAILED (any error, also while logging the model) or
        KILLED (Ctrl-C).

        Args:
            resume: a checkpoint to continue from (the run keeps its folder and MLflow run).

        Raises:
            TrainingError: on a non-finite loss (the last good checkpoint is kept).
        """
        t = self.cfg.train
        status, reason = "FAILED", "completed"
        try:
            self._prepare(resume)
            if self.budget is not None:
                self.budget.start(self.step)
            self.model.train()
            while not self._schedule_done():  # a round due at step 0 (start 0) runs before any step
                for rounds in (self.propagator, self.miner):  # propagation, hard negatives (their order)
                    if rounds is not None and rounds.due(self.step, self.total_steps):
                        rounds.run_round(self)
                losses = self._train_epoch()
                record: dict[str, float] = {"epoch": self.epoch,
                                            "train_loss": float(np.mean(losses)) if losses else float("nan")}
                self.tracker.log_metrics({"train/epoch_loss": record["train_loss"]}, self.step)
                stop = False
                if self.epoch % t.val_every == 0 or self._schedule_done():  # final weights: always
                    stop = self._after_validation(record)
                self.history.append(record)
                self.save_checkpoint()
                log.info("epoch %d: %s", self.epoch, {k: round(v, 4) for k, v in record.items()})
                if stop:
                    reason = "early_stopping"
                    break
            if reason == "completed" and self.budget and self.budget.steps is not None \
                    and self.budget.steps < self._step_cap():
                reason = "time_limit"  # the budget, not train.epochs / max_steps, set the length
            self._finish()
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.tracker.end(status)
        best = self.ckpt_dir / "best.pt"
        return TrainResult(self.run_dir, self.run_id, self.best_metric, best if best.is_file() else None,
                           self.ckpt_dir / "last.pt", self.epoch, self.step, self.history, reason)

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
        best_ckpt = read_checkpoint(ckpt)  # read as data, like every model file
        self.net.load_state_dict(best_ckpt["model"])
        self.net.eval()
        if self.tracker.run_id is not None:  # the MLflow model: weights + JSON, no pickle
            with tempfile.TemporaryDirectory() as tmp:
                self.tracker.log_model(save_mlflow_model(Path(tmp) / "model", best_ckpt), "model")
