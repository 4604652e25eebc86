"""Uncertainty on plain NumPy arrays: cluster-bootstrap confidence intervals and a paired test.

Lesions on one slice, and slices of one patient, are not independent: a model that fails on one
patient's scans fails on several lesions at once. So every interval here resamples **units**
(patients, series or images — whatever groups the items) with replacement, and an item enters a
resample as often as its unit was drawn (the cluster bootstrap). A metric that is a mean over items
(lesion Dice) or a ratio of sums (pixel Dice, false positives per image) is then a ratio of
weighted per-unit sums, so one matrix product gives all resamples at once.

* :func:`resample_counts` — the ``(B, U)`` draw counts of ``B`` seeded resamples of ``U`` units.
* :func:`unit_sums` / :func:`ratio_samples` — per-unit sums of items, resampled ratios.
* :func:`percentile_interval` — the percentile interval of the resampled values.
* :func:`bootstrap_mean_ci` — all three for the mean of per-item values.
* :func:`paired_test` — two runs scored on the same items: the mean difference, its bootstrap
  interval and a sign-flip permutation test over units (exact up to 2^16 units' sign patterns).

Example:
    >>> low, high = bootstrap_mean_ci(values, units, n_resamples=1000, seed=0)
    >>> res = paired_test(dice_a, dice_b, units, seed=0)
    >>> res.significant, res.p_value
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "PairedResult",
    "bootstrap_mean_ci",
    "encode_units",
    "fmt_interval",
    "paired_test",
    "percentile_interval",
    "ratio_samples",
    "resample_counts",
    "unit_sums",
]

#: an interval is reported only when the metric is defined in at least this share of resamples
MIN_DEFINED_SHARE = 0.95
#: up to this many units the permutation test enumerates every sign pattern (exact p-value)
EXACT_UNITS = 16


def encode_units(units: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Dense unit indices ``(N,)`` for per-item unit labels, and the labels in index order."""
    labels: dict[Any, int] = {}
    idx = np.array([labels.setdefault(u, len(labels)) for u in units], dtype=np.int64)
    return idx, list(labels)


def resample_counts(n_units: int, n_resamples: int, seed: int) -> np.ndarray:
    """How often each unit is drawn in each resample: ``(n_resamples, n_units)`` int64, rows sum to ``n_units``.

    Each resample draws ``n_units`` units uniformly with replacement from a ``numpy`` generator
    seeded with ``seed``, so the same seed gives the same resamples.
    """
    if n_units <= 0 or n_resamples <= 0:
        return np.zeros((max(n_resamples, 0), max(n_units, 0)), dtype=np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_units, size=(n_resamples, n_units))
    flat = idx + np.arange(n_resamples)[:, None] * n_units
    return np.bincount(flat.ravel(), minlength=n_resamples * n_units).reshape(n_resamples, n_units)


def unit_sums(values: Sequence[float] | np.ndarray, units: np.ndarray, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit sum and count of the finite ``values`` (NaN / inf items are left out, as in the means)."""
    v = np.asarray(values, dtype=np.float64)
    u = np.asarray(units, dtype=np.int64)
    ok = np.isfinite(v)
    return (np.bincount(u[ok], weights=v[ok], minlength=n_units).astype(np.float64),
            np.bincount(u[ok], minlength=n_units).astype(np.float64))


def ratio_samples(num: np.ndarray, den: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``(B,)`` resampled ratios ``Σ_u c_bu·num_u / Σ_u c_bu·den_u`` (NaN where the denominator is 0)."""
    n = counts @ np.asarray(num, dtype=np.float64)
    d = counts @ np.asarray(den, dtype=np.float64)
    out = np.full(n.shape, np.nan)
    np.divide(n, d, out=out, where=d > 0)
    return out


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` percentile interval of resampled values, or None when the metric is undefined
    in more than 5 % of the resamples (a resample without any lesion, say)."""
    s = np.asarray(samples, dtype=np.float64)
    ok = s[np.isfinite(s)]
    if s.size == 0 or ok.size < MIN_DEFINED_SHARE * s.size:
        return None
    a = (1.0 - level) / 2.0
    low, high = np.quantile(ok, [a, 1.0 - a])
    return float(low), float(high)


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    units: Sequence[Any] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of the finite ``values``, resampling ``units``.

    Args:
        values: ``(N,)`` per-item values.
        units: ``(N,)`` the unit of each item (None = every item its own unit).
        n_resamples: bootstrap resamples.
        seed: seeds the resampling.
        level: confidence level.
    """
    v = np.asarray(values, dtype=np.float64)
    idx, labels = encode_units(range(len(v)) if units is None else units)
    num, den = unit_sums(v, idx, len(labels))
    return percentile_interval(ratio_samples(num, den, resample_counts(len(labels), n_resamples, seed)), level)


@dataclass
class PairedResult:
    """What :func:`paired_test` returns (per-item differences are ``a − b``).

    Attributes:
        n: items scored in both runs (finite in both).
        n_units: units those items fall in (the resampling / permutation unit).
        mean_a, mean_b: the two runs' means over those items.
        diff: ``mean_a − mean_b``.
        ci_low, ci_high: the bootstrap interval of ``diff`` (None when undefined).
        p_value: two-sided sign-flip permutation p-value over units.
        min_p: the smallest p-value the test can give with ``n_units`` units (exact test).
        exact: every sign pattern was enumerated (else ``n_resamples`` random ones).
        level: the confidence level; the test rejects when ``p_value < 1 − level``.
    """

    n: int
    n_units: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float | None
    ci_high: float | None
    p_value: float
    min_p: float
    exact: bool
    level: float

    @property
    def significant(self) -> bool:
        """The difference is larger than noise at ``1 − level`` (two-sided)."""
        return self.p_value < 1.0 - self.level

    def as_dict(self) -> dict[str, Any]:
        """A flat dict (for CSV / JSON), with ``significant``."""
        return {**asdict(self), "significant": self.significant}


def _sign_flip_p(s: np.ndarray, total: float, n_resamples: int, seed: int) -> tuple[float, bool]:
    """Two-sided p-value of ``|Σ s_u|`` under random sign flips of the unit sums ``s``."""
    u = len(s)
    obs = abs(float(s.sum())) / total
    tol = 1e-12 * max(1.0, float(np.abs(s).sum()) / total)
    if u <= EXACT_UNITS:
        signs = 1 - 2 * ((np.arange(2**u)[:, None] >> np.arange(u)[None, :]) & 1)
        stats = np.abs(signs @ s) / total
        return float(np.mean(stats >= obs - tol)), True
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_resamples, u))
    stats = np.abs(signs @ s) / total
    return float((1 + np.sum(stats >= obs - tol)) / (1 + n_resamples)), False


def paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    units: Sequence[Any] | None = None,
    n_resamples: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedResult:
    """Is run A's per-item metric different from run B's on the same items, beyond noise?

    Items where either value is not finite are dropped. The per-item differences ``d = a − b`` are
    summed per unit; under the null hypothesis (A and B interchangeable within each unit) each unit
    sum is as likely to have either sign, so the p-value is the share of sign patterns whose
    ``|Σ ± s_u|`` reaches the observed one — every pattern when there are at most 16 units (an
    exact test), else ``n_resamples`` seeded random patterns. The interval of the mean difference
    is the cluster bootstrap's (:func:`ratio_samples`). A run compared with itself has ``d = 0``
    everywhere and p = 1.

    Args:
        a, b: ``(N,)`` per-item values of the two runs, aligned item by item.
        units: ``(N,)`` the unit of each item (None = items are independent).
        n_resamples: bootstrap resamples, and random sign patterns beyond 16 units.
        seed: seeds both.
        level: confidence level; the test rejects at ``1 − level``.

    Raises:
        ValueError: ``a`` and ``b`` differ in length, or no item is finite in both.
    """
    va = np.asarray(a, dtype=np.float64)
    vb = np.asarray(b, dtype=np.float64)
    if va.shape != vb.shape or va.ndim != 1:
        raise ValueError(f"paired values must be two equal-length vectors, got {va.shape} and {vb.shape}")
    labels = list(range(len(va))) if units is None else list(units)
    if len(labels) != len(va):
        raise ValueError(f"{len(labels)} units for {len(va)} paired items")
    ok = np.isfinite(va) & np.isfinite(vb)
    if not ok.any():
        raise ValueError("no item has a finite value in both runs")
    va, vb = va[ok], vb[ok]
    idx, names = encode_units([u for u, k in zip(labels, ok) if k])
    n_units = len(names)
    d_sum, n_items = unit_sums(va - vb, idx, n_units)
    total = float(n_items.sum())
    p, exact = _sign_flip_p(d_sum, total, n_resamples, seed)
    ci = percentile_interval(ratio_samples(d_sum, n_items, resample_counts(n_units, n_resamples, seed)), level)
    return PairedResult(
        n=int(ok.sum()), n_units=n_units, mean_a=float(va.mean()), mean_b=float(vb.mean()),
        diff=float((va - vb).mean()), ci_low=ci[0] if ci else None, ci_high=ci[1] if ci else None,
        p_value=p, min_p=2.0 / 2**n_units if exact else 1.0 / (1 + n_resamples), exact=exact, level=level,
    )


def fmt_interval(low: float | None, high: float | None, digits: int = 3) -> str:
    """``[low, high]`` for a report ("" when undefined)."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return ""
    return f"[{low:.{digits}f}, {high:.{digits}f}]"
