"""Geometry of the generated CT: irregular ellipses, drawn as level functions or filled polygons.

A :class:`Shape` is an ellipse in pixels whose radius is modulated by a few cosine harmonics,
``r(θ) = 1 + Σ amp·cos(kθ + phase)``; :func:`shape_level` evaluates it as a level function (< 1
inside; lesions, sub-pixel exact), :func:`paint` fills it as a polygon (anatomy, fast). The smooth
ramps :func:`smoothstep` / :func:`bump` switch organs on and off along the body axis.

Example:
    >>> s = Shape(cx=32, cy=32, ax=10, ay=6, harm=((3, 0.05, 0.0),))
    >>> win, lev = shape_level(s, (64, 64))
    >>> int((lev < 1).sum()) > 150
    True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

__all__ = ["Shape", "bump", "choice", "paint", "random_harmonics", "shape_level", "shape_polygon", "smoothstep"]


class Shape(NamedTuple):
    """An irregular ellipse in pixels: r(θ) = 1 + Σ amp·cos(kθ + phase) in its normalised frame."""

    cx: float
    cy: float
    ax: float
    ay: float
    ang: float = 0.0
    harm: tuple[tuple[int, float, float], ...] = ()


def shape_level(s: Shape, hw: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray] | None:
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


def shape_polygon(s: Shape) -> np.ndarray:
    """Boundary of ``s`` as an ``(N, 2)`` float polygon (x, y), the same curve as :func:`shape_level`."""
    rmax = 1.0 + sum(abs(a) for _, a, _ in s.harm)
    n = int(np.clip(2 * math.pi * max(s.ax, s.ay) * rmax / 1.5, 24, 480))
    th = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n)
    for k, a, ph in s.harm:
        r += a * np.cos(k * th + ph)
    u, v = r * np.cos(th) * s.ax, r * np.sin(th) * s.ay
    c, sn = math.cos(s.ang), math.sin(s.ang)
    return np.column_stack([s.cx + u * c - v * sn, s.cy + u * sn + v * c])


def paint(
    hu: np.ndarray, tis: np.ndarray, s: Shape, value: float, tid: int, within: tuple[int, ...] | None = None
) -> np.ndarray | None:
    """Fill ``s`` with ``value`` HU and tissue ``tid`` (only over ``within`` tissues); returns its polygon.

    Anatomy is filled as a polygon (OpenCV, cost independent of the area) because a level function
    over a whole 512² slice for every organ is several times slower; lesions use :func:`shape_level`.
    """
    if s.ax <= 0.3 or s.ay <= 0.3:
        return None
    pts = shape_polygon(s)
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


def random_harmonics(rng: np.random.Generator, ks: tuple[int, ...], amp: float) -> tuple[tuple[int, float, float], ...]:
    """Random boundary harmonics: one ``(k, amplitude, phase)`` per k, amplitudes up to ``amp``."""
    return tuple((k, float(rng.uniform(0.3, 1.0) * amp), float(rng.uniform(0, 2 * math.pi))) for k in ks)


def smoothstep(t: float, a: float, b: float) -> float:
    """Smoothstep from 0 at ``t = a`` to 1 at ``t = b`` (falls instead when a > b)."""
    x = min(max((t - a) / (b - a), 0.0), 1.0)
    return x * x * (3 - 2 * x)


def bump(t: float, t0: float, t1: float, t2: float, t3: float) -> float:
    """0 before t0, rising to 1 at t1, 1 until t2, falling to 0 at t3."""
    return smoothstep(t, t0, t1) * smoothstep(t, t3, t2)



def choice(rng: np.random.Generator, items: tuple | list, p: tuple | list) -> object:
    """One item drawn with probabilities ``p``."""
    return items[int(rng.choice(len(items), p=np.asarray(p, float) / np.sum(p)))]

