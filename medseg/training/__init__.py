"""Training: the one :class:`~medseg.training.trainer.Trainer`, run folders and resume, the step budget,
the optimizer and LR schedule, the losses."""
