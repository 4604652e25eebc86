"""The training step makes the host wait for the device only at the log points (issue 22, item 1).

``torch.profiler`` records every operator of real :class:`Trainer` steps on the CPU. A host read of a
tensor's value (``float(t)``, ``t.item()``, ``bool(t)``) dispatches ``aten::_local_scalar_dense``; on
a GPU it is the point where the host waits for the device. Over 12 steps with ``train.log_every=4``
the Trainer reads the losses back once per log point (steps 1, 4, 8, 12: inside
``medseg.training.losslog.READ_RANGE``) and nowhere else; the label-range check reads the batch's
labels while they are still on the host, before the copy (``HOST_CHECK_RANGE``: no device involved).

Adam on the CPU reads its own step counter (a host-resident tensor, ``state["step"]``) inside
``Optimizer.step`` — a read of host memory, not of the device (on CUDA the Trainer takes the fused
kernels, which keep the counter on the device and read nothing): those reads are attributed to the
optimizer and excluded; with SGD nothing is excluded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from medseg.config import load_config
from medseg.registry import LOSSES
from medseg.runtime import TrainingError
from medseg.training.losslog import HOST_CHECK_RANGE, READ_RANGE
from medseg.training.trainer import Trainer
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "pipelines" / "quickstart.yaml"
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")
HOSTSIDE = (READ_RANGE, HOST_CHECK_RANGE)


def _ancestors(event: object) -> list[str]:
    names, e = [], getattr(event, "cpu_parent", None)
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    return names


def _profile_epoch(demo_root: Path, tmp_path: Path, optimizer: str) -> tuple[list[object], Trainer]:
    ov = tiny_overrides(demo_root, tmp_path, **{
        "train.epochs": 1, "train.max_steps": 12, "train.steps_per_epoch": 12, "train.log_every": 4,
        "train.optimizer": optimizer, "train.checkpoint_every_steps": None, "tracking.enabled": False,
        "transforms.crop_size": [32, 32], "model.params.base_channels": 4})
    trainer = Trainer(load_config(QUICK, ov))
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.train()
    # the batches come from the real loader, read before profiling (loading is not the step)
    trainer.sampler.set_epoch(0, 12 * trainer.cfg.train.batch_size)
    trainer.train_loader = [b for b in trainer.train_loader][:12]
    assert len(trainer.train_loader) == 12
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        losses = trainer._train_epoch()
    assert trainer.step == 12 and len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    return list(prof.events()), trainer


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_no_host_read_between_log_points(demo_root: Path, tmp_path: Path, optimizer: str) -> None:
    events, _ = _profile_epoch(demo_root, tmp_path, optimizer)
    stray = []
    for e in events:
        if e.name not in SYNC_OPS:
            continue
        up = _ancestors(e)
        if any(r in up for r in HOSTSIDE):
            continue
        if optimizer == "adam" and any(n.startswith("Optimizer.step#") for n in up):
            continue  # Adam's host-resident step counter (see the module docstring)
        stray.append((e.name, up[:6]))
    assert stray == [], (len(stray), stray[:5])
    reads = [e for e in events if e.name == READ_RANGE]
    assert len(reads) == 4  # steps 1, 4, 8, 12: two whole intervals of 4 steps between them
    # the profile does see the forward and backward passes of the 12 steps
    assert sum(e.name == "aten::convolution_backward" for e in events) >= 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_to_host_copy_between_log_points_cuda(demo_root: Path, tmp_path: Path) -> None:
    ov = tiny_overrides(demo_root, tmp_path, **{
        "train.epochs": 1, "train.max_steps": 12, "train.steps_per_epoch": 12, "train.log_every": 4,
        "train.device": "cuda", "train.amp": "auto", "tracking.enabled": False, "transforms.crop_size": [32, 32]})
    trainer = Trainer(load_config(QUICK, ov))
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.train()
    trainer.sampler.set_epoch(0, 12 * trainer.cfg.train.batch_size)
    trainer.train_loader = [b for b in trainer.train_loader][:12]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer._train_epoch()
    events = list(prof.events())
    syncs = [e for e in events if e.name in SYNC_OPS and not any(r in _ancestors(e) for r in HOSTSIDE)]
    assert syncs == []
    dtoh = [e for e in events if "DtoH" in e.name or "Device -> Host" in e.name]
    assert len(dtoh) <= 4  # at most one copy per read


class _NanAtThird(torch.nn.Module):
    """Cross-entropy that turns NaN at its 3rd training call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += int(logits.requires_grad)
        loss = torch.nn.functional.cross_entropy(logits, label[:, 0])
        return loss * float("nan") if self.calls >= 3 else loss


def test_non_finite_loss_found_at_the_interval_rolls_back(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 3 is non-finite but read only at step 4 (a checkpoint is due there; log_every is 10): step 4
    already ran on NaN weights, so the trainer rolls back to the checkpoint of step 2, in memory too."""
    monkeypatch.setitem(LOSSES._entries, "test_nan_at_third", _NanAtThird)
    ov = tiny_overrides(demo_root, tmp_path, **{
        "loss.name": "test_nan_at_third", "loss.params": {}, "train.max_steps": 6, "train.epochs": 1,
        "train.steps_per_epoch": 6, "train.log_every": 10, "train.checkpoint_every_steps": 2,
        "tracking.enabled": False, "transforms.crop_size": [32, 32], "model.params.base_channels": 4})
    trainer = Trainer(load_config(QUICK, ov))
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 1, step 3;.*last good checkpoint"):
        trainer.fit()
    last = torch.load(trainer.ckpt_dir / "last.pt", weights_only=False)
    assert last["step"] == 2 and trainer.step == 2
    for name, p in trainer.net.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p.detach(), last["model"][name]), name
