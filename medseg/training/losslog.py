"""Training losses kept on the device and read back once per log interval.

Reading a loss back (``float(loss)``, ``loss.item()``) makes the host wait until the device has
finished the step, so a read per step keeps a GPU idle while the host queues the next one. The
:class:`~medseg.training.trainer.Trainer` therefore keeps each step's (detached) loss on the device in a
:class:`LossLog` and reads all of them in one copy at its log points (``train.log_every``, the end of
an epoch, before a checkpoint): :meth:`LossLog.read`. The non-finite guard is checked at that read
too; a non-finite loss found there stops training with a rollback to the last good checkpoint (see
``Trainer._read_losses``).

The read is wrapped in ``torch.profiler.record_function(READ_RANGE)`` so a profile can tell the
intended reads from any other (``tests/training/test_host_sync.py`` counts the latter: zero).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["HOST_CHECK_RANGE", "READ_RANGE", "SYNC_OPS", "BadLoss", "LossLog", "host_reads"]

#: the profiler range around the one host read per log interval
READ_RANGE = "medseg.train.read_losses"
#: the profiler range around the label-range check of a batch still on the host (before its copy)
HOST_CHECK_RANGE = "medseg.train.check_labels_on_host"
#: the operators a host read of a tensor's value dispatches (``float(t)``, ``t.item()``, ``bool(t)``)
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


def host_reads(events: Iterable[Any], allowed: Iterable[str] = (READ_RANGE, HOST_CHECK_RANGE),
               skip_prefixes: Iterable[str] = ()) -> list[tuple[str, list[str]]]:
    """The host reads in a ``torch.profiler`` event list outside the ``allowed`` ranges.

    Returns one ``(operator, enclosing ranges)`` per ``aten::_local_scalar_dense`` (the kernel every
    read ends in) that has no ancestor named in ``allowed`` nor starting with one of ``skip_prefixes``
    (e.g. ``"Optimizer.step#"``: Adam's CPU step counter is host memory).
    """
    allowed, skip = set(allowed), tuple(skip_prefixes)
    out = []
    for e in events:
        if e.name != "aten::_local_scalar_dense":
            continue
        up, q = [], e.cpu_parent
        while q is not None:
            up.append(q.name)
            q = q.cpu_parent
        if allowed.intersection(up) or (skip and any(n.startswith(skip) for n in up)):
            continue
        out.append((e.name, up))
    return out


@dataclass(frozen=True)
class BadLoss:
    """The first non-finite loss found by a read: its optimizer step (1-based), epoch (1-based) and value."""

    step: int
    epoch: int
    value: float


@dataclass
class LossLog:
    """Per-step losses on the device, read back in one copy (:meth:`read`).

    Attributes:
        values: the losses read back so far (floats, in step order); :meth:`take` empties it.
        last: the most recent loss read back (None before the first read).
    """

    values: list[float] = field(default_factory=list)
    last: float | None = None
    _pending: list[torch.Tensor] = field(default_factory=list)
    _where: list[tuple[int, int]] = field(default_factory=list)

    def add(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        """Keep ``loss`` (a 0-d tensor on any device; never read here) of optimizer step ``step`` in ``epoch``."""
        self._pending.append(loss.detach().reshape(()))
        self._where.append((step, epoch))

    def __len__(self) -> int:
        """Losses added and not yet read."""
        return len(self._pending)

    def read(self) -> BadLoss | None:
        """Read every pending loss in one device→host copy; the first non-finite one, or None.

        The values up to (not including) a non-finite one are appended to :attr:`values`.
        """
        if not self._pending:
            return None
        with torch.profiler.record_function(READ_RANGE):
            host = torch.stack(self._pending).float().cpu().tolist()
        where, self._pending, self._where = self._where, [], []
        for value, (step, epoch) in zip(host, where):
            if not math.isfinite(value):
                return BadLoss(step, epoch, value)
            self.values.append(value)
            self.last = value
        return None

    def take(self) -> list[float]:
        """The values read back since the last call (an epoch's losses), and forget them."""
        out, self.values = self.values, []
        return out

    def clear(self) -> None:
        """Drop everything (after a rollback)."""
        self._pending, self._where, self.values, self.last = [], [], [], None
