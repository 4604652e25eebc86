"""Evaluation: the evaluation loop and ``medseg evaluate``, calibration of the operating point,
``medseg compare``, and the plots."""
