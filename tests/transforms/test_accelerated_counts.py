"""The device augmentation is a fixed number of batched kernels: counted with ``torch.profiler`` on the CPU.

A per-sample Python loop, a generator per sample or a host read-back (``.item()``, ``.tolist()``,
``nonzero``/``unique`` sizes) makes the number of dispatched operators grow with the batch or reads
the device back — on a GPU each of those is a launch or a wait. Counting operators on the CPU finds
them exactly, with no GPU.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from torch.profiler import ProfilerActivity, profile

from medseg.transforms.functional import spline_axis_weights

#: operators that read a device value back to the host (a sync on CUDA) or whose output size
#: depends on the data (also a sync on CUDA)
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::unique", "aten::_unique",
              "aten::_unique2", "aten::unique_dim", "aten::masked_select", "aten::tolist")


def _cfg(noise: float = 0.05, w0: float = 10.0) -> Any:
    from medseg.config import load_config

    return load_config(None, ["transforms.crop_size=[48,48]", "transforms.accelerator=true",
                              f"transforms.noise_std={noise}", "transforms.intensity_scale=0.1",
                              "transforms.intensity_shift=0.1", f"transforms.weight_map.w0={w0}"]).transforms


def _batch(b: int, margin: int, crop: int = 48, seed: int = 0) -> dict[str, Any]:
    """A collated accelerator batch of random touching discs (as the CPU workers hand it over)."""
    rng = np.random.default_rng(seed)
    n = crop + 2 * margin
    yy, xx = np.mgrid[:n, :n]
    inst = np.zeros((b, 1, n, n), np.int32)
    for i in range(b):
        for k in range(1, int(rng.integers(1, 9))):  # 0..7 objects: the count varies per sample
            cy, cx, r = *rng.uniform(0, n, 2), rng.uniform(3, 12)
            inst[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    label = np.where(inst > 0, 1 + inst % 2, 0).astype(np.int64)
    wy = np.stack([spline_axis_weights(3, 256, int(rng.integers(0, 200)), crop) for _ in range(b)])
    return {
        "image": torch.as_tensor(rng.random((b, 3, n, n), dtype=np.float32)),
        "label": torch.as_tensor(label), "instance": torch.as_tensor(inst), "truth": torch.as_tensor(inst.copy()),
        "elastic_wy": torch.as_tensor(wy, dtype=torch.float32),
        "elastic_wx": torch.as_tensor(wy[::-1].copy(), dtype=torch.float32),
        "elastic_disp": torch.as_tensor(rng.normal(0, 10, (b, 2, 3, 3)), dtype=torch.float32),
        "device_aug": torch.as_tensor(np.c_[rng.random((b, 2)) < 0.5, rng.uniform(-0.1, 0.1, (b, 2))],
                                      dtype=torch.float32),
        "device_noise_seed": torch.as_tensor(rng.integers(0, 2**31 - 1, (b, 1))),
        "meta": [SimpleNamespace(index=i) for i in range(b)],
    }


def op_counts(fn: Any, *args: Any) -> Counter[str]:
    """Every operator ``fn(*args)`` dispatches (nested ones included), by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    return Counter(e.name for e in prof.events())


@pytest.mark.parametrize("noise,w0", [(0.05, 10.0), (0.0, 0.0)])
def test_device_augment_ops_do_not_grow_with_the_batch(noise: float, w0: float) -> None:
    """Warp, flips, intensity, noise and the border weight map: the same operators at batch 4 and 32,
    and no host read-back."""
    from medseg.transforms.accelerated import DeviceAugment

    aug = DeviceAugment(_cfg(noise, w0))
    aug(_batch(2, aug.margin, seed=9))  # warm-up (lazy initialisations)
    small = op_counts(aug, _batch(4, aug.margin, seed=1))
    large = op_counts(aug, _batch(32, aug.margin, seed=2))
    assert sum(small.values()) > 20  # the profiler saw the work
    assert small == large, {k: (small[k], large[k]) for k in small.keys() | large.keys() if small[k] != large[k]}
    reads = {k: v for k, v in large.items() if any(k.startswith(h) for h in HOST_READS)}
    assert not reads, reads


def test_border_weight_map_ops_do_not_grow_with_the_batch() -> None:
    from medseg.transforms.accelerated import border_weight_map_torch

    b4, b32 = _batch(4, 0, seed=3), _batch(32, 0, seed=4)
    small = op_counts(border_weight_map_torch, b4["instance"][:, 0], b4["label"][:, 0])
    large = op_counts(border_weight_map_torch, b32["instance"][:, 0], b32["label"][:, 0])
    assert small == large and small["aten::_local_scalar_dense"] == 0


@pytest.mark.parametrize("seed,max_distance", [(0, 31.0), (1, 12.0), (2, 1000.0)])
def test_two_nearest_distances_equal_the_cpu_edts(seed: int, max_distance: float) -> None:
    """The batched separable transform against SciPy's per-instance EDTs: exact wherever d1 + d2 ≤ max_distance
    (where the border term is not negligible), and above max_distance wherever the truth is."""
    from medseg.transforms.accelerated import two_nearest_distances_torch
    from medseg.transforms.functional import two_nearest_distances

    inst = _batch(3, 8, crop=40, seed=seed)["instance"][:, 0]
    inst[2] = 0
    inst[2, 5:9, 30:33] = 4  # a lone object: no second distance anywhere
    d1, d2 = (t.numpy() for t in two_nearest_distances_torch(inst, max_distance))
    for i in range(len(inst)):
        r1, r2 = two_nearest_distances(inst[i].numpy(), None)  # exact everywhere
        ok = r1 + r2 <= max_distance
        np.testing.assert_allclose(d1[i][ok], r1[ok], rtol=1e-6)
        np.testing.assert_allclose(d2[i][ok], r2[ok], rtol=1e-6)
        assert (d1[i] + d2[i] > max_distance)[~ok].all()
        assert ok.any() == (i < 2)
        assert (d1[i][inst[i].numpy() > 0] == 0).all()


def test_class_balance_counts_each_sample() -> None:
    from medseg.transforms.accelerated import border_weight_map_torch
    from medseg.transforms.functional import class_balance_weights

    label = torch.as_tensor(np.random.default_rng(0).integers(0, 4, (3, 9, 7)))
    label[1] = 2  # one class: ones
    label[2] = torch.where(label[2] == 1, 7, label[2])  # sparse ids
    got = border_weight_map_torch(torch.zeros_like(label), label, 0.0).numpy()
    for i in range(3):
        np.testing.assert_allclose(got[i], class_balance_weights(label[i].numpy()), rtol=1e-6)


def test_seeded_noise_is_per_sample_and_normal() -> None:
    """A sample's noise depends on its seed only (not on the batch around it) and is standard normal."""
    from medseg.transforms.accelerated import seeded_normal

    seeds = torch.tensor([[5], [123456], [5], [2**31 - 2]])
    z = seeded_normal(seeds, (3, 64, 64))
    assert z.shape == (4, 3, 64, 64) and torch.equal(z[0], z[2]) and not torch.equal(z[0], z[1])
    assert torch.equal(seeded_normal(seeds[1:2], (3, 64, 64))[0], z[1])
    flat = z[1:].reshape(-1).double()
    assert abs(flat.mean()) < 0.02 and abs(flat.std() - 1) < 0.02
    assert abs(float(np.corrcoef(flat[:-1], flat[1:])[0, 1])) < 0.02  # neighbours independent
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3


def test_a_samples_augmentation_does_not_depend_on_its_batch() -> None:
    """Every draw travels with its sample (seeded per sample in the workers): a sample augmented in a batch of
    five equals it augmented alone — warp, flips, intensity, noise and weight map."""
    from medseg.transforms.accelerated import DeviceAugment, seeded_normal

    aug = DeviceAugment(_cfg(noise=0.05))
    batch = _batch(5, aug.margin, seed=7)
    batch["device_aug"][3, :2] = 1.0  # both flips on sample 3
    whole = aug(dict(batch))
    alone = aug({k: (v[3:4] if torch.is_tensor(v) else v[3:4]) for k, v in batch.items()})
    for key in ("image", "label", "instance", "truth", "weight"):
        assert torch.equal(whole[key][3:4], alone[key]), key
    # the noise is the seed's: without it (std 0) the image differs by exactly std · seeded_normal inside (0, 1)
    plain = DeviceAugment(_cfg(noise=0.0))({k: (v[3:4] if torch.is_tensor(v) else v[3:4]) for k, v in batch.items()})
    inside = (alone["image"] > 0) & (alone["image"] < 1) & (plain["image"] > 0) & (plain["image"] < 1)
    noise = 0.05 * seeded_normal(batch["device_noise_seed"][3:4], alone["image"].shape[1:])
    assert inside.float().mean() > 0.5
    torch.testing.assert_close((alone["image"] - plain["image"])[inside], noise[inside], rtol=0, atol=1e-6)
