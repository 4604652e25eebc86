"""The anatomy of a generated CT slice: a parametric trunk rendered at body-axis position ``t``.

:func:`render_anatomy` draws body outline, subcutaneous fat, muscle, lungs with vessels,
mediastinum, heart and great vessels, liver, spleen, stomach, pancreas, kidneys, bowel, bladder,
spine with discs, ribs, pelvis and the scanner table into a HU map and a tissue map (the tissue
labels below), both ``(size, size)``. Organs switch on and off smoothly along ``t``, so
neighbouring slices of a series change smoothly.

Example:
    >>> hu, tis, bbox = render_anatomy(series, series.t(10))  # series from plan.make_series
    >>> (tis == LIVER).any()  # doctest: +SKIP
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from medseg.data.synthetic.plan import REGIONS, Series, body_axes
from medseg.data.synthetic.shapes import Shape, bump, paint, smoothstep

__all__ = ["AIR", "BLADDER", "BONE", "BOWEL", "CORTEX", "FAT", "HEART", "KIDNEY", "LIVER", "LUNG", "MFAT",
           "MUSCLE", "OTHER", "PANCREAS", "SPLEEN", "STOMACH", "TEXTURE", "VESSEL", "VFAT", "base_layers",
           "render_anatomy", "scanner_table", "series_array"]

# tissue labels of the anatomy map (used to place lesions in their host and to vary texture)
AIR, FAT, MUSCLE, VFAT, MFAT, LUNG, LIVER, SPLEEN, KIDNEY, VESSEL, HEART, BONE, CORTEX, BOWEL, \
    STOMACH, BLADDER, PANCREAS, OTHER = range(18)  # fmt: skip
#: texture amplitude (HU) per tissue label: organs are not perfectly flat on CT
TEXTURE = np.array([0, 6, 5, 8, 8, 25, 5, 4, 6, 4, 6, 30, 40, 8, 5, 2, 8, 3], np.float32)


def series_array(se: Series, key: str) -> np.ndarray:
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
            se.cache["base_hu"], se.cache["base_tis"] = scanner_table(se)
    return se.cache[key]


def base_layers(se: Series) -> tuple[np.ndarray, np.ndarray]:
    """Air and the scanner table: the part of every slice that does not depend on ``t``."""
    return series_array(se, "base_hu"), series_array(se, "base_tis")


def scanner_table(se: Series) -> tuple[np.ndarray, np.ndarray]:
    """A curved carbon-fibre table top on foam, under the patient's back (fixed along the series)."""
    n, sp = se.size, se.spacing
    lo, hi = REGIONS[se.region][0]
    A, B = body_axes(se.patient, (lo + hi) / 2)
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
    tis[(d >= 0) & (d < 19) & inside] = OTHER
    return hu, tis


def render_anatomy(se: Series, t: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """HU map, tissue map and body bounding box ``(x0, y0, x1, y1)`` of slice position ``t``."""
    p, n, sp = se.patient, se.size, se.spacing
    hu = np.empty((n, n), np.float32)
    tis = np.empty((n, n), np.uint8)
    A, B = body_axes(p, t)
    bx, by = se.bx, se.by
    fat = p.fat_mm * float(np.interp(t, (0, 200, 350, 500, 650), (0.7, 0.8, 1.0, 1.25, 1.2)))
    wall = p.muscle_mm
    ca, cb = A - fat - wall, B - fat - wall  # cavity half-axes

    def mm(x: float, y: float, a: float, b: float, ang: float = 0.0, harm: tuple = ()) -> Shape:
        """A shape from mm offsets to the body centre (x to the patient's left, y posterior)."""
        return Shape(bx + x / sp, by + y / sp, a / sp, b / sp, math.radians(ang), harm)

    enh = se.enh
    blood = 120.0 + 60.0 * enh
    base_hu, base_tis = base_layers(se)
    hu[:] = base_hu
    tis[:] = base_tis
    # --- body wall: subcutaneous fat, muscle (its own harmonics, so its thickness varies), cavity
    bh = tuple((k, a, ph + 0.004 * t) for k, a, ph in p.body_harm)
    mh = tuple((k, a, ph + 0.003 * t) for k, a, ph in p.organ_harm)
    chest = t < 245
    pts = paint(hu, tis, mm(0, 0, A, B, 0, bh), p.hu_fat, FAT)
    paint(hu, tis, mm(0, 0, A - fat, B - fat, 0, bh), p.hu_muscle, MUSCLE)
    paint(hu, tis, mm(0, -0.3 * wall, ca, cb + 0.3 * wall, 0, mh[:1] + bh[1:]), p.hu_fat + 10,
           MFAT if chest else VFAT)
    assert pts is not None
    bbox = (
        max(int(pts[:, 0].min()), 0), max(int(pts[:, 1].min()), 0),
        min(int(pts[:, 0].max()), n - 1), min(int(pts[:, 1].max()), n - 1),
    )  # fmt: skip

    vb_r = float(np.interp(t, (0, 250, 450), (15.0, 18.0, 22.0)))
    y_vb = B - fat - 60.0 - vb_r * 0.3
    oh = p.organ_harm
    soft = (MFAT, VFAT, MUSCLE)
    # --- abdominal organs
    pl = bump(t, 195, 240, 320, 405)
    if pl > 0.05:
        lx, ly = -0.42 * ca, (-0.08 + 0.25 * (1 - pl)) * cb
        paint(hu, tis, mm(lx, ly, 0.58 * ca * pl**0.5, 0.8 * cb * pl**0.7, 15, oh), p.hu_liver, LIVER, soft)
        pll = bump(t, 232, 252, 290, 320)  # the left lobe starts below the heart
        if pll > 0.05:
            paint(hu, tis, mm(0.1 * ca, -0.5 * cb, 0.4 * ca * pll, 0.3 * cb * pll, -10, oh[:2]),
                   p.hu_liver, LIVER, soft)
        for u, v, r, t1, t2 in se.liver_vessels:
            if t1 <= t <= t2:
                paint(hu, tis, mm(u * ca, v * cb, r, r), blood - 20, VESSEL, (LIVER,))
        if p.gallbladder and 285 < t < 335:
            g = bump(t, 285, 295, 325, 335)
            paint(hu, tis, mm(-0.22 * ca, -0.42 * cb, 14 * g, 18 * g, 30), 8.0, OTHER, (LIVER, VFAT))
    ps = bump(t, 225, 250, 310, 335)
    if ps > 0.05:
        paint(hu, tis, mm(0.6 * ca, 0.3 * cb, 0.2 * ca * ps, 0.4 * cb * ps, -35, oh), 45 + 40 * enh, SPLEEN, soft)
    pst = bump(t, 215, 240, 300, 325)
    if pst > 0.05:
        st = mm(0.3 * ca, -0.35 * cb, 0.3 * ca * pst, 0.28 * cb * pst, 20, oh[:2])
        paint(hu, tis, st, 45.0, STOMACH, soft)
        paint(hu, tis, st._replace(ax=st.ax * 0.85, ay=st.ay * 0.85), 15.0, STOMACH, (STOMACH,))
        paint(hu, tis, st._replace(cy=st.cy - st.ay * 0.55, ax=st.ax * 0.7, ay=st.ay * 0.4), -950.0,
               STOMACH, (STOMACH,))
    ppa = bump(t, 285, 300, 320, 340)
    if ppa > 0.05:
        paint(hu, tis, mm(0.05 * ca, -0.02 * cb, 0.42 * ca * ppa, 0.09 * cb, -12, oh[:1]), 45 + 30 * enh,
               PANCREAS, (VFAT,))
    for side in (-1, 1):
        pk = bump(t + (12 if side > 0 else 0), 285, 310, 395, 425)
        if pk > 0.05:
            kx, ky = side * (vb_r + 50.0), y_vb + 2.0
            k = mm(kx, ky, 24 * pk**0.5, 33 * pk**0.5, -side * 30, oh[:2])
            paint(hu, tis, k, 40 + 130 * enh, KIDNEY, soft + (LIVER, SPLEEN))
            # renal sinus fat at the hilum, on the medial side
            paint(hu, tis, k._replace(cx=k.cx - side * 13 / sp, ax=k.ax * 0.3, ay=k.ay * 0.33, harm=()),
                   -40.0, OTHER, (KIDNEY,))
    if t > 270:
        for u, v, r, cz, c, kind in se.bowel:
            s2 = 1 - ((t - cz) / c) ** 2
            if s2 > 0:
                s = math.sqrt(s2)
                sh = mm(u * ca, v * cb, r * s, r * s * 0.8, 40 * u)
                paint(hu, tis, sh, 35.0, BOWEL, (VFAT,))
                inner = {0: 8.0, 1: -950.0, 2: 250.0}[int(kind)]  # water, gas or oral contrast
                paint(hu, tis, sh._replace(ax=sh.ax * 0.75, ay=sh.ay * 0.75), inner, BOWEL, (BOWEL,))
    pb = bump(t, 535, 575, 640, 700)
    if pb > 0.05:
        bl = mm(0, -0.4 * cb, 0.32 * ca * pb, 0.4 * cb * pb, 0, oh[:1])
        paint(hu, tis, bl, 35.0, BLADDER, (VFAT, BOWEL))
        paint(hu, tis, bl._replace(ax=bl.ax * 0.9, ay=bl.ay * 0.9), 8.0, BLADDER, (BLADDER,))
    if t > 520:
        paint(hu, tis, mm(0, y_vb - 28, 16, 14), 30.0, BOWEL, (VFAT,))
        paint(hu, tis, mm(0, y_vb - 28, 8, 6), -950.0, BOWEL, (BOWEL,))
    # --- chest: lungs, mediastinum, heart, airways
    pe, pd = smoothstep(t, 0, 70), smoothstep(t, 290, 190)
    if pe * pd > 0.03:
        vl = (0.02 + 0.35 * (1 - pd) + 0.1 * (1 - pe)) * cb
        for side in (-1, 1):
            lung = mm(side * 0.47 * ca, vl, (0.52 if side < 0 else 0.5) * ca * pe**0.5 * pd**0.4,
                      0.93 * cb * pe**0.7 * pd**0.8, side * 4, oh[:2])
            paint(hu, tis, lung, -860.0, LUNG, (MFAT, VFAT, LIVER, SPLEEN, STOMACH))
        if t < 250:  # mediastinum: narrow in front, wider behind the heart
            paint(hu, tis, mm(0.03 * ca, -0.35 * cb, 0.12 * ca, 0.62 * cb, 0, oh[:1]), p.hu_fat + 10, MFAT,
                   (LUNG,))
            paint(hu, tis, mm(0.03 * ca, 0.15 * cb, 0.2 * ca, 0.45 * cb, 0, oh[:1]), p.hu_fat + 10, MFAT,
                   (LUNG,))
        for u, v, r, t1, t2 in se.lung_vessels:
            if t1 <= t <= t2:
                paint(hu, tis, mm(u * ca, v * cb, r, r), 40.0, VESSEL, (LUNG,))
    ph = bump(t, 85, 125, 195, 240)
    if ph > 0.05:
        h = mm(0.18 * ca, -0.12 * cb, 0.4 * ca * ph, 0.52 * cb * ph, -25, oh[:1])
        paint(hu, tis, h, 70 + 40 * enh, HEART, (MFAT, LUNG, LIVER))
        paint(hu, tis, h._replace(ax=h.ax * 0.78, ay=h.ay * 0.78), blood, HEART, (HEART,))
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
        g = smoothstep(t, 240, 300)
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
        paint(hu, tis, mm(x, y, r, r), v, VESSEL, (MFAT, VFAT, LUNG, HEART, LIVER))
    if t < 125:
        paint(hu, tis, mm(0, y_vb - vb_r - 24, 10, 9), 40.0, OTHER, (MFAT, LUNG, VESSEL))
        paint(hu, tis, mm(0, y_vb - vb_r - 24, 8, 7), -1000.0, OTHER, (OTHER,))
    elif t < 155:
        dx = 5 + 0.8 * (t - 125)
        for side in (-1, 1):
            paint(hu, tis, mm(side * dx, y_vb - vb_r - 22, 6, 6), -1000.0, OTHER, (MFAT, LUNG, VESSEL))
    # --- pelvis: gluteal muscles, iliac wings, femoral heads
    pg = smoothstep(t, 440, 520)
    if pg > 0.05:
        for side in (-1, 1):
            paint(hu, tis, mm(side * 0.5 * A, 0.55 * B, 0.4 * A * pg, 0.38 * B * pg, side * 20, oh[:1]),
                   p.hu_muscle, MUSCLE, (FAT, MUSCLE, VFAT))
    pi = bump(t, 430, 455, 560, 590)
    if pi > 0.05:
        g = smoothstep(t, 450, 570)
        for side in (-1, 1):
            # a wing-shaped ilium: an ellipse of bone hollowed on its front by the iliacus muscle
            il = mm(side * (0.66 - 0.25 * g) * ca, y_vb - 10 - 20 * g, (62 - 25 * g) * pi, 16 + 6 * g,
                    side * (62 - 30 * g))
            paint(hu, tis, il, 750.0, CORTEX, (VFAT, MUSCLE, FAT, BOWEL))
            paint(hu, tis, il._replace(ax=il.ax * 0.9, ay=il.ay * 0.7), 240.0, BONE, (CORTEX,))
            ang = il.ang - side * math.pi / 2
            front = il._replace(cx=il.cx + math.cos(ang) * il.ay * 1.4, cy=il.cy + math.sin(ang) * il.ay * 1.4,
                                ax=il.ax * 0.95, ay=il.ay * 1.15)
            paint(hu, tis, front, p.hu_muscle, MUSCLE, (CORTEX, BONE, VFAT, BOWEL))
    pf = smoothstep(t, 575, 600)
    if pf > 0.05:
        for side in (-1, 1):
            fh = mm(side * 0.6 * ca, 0.05 * cb, 25 * pf, 25 * pf)
            paint(hu, tis, fh, 700.0, CORTEX)
            paint(hu, tis, fh._replace(ax=fh.ax * 0.85, ay=fh.ay * 0.85), 260.0, BONE, (CORTEX,))
    # --- psoas, paraspinal muscles and the spine
    pp = smoothstep(t, 320, 470) * smoothstep(t, 640, 560)
    if pp > 0.05:
        off = vb_r + 10 + 18 * pp + 15 * smoothstep(t, 480, 600)
        for side in (-1, 1):
            paint(hu, tis, mm(side * off, y_vb - 4, 10 + 14 * pp, 12 + 8 * pp, side * 20), p.hu_muscle, MUSCLE,
                   (VFAT, MFAT, LUNG, BOWEL))
    sacrum = smoothstep(t, 470, 500)
    for side in (-1, 1):
        paint(hu, tis, mm(side * 27, y_vb + vb_r + 20, 25, 24 - 6 * sacrum), p.hu_muscle, MUSCLE)
    disc = math.cos(2 * math.pi * t / 32.0 + p.disc_phase) > 0.8 and sacrum < 0.5
    vbx = vb_r * (1 + 1.4 * sacrum * smoothstep(t, 620, 520))
    vb = mm(0, y_vb + 12 * sacrum, vbx, vb_r * 0.85 * (1 - 0.2 * sacrum))
    if disc:
        paint(hu, tis, vb, 85.0, OTHER)
    else:
        paint(hu, tis, vb, 800.0, CORTEX)
        paint(hu, tis, vb._replace(ax=vb.ax - 2 / sp, ay=vb.ay - 2 / sp), 240.0, BONE, (CORTEX,))
    if t < 560:
        cy = y_vb + vb_r + 10
        paint(hu, tis, mm(0, cy, 15, 13), 650.0, CORTEX)
        paint(hu, tis, mm(0, cy, 8, 8), 15.0, OTHER, (CORTEX,))
        paint(hu, tis, mm(0, cy + 20, 5, 13), 650.0, CORTEX)
        if not disc:
            for side in (-1, 1):
                paint(hu, tis, mm(side * (vb_r + 12), cy - 3, 14, 5, side * 15), 600.0, CORTEX)
    # --- ribs, sternum and scapulae
    pr = bump(t, 10, 30, 300, 345)
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
            paint(hu, tis, rib, 700.0, CORTEX)
            paint(hu, tis, rib._replace(ax=rib.ax * 0.55, ay=rib.ay * 0.45), 250.0, BONE, (CORTEX,))
    if 40 < t < 215:
        st = mm(0, -(cb + 0.4 * wall), 14, 6)
        paint(hu, tis, st, 650.0, CORTEX)
        paint(hu, tis, st._replace(ax=st.ax * 0.8, ay=st.ay * 0.5), 250.0, BONE, (CORTEX,))
    psc = bump(t, 10, 30, 120, 160)
    if psc > 0.05:
        for side in (-1, 1):
            paint(hu, tis, mm(side * 0.68 * A, 0.5 * B, 42 * psc, 5, -side * 35), 600.0, CORTEX, (MUSCLE, FAT))
    return hu, tis, bbox

