"""``medseg train`` as a function: resume lookup, the run folder's lock, the tracking probe, data preparation,
the :class:`~medseg.training.trainer.Trainer`, then calibration and the evaluation of ``train.evaluate_splits``.

Example:
    >>> result, evaluations = run_training(load_config("pipelines/quickstart.yaml"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.config import Config, from_dict
from medseg.evaluation.evaluate import check_monitor, evaluate_after_training
from medseg.runtime import barrier, broadcast_object, init_distributed
from medseg.training.resume import config_from_run, find_resume_point, lock_run_dir, new_run_dir
from medseg.training.trainer import Trainer, TrainResult

__all__ = ["run_training"]


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
    check_monitor(cfg)  # before the data is prepared (generating the demo data takes minutes)
    rank, world, _ = init_distributed()  # under torchrun only rank 0 prepares data and logs
    # a tracking server that does not answer stops here, in seconds, before anything is written (tracking.offline)
    t = cfg.tracking
    tracker = build_tracker(t.enabled and rank == 0, t.uri, cfg.output_dir, t.offline)
    run_dir = run_dir or Path(broadcast_object(str(new_run_dir(cfg))))  # named here: locked before any work
    with lock_run_dir(run_dir, rank):  # one training per run folder: a second --resume refuses
        if rank == 0:
            prepare_data(cfg.data)
        barrier(world)
        trainer = Trainer(cfg, tracker, run_dir=run_dir, pipeline_path=pipeline_path)
        result = trainer.fit(resume=ckpt)
        result.tracking_uri = tracker.shown_uri
        evaluations: dict[str, Any] = {}
        if rank == 0 and (cfg.calibration.after_training or cfg.train.evaluate_splits):
            # training's thread count left a core to the DataLoader, whose workers are gone now: calibration
            # and evaluation predict with every core, as `medseg evaluate` / `calibrate` / `predict` do
            import torch

            from medseg.predict.run import predict_threads

            torch.set_num_threads(predict_threads(cfg.predict.threads))
        if cfg.calibration.after_training and rank == 0:  # the operating point, chosen on val, before any test
            from medseg.evaluation.calibrate import calibrate_run

            result.operating_point = calibrate_run(cfg, result.best_checkpoint or result.last_checkpoint,
                                                   result.run_dir, result.run_id, tracker)
        if rank == 0:
            evaluations = evaluate_after_training(cfg, result.best_checkpoint or result.last_checkpoint,
                                                  result.run_dir, result.run_id, tracker)
    return result, evaluations
