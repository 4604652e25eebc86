"""From datasets to batches: the sample cache with persistent workers, samplers, per-shape collation."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.config import load_config
from medseg.data import build_dataset
from medseg.data.deeplesion import DeepLesionDataset, ImageSource
from medseg.data.loading import (
    EpochSampler,
    ShardSampler,
    TransformedDataset,
    cache_dataset,
    collate_by_shape,
    make_loader,
    sample_nbytes,
)
from medseg.transforms import build_transforms
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "pipelines" / "quickstart.yaml"


def _count_reads(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """Append ``<pid> <file>`` to ``log`` for every image or mask file a DeepLesion dataset reads.

    The patch is on the classes, so forked DataLoader workers inherit it; each line is one
    ``O_APPEND`` write, so lines from several processes never interleave.
    """
    read, read_truth = ImageSource.read, DeepLesionDataset.read_truth

    def note(what: str) -> None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{os.getpid()} {what}\n".encode())
        finally:
            os.close(fd)

    def counted_read(self, series, n):  # type: ignore[no-untyped-def]
        note(f"Images_png/{series}/{n:03d}.png")
        return read(self, series, n)

    def counted_truth(self, series, n, shape, empty_if_absent=False):  # type: ignore[no-untyped-def]
        note(f"Masks_png/{series}/{n:03d}.png")
        return read_truth(self, series, n, shape, empty_if_absent)

    monkeypatch.setattr(ImageSource, "read", counted_read)
    monkeypatch.setattr(DeepLesionDataset, "read_truth", counted_truth)


def _reads(log: Path) -> list[tuple[int, str]]:
    if not log.is_file():
        return []
    return [(int(pid), name) for pid, name in (line.split(" ", 1) for line in log.read_text().splitlines())]


def test_read_counter_sees_reads_in_persistent_workers(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control for the cache test below: without a cache, workers read, and the counter sees them."""
    log = tmp_path / "reads.log"
    _count_reads(monkeypatch, log)
    cfg = load_config(QUICK, tiny_overrides(demo_root, tmp_path, **{"train.num_workers": 2}))
    base = build_dataset(cfg.data, "val")
    ds = TransformedDataset(base, build_transforms(cfg.transforms, train=False), cfg.train.seed)
    sampler = EpochSampler(len(ds), len(ds), seed=0)
    loader = make_loader(ds, cfg.train, sampler, batch_size=1)
    pids = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        assert sum(len(b["image"]) for b in loader) == len(ds)
        pids.append({pid for pid, _ in _reads(log)})
        log.unlink()
    assert os.getpid() not in pids[0] | pids[1]  # every read happened in a worker ...
    assert pids[0] and pids[0] == pids[1]  # ... and the same workers served both epochs


def test_cache_is_filled_before_workers_start_and_no_epoch_reads_again(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.training.trainer import Trainer

    log = tmp_path / "reads.log"
    ov = tiny_overrides(demo_root, tmp_path / "out", **{
        "train.num_workers": 2, "train.epochs": 2, "train.max_steps": None, "train.steps_per_epoch": 2,
        "train.cache_samples": True, "tracking.enabled": False, "train.overlay_count": 0,
        "model.params.base_channels": 8,
        "train.propagate.enabled": False,  # propagation reads new slices by design (the neighbours it labels)
    })
    cfg = load_config(QUICK, ov)
    # what reading the probe (the first training sample), then every sample once reads, counted alike
    _count_reads(monkeypatch, log)
    build_dataset(cfg.data, "train")[0]
    probe = Counter(name for _, name in _reads(log))
    log.unlink()
    for split in ("train", "val"):
        ds = build_dataset(cfg.data, split)
        for i in range(len(ds)):
            ds[i]
    once = Counter(name for _, name in _reads(log))
    log.unlink()
    assert probe and len(once) > len(probe)

    trainer = Trainer(cfg)
    built = Counter(name for _, name in _reads(log))
    assert built == once + probe  # the cache read each file once, in this process, before any worker
    assert {pid for pid, _ in _reads(log)} == {os.getpid()}
    train_epoch = Trainer._train_epoch

    def marked(self: Trainer) -> list[float]:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"0 EPOCH {self.epoch}\n".encode())
        os.close(fd)
        return train_epoch(self)

    monkeypatch.setattr(Trainer, "_train_epoch", marked)
    result = trainer.fit()
    assert result.epochs_done == 2 and result.steps_done == 4
    lines = [name for _, name in _reads(log)]
    assert lines.index("EPOCH 0") == sum(built.values()) and "EPOCH 1" in lines
    # training and validation in both epochs (with persistent workers): no file read again
    after = lines[lines.index("EPOCH 0") + 1 :]
    assert [x for x in after if not x.startswith("EPOCH")] == [], after[:10]


def test_cache_bound_and_uncached_samples(demo_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(QUICK, tiny_overrides(demo_root, tmp_path))
    base = build_dataset(cfg.data, "train")
    probe = base[0]
    per = sample_nbytes(probe)
    assert per == sum(v.nbytes for v in probe.values() if isinstance(v, np.ndarray))
    with caplog.at_level(logging.WARNING, "medseg.data"):
        ds = cache_dataset(base, max_gb=3.5 * per / 1e9, probe=probe, progress=False)
    assert ds.cache_num == 3 and len(ds) == len(base)
    assert "holds 3 of" in caplog.text
    for i in (0, 2, 3, len(base) - 1):  # cached and read-from-disk samples are the same sample
        a, b = ds[i], base[i]
        assert a["meta"]["id"] == b["meta"]["id"]
        for key in ("image", "label", "instance"):
            assert np.array_equal(a[key], b[key])
    assert cache_dataset(base, 0.0, probe, progress=False).cache_num == 0


def test_training_transforms_leave_the_cached_samples_unchanged(demo_root: Path, tmp_path: Path) -> None:
    """The cache hands out its own arrays (no copy): an in-place augmentation would corrupt it."""
    ov = tiny_overrides(demo_root, tmp_path, **{
        "transforms.intensity_scale": 0.2, "transforms.intensity_shift": 0.1, "transforms.noise_std": 0.05,
        "transforms.rotate_prob": 1.0, "transforms.flip_prob": 1.0, "transforms.crop_size": None,
    })
    cfg = load_config(QUICK, ov)
    base = build_dataset(cfg.data, "train")
    cached = cache_dataset(base, 1.0, base[0], progress=False)
    before = [{k: np.array(v, copy=True) for k, v in cached[i].items() if k != "meta"} for i in range(len(cached))]
    ds = TransformedDataset(cached, build_transforms(cfg.transforms, train=True), seed=0)
    for epoch in range(2):
        for i in range(len(ds)):
            out = ds[(epoch, i)]
            assert out is not None and "weight" in out
    for i, snap in enumerate(before):
        assert "weight" not in cached[i]
        for k, v in snap.items():
            assert np.array_equal(np.asarray(cached[i][k]), v), f"sample {i} {k} changed in the cache"


def test_persistent_workers_seed_each_epoch_like_the_main_process(demo_root: Path, tmp_path: Path) -> None:
    cfg = load_config(QUICK, tiny_overrides(demo_root, tmp_path, **{"transforms.noise_std": 0.05}))
    base = build_dataset(cfg.data, "train")
    ds = TransformedDataset(cache_dataset(base, 1.0, base[0], progress=False),
                            build_transforms(cfg.transforms, train=True), seed=7)

    def epochs(workers: int) -> list[list[torch.Tensor]]:
        t = load_config(QUICK, tiny_overrides(demo_root, tmp_path, **{"train.num_workers": workers})).train
        sampler = EpochSampler(len(ds), 6, seed=7)
        loader = make_loader(ds, t, sampler, batch_size=3)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out.append([b["image"] for b in loader])
        return out

    main, workers = epochs(0), epochs(2)
    for a, b in zip(main, workers):
        assert len(a) == len(b) == 2
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(main[0][0], main[1][0])  # the epoch changes the order and the augmentation


def test_shard_sampler_covers_every_index_once() -> None:
    for n, world in ((17, 2), (17, 3), (2, 4), (0, 2)):
        shards = [list(ShardSampler(n, r, world)) for r in range(world)]
        assert sorted(i for s in shards for _, i in s) == list(range(n))  # no padding, no repeats
        assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]
        assert all(e == 0 for s in shards for e, _ in s)
    assert [i for _, i in ShardSampler(5)] == [0, 1, 2, 3, 4]


def test_collate_by_shape_groups_without_padding() -> None:
    def sample(h: int, w: int, v: int) -> dict:
        return {"image": np.full((1, h, w), v, np.float32), "label": np.zeros((1, h, w), np.int64),
                "meta": {"id": f"{h}x{w}-{v}"}}

    batch = [sample(4, 5, 0), sample(6, 6, 1), None, sample(4, 5, 2), sample(6, 6, 3), sample(3, 3, 4)]
    groups = collate_by_shape(batch)
    assert [tuple(g["image"].shape) for g in groups] == [(2, 1, 4, 5), (2, 1, 6, 6), (1, 1, 3, 3)]
    assert [m["id"] for g in groups for m in g["meta"]] == ["4x5-0", "4x5-2", "6x6-1", "6x6-3", "3x3-4"]
    assert groups[0]["image"][1].max() == 2 and groups[0]["label"].dtype == torch.int64
    assert collate_by_shape([None, None]) == []
