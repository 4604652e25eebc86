"""U-Net border weight map: medseg's windowed EDT per instance vs a full-image EDT per instance.

``medseg.transforms.functional.border_weight_map`` runs one ``distance_transform_edt`` per instance
on the instance's bounding box grown by the distance where the border term falls below
``BORDER_TOLERANCE``. The reference below is the textbook computation: one EDT of the whole image
per instance, the two smallest distances kept per pixel. Both must give the same map (max |Δ| is
reported); the ratio is the time per map.

Run: ``python benchmarks/bench_weight_map.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
from common import max_abs_diff, report, set_threads, time_pair
from scipy import ndimage

from medseg.transforms.functional import border_weight_map

W0, SIGMA = 10.0, 5.0
#: float32 output vs a float64 reference, plus the dropped tail below BORDER_TOLERANCE
TOLERANCE = 1e-5


def make_instances(size: int, n: int, seed: int = 0) -> np.ndarray:
    """An ``(size, size)`` int32 map of ``n`` disk-shaped instances, about 15 % of the image.

    Half of the disks are placed touching (or 1–3 px from) an earlier one, so the map has the
    narrow gaps the border term is for; a later disk never overwrites an earlier one.
    """
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    r_mean = np.sqrt(0.15 * size * size / (np.pi * n))
    yy, xx = np.ogrid[:size, :size]
    centres: list[tuple[float, float, float]] = []
    for i in range(1, n + 1):
        r = float(rng.uniform(0.6, 1.4) * r_mean)
        if centres and rng.random() < 0.5:
            cy, cx, r0 = centres[int(rng.integers(len(centres)))]
            angle = rng.uniform(0, 2 * np.pi)
            dist = r0 + r + float(rng.integers(0, 4))
            y, x = cy + dist * np.sin(angle), cx + dist * np.cos(angle)
        else:
            y, x = rng.uniform(r, size - r, 2)
        centres.append((y, x, r))
        disk = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        inst[disk & (inst == 0)] = i
    return inst


def reference_weight_map(instance: np.ndarray, label: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """The weight map from one full-image EDT per instance (float64), written from the definition."""
    counts = {int(c): int(k) for c, k in zip(*np.unique(label, return_counts=True))}
    wc = np.zeros(label.shape)
    for c, k in counts.items():
        wc[label == c] = label.size / (len(counts) * k)
    d1 = np.full(instance.shape, np.inf)
    d2 = np.full(instance.shape, np.inf)
    for i in np.unique(instance):
        if i == 0:
            continue
        d = ndimage.distance_transform_edt(instance != i)
        d2 = np.minimum(d2, np.maximum(d1, d))  # the second smallest so far, from the old d1
        d1 = np.minimum(d1, d)
    background = (label == 0) & (instance == 0) & np.isfinite(d2)
    border = np.zeros(label.shape)
    s = d1[background] + d2[background]
    border[background] = w0 * np.exp(-(s * s) / (2 * sigma * sigma))
    return wc + border


def main(quick: bool = False) -> list[dict[str, Any]]:
    """Time both weight maps on one image per instance count; returns the report rows."""
    set_threads()
    size, counts, n = (128, (5, 20), 2) if quick else (512, (5, 20, 100), 5)
    rows = []
    for count in counts:
        inst = make_instances(size, count, seed=count)
        label = (inst > 0).astype(np.int64)
        ours = border_weight_map(inst, label, W0, SIGMA)
        ref = reference_weight_map(inst, label, W0, SIGMA)
        diff = max_abs_diff(ours, ref)
        t_ours, t_ref = time_pair(
            lambda inst=inst, label=label: border_weight_map(inst, label, W0, SIGMA),
            lambda inst=inst, label=label: reference_weight_map(inst, label, W0, SIGMA),
            n,
        )
        rows.append(
            report(
                f"weight map {size}², {count} instances: windowed EDT vs full-image EDT",
                t_ours * 1e3,
                t_ref * 1e3,
                "ms",
                check=f"max abs Δw = {diff:.1e}",
                ok=diff <= TOLERANCE,
            )
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    rows = main(parser.parse_args().quick)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)
