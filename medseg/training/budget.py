"""A wall-clock budget that shapes the learning-rate schedule (``train.time_limit_min``).

A run cut by its clock at a high learning rate wastes the budget's end. With
``train.time_limit_min`` set, :class:`StepBudget` measures the first ``train.budget_probe_steps``
optimizer steps and one validation pass, converts what is left of the budget into a step count
**once** (:func:`steps_for_budget`), and the Trainer lays its schedule over that count, so the
learning rate reaches the schedule's end when the budget does. The count is stored in every
checkpoint and a resumed run keeps it (timing is never measured again), so kill + resume still ends
with the same weights as an uninterrupted run.

Example:
    >>> b = StepBudget(budget_s=600.0, probe_steps=20)
    >>> b.start(step=0)
    >>> # ... after 20 steps and a timed validation pass of 4 s:
    >>> b.convert(step=20, val_s=4.0, steps_per_epoch=60, val_every=4, cap=100_000)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from medseg.runtime import dist_ready

log = logging.getLogger("medseg.budget")

__all__ = ["StepBudget", "steps_for_budget"]


def steps_for_budget(
    budget_s: float, elapsed_s: float, steps_done: int, step_s: float, val_s: float, steps_per_epoch: int,
    val_every: int,
) -> int:
    """Total optimizer steps that fit the budget: those done plus what the rest of the budget pays for.

    Every further step costs ``step_s`` plus its share of the validations that follow (one every
    ``val_every`` epochs of ``steps_per_epoch`` steps, ``val_s`` each); the final validation is
    reserved up front.

    Args:
        budget_s: the whole budget in seconds.
        elapsed_s: seconds spent so far (probe steps and the timed validation included).
        steps_done: optimizer steps done so far.
        step_s: measured seconds per optimizer step (data loading included).
        val_s: measured seconds of one validation pass.
        steps_per_epoch, val_every: how often validation runs.

    Returns:
        At least ``steps_done``.
    """
    per_step = step_s + val_s / max(steps_per_epoch * val_every, 1)
    left = budget_s - elapsed_s - val_s
    return steps_done + max(int(math.floor(left / max(per_step, 1e-9))), 0)


@dataclass
class StepBudget:
    """The budget's state: when it started, the probe, and the converted step count.

    Args:
        budget_s: the budget in seconds (``60 · train.time_limit_min``).
        probe_steps: optimizer steps measured before converting.
        steps: the converted total step count (None until converted; restored on resume).
    """

    budget_s: float
    probe_steps: int
    steps: int | None = None
    _t0: float = 0.0
    _step0: int = 0
    _t1: float | None = None  # when the first step ended (its start-up cost is not a step's cost)

    def start(self, step: int) -> None:
        """Start the clock at optimizer step ``step`` (0, or where a resumed run continues)."""
        self._t0, self._step0, self._t1 = time.monotonic(), step, None

    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        return time.monotonic() - self._t0

    def due(self, step: int) -> bool:
        """Whether to convert now: the probe is done or the budget already ran out (same on every rank)."""
        if self.steps is not None:
            return False
        if step - self._step0 == 1:
            self._t1 = time.monotonic()
        flag = step - self._step0 >= self.probe_steps or self.elapsed() >= self.budget_s
        if dist_ready():  # rank 0's clock decides, or the ranks would leave the probe at different steps
            import torch
            import torch.distributed as dist

            t = torch.tensor([int(flag)])
            dist.broadcast(t, 0)
            flag = bool(t.item())
        return flag

    def convert(self, step: int, val_s: float, steps_per_epoch: int, val_every: int, cap: int,
                other_s: float = 0.0) -> int:
        """Fix :attr:`steps` from the probe (``step`` steps done, ``val_s`` per validation), at most ``cap``.

        Call after the timed validation, so that :meth:`elapsed` includes it. ``other_s``: further
        seconds since the last probe step that were no step's (the propagation reserve's timing): like
        ``val_s`` they count against the budget but not into the time per step. Under DDP rank 0's
        count is used by every rank.
        """
        elapsed = self.elapsed()
        if self._t1 is not None and step - self._step0 > 1:  # steps after the first (worker start-up, warm-up)
            step_s = (time.monotonic() - self._t1 - val_s - other_s) / (step - self._step0 - 1)
        else:
            step_s = (elapsed - val_s - other_s) / max(step - self._step0, 1)
        step_s = max(step_s, 0.0)
        total = min(steps_for_budget(self.budget_s, elapsed, step, step_s, val_s, steps_per_epoch, val_every), cap)
        if dist_ready():
            import torch.distributed as dist

            shared = [total]
            dist.broadcast_object_list(shared, src=0)
            total = int(shared[0])
        self.steps = max(total, step)
        log.info("time budget %.1f min: %.1f s spent at step %d; %.3f s per step, %.1f s per validation "
                 "→ %d optimizer steps in total", self.budget_s / 60, elapsed, step, step_s, val_s, self.steps)
        return self.steps
