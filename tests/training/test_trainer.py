"""Trainer: schedules, sampler, atomic checkpoints, exact resume after kill -9, non-finite loss."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from medseg.config import load_config
from medseg.data.loading import EpochSampler
from medseg.io import atomic_torch_save
from medseg.registry import LOSSES
from medseg.runtime import TrainingError, sample_seed
from medseg.tracking import build_tracker
from medseg.training.optim import lr_factor
from medseg.training.run import run_training
from medseg.training.trainer import Trainer
from tests.conftest import tiny_overrides
from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "pipelines" / "quickstart.yaml"


def test_lr_factor_poly_and_cosine() -> None:
    assert lr_factor("poly", 0, 100) == 1.0
    assert lr_factor("poly", 50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert lr_factor("poly", 100, 100) == 0.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor("constant", 70, 100) == 1.0
    with pytest.raises(TrainingError, match="train.schedule"):
        lr_factor("step", 1, 10)


def test_epoch_sampler_is_deterministic_and_resumable() -> None:
    a = EpochSampler(10, 25, seed=1, epoch=3)
    assert list(a) == list(EpochSampler(10, 25, seed=1, epoch=3))
    assert [i for _, i in a] != [i for _, i in EpochSampler(10, 25, seed=1, epoch=4)]
    assert {e for e, _ in a} == {3}  # each index carries its epoch (persistent workers seed with it)
    idx = [i for _, i in a]
    assert len(idx) == 25 and sorted(idx[:10]) == list(range(10))  # whole permutations first
    assert [i for _, i in EpochSampler(10, 25, seed=1, epoch=3, start=8)] == idx[8:]
    b = EpochSampler(10, 25, seed=1, epoch=0)
    b.set_epoch(3, 25, start=8)  # one sampler moved on equals a fresh one
    assert list(b) == list(EpochSampler(10, 25, seed=1, epoch=3, start=8))
    assert sample_seed(0, 1, 2) != sample_seed(0, 1, 3) != sample_seed(0, 2, 2)


def test_atomic_save_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "last.pt"
    atomic_torch_save({"a": torch.arange(3)}, path)
    atomic_torch_save({"a": torch.arange(5)}, path)
    assert torch.equal(torch.load(path)["a"], torch.arange(5))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp files left


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


RESUME_OVERRIDES = {
    "train.epochs": 3, "train.max_steps": None, "train.steps_per_epoch": 4, "train.batch_size": 3,
    "train.checkpoint_every_steps": 1, "transforms.crop_size": [96, 96], "model.params.base_channels": 16,
    "model.params.dropout": 0.5, "train.val_every": 2, "train.log_every": 1,
}


def _train_and_kill(ov: list[str], out: Path, when: Callable[[dict[str, Any]], bool]) -> tuple[dict[str, Any], int]:
    """``medseg train`` on the quick start with ``ov`` in a subprocess, killed with SIGKILL as soon as its
    ``last.pt`` under ``out`` satisfies ``when(checkpoint)``; returns that checkpoint and the exit code."""
    cmd = [sys.executable, "-m", "medseg.cli", "train", str(QUICK)] + [a for o in ov for a in ("--set", o)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    killed: dict[str, Any] | None = None
    try:
        while time.monotonic() < deadline and proc.poll() is None and killed is None:
            for last in out.glob("quickstart/*/checkpoints/last.pt"):
                try:
                    ck = torch.load(last, map_location="cpu", weights_only=False)
                except Exception:  # noqa: BLE001 — never happens with atomic saves, but do not fail the poll
                    continue
                if when(ck):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = ck
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
    assert killed is not None, "the run finished before it could be killed"
    return killed, proc.returncode


@pytest.mark.slow
def test_kill_and_resume_gives_identical_weights(demo_root: Path, tmp_path: Path) -> None:
    # reference: one uninterrupted run
    ref_ov = tiny_overrides(demo_root, tmp_path / "ref", **RESUME_OVERRIDES, **{"tracking.enabled": False})
    ref, _ = run_training(load_config(QUICK, ref_ov))
    assert ref.steps_done == 12

    # the same run in a subprocess, killed with SIGKILL after its 3rd checkpointed step
    out = tmp_path / "killed"
    ov = tiny_overrides(demo_root, out, **RESUME_OVERRIDES)
    ck, returncode = _train_and_kill(ov, out, lambda ck: 3 <= ck["step"] < 12)
    killed_at = ck["step"]
    assert returncode == -signal.SIGKILL
    (run_dir,) = list(out.glob("quickstart/*"))
    first_run_id = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["run_id"]

    # resume: continues exactly, in the same MLflow run
    resumed, _ = run_training(load_config(QUICK, ov), resume=run_dir, overrides=[])
    assert resumed.run_dir == run_dir and resumed.steps_done == 12
    assert resumed.run_id == first_run_id
    a, b = _weights(ref.last_checkpoint), _weights(resumed.last_checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (killed at step {killed_at})"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    run = client.get_run(first_run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(first_run_id, "train/loss")]
    assert max(steps) == 12 and min(steps) == 1
    assert run.data.tags["medseg.resumed_at_step"] == str(killed_at)

    # extending the schedule on resume continues the same run
    longer, _ = run_training(load_config(QUICK, ov), resume=run_dir, overrides=["train.epochs=4"])
    assert longer.steps_done == 16 and longer.epochs_done == 4 and longer.run_id == first_run_id


class _NanAfter(torch.nn.Module):
    """A loss that turns NaN at its 3rd training call (to test the non-finite-loss stop)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += int(logits.requires_grad)  # count training steps, not validation
        loss = torch.nn.functional.cross_entropy(logits, label[:, 0])
        return loss * float("nan") if self.calls >= 3 else loss


@pytest.mark.parametrize("loss_scaling", [False, True])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss_scaling: bool
) -> None:
    """The losses are read back at the log points and before every checkpoint (here every step: one step
    an epoch); a non-finite one stops training and rolls the trainer back to the last good checkpoint,
    with or without loss scaling (AMP on CUDA, here a CPU GradScaler): no weight of the bad step stays."""
    monkeypatch.setitem(LOSSES._entries, "test_nan_after_2", _NanAfter)  # registered for this test only
    ov = tiny_overrides(demo_root, tmp_path, **{"loss.name": "test_nan_after_2", "loss.params": {},
                                                 "train.max_steps": 5, "train.epochs": 5,
                                                 "train.steps_per_epoch": 1})
    cfg = load_config(QUICK, ov)
    tracker = build_tracker(True, None, cfg.output_dir)
    trainer = Trainer(cfg, tracker)
    if loss_scaling:
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, enabled=True)
    with pytest.raises(TrainingError, match=r"non-finite loss.*step 3.*last good checkpoint"):
        trainer.fit()
    last = torch.load(trainer.ckpt_dir / "last.pt", weights_only=False)
    assert last["step"] == 2  # the state before the bad step
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    for name, p in trainer.net.named_parameters():  # the bad step updated nothing in memory either
        assert torch.equal(p.detach().cpu(), last["model"][name]), name
    assert tracker.client.get_run(trainer.run_id).info.status == "FAILED"


def test_sampler_shards_across_ranks() -> None:
    whole = list(EpochSampler(10, 12, seed=0, epoch=1))
    parts = [list(EpochSampler(10, 12, seed=0, epoch=1, rank=r, world=2)) for r in range(2)]
    assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    assert len(EpochSampler(10, 12, seed=0, rank=1, world=2, start=4)) == 4


@pytest.mark.slow
def test_two_process_ddp_on_cpu(demo_root: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` (gloo on the CPU): one run folder, one MLflow run, rank 0 logs
    and evaluates the test split alone once the other rank has returned."""
    from mlflow.tracking import MlflowClient

    ov = tiny_overrides(demo_root, tmp_path, **{"train.max_steps": 3, "train.epochs": 1,
                                                 "train.evaluate_splits": ["test"]})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "medseg.cli", "train", str(QUICK)] + [a for o in ov for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(tmp_path.glob("quickstart/*/checkpoints/last.pt"))
    assert len(runs) == 1
    ck = torch.load(runs[0], weights_only=False)
    assert ck["step"] == 3
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    found = client.search_runs([exp.experiment_id])
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert "test/dice" in found[0].data.metrics and (runs[0].parents[1] / "metrics_test.json").is_file()


def test_time_limit_still_validates_final_weights(demo_root: Path, tmp_path: Path) -> None:
    ov = tiny_overrides(demo_root, tmp_path, **{"train.max_steps": None, "train.epochs": 50, "train.steps_per_epoch": 1,
                                                 "train.val_every": 100, "train.time_limit_min": 1e-6,
                                                 "tracking.enabled": False})
    result, _ = run_training(load_config(QUICK, ov))
    assert result.stopped_reason == "time_limit" and result.epochs_done == 1
    assert result.best_checkpoint is not None and "val_dice" in result.history[-1]


def test_amp_setting() -> None:
    from medseg.runtime import amp_dtype, use_amp

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_amp("auto", cuda) and not use_amp("auto", cpu)
    assert use_amp("on", cpu) and not use_amp("off", cuda)
    assert amp_dtype(cpu) == torch.bfloat16 and amp_dtype(cuda) == torch.float16


def test_bfloat16_autocast_trains_on_cpu(demo_root: Path, tmp_path: Path) -> None:
    ov = tiny_overrides(demo_root, tmp_path, **{"train.amp": "on", "tracking.enabled": False})
    trainer = Trainer(load_config(QUICK, ov))
    assert trainer.amp and not trainer.scaler.is_enabled()
    result = trainer.fit()
    assert result.steps_done == 2
    weights = _weights(result.last_checkpoint)
    assert all(v.dtype != torch.bfloat16 for v in weights.values())  # master weights stay float32
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


# ----------------------------------------------------------------------------- best checkpoint


def _quiet_trainer(demo_root: Path, out: Path, **extra: object) -> Trainer:
    ov = tiny_overrides(demo_root, out, **{"tracking.enabled": False, "train.overlay_count": 0, "train.amp": "off",
                                           **extra})
    return Trainer(load_config(QUICK, ov))


@pytest.mark.parametrize("mode,values,improved,best", [
    ("min", [0.5, 0.7, 0.3, None, 0.4, float("nan")], [0, 2], 0.3),
    ("max", [0.5, 0.7, 0.3, None, 0.6, float("nan")], [0, 1], 0.7),
])
def test_monitor_mode_keeps_the_best_checkpoint(
    mode: str, values: list[float | None], improved: list[int], best: float,
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    trainer = _quiet_trainer(demo_root, tmp_path, **{"train.monitor": "loss", "train.monitor_mode": mode,
                                                     "train.early_stop_patience": 4})
    reports = iter(values)  # None: this validation reports no "loss" at all
    monkeypatch.setattr(trainer, "validate", lambda: ({"dice": 0.5} | ({} if (v := next(reports)) is None
                                                                       else {"loss": v}), []))
    saves: list[tuple[str, int]] = []
    save = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda name="last.pt": saves.append((name, trainer.epoch))
                        or save(name))
    stops = []
    for epoch in range(len(values)):
        trainer.epoch = epoch
        record: dict[str, float] = {}
        stops.append(trainer._after_validation(record))
        assert record["val_dice"] == 0.5
    assert [e for name, e in saves if name == "best.pt"] == improved  # rewritten only on improvement
    assert trainer.best_metric == best
    ck = torch.load(trainer.ckpt_dir / "best.pt", weights_only=False)
    assert ck["epoch"] == improved[-1] and ck["best_metric"] == best
    assert trainer.stale == len(values) - 1 - improved[-1]
    assert stops == [i - improved[-1] >= 4 for i in range(len(values))]  # missing or NaN = no improvement
    assert "reported no loss (counted as no improvement)" in caplog.text


def test_monitor_loss_min_in_a_real_run(demo_root: Path, tmp_path: Path) -> None:
    trainer = _quiet_trainer(demo_root, tmp_path, **{
        "train.monitor": "loss", "train.monitor_mode": "min", "train.epochs": 3, "train.max_steps": None,
        "train.steps_per_epoch": 1, "model.params.base_channels": 8})
    result = trainer.fit()
    losses = [r["val_loss"] for r in result.history]
    assert len(losses) == 3 and result.best_metric == min(losses)
    best = torch.load(result.best_checkpoint, weights_only=False)
    assert best["epoch"] == 1 + losses.index(min(losses))


def test_unknown_monitor_is_a_config_error(demo_root: Path, tmp_path: Path) -> None:
    from medseg.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.monitor = 'dcie'.*\bdice\b.*\bhd95\b.*\bloss\b"):
        _quiet_trainer(demo_root, tmp_path, **{"train.monitor": "dcie"})
    with pytest.raises(ConfigError, match=r"train.monitor = 'lesion_dice'.*\bmiou\b"):
        _quiet_trainer(demo_root, tmp_path, **{"train.monitor": "lesion_dice", "metrics.lesion_metrics": False})
    _quiet_trainer(demo_root, tmp_path, **{"train.monitor": "lesion_sensitivity"})  # a lesion metric is fine


# ----------------------------------------------------------------------------- MLflow runs always end


@pytest.mark.parametrize("error,status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_failure_in_finish_ends_the_mlflow_run(
    error: type[BaseException], status: str, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(QUICK, tiny_overrides(demo_root, tmp_path, **{"train.max_steps": 1, "train.amp": "off",
                                                                     "model.params.base_channels": 8}))
    tracker = build_tracker(True, None, cfg.output_dir)

    def broken(model: object, name: str) -> None:
        raise error("model logging broke")

    monkeypatch.setattr(tracker, "log_model", broken)
    trainer = Trainer(cfg, tracker)
    with pytest.raises(error, match="model logging broke"):
        trainer.fit()
    run = tracker.client.get_run(trainer.run_id)
    assert run.info.status == status
    assert "best.pt" in {a.path.split("/")[-1] for a in tracker.client.list_artifacts(trainer.run_id, "checkpoints")}


def test_failure_in_evaluate_after_training_ends_the_mlflow_run(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    import medseg.evaluation.evaluate

    def broken(*args: object, **kwargs: object) -> None:
        raise TrainingError("evaluation broke")

    monkeypatch.setattr(medseg.evaluation.evaluate, "evaluate", broken)  # what evaluate_after_training calls
    cfg = load_config(QUICK, tiny_overrides(demo_root, tmp_path, **{
        "train.max_steps": 1, "train.evaluate_splits": ["test"], "model.params.base_channels": 8,
        "train.amp": "off"}))
    with pytest.raises(TrainingError, match="evaluation broke"):
        run_training(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FAILED"


# ----------------------------------------------------------------------------- DDP validation


def _validate_both_splits(trainer: Trainer) -> dict[str, tuple[dict[str, float], list[dict]]]:
    """``Trainer.validate`` on its val split and on the whole data set (17 slices: uneven shards)."""
    import medseg.training.trainer
    from medseg.data import build_dataset
    from medseg.data.loading import TransformedDataset
    from medseg.evaluation.evaluate import eval_loader
    from medseg.transforms import build_transforms

    captured = []
    evaluate_loader = medseg.training.trainer.evaluate_loader

    def capture(*args: object, **kwargs: object) -> object:
        captured.append(evaluate_loader(*args, **kwargs))  # type: ignore[arg-type]
        return captured[-1]

    medseg.training.trainer.evaluate_loader = capture  # type: ignore[assignment]
    try:
        out = {}
        for split in ("val", "all"):
            if split == "all":
                cfg = trainer.cfg
                ds = TransformedDataset(build_dataset(cfg.data, "all"), build_transforms(cfg.transforms, train=False),
                                        cfg.train.seed)
                trainer.val_loader = eval_loader(ds, cfg, trainer.rank, trainer.world)
            metrics, _ = trainer.validate()
            out[split] = (metrics, captured[-1].rows, len(trainer.val_loader.sampler))
    finally:
        medseg.training.trainer.evaluate_loader = evaluate_loader  # type: ignore[assignment]
    return out


def _ddp_rank(rank: int, world: int, port: int, overrides: list[str], weights: str, out_dir: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    trainer = Trainer(load_config(QUICK, overrides))
    assert trainer.world == world and trainer.rank == rank
    trainer.net.load_state_dict(torch.load(weights, weights_only=False))
    if rank == 1:  # as if this rank's last training batch had moved its BatchNorm statistics
        for name, buf in trainer.net.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(0.5)
    result = _validate_both_splits(trainer)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_validation_equals_one_process(demo_root: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tests.evaluation.test_evaluation import assert_same_evaluation

    ov = tiny_overrides(demo_root, tmp_path, **{
        "tracking.enabled": False, "train.overlay_count": 1, "train.cache_samples": False,
        "model.params.base_channels": 8, "data.spacing_mm": 3.0, "evaluation.batch_size": 3, "train.amp": "off",
        # the lesion's own window: contrasted inputs keep the doctored logits off argmax ties (in the flat
        # wide window a batch-size-dependent float32 rounding flips a few of the ~10 % pixels at the cut)
        "data.window": "dicom"})
    single = Trainer(load_config(QUICK, ov))
    net = single.net.eval()
    torch.manual_seed(1)
    for name, buf in net.named_buffers():  # BatchNorm statistics that matter, the same in every process
        if name.endswith("running_mean"):
            buf.copy_(torch.randn_like(buf) * 0.5)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand_like(buf) * 2 + 0.2)
    with torch.no_grad():  # an untrained net predicts one class everywhere: make it predict ~10 % lesion
        logits = net(torch.as_tensor(single.val_set[0]["image"])[None])
        net.head.bias[1] -= torch.quantile((logits[:, 1] - logits[:, 0]).flatten(), 0.9)
    weights = tmp_path / "weights.pt"
    torch.save(single.net.state_dict(), weights)
    expected = _validate_both_splits(single)

    # forked (not spawned): the ranks inherit this process' imports, which take most of a spawn
    mp.start_processes(_ddp_rank, args=(2, free_port(), ov, str(weights), str(tmp_path)), nprocs=2,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for split, n in (("val", 2), ("all", 17)):
        assert expected[split][2] == n and [r[split][2] for r in ranks] == [(n + 1) // 2, n // 2]  # no padding
        metrics, rows = expected[split][:2]
        assert any(r["detected"] for r in rows) and metrics["fp_per_image"] > 0 and 0 < metrics["dice"] < 1
        for r in ranks:  # every rank reports the combined metrics
            assert_same_evaluation(r[split][:2], expected[split][:2])
            for key in ("lesion_count", "fp_per_image", "lesion_merges", "hd95_one_empty"):
                assert r[split][0][key] == expected[split][0][key], key
def test_budget_converts_once_into_steps() -> None:
    from medseg.training.budget import StepBudget, steps_for_budget

    # 100 s budget, 10 s spent on 10 steps (1 s each) and a 2 s validation every 2 epochs of 5 steps
    assert steps_for_budget(100.0, 10.0, 10, 1.0, 2.0, 5, 2) == 10 + int((100 - 10 - 2) / (1 + 2 / 10))
    assert steps_for_budget(100.0, 150.0, 7, 1.0, 2.0, 5, 2) == 7  # budget already spent: stop here
    b = StepBudget(budget_s=1e6, probe_steps=3)
    b.start(step=4)  # a resumed run probes from where it continues
    assert not b.due(6) and b.due(7)
    assert b.convert(step=7, val_s=0.0, steps_per_epoch=5, val_every=1, cap=50) == 50  # capped by epochs
    assert not b.due(8)  # converted once


def test_budget_time_per_step_leaves_out_validation_and_other_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seconds spent after the probe's steps on validation or the propagation reserve's timing are no step's:
    counting them into the time per step under-spent the quick start's 8 minutes by ≈ 20 %."""
    from medseg.training import budget as budget_mod

    clock = [100.0]
    monkeypatch.setattr(budget_mod.time, "monotonic", lambda: clock[0])
    b = budget_mod.StepBudget(budget_s=1000.0, probe_steps=5)
    b.start(step=0)
    for step in range(1, 6):  # the first step takes 10 s (start-up), the next four 1 s each
        clock[0] += 10.0 if step == 1 else 1.0
        assert b.due(step) == (step == 5)
    clock[0] += 20.0 + 7.0  # a 20 s validation, then 7 s of timing the reserve
    total = b.convert(step=5, val_s=20.0, steps_per_epoch=10, val_every=2, cap=10**6, other_s=7.0)
    # 1 s per step, one 20 s validation per 20 steps: (1000 - 41 spent - 20 for the last validation) / 2 s
    assert total == budget_mod.steps_for_budget(1000.0, 41.0, 5, 1.0, 20.0, 10, 2) == 5 + 469


def _lr_of(ckpt: Path) -> float:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer"]["param_groups"][0]["lr"]


BUDGET_OVERRIDES = {
    "train.epochs": 1000, "train.max_steps": None, "train.steps_per_epoch": 4, "train.batch_size": 3,
    "train.time_limit_min": 0.4, "train.budget_probe_steps": 2, "train.val_every": 2, "train.log_every": 1,
    "transforms.crop_size": [96, 96], "model.params.base_channels": 8, "model.params.dropout": 0.5,
}


@pytest.mark.slow
def test_time_budget_shapes_the_schedule(demo_root: Path, tmp_path: Path) -> None:
    """A time-limited run lays its schedule over the budget: the LR ends at 0 when the budget does."""
    ov = tiny_overrides(demo_root, tmp_path, **BUDGET_OVERRIDES, **{"tracking.enabled": False})
    tick = time.monotonic()
    result, _ = run_training(load_config(QUICK, ov))
    wall = time.monotonic() - tick
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
    steps = ckpt["budget_steps"]
    assert steps is not None and steps > 2 and result.steps_done == steps
    assert result.stopped_reason == "time_limit"
    assert _lr_of(result.last_checkpoint) == 0.0  # the poly schedule's end, reached at the budget
    assert ckpt["scheduler"]["last_epoch"] == steps
    # the budget was used, not cut short nor overrun by much (generous: the CPU is shared)
    assert 0.4 * 24 < wall < 3 * 24 + 20, wall


@pytest.mark.slow
def test_kill_and_resume_of_a_time_budget_run_is_identical(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured step count is stored in the checkpoint and reused: kill -9 + resume ends bit-identical."""
    out = tmp_path / "killed"
    ov = tiny_overrides(demo_root, out, **BUDGET_OVERRIDES, **{"train.checkpoint_every_steps": 1})
    ck, _ = _train_and_kill(ov, out, lambda ck: ck["budget_steps"] is not None and ck["step"] < ck["budget_steps"])
    killed_at, budget = ck["step"], ck["budget_steps"]
    (run_dir,) = list(out.glob("quickstart/*"))

    resumed, _ = run_training(load_config(QUICK, ov), resume=run_dir, overrides=[])
    assert resumed.steps_done == budget

    # reference: one uninterrupted run whose probe measured the same step count
    from medseg.training.budget import StepBudget

    def same_count(self: StepBudget, step: int, val_s: float, steps_per_epoch: int, val_every: int, cap: int,
                   other_s: float = 0.0) -> int:
        self.steps = budget
        return budget

    monkeypatch.setattr(StepBudget, "convert", same_count)
    ref_ov = tiny_overrides(demo_root, tmp_path / "ref", **BUDGET_OVERRIDES, **{"tracking.enabled": False})
    ref, _ = run_training(load_config(QUICK, ref_ov))
    assert ref.steps_done == budget
    a, b = _weights(ref.last_checkpoint), _weights(resumed.last_checkpoint)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (killed at step {killed_at} of {budget})"
    assert _lr_of(resumed.last_checkpoint) == _lr_of(ref.last_checkpoint) == 0.0
