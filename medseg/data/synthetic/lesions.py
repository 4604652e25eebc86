"""Lesions of a generated release: placed in their host tissue on a key slice, kept where largest.

:func:`place_group` puts 1–3 lesions of the series region's kinds on a key slice (some touching,
some on an organ border), each an irregular ellipsoid (:class:`~medseg.data.synthetic.plan.Lesion`)
with a HU profile contrasting with its host (:func:`lesion_hu`) and the DICOM window a radiologist
would measure it in; :func:`validate_group` drops lesions that are not largest on their key slice
or too small; :func:`lesion_map` renders the instance ids of a slice.

Example:
    >>> place_group(rng, series, group, 2)
    >>> masks = validate_group(series, group, min_px=12)  # one bool mask per kept lesion
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from medseg.data.synthetic.anatomy import (
    BONE,
    FAT,
    KIDNEY,
    LIVER,
    LUNG,
    MFAT,
    MUSCLE,
    PANCREAS,
    SPLEEN,
    VFAT,
    render_anatomy,
)
from medseg.data.synthetic.plan import REGIONS, Group, Lesion, Patient, Series
from medseg.data.synthetic.shapes import choice, random_harmonics, shape_level

__all__ = ["host_mask", "lesion_hu", "lesion_map", "lesion_window", "place_group", "validate_group"]

# windows radiologists used, with how often (fractional ones exist in the real file)
_SOFT_WINDOWS = ((-175, 275), (-160, 240), (-135, 215), (-177.5, 307.5), (-125, 225))
_SOFT_P = (0.8, 0.07, 0.05, 0.04, 0.04)
_LUNG_WINDOWS = ((-1500, 500), (-1400, 200), (-1350, 150))
_LUNG_P = (0.75, 0.15, 0.1)
_BONE_WINDOWS = ((-450, 1050), (-500, 1300), (-322.5, 1077.5))
_BONE_P = (0.5, 0.3, 0.2)

#: per lesion kind: host tissues, long-axis range (mm), least fraction of the radius inside the host
_KINDS = {
    "lung": ((LUNG,), (8.0, 30.0), (0.0, 1.0)),
    "mediastinum": ((MFAT,), (10.0, 40.0), (0.4, 0.8)),
    "liver": ((LIVER,), (10.0, 60.0), (0.1, 1.0)),
    "kidney": ((KIDNEY,), (10.0, 45.0), (0.0, 0.7)),
    "abdomen": ((VFAT, SPLEEN, PANCREAS), (12.0, 55.0), (0.4, 0.9)),
    "soft_tissue": ((FAT, MUSCLE), (15.0, 60.0), (0.4, 0.9)),
    "bone": ((BONE,), (10.0, 30.0), (0.5, 0.8)),
    "pelvis": ((VFAT,), (15.0, 50.0), (0.4, 0.9)),
}


def lesion_map(lesions: list[Lesion], t: float, sp: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids (uint8, 0 = none) and the owning lesion's level at ``t``.

    Where two lesions overlap the pixel goes to the lesion whose normalised level is lower, so
    touching lesions meet along a shared border instead of one covering the other.
    """
    ids = np.zeros((n, n), np.uint8)
    best = np.full((n, n), np.inf, np.float32)
    for i, les in enumerate(lesions):
        sh = les.section(t, sp)
        res = shape_level(sh, (n, n)) if sh is not None else None
        if res is None:
            continue
        win, lev = res
        m = (lev < 1.0) & (lev < best[win])
        best[win][m] = lev[m]
        ids[win][m] = i + 1
    return ids, best



def lesion_hu(rng: np.random.Generator, kind: str, host: int, p: Patient, se: Series) -> tuple[float, float]:
    """Edge and centre HU of a new lesion, with a contrast to its host a small U-Net can learn."""
    u = rng.uniform
    if kind == "lung":
        e = u(-20, 40)
        return e, e + u(0, 20)
    if kind == "liver":
        if rng.random() < 0.15:  # a hyperdense lesion (e.g. haemangioma, hypervascular metastasis)
            e = p.hu_liver + u(45, 70)
            return e, e + u(-10, 10)
        e = max(p.hu_liver - u(45, 65), 2.0)
        return e, max(e - u(0, 20), -5.0)
    if kind == "kidney":
        e = u(3, 15) if rng.random() < 0.65 else u(45, 75)
        return e, e
    if kind == "bone":
        if rng.random() < 0.3:
            e = u(650, 950)
            return e, e + u(0, 100)
        e = u(30, 80)
        return e, e - u(0, 20)
    if host == SPLEEN:
        e = 45 + 40 * se.enh - u(45, 60)
        return e, e
    if host == MUSCLE:
        e = p.hu_muscle - u(45, 60) if rng.random() < 0.7 else p.hu_muscle + u(50, 75)
        return e, e
    e = u(35, 60)  # lymph nodes and soft-tissue masses in fat
    return e, e + (u(-30, -5) if rng.random() < 0.3 else u(-5, 5))


def lesion_window(rng: np.random.Generator, kind: str) -> tuple[float, float]:
    """The DICOM window a radiologist would have measured this lesion kind in."""
    if kind == "lung":
        return choice(rng, _LUNG_WINDOWS, _LUNG_P)  # type: ignore[return-value]
    if kind == "bone" and rng.random() < 0.4:
        return choice(rng, _BONE_WINDOWS, _BONE_P)  # type: ignore[return-value]
    return choice(rng, _SOFT_WINDOWS, _SOFT_P)  # type: ignore[return-value]


def host_mask(kind: str, tis: np.ndarray, se: Series, t: float) -> np.ndarray:
    """Pixels of the lesion kind's host tissue on the key slice."""
    m = np.isin(tis, _KINDS[kind][0])
    if kind == "mediastinum":  # the central mediastinum, not fat left at the lateral cavity edge
        xs = np.arange(se.size)[None, :]
        m &= np.abs(xs - se.bx) < 45 / se.spacing
    if kind == "pelvis":
        m &= t > 440
    if kind == "abdomen":
        m &= t > 235
    return m


def place_group(rng: np.random.Generator, se: Series, g: Group, n_lesions: int) -> None:
    """Place ``n_lesions`` lesions on key slice ``g`` (some touching), appending to ``g.lesions``."""
    t = se.t(g.key)
    _, tis, _ = render_anatomy(se, t)
    sp = se.spacing
    kinds = REGIONS[se.region][2]
    dist_cache: dict[str, np.ndarray] = {}
    for _ in range(n_lesions):
        touching = bool(g.lesions) and rng.random() < 0.35
        kind = g.lesions[int(rng.integers(len(g.lesions)))].kind if touching else str(
            choice(rng, list(kinds), list(kinds.values()))
        )
        if kind not in dist_cache:
            host = host_mask(kind, tis, se, t).astype(np.uint8)
            dist_cache[kind] = cv2.distanceTransform(host, cv2.DIST_L2, 5)
        dist = dist_cache[kind]
        if dist.max() < 3:
            continue
        (lo, hi), (f0, f1) = _KINDS[kind][1], _KINDS[kind][2]
        long_mm = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        ratio = rng.uniform(0.75, 0.95) if kind == "lung" else rng.uniform(0.55, 0.95)
        frac = rng.uniform(f0, f1)
        irregular = 0.05 if kind in ("lung", "mediastinum", "bone") else 0.09
        harm = random_harmonics(rng, (2, 3, 4, 5), irregular)
        drift = tuple(float(x) for x in rng.uniform(-0.8, 0.8, 4))
        ang = rng.uniform(0, math.pi)
        centre = None
        for _shrink in range(5):
            a = long_mm / 2
            r_px = a / sp
            if touching:
                base = g.lesions[int(rng.integers(len(g.lesions)))]
                for psi in rng.uniform(0, 2 * math.pi, 12):
                    d = 0.76 * (r_px + (base.a + base.b) / 2 / sp)  # overlap a little: they meet along a border
                    cx, cy = base.cx + d * math.cos(psi), base.cy + d * math.sin(psi)
                    ix, iy = int(round(cx)), int(round(cy))
                    if not (0 <= ix < se.size and 0 <= iy < se.size) or dist[iy, ix] < 1:
                        continue
                    others = [x for x in g.lesions if x is not base]
                    if all(math.hypot(cx - x.cx, cy - x.cy) > r_px + x.a / sp + 2 for x in others):
                        centre = (cx, cy)
                        break
            else:
                ys, xs = np.nonzero(dist >= max(frac * r_px, 1.0))
                ok = np.ones(len(xs), bool)
                for x in g.lesions:
                    ok &= np.hypot(xs - x.cx, ys - x.cy) > r_px + x.a / sp + 3 / sp
                ok &= (xs > r_px + 8) & (xs < se.size - r_px - 8) & (ys > r_px + 8) & (ys < se.size - r_px - 8)
                if ok.any():
                    i = int(rng.choice(np.flatnonzero(ok)))
                    centre = (float(xs[i]) + rng.uniform(-0.5, 0.5), float(ys[i]) + rng.uniform(-0.5, 0.5))
            if centre is not None:
                break
            long_mm *= 0.8
            if long_mm < lo * 0.8:
                break
        if centre is None:
            continue
        a = long_mm / 2
        b = a * ratio
        host = int(tis[int(round(centre[1])), int(round(centre[0]))])
        e, c = lesion_hu(rng, kind, host, se.patient, se)
        g.lesions.append(
            Lesion(
                kind=kind,
                cx=centre[0],
                cy=centre[1],
                a=a,
                b=b,
                c=float(min(30.0, max(2.5, rng.uniform(0.6, 1.0) * (a + b) / 2))),
                cz=t + float(rng.uniform(-0.2, 0.2)) * se.interval,
                ang=float(ang),
                harm=harm,
                drift=drift,
                hu_edge=float(e),
                hu_centre=float(c),
                window=lesion_window(rng, kind),
            )
        )


def validate_group(se: Series, g: Group, min_px: int) -> list[np.ndarray]:
    """Drop lesions not largest on the key slice or too small; return the key-slice masks."""
    while True:
        areas = []
        for i in range(g.first, g.last + 1):
            ids, _ = lesion_map(g.lesions, se.t(i), se.spacing, se.size)
            areas.append(np.bincount(ids.ravel(), minlength=len(g.lesions) + 1)[1:])
        areas_a = np.array(areas)
        key_area = areas_a[g.key - g.first]
        keep = (key_area >= areas_a.max(axis=0)) & (key_area >= min_px)
        if keep.all():
            ids, _ = lesion_map(g.lesions, se.t(g.key), se.spacing, se.size)
            return [ids == i + 1 for i in range(len(g.lesions))]
        g.lesions = [x for x, k in zip(g.lesions, keep) if k]

