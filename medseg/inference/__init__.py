"""Inference: sliding-window tiling (:mod:`~medseg.inference.window`), the predictor and test-time
augmentation (:mod:`~medseg.inference.predictor`), post-processing at the operating point
(:mod:`~medseg.inference.postprocess`) and the dense CRF (:mod:`~medseg.inference.crf`)."""
