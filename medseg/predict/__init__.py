"""Batch inference (``medseg predict``): readers, pre-processing, writers, lesion table, manifest, the run."""

from medseg.predict.run import PredictResult, run_predict

__all__ = ["PredictResult", "run_predict"]
