"""Generated DeepLesion-format data: CT-like 16-bit PNG series, ``DL_info.csv`` and true masks.

The release written by :func:`generate_demo_data` has exactly the on-disk format of NIH DeepLesion:
``Images_png/{patient:06d}_{study:02d}_{series:02d}/{slice:03d}.png``
holding HU + 32768 as uint16, and ``DL_info.csv`` with one row per lesion in the real file's text
formatting (same header, quoted ``"x, y"`` cells, 6 significant digits). RECIST marks are *measured*
with :func:`medseg.measure.measure_recist` on each lesion's true mask on its key slice, the slice
where the lesion is largest. Unlike the real release it also has the true masks:
``Masks_png/<series>/<slice>.png`` (uint8 instance ids) for every written slice a lesion shows on;
on a key slice, id *k* is the *k*-th CSV row of that key slice, and on a neighbouring slice the ids
are those of the key slice whose lesions it shows (lesions of two key slices never share a slice).

The anatomy is a parametric trunk along a body axis ``t`` (mm, from the lung apices at 0 to the hips
at ≈ 650): body outline, subcutaneous fat, muscle, lungs with vessels, mediastinum, heart and great
vessels, liver, spleen, stomach, pancreas, kidneys, bowel, bladder, spine with discs, ribs, pelvis
and the scanner table. Each series covers a stretch of ``t``, so neighbouring slices change smoothly.
Lesions are irregular 3-D ellipsoids of eight coarse types placed in their host tissue; some touch
each other, some sit on an organ border.

As in the real file, ``Slice_range`` is per key slice: each key slice gets its own block of 9–13
contiguous slices (occasionally cut at the series start), and a folder with two key slices holds two
blocks, possibly with a gap between them. Most training rows have ``Coarse_lesion_type`` −1; about 3 %
of rows are ``Possibly_noisy`` = 1, and their marks are deliberately off by ~2 px (box and
diameters follow the moved marks), so only the other rows match the true masks exactly.

Example:
    >>> root = generate_demo_data("data/demo", patients=4, progress=False)
    >>> (root / "DL_info.csv").exists()
    True
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from tqdm.auto import tqdm

from medseg.data.base import DataError
from medseg.data.deeplesion import COLUMNS, HU_OFFSET
from medseg.lesion import LESION_TYPES, measure_recist

log = logging.getLogger("medseg.data")


_INCOMPLETE = ".medseg_demo_incomplete"
#: fast zlib level with run-length matching: the smallest and quickest of OpenCV's options on noisy CT
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
_HU_MIN, _HU_MAX = -1024, 3071

# tissue labels of the anatomy map (used to place lesions in their host and to vary texture)
_AIR, _FAT, _MUSCLE, _VFAT, _MFAT, _LUNG, _LIVER, _SPLEEN, _KIDNEY, _VESSEL, _HEART, _BONE, _CORTEX, _BOWEL, \
    _STOMACH, _BLADDER, _PANCREAS, _OTHER = range(18)  # fmt: skip
#: texture amplitude (HU) per tissue label: organs are not perfectly flat on CT
_TEXTURE = np.array([0, 6, 5, 8, 8, 25, 5, 4, 6, 4, 6, 30, 40, 8, 5, 2, 8, 3], np.float32)

# windows radiologists used, with how often (fractional ones exist in the real file)
_SOFT_WINDOWS = ((-175, 275), (-160, 240), (-135, 215), (-177.5, 307.5), (-125, 225))
_SOFT_P = (0.8, 0.07, 0.05, 0.04, 0.04)
_LUNG_WINDOWS = ((-1500, 500), (-1400, 200), (-1350, 150))
_LUNG_P = (0.75, 0.15, 0.1)
_BONE_WINDOWS = ((-450, 1050), (-500, 1300), (-322.5, 1077.5))
_BONE_P = (0.5, 0.3, 0.2)

#: body regions a series can cover: t range (mm) of its key slices, probability, lesion kinds
_REGIONS = {
    "chest": ((40.0, 240.0), 0.45,
              {"lung": 0.5, "mediastinum": 0.3, "soft_tissue": 0.08, "bone": 0.05, "liver": 0.07}),
    "abdomen": ((250.0, 430.0), 0.42,
                {"liver": 0.32, "abdomen": 0.3, "kidney": 0.16, "soft_tissue": 0.08, "bone": 0.05,
                 "lung": 0.04, "mediastinum": 0.05}),
    "pelvis": ((455.0, 610.0), 0.13,
               {"pelvis": 0.55, "abdomen": 0.1, "soft_tissue": 0.15, "bone": 0.15, "kidney": 0.05}),
}  # fmt: skip
#: per lesion kind: host tissues, long-axis range (mm), least fraction of the radius inside the host
_KINDS = {
    "lung": ((_LUNG,), (8.0, 30.0), (0.0, 1.0)),
    "mediastinum": ((_MFAT,), (10.0, 40.0), (0.4, 0.8)),
    "liver": ((_LIVER,), (10.0, 60.0), (0.1, 1.0)),
    "kidney": ((_KIDNEY,), (10.0, 45.0), (0.0, 0.7)),
    "abdomen": ((_VFAT, _SPLEEN, _PANCREAS), (12.0, 55.0), (0.4, 0.9)),
    "soft_tissue": ((_FAT, _MUSCLE), (15.0, 60.0), (0.4, 0.9)),
    "bone": ((_BONE,), (10.0, 30.0), (0.5, 0.8)),
    "pelvis": ((_VFAT,), (15.0, 50.0), (0.4, 0.9)),
}


# ----------------------------------------------------------------------------- shapes


class _Shape(NamedTuple):
    """An irregular ellipse in pixels: r(θ) = 1 + Σ amp·cos(kθ + phase) in its normalised frame."""

    cx: float
    cy: float
    ax: float
    ay: float
    ang: float = 0.0
    harm: tuple[tuple[int, float, float], ...] = ()


def _level(s: _Shape, hw: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The shape's level function (< 1 inside) over its bounding window of an ``hw`` image."""
    ext = max(s.ax, s.ay) * (1.0 + sum(abs(a) for _, a, _ in s.harm)) + 1.5
    x0, x1 = max(int(s.cx - ext), 0), min(int(s.cx + ext) + 2, hw[1])
    y0, y1 = max(int(s.cy - ext), 0), min(int(s.cy + ext) + 2, hw[0])
    if x0 >= x1 or y0 >= y1 or s.ax <= 0.3 or s.ay <= 0.3:
        return None
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(s.cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(s.cy)
    c, sn = np.float32(math.cos(s.ang)), np.float32(math.sin(s.ang))
    u = (dx * c + dy * sn) / np.float32(s.ax)
    v = (dy * c - dx * sn) / np.float32(s.ay)
    rho = np.sqrt(u * u + v * v)
    if s.harm:
        # cos(kθ), sin(kθ) by complex powers of (u + iv)/ρ: much cheaper than arctan2 + cos
        inv = 1.0 / np.maximum(rho, np.float32(1e-6))
        c1, s1 = u * inv, v * inv
        ck, sk = c1, s1
        r = np.ones_like(rho)
        amps = {k: (a, p) for k, a, p in s.harm}
        for k in range(1, max(amps) + 1):
            if k > 1:
                ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
            if k in amps:
                a, p = amps[k]
                r += np.float32(a * math.cos(p)) * ck - np.float32(a * math.sin(p)) * sk
        rho /= r
    return (slice(y0, y1), slice(x0, x1)), rho


def _polygon(s: _Shape) -> np.ndarray:
    """Boundary of ``s`` as an ``(N, 2)`` float polygon (x, y), the same curve as :func:`_level`."""
    rmax = 1.0 + sum(abs(a) for _, a, _ in s.harm)
    n = int(np.clip(2 * math.pi * max(s.ax, s.ay) * rmax / 1.5, 24, 480))
    th = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n)
    for k, a, ph in s.harm:
        r += a * np.cos(k * th + ph)
    u, v = r * np.cos(th) * s.ax, r * np.sin(th) * s.ay
    c, sn = math.cos(s.ang), math.sin(s.ang)
    return np.column_stack([s.cx + u * c - v * sn, s.cy + u * sn + v * c])


def _paint(
    hu: np.ndarray, tis: np.ndarray, s: _Shape, value: float, tid: int, within: tuple[int, ...] | None = None
) -> np.ndarray | None:
    """Fill ``s`` with ``value`` HU and tissue ``tid`` (only over ``within`` tissues); returns its polygon.

    Anatomy is filled as a polygon (OpenCV, cost independent of the area) because a level function
    over a whole 512² slice for every organ is several times slower; lesions use :func:`_level`.
    """
    if s.ax <= 0.3 or s.ay <= 0.3:
        return None
    pts = _polygon(s)
    ipts = np.round(pts * 16).astype(np.int32)  # 4 fractional bits (shift=4): sub-pixel vertices
    if within is None:
        cv2.fillPoly(hu, [ipts], float(value), lineType=cv2.LINE_8, shift=4)
        cv2.fillPoly(tis, [ipts], int(tid), lineType=cv2.LINE_8, shift=4)
        return pts
    n_y, n_x = hu.shape
    x0, y0 = max(int(pts[:, 0].min()) - 1, 0), max(int(pts[:, 1].min()) - 1, 0)
    x1, y1 = min(int(pts[:, 0].max()) + 2, n_x), min(int(pts[:, 1].max()) + 2, n_y)
    if x0 >= x1 or y0 >= y1:
        return pts
    m = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(m, [ipts - np.array([x0 * 16, y0 * 16], np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    lut = np.zeros(256, bool)
    lut[list(within)] = True
    win = (slice(y0, y1), slice(x0, x1))
    sel = m.view(bool) & lut[tis[win]]
    hu[win][sel] = value
    tis[win][sel] = tid
    return pts


def _harm(rng: np.random.Generator, ks: tuple[int, ...], amp: float) -> tuple[tuple[int, float, float], ...]:
    """Random boundary harmonics: one ``(k, amplitude, phase)`` per k, amplitudes up to ``amp``."""
    return tuple((k, float(rng.uniform(0.3, 1.0) * amp), float(rng.uniform(0, 2 * math.pi))) for k in ks)


def _smooth(t: float, a: float, b: float) -> float:
    """Smoothstep from 0 at ``t = a`` to 1 at ``t = b`` (falls instead when a > b)."""
    x = min(max((t - a) / (b - a), 0.0), 1.0)
    return x * x * (3 - 2 * x)


def _bump(t: float, t0: float, t1: float, t2: float, t3: float) -> float:
    """0 before t0, rising to 1 at t1, 1 until t2, falling to 0 at t3."""
    return _smooth(t, t0, t1) * _smooth(t, t3, t2)


# ----------------------------------------------------------------------------- plan


@dataclass
class _Patient:
    """Patient-level anatomy and metadata (shared by all the patient's studies)."""

    index: int
    split: int
    gender: str
    age: int | None
    scale: float
    fat_mm: float
    muscle_mm: float
    body_harm: tuple[tuple[int, float, float], ...]
    organ_harm: tuple[tuple[int, float, float], ...]
    hu_fat: float
    hu_muscle: float
    hu_liver: float
    gallbladder: bool
    disc_phase: float
    rib_phase: tuple[float, ...]


@dataclass
class _Lesion:
    """A lesion: an irregular ellipsoid (pixels in-plane, mm along t) with its HU profile."""

    kind: str
    cx: float
    cy: float
    a: float  #: in-plane semi-axes, mm
    b: float
    c: float  #: semi-axis along t, mm
    cz: float  #: centre along t, mm
    ang: float
    harm: tuple[tuple[int, float, float], ...]
    drift: tuple[float, ...]  #: phase drift of each harmonic from centre to tip (keeps the area)
    hu_edge: float
    hu_centre: float
    window: tuple[float, float] = (-175.0, 275.0)

    def section(self, t: float, spacing: float) -> _Shape | None:
        """The cross-section at ``t`` in pixels, or None where the lesion is absent."""
        s2 = 1.0 - ((t - self.cz) / self.c) ** 2
        if s2 <= 0.0:
            return None
        s = math.sqrt(s2)
        z = (t - self.cz) / self.c
        harm = tuple((k, a, p + d * z) for (k, a, p), d in zip(self.harm, self.drift))
        return _Shape(self.cx, self.cy, self.a * s / spacing, self.b * s / spacing, self.ang, harm)


@dataclass
class _Group:
    """One key slice: its lesions (in CSV row order) and the block of slices written around it."""

    key: int
    first: int
    last: int
    lesions: list[_Lesion] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class _Series:
    """One CT series: geometry, its own random anatomy details, and its key-slice groups."""

    patient: _Patient
    study: int
    series_id: int
    age: int | None
    region: str
    interval: float
    spacing: float
    spacing_text: str
    size: int
    t0: float
    bx: float
    by: float
    noise: float
    enh: float
    table_gap: float
    lung_vessels: np.ndarray
    liver_vessels: np.ndarray
    bowel: np.ndarray
    texture: np.ndarray  #: (2, 24, 24) coarse random fields, upsampled per series when rendered
    groups: list[_Group] = field(default_factory=list)
    #: per-series arrays built on first use and dropped after the series is written (memory)
    cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """Folder name ``{patient:06d}_{study:02d}_{series:02d}``."""
        return f"{self.patient.index:06d}_{self.study:02d}_{self.series_id:02d}"

    def t(self, index: int) -> float:
        """Body-axis position (mm) of slice ``index`` (1-based)."""
        return self.t0 + (index - 1) * self.interval


# ----------------------------------------------------------------------------- anatomy


def _body_axes(p: _Patient, t: float) -> tuple[float, float]:
    """Body half-width and half-depth (mm) at ``t``."""
    ts = (0.0, 100.0, 250.0, 350.0, 450.0, 550.0, 650.0)
    a = np.interp(t, ts, (140.0, 165.0, 160.0, 150.0, 156.0, 168.0, 166.0))
    b = np.interp(t, ts, (100.0, 112.0, 115.0, 118.0, 116.0, 112.0, 108.0))
    if p.gender == "F":
        a *= 0.95 + 0.08 * _smooth(t, 420, 560)
    return float(a * p.scale), float(b * p.scale)


def _cached(se: _Series, key: str) -> np.ndarray:
    """Per-series constant arrays: the table (``base_hu``/``base_tis``), texture fields, FOV mask."""
    if key not in se.cache:
        n = se.size
        if key in ("tex0", "tex1"):
            small = se.texture[0 if key == "tex0" else 1]
            se.cache[key] = cv2.resize(small, (n, n), interpolation=cv2.INTER_CUBIC)
        elif key == "fov":  # outside the reconstruction circle
            yy, xx = np.ogrid[:n, :n]
            out = (xx - (n - 1) / 2) ** 2 + (yy - (n - 1) / 2) ** 2 > (n / 2) ** 2
            se.cache[key] = out.astype(np.uint8)
        else:
            se.cache["base_hu"], se.cache["base_tis"] = _table(se)
    return se.cache[key]


def _base_layers(se: _Series) -> tuple[np.ndarray, np.ndarray]:
    """Air and the scanner table: the part of every slice that does not depend on ``t``."""
    return _cached(se, "base_hu"), _cached(se, "base_tis")


def _table(se: _Series) -> tuple[np.ndarray, np.ndarray]:
    """A curved carbon-fibre table top on foam, under the patient's back (fixed along the series)."""
    n, sp = se.size, se.spacing
    lo, hi = _REGIONS[se.region][0]
    A, B = _body_axes(se.patient, (lo + hi) / 2)
    hu = np.full((n, n), -1000.0, np.float32)
    tis = np.zeros((n, n), np.uint8)
    xs = np.arange(n, dtype=np.float32)[None, :]
    rows = np.arange(n, dtype=np.float32)[:, None]
    half = 1.15 * A / sp
    ytop = se.by + (1.06 * B + se.table_gap) / sp
    d = (rows - ytop + (12.0 / sp) * np.clip((xs - se.bx) / half, -1, 1) ** 2) * sp
    inside = np.abs(xs - se.bx) < half
    hu[(d >= 0) & (d < 3) & inside] = 60.0
    hu[(d >= 3) & (d < 16) & inside] = -750.0
    hu[(d >= 16) & (d < 19) & inside] = 60.0
    tis[(d >= 0) & (d < 19) & inside] = _OTHER
    return hu, tis


def _render_anatomy(se: _Series, t: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """HU map, tissue map and body bounding box ``(x0, y0, x1, y1)`` of slice position ``t``."""
    p, n, sp = se.patient, se.size, se.spacing
    hu = np.empty((n, n), np.float32)
    tis = np.empty((n, n), np.uint8)
    A, B = _body_axes(p, t)
    bx, by = se.bx, se.by
    fat = p.fat_mm * float(np.interp(t, (0, 200, 350, 500, 650), (0.7, 0.8, 1.0, 1.25, 1.2)))
    wall = p.muscle_mm
    ca, cb = A - fat - wall, B - fat - wall  # cavity half-axes

    def mm(x: float, y: float, a: float, b: float, ang: float = 0.0, harm: tuple = ()) -> _Shape:
        """A shape from mm offsets to the body centre (x to the patient's left, y posterior)."""
        return _Shape(bx + x / sp, by + y / sp, a / sp, b / sp, math.radians(ang), harm)

    enh = se.enh
    blood = 120.0 + 60.0 * enh
    base_hu, base_tis = _base_layers(se)
    hu[:] = base_hu
    tis[:] = base_tis
    # --- body wall: subcutaneous fat, muscle (its own harmonics, so its thickness varies), cavity
    bh = tuple((k, a, ph + 0.004 * t) for k, a, ph in p.body_harm)
    mh = tuple((k, a, ph + 0.003 * t) for k, a, ph in p.organ_harm)
    chest = t < 245
    pts = _paint(hu, tis, mm(0, 0, A, B, 0, bh), p.hu_fat, _FAT)
    _paint(hu, tis, mm(0, 0, A - fat, B - fat, 0, bh), p.hu_muscle, _MUSCLE)
    _paint(hu, tis, mm(0, -0.3 * wall, ca, cb + 0.3 * wall, 0, mh[:1] + bh[1:]), p.hu_fat + 10,
           _MFAT if chest else _VFAT)
    assert pts is not None
    bbox = (
        max(int(pts[:, 0].min()), 0), max(int(pts[:, 1].min()), 0),
        min(int(pts[:, 0].max()), n - 1), min(int(pts[:, 1].max()), n - 1),
    )  # fmt: skip

    vb_r = float(np.interp(t, (0, 250, 450), (15.0, 18.0, 22.0)))
    y_vb = B - fat - 60.0 - vb_r * 0.3
    oh = p.organ_harm
    soft = (_MFAT, _VFAT, _MUSCLE)
    # --- abdominal organs
    pl = _bump(t, 195, 240, 320, 405)
    if pl > 0.05:
        lx, ly = -0.42 * ca, (-0.08 + 0.25 * (1 - pl)) * cb
        _paint(hu, tis, mm(lx, ly, 0.58 * ca * pl**0.5, 0.8 * cb * pl**0.7, 15, oh), p.hu_liver, _LIVER, soft)
        pll = _bump(t, 232, 252, 290, 320)  # the left lobe starts below the heart
        if pll > 0.05:
            _paint(hu, tis, mm(0.1 * ca, -0.5 * cb, 0.4 * ca * pll, 0.3 * cb * pll, -10, oh[:2]),
                   p.hu_liver, _LIVER, soft)
        for u, v, r, t1, t2 in se.liver_vessels:
            if t1 <= t <= t2:
                _paint(hu, tis, mm(u * ca, v * cb, r, r), blood - 20, _VESSEL, (_LIVER,))
        if p.gallbladder and 285 < t < 335:
            g = _bump(t, 285, 295, 325, 335)
            _paint(hu, tis, mm(-0.22 * ca, -0.42 * cb, 14 * g, 18 * g, 30), 8.0, _OTHER, (_LIVER, _VFAT))
    ps = _bump(t, 225, 250, 310, 335)
    if ps > 0.05:
        _paint(hu, tis, mm(0.6 * ca, 0.3 * cb, 0.2 * ca * ps, 0.4 * cb * ps, -35, oh), 45 + 40 * enh, _SPLEEN, soft)
    pst = _bump(t, 215, 240, 300, 325)
    if pst > 0.05:
        st = mm(0.3 * ca, -0.35 * cb, 0.3 * ca * pst, 0.28 * cb * pst, 20, oh[:2])
        _paint(hu, tis, st, 45.0, _STOMACH, soft)
        _paint(hu, tis, st._replace(ax=st.ax * 0.85, ay=st.ay * 0.85), 15.0, _STOMACH, (_STOMACH,))
        _paint(hu, tis, st._replace(cy=st.cy - st.ay * 0.55, ax=st.ax * 0.7, ay=st.ay * 0.4), -950.0,
               _STOMACH, (_STOMACH,))
    ppa = _bump(t, 285, 300, 320, 340)
    if ppa > 0.05:
        _paint(hu, tis, mm(0.05 * ca, -0.02 * cb, 0.42 * ca * ppa, 0.09 * cb, -12, oh[:1]), 45 + 30 * enh,
               _PANCREAS, (_VFAT,))
    for side in (-1, 1):
        pk = _bump(t + (12 if side > 0 else 0), 285, 310, 395, 425)
        if pk > 0.05:
            kx, ky = side * (vb_r + 50.0), y_vb + 2.0
            k = mm(kx, ky, 24 * pk**0.5, 33 * pk**0.5, -side * 30, oh[:2])
            _paint(hu, tis, k, 40 + 130 * enh, _KIDNEY, soft + (_LIVER, _SPLEEN))
            # renal sinus fat at the hilum, on the medial side
            _paint(hu, tis, k._replace(cx=k.cx - side * 13 / sp, ax=k.ax * 0.3, ay=k.ay * 0.33, harm=()),
                   -40.0, _OTHER, (_KIDNEY,))
    if t > 270:
        for u, v, r, cz, c, kind in se.bowel:
            s2 = 1 - ((t - cz) / c) ** 2
            if s2 > 0:
                s = math.sqrt(s2)
                sh = mm(u * ca, v * cb, r * s, r * s * 0.8, 40 * u)
                _paint(hu, tis, sh, 35.0, _BOWEL, (_VFAT,))
                inner = {0: 8.0, 1: -950.0, 2: 250.0}[int(kind)]  # water, gas or oral contrast
                _paint(hu, tis, sh._replace(ax=sh.ax * 0.75, ay=sh.ay * 0.75), inner, _BOWEL, (_BOWEL,))
    pb = _bump(t, 535, 575, 640, 700)
    if pb > 0.05:
        bl = mm(0, -0.4 * cb, 0.32 * ca * pb, 0.4 * cb * pb, 0, oh[:1])
        _paint(hu, tis, bl, 35.0, _BLADDER, (_VFAT, _BOWEL))
        _paint(hu, tis, bl._replace(ax=bl.ax * 0.9, ay=bl.ay * 0.9), 8.0, _BLADDER, (_BLADDER,))
    if t > 520:
        _paint(hu, tis, mm(0, y_vb - 28, 16, 14), 30.0, _BOWEL, (_VFAT,))
        _paint(hu, tis, mm(0, y_vb - 28, 8, 6), -950.0, _BOWEL, (_BOWEL,))
    # --- chest: lungs, mediastinum, heart, airways
    pe, pd = _smooth(t, 0, 70), _smooth(t, 290, 190)
    if pe * pd > 0.03:
        vl = (0.02 + 0.35 * (1 - pd) + 0.1 * (1 - pe)) * cb
        for side in (-1, 1):
            lung = mm(side * 0.47 * ca, vl, (0.52 if side < 0 else 0.5) * ca * pe**0.5 * pd**0.4,
                      0.93 * cb * pe**0.7 * pd**0.8, side * 4, oh[:2])
            _paint(hu, tis, lung, -860.0, _LUNG, (_MFAT, _VFAT, _LIVER, _SPLEEN, _STOMACH))
        if t < 250:  # mediastinum: narrow in front, wider behind the heart
            _paint(hu, tis, mm(0.03 * ca, -0.35 * cb, 0.12 * ca, 0.62 * cb, 0, oh[:1]), p.hu_fat + 10, _MFAT,
                   (_LUNG,))
            _paint(hu, tis, mm(0.03 * ca, 0.15 * cb, 0.2 * ca, 0.45 * cb, 0, oh[:1]), p.hu_fat + 10, _MFAT,
                   (_LUNG,))
        for u, v, r, t1, t2 in se.lung_vessels:
            if t1 <= t <= t2:
                _paint(hu, tis, mm(u * ca, v * cb, r, r), 40.0, _VESSEL, (_LUNG,))
    ph = _bump(t, 85, 125, 195, 240)
    if ph > 0.05:
        h = mm(0.18 * ca, -0.12 * cb, 0.4 * ca * ph, 0.52 * cb * ph, -25, oh[:1])
        _paint(hu, tis, h, 70 + 40 * enh, _HEART, (_MFAT, _LUNG, _LIVER))
        _paint(hu, tis, h._replace(ax=h.ax * 0.78, ay=h.ay * 0.78), blood, _HEART, (_HEART,))
    vessels: list[tuple[float, float, float, float]] = []  # x, y, r (mm), HU
    if 60 < t < 150:
        vessels.append((-8.0, -0.3 * cb, 15.0, blood))  # ascending aorta
    if 105 < t < 145:
        vessels.append((22.0, -0.28 * cb, 13.0, blood))  # pulmonary trunk
    if 30 < t < 130:
        vessels.append((-30.0, -0.3 * cb, 10.0, blood + 40))  # superior vena cava
    if 48 < t < 62:
        vessels.append((4.0, 0.5 * (-0.3 * cb + y_vb - vb_r - 10), 24.0, blood))  # arch (simplified)
    if 50 < t < 470:
        g = _smooth(t, 240, 300)
        vessels.append((16 - 8 * g, y_vb - vb_r - 9 - 3 * g, 12 - 2 * g, blood))  # descending aorta
    if 240 < t < 470:
        vessels.append((-24.0, y_vb - vb_r - 10, 11.0, blood - 20))  # inferior vena cava
    if t >= 470:
        off = 10 + 0.35 * (t - 470)
        vessels += [(-off, y_vb - vb_r - 8, 7.0, blood), (off, y_vb - vb_r - 8, 7.0, blood),
                    (-off + 6, y_vb - vb_r + 4, 9.0, blood - 20), (off - 6, y_vb - vb_r + 4, 9.0, blood - 20)]
    if t < 280:
        vessels.append((-4.0, y_vb - vb_r - 8, 7.0, 40.0))  # oesophagus
    for x, y, r, v in vessels:
        _paint(hu, tis, mm(x, y, r, r), v, _VESSEL, (_MFAT, _VFAT, _LUNG, _HEART, _LIVER))
    if t < 125:
        _paint(hu, tis, mm(0, y_vb - vb_r - 24, 10, 9), 40.0, _OTHER, (_MFAT, _LUNG, _VESSEL))
        _paint(hu, tis, mm(0, y_vb - vb_r - 24, 8, 7), -1000.0, _OTHER, (_OTHER,))
    elif t < 155:
        dx = 5 + 0.8 * (t - 125)
        for side in (-1, 1):
            _paint(hu, tis, mm(side * dx, y_vb - vb_r - 22, 6, 6), -1000.0, _OTHER, (_MFAT, _LUNG, _VESSEL))
    # --- pelvis: gluteal muscles, iliac wings, femoral heads
    pg = _smooth(t, 440, 520)
    if pg > 0.05:
        for side in (-1, 1):
            _paint(hu, tis, mm(side * 0.5 * A, 0.55 * B, 0.4 * A * pg, 0.38 * B * pg, side * 20, oh[:1]),
                   p.hu_muscle, _MUSCLE, (_FAT, _MUSCLE, _VFAT))
    pi = _bump(t, 430, 455, 560, 590)
    if pi > 0.05:
        g = _smooth(t, 450, 570)
        for side in (-1, 1):
            # a wing-shaped ilium: an ellipse of bone hollowed on its front by the iliacus muscle
            il = mm(side * (0.66 - 0.25 * g) * ca, y_vb - 10 - 20 * g, (62 - 25 * g) * pi, 16 + 6 * g,
                    side * (62 - 30 * g))
            _paint(hu, tis, il, 750.0, _CORTEX, (_VFAT, _MUSCLE, _FAT, _BOWEL))
            _paint(hu, tis, il._replace(ax=il.ax * 0.9, ay=il.ay * 0.7), 240.0, _BONE, (_CORTEX,))
            ang = il.ang - side * math.pi / 2
            front = il._replace(cx=il.cx + math.cos(ang) * il.ay * 1.4, cy=il.cy + math.sin(ang) * il.ay * 1.4,
                                ax=il.ax * 0.95, ay=il.ay * 1.15)
            _paint(hu, tis, front, p.hu_muscle, _MUSCLE, (_CORTEX, _BONE, _VFAT, _BOWEL))
    pf = _smooth(t, 575, 600)
    if pf > 0.05:
        for side in (-1, 1):
            fh = mm(side * 0.6 * ca, 0.05 * cb, 25 * pf, 25 * pf)
            _paint(hu, tis, fh, 700.0, _CORTEX)
            _paint(hu, tis, fh._replace(ax=fh.ax * 0.85, ay=fh.ay * 0.85), 260.0, _BONE, (_CORTEX,))
    # --- psoas, paraspinal muscles and the spine
    pp = _smooth(t, 320, 470) * _smooth(t, 640, 560)
    if pp > 0.05:
        off = vb_r + 10 + 18 * pp + 15 * _smooth(t, 480, 600)
        for side in (-1, 1):
            _paint(hu, tis, mm(side * off, y_vb - 4, 10 + 14 * pp, 12 + 8 * pp, side * 20), p.hu_muscle, _MUSCLE,
                   (_VFAT, _MFAT, _LUNG, _BOWEL))
    sacrum = _smooth(t, 470, 500)
    for side in (-1, 1):
        _paint(hu, tis, mm(side * 27, y_vb + vb_r + 20, 25, 24 - 6 * sacrum), p.hu_muscle, _MUSCLE)
    disc = math.cos(2 * math.pi * t / 32.0 + p.disc_phase) > 0.8 and sacrum < 0.5
    vbx = vb_r * (1 + 1.4 * sacrum * _smooth(t, 620, 520))
    vb = mm(0, y_vb + 12 * sacrum, vbx, vb_r * 0.85 * (1 - 0.2 * sacrum))
    if disc:
        _paint(hu, tis, vb, 85.0, _OTHER)
    else:
        _paint(hu, tis, vb, 800.0, _CORTEX)
        _paint(hu, tis, vb._replace(ax=vb.ax - 2 / sp, ay=vb.ay - 2 / sp), 240.0, _BONE, (_CORTEX,))
    if t < 560:
        cy = y_vb + vb_r + 10
        _paint(hu, tis, mm(0, cy, 15, 13), 650.0, _CORTEX)
        _paint(hu, tis, mm(0, cy, 8, 8), 15.0, _OTHER, (_CORTEX,))
        _paint(hu, tis, mm(0, cy + 20, 5, 13), 650.0, _CORTEX)
        if not disc:
            for side in (-1, 1):
                _paint(hu, tis, mm(side * (vb_r + 12), cy - 3, 14, 5, side * 15), 600.0, _CORTEX)
    # --- ribs, sternum and scapulae
    pr = _bump(t, 10, 30, 300, 345)
    if pr > 0.05:
        ra, rb = ca + 0.45 * wall, cb + 0.45 * wall
        for j, psi in enumerate(p.rib_phase):
            side = -1 if j % 2 else 1
            theta = math.radians(side * (-62 + 14 * (j // 2)) + (180 if side < 0 else 0))
            theta += 0.002 * t * side
            lateral = abs(math.cos(theta))
            if math.cos(2 * math.pi * t / 26.0 + psi) < -0.15 or (t > 250 and lateral < 0.5):
                continue
            rx, ry = ra * math.cos(theta), rb * math.sin(theta)
            rib = mm(rx, ry, 7.0, 4.5, math.degrees(theta) + 90)
            _paint(hu, tis, rib, 700.0, _CORTEX)
            _paint(hu, tis, rib._replace(ax=rib.ax * 0.55, ay=rib.ay * 0.45), 250.0, _BONE, (_CORTEX,))
    if 40 < t < 215:
        st = mm(0, -(cb + 0.4 * wall), 14, 6)
        _paint(hu, tis, st, 650.0, _CORTEX)
        _paint(hu, tis, st._replace(ax=st.ax * 0.8, ay=st.ay * 0.5), 250.0, _BONE, (_CORTEX,))
    psc = _bump(t, 10, 30, 120, 160)
    if psc > 0.05:
        for side in (-1, 1):
            _paint(hu, tis, mm(side * 0.68 * A, 0.5 * B, 42 * psc, 5, -side * 35), 600.0, _CORTEX, (_MUSCLE, _FAT))
    return hu, tis, bbox


def _lesion_map(lesions: list[_Lesion], t: float, sp: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids (uint8, 0 = none) and the owning lesion's level at ``t``.

    Where two lesions overlap the pixel goes to the lesion whose normalised level is lower, so
    touching lesions meet along a shared border instead of one covering the other.
    """
    ids = np.zeros((n, n), np.uint8)
    best = np.full((n, n), np.inf, np.float32)
    for i, les in enumerate(lesions):
        sh = les.section(t, sp)
        res = _level(sh, (n, n)) if sh is not None else None
        if res is None:
            continue
        win, lev = res
        m = (lev < 1.0) & (lev < best[win])
        best[win][m] = lev[m]
        ids[win][m] = i + 1
    return ids, best


def _render_slice(
    se: _Series, index: int, group: _Group | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """The uint16 PNG array (HU + 32768) of slice ``index`` and its instance mask (None if empty)."""
    t = se.t(index)
    n = se.size
    hu, tis, _ = _render_anatomy(se, t)
    w = 2 * math.pi * t / 90.0
    tex0, tex1 = _cached(se, "tex0"), _cached(se, "tex1")
    tex = tex0 * np.float32(math.cos(w)) + tex1 * np.float32(math.sin(w))
    hu += _TEXTURE[tis] * tex
    ids = None
    if group is not None and group.lesions:
        ids, lev = _lesion_map(group.lesions, t, se.spacing, n)
        if ids.any():
            edge = np.array([0] + [x.hu_edge for x in group.lesions], np.float32)
            centre = np.array([0] + [x.hu_centre for x in group.lesions], np.float32)
            m = ids > 0
            k = ids[m]
            lv = lev[m]
            hu[m] = edge[k] + (centre[k] - edge[k]) * (1 - lv * lv) + 6.0 * tex[m]
        else:
            ids = None
    # partial-volume blur, then correlated quantum noise (CT noise is not white)
    hu = cv2.GaussianBlur(hu, (5, 5), 0.7)
    noise = rng.standard_normal((n, n), dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (5, 5), 0.8)
    k1 = cv2.getGaussianKernel(5, 0.8, cv2.CV_64F).ravel()
    hu += noise * np.float32(se.noise / float((k1**2).sum()))
    hu[_cached(se, "fov").view(bool)] = _HU_MIN
    out = np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int32) + HU_OFFSET
    return out.astype(np.uint16), ids


# ----------------------------------------------------------------------------- planning


def _choice(rng: np.random.Generator, items: tuple | list, p: tuple | list) -> object:
    """One item drawn with probabilities ``p``."""
    return items[int(rng.choice(len(items), p=np.asarray(p, float) / np.sum(p)))]


def _make_patients(rng: np.random.Generator, patients: int) -> list[_Patient]:
    """Patients with their anatomy and the official split (≈70/15/15, by patient, none empty)."""
    n_val = max(1, round(0.15 * patients))
    n_test = max(1, round(0.15 * patients))
    split = np.ones(patients, int)
    order = rng.permutation(patients)
    split[order[:n_val]] = 2
    split[order[n_val : n_val + n_test]] = 3
    out = []
    for i in range(patients):
        gender = "F" if rng.random() < 0.48 else "M"
        out.append(
            _Patient(
                index=i + 1,
                split=int(split[i]),
                gender=gender,
                age=None if rng.random() < 0.05 else int(rng.integers(22, 86)),
                scale=float(rng.uniform(0.88, 1.1)),
                fat_mm=float(rng.uniform(8, 28) * (1.15 if gender == "F" else 1.0)),
                muscle_mm=float(rng.uniform(8, 14)),
                body_harm=_harm(rng, (2, 3, 4), 0.035),
                organ_harm=_harm(rng, (2, 3, 4), 0.06),
                hu_fat=float(rng.uniform(-115, -90)),
                hu_muscle=float(rng.uniform(38, 55)),
                hu_liver=float(rng.uniform(55, 75)),
                gallbladder=bool(rng.random() < 0.7),
                disc_phase=float(rng.uniform(0, 2 * math.pi)),
                rib_phase=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, 18)),
            )
        )
    return out


def _make_series(
    rng: np.random.Generator, p: _Patient, study: int, series_id: int, age: int | None, size: int
) -> _Series:
    """A series: region, slice interval, pixel spacing, position and its random anatomy details."""
    region = str(_choice(rng, list(_REGIONS), [r[1] for r in _REGIONS.values()]))
    interval = float(_choice(rng, (5.0, 2.5, 2.0, 1.0), (0.45, 0.15, 0.15, 0.25)))
    lo, hi = _REGIONS[region][0]
    a_max = max(_body_axes(p, t)[0] for t in np.linspace(lo - 40, hi + 40, 9))
    # the field of view is chosen to fit the patient, so the pixel spacing follows the body size
    fov = float(np.clip(round(2 * a_max * rng.uniform(1.12, 1.32)), 0.6 * 512, 0.98 * 512))
    spacing = round(fov / 512, 2) if rng.random() < 0.15 else fov / 512
    spacing *= 512 / size
    n_lv, n_bw = int(rng.integers(50, 80)), int(rng.integers(70, 100))
    lung_vessels = np.column_stack([
        rng.choice([-1, 1], n_lv) * rng.uniform(0.12, 0.85, n_lv),
        rng.uniform(-0.7, 0.75, n_lv),
        rng.uniform(1.0, 3.5, n_lv),
        t1 := rng.uniform(-60, 300, n_lv),
        t1 + rng.uniform(20, 160, n_lv),
    ])  # fmt: skip
    lung_vessels[:, 2] *= 1.6 - np.abs(lung_vessels[:, 0])  # thicker towards the hila
    liver_vessels = np.column_stack([
        rng.uniform(-0.85, -0.05, 12), rng.uniform(-0.7, 0.5, 12), rng.uniform(1.5, 5.0, 12),
        t2 := rng.uniform(180, 380, 12), t2 + rng.uniform(20, 90, 12),
    ])  # fmt: skip
    oral = bool(rng.random() < 0.4)
    bowel = np.column_stack([
        rng.uniform(-0.85, 0.85, n_bw), rng.uniform(-0.9, 0.45, n_bw), rng.uniform(10, 26, n_bw),
        rng.uniform(270, 660, n_bw), rng.uniform(15, 45, n_bw),
        rng.choice(3, n_bw, p=[0.55, 0.3, 0.15] if oral else [0.65, 0.35, 0.0]),
    ])  # fmt: skip
    return _Series(
        patient=p,
        study=study,
        series_id=series_id,
        age=age,
        region=region,
        interval=interval,
        spacing=float(spacing),
        spacing_text=_fmt([spacing, spacing, interval]),
        size=size,
        t0=0.0,
        bx=size / 2 + float(rng.normal(0, 0.012 * size)),
        by=size / 2 - 0.035 * size + float(rng.normal(0, 0.012 * size)),
        noise=float(rng.uniform(10, 15)),
        enh=float(rng.uniform(0.6, 1.1)),
        table_gap=float(rng.uniform(12, 35)),
        lung_vessels=lung_vessels.astype(np.float32),
        liver_vessels=liver_vessels.astype(np.float32),
        bowel=bowel.astype(np.float32),
        texture=rng.standard_normal((2, 24, 24)).astype(np.float32),
    )


def _plan_groups(rng: np.random.Generator, se: _Series) -> None:
    """Key slices of the series and their slice blocks; sets ``se.t0``.

    Consecutive key slices sit so far apart that no lesion of one reaches the other's block (a
    lesion is at most 30 mm deep on each side).
    """
    lo, hi = _REGIONS[se.region][0]
    iv = se.interval
    n_groups = 1 if rng.random() < 0.8 else 2
    halves = [(int(rng.integers(4, 7)), int(rng.integers(4, 7))) for _ in range(n_groups)]
    keys_t = [float(rng.uniform(lo, hi))]
    for g in range(1, n_groups):
        gap = (halves[g - 1][1] + halves[g][0]) * iv + 70.0 + float(rng.uniform(0, 40))
        keys_t.append(keys_t[-1] + gap)
    if rng.random() < 0.08:  # key slice at the very start of the series (a truncated block)
        t0 = keys_t[0] - float(rng.integers(0, 3)) * iv
    else:
        t0 = keys_t[0] - halves[0][0] * iv - float(rng.uniform(0, 80))
    se.t0 = t0
    for kt, (below, above) in zip(keys_t, halves):
        key = int(round((kt - t0) / iv)) + 1
        se.groups.append(_Group(key=key, first=max(1, key - below), last=key + above))


def _lesion_hu(rng: np.random.Generator, kind: str, host: int, p: _Patient, se: _Series) -> tuple[float, float]:
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
    if host == _SPLEEN:
        e = 45 + 40 * se.enh - u(45, 60)
        return e, e
    if host == _MUSCLE:
        e = p.hu_muscle - u(45, 60) if rng.random() < 0.7 else p.hu_muscle + u(50, 75)
        return e, e
    e = u(35, 60)  # lymph nodes and soft-tissue masses in fat
    return e, e + (u(-30, -5) if rng.random() < 0.3 else u(-5, 5))


def _window(rng: np.random.Generator, kind: str) -> tuple[float, float]:
    """The DICOM window a radiologist would have measured this lesion kind in."""
    if kind == "lung":
        return _choice(rng, _LUNG_WINDOWS, _LUNG_P)  # type: ignore[return-value]
    if kind == "bone" and rng.random() < 0.4:
        return _choice(rng, _BONE_WINDOWS, _BONE_P)  # type: ignore[return-value]
    return _choice(rng, _SOFT_WINDOWS, _SOFT_P)  # type: ignore[return-value]


def _host_mask(kind: str, tis: np.ndarray, se: _Series, t: float) -> np.ndarray:
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


def _place_group(rng: np.random.Generator, se: _Series, g: _Group, n_lesions: int) -> None:
    """Place ``n_lesions`` lesions on key slice ``g`` (some touching), appending to ``g.lesions``."""
    t = se.t(g.key)
    _, tis, _ = _render_anatomy(se, t)
    sp = se.spacing
    kinds = _REGIONS[se.region][2]
    dist_cache: dict[str, np.ndarray] = {}
    for _ in range(n_lesions):
        touching = bool(g.lesions) and rng.random() < 0.35
        kind = g.lesions[int(rng.integers(len(g.lesions)))].kind if touching else str(
            _choice(rng, list(kinds), list(kinds.values()))
        )
        if kind not in dist_cache:
            host = _host_mask(kind, tis, se, t).astype(np.uint8)
            dist_cache[kind] = cv2.distanceTransform(host, cv2.DIST_L2, 5)
        dist = dist_cache[kind]
        if dist.max() < 3:
            continue
        (lo, hi), (f0, f1) = _KINDS[kind][1], _KINDS[kind][2]
        long_mm = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        ratio = rng.uniform(0.75, 0.95) if kind == "lung" else rng.uniform(0.55, 0.95)
        frac = rng.uniform(f0, f1)
        irregular = 0.05 if kind in ("lung", "mediastinum", "bone") else 0.09
        harm = _harm(rng, (2, 3, 4, 5), irregular)
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
        e, c = _lesion_hu(rng, kind, host, se.patient, se)
        g.lesions.append(
            _Lesion(
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
                window=_window(rng, kind),
            )
        )


def _validate_group(se: _Series, g: _Group, min_px: int) -> list[np.ndarray]:
    """Drop lesions not largest on the key slice or too small; return the key-slice masks."""
    while True:
        areas = []
        for i in range(g.first, g.last + 1):
            ids, _ = _lesion_map(g.lesions, se.t(i), se.spacing, se.size)
            areas.append(np.bincount(ids.ravel(), minlength=len(g.lesions) + 1)[1:])
        areas_a = np.array(areas)
        key_area = areas_a[g.key - g.first]
        keep = (key_area >= areas_a.max(axis=0)) & (key_area >= min_px)
        if keep.all():
            ids, _ = _lesion_map(g.lesions, se.t(g.key), se.spacing, se.size)
            return [ids == i + 1 for i in range(len(g.lesions))]
        g.lesions = [x for x, k in zip(g.lesions, keep) if k]


# ----------------------------------------------------------------------------- CSV


def _fmt(values: list[float] | tuple[float, ...] | np.ndarray) -> str:
    """Format numbers like the real DL_info.csv: 6 significant digits, ``", "`` separated."""
    out = []
    for v in values:
        s = f"{float(v):g}"
        out.append("0" if s == "-0" else s)
    return ", ".join(out)


def _rows_for_group(
    rng: np.random.Generator, se: _Series, g: _Group, masks: list[np.ndarray], bbox: tuple[int, int, int, int]
) -> None:
    """Measure RECIST on each true key-slice mask and fill ``g.rows`` (one CSV row per lesion)."""
    p = se.patient
    x0, y0, x1, y1 = bbox
    for les, mask in zip(g.lesions, masks):
        axes = measure_recist(mask)
        if axes is None:  # cannot happen after _validate_group; kept as a guard
            raise DataError(f"{se.name}/{g.key:03d}.png: a generated lesion has an empty key-slice mask")
        pts = np.concatenate([np.asarray(axes.long, float), np.asarray(axes.short, float)]) + 1.0  # 1-based
        box = [pts[:, 0].min() - 5, pts[:, 1].min() - 5, pts[:, 0].max() + 5, pts[:, 1].max() + 5]
        diam = [axes.long_px, axes.short_px]
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean(), ys.mean()
        loc = [
            np.clip((cx - x0) / max(x1 - x0, 1), 0, 1),
            np.clip((cy - y0) / max(y1 - y0, 1), 0, 1),
            np.clip(0.12 + se.t(g.key) / 900.0, 0, 1),
        ]
        code = LESION_TYPES[les.kind]
        if p.split == 1 and rng.random() < 0.75:  # most training lesions carry no type label
            code = -1
        g.rows.append([
            f"{se.name}_{g.key:03d}.png", str(p.index), str(se.study), str(se.series_id), str(g.key),
            _fmt(pts.ravel()), _fmt(box), _fmt(diam), _fmt(loc), str(code), "0",
            _fmt([g.first, g.last]), se.spacing_text, _fmt([se.size, se.size]), _fmt(les.window),
            p.gender, "" if se.age is None else str(se.age), str(p.split),
        ])  # fmt: skip


def _mark_noisy(rng: np.random.Generator, rows: list[list[str]], share: float = 0.03) -> None:
    """Flag a few rows ``Possibly_noisy`` (at least one) and make their marks careless.

    The endpoints move by ~2 px; box and diameters are recomputed from them, as in the real file.
    """
    col = {name: i for i, name in enumerate(COLUMNS)}
    k = max(1, round(share * len(rows)))
    for i in rng.choice(len(rows), size=min(k, len(rows)), replace=False):
        r = rows[int(i)]
        pts = np.array([float(v) for v in r[col["Measurement_coordinates"]].split(",")]).reshape(4, 2)
        pts = np.maximum(pts + rng.normal(0, 2.0, pts.shape), 1.0)
        diam = [float(np.linalg.norm(pts[1] - pts[0])), float(np.linalg.norm(pts[3] - pts[2]))]
        if diam[1] > diam[0]:  # the long axis stays the first pair
            pts, diam = pts[[2, 3, 0, 1]], diam[::-1]
        r[col["Measurement_coordinates"]] = _fmt(pts.ravel())
        r[col["Bounding_boxes"]] = _fmt([*(pts.min(0) - 5), *(pts.max(0) + 5)])
        r[col["Lesion_diameters_Pixel_"]] = _fmt(diam)
        r[col["Possibly_noisy"]] = "1"


# ----------------------------------------------------------------------------- public API


def generate_demo_data(
    out_dir: str | Path, patients: int | None = None, seed: int = 0, progress: bool = True, image_size: int = 512
) -> Path:
    """Write a generated DeepLesion-format release (images, ``DL_info.csv``, true masks).

    The default (``data.demo_patients`` = 90 patients, seed 0) gives 227 lesions on 145 key slices
    (test split: 37 lesions on 24 key slices). Files are byte-identical for the same
    arguments. ``DL_info.csv`` is written last (temp file + rename), so a directory holding it is a
    finished release and is left as it is (whatever the arguments); an interrupted run is redone
    from scratch.

    Args:
        out_dir: release root; gets ``Images_png/``, ``Masks_png/`` and ``DL_info.csv``.
        patients: number of patients (≥ 3, so that train, validation and test are all non-empty);
            None = ``DataConfig.demo_patients``, the quick start's count.
        seed: seed of the one ``numpy.random.Generator`` every random choice is drawn from.
        progress: show a tqdm progress bar over the series.
        image_size: slice size in pixels (square); 512 like DeepLesion, smaller for fast tests
            (the field of view stays, so the pixel spacing grows).

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: ``patients < 3`` or ``image_size < 96``.
        DataError: ``out_dir`` already holds ``Images_png`` or ``Masks_png`` that an interrupted
            run of this function did not write.

    Example:
        >>> root = generate_demo_data("data/demo", patients=4, seed=1, progress=False)
        >>> sorted(p.name for p in root.iterdir())
        ['DL_info.csv', 'Images_png', 'Masks_png']
    """
    if patients is None:
        from medseg.config import DataConfig

        patients = DataConfig().demo_patients
    if patients < 3:
        raise ValueError(f"patients must be >= 3 (one each for train, validation and test), got {patients}")
    if image_size < 96:
        raise ValueError(f"image_size must be >= 96 px, got {image_size}")
    root = Path(out_dir)
    csv_path = root / "DL_info.csv"
    if csv_path.exists():
        log.info("%s exists: keeping the generated data in %s", csv_path, root)
        return root
    root.mkdir(parents=True, exist_ok=True)
    marker = root / _INCOMPLETE
    for sub in ("Images_png", "Masks_png"):
        if (root / sub).exists():
            if not marker.exists():
                raise DataError(
                    f"{root / sub} exists but {csv_path} does not, and it was not written by an "
                    "interrupted demo-data run; expected an empty or new directory for generated data"
                )
            shutil.rmtree(root / sub)
    marker.write_text("generate_demo_data in progress\n")

    rng = np.random.default_rng(seed)
    pats = _make_patients(rng, patients)
    plan: list[_Series] = []
    for p in pats:
        n_studies = int(_choice(rng, (1, 2, 3), (0.75, 0.2, 0.05)))
        studies = np.sort(rng.choice(np.arange(1, 9), n_studies, replace=False))
        for k, st in enumerate(studies):
            age = None if p.age is None else p.age + k + int(rng.integers(0, 2)) * k
            ids = [1] if rng.random() < 0.92 else [1, 2]
            if len(ids) == 1:
                ids = [int(_choice(rng, (1, 2, 3), (0.7, 0.2, 0.1)))]
            for sid in ids:
                plan.append(_make_series(rng, p, int(st), sid, age, image_size))

    rows: list[list[str]] = []
    min_px = max(6, round(12 * (image_size / 512) ** 2))
    with tqdm(total=len(plan), desc="demo-data", unit="series", disable=not progress) as bar:
        for se in plan:
            _plan_groups(rng, se)
            for g in list(se.groups):
                masks: list[np.ndarray] = []
                for _attempt in range(20):  # a crowded or tiny key slice may reject every lesion
                    g.lesions = []
                    _place_group(rng, se, g, int(_choice(rng, (1, 2, 3), (0.6, 0.28, 0.12))))
                    masks = _validate_group(se, g, min_px)
                    if g.lesions:
                        break
                if not g.lesions:
                    se.groups.remove(g)
                    continue
                _, _, bbox = _render_anatomy(se, se.t(g.key))
                _rows_for_group(rng, se, g, masks, bbox)
            if se.groups:
                _write_series(rng, root, se)
            se.cache.clear()
            rows.extend(r for g in se.groups for r in g.rows)
            bar.update(1)
            bar.set_postfix(lesions=len(rows))

    _mark_noisy(rng, rows)
    missing = {1, 2, 3} - {int(r[-1]) for r in rows}
    if missing:  # cannot happen: every patient gets at least one lesion in practice
        raise RuntimeError(f"generated data has no lesion in split(s) {sorted(missing)}; try another seed")
    tmp = root / "DL_info.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(rows)
    os.replace(tmp, csv_path)
    marker.unlink()
    log.info("generated %d lesions in %d series under %s", len(rows), len(plan), root)
    return root


def _write_series(rng: np.random.Generator, root: Path, se: _Series) -> None:
    """Render and write every slice of the series' blocks, and the masks where lesions show."""
    img_dir = root / "Images_png" / se.name
    img_dir.mkdir(parents=True, exist_ok=True)
    owner: dict[int, _Group] = {}
    for g in se.groups:
        for i in range(g.first, g.last + 1):
            owner[i] = g
    for i in sorted(owner):
        img, ids = _render_slice(se, i, owner[i], rng)
        cv2.imwrite(str(img_dir / f"{i:03d}.png"), img, _PNG_PARAMS)
        if ids is not None:
            mdir = root / "Masks_png" / se.name
            mdir.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mdir / f"{i:03d}.png"), ids, _PNG_PARAMS)

