"""medseg.metrics.stats: the cluster bootstrap covers the truth, the paired test finds real differences only."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medseg.metrics.stats import (
    bootstrap_mean_ci,
    encode_units,
    paired_test,
    percentile_interval,
    ratio_samples,
    resample_counts,
    unit_sums,
)


def test_resample_counts_are_seeded_draws_with_replacement() -> None:
    a = resample_counts(7, 50, seed=3)
    assert a.shape == (50, 7) and (a.sum(1) == 7).all() and (a >= 0).all()
    assert np.array_equal(a, resample_counts(7, 50, seed=3))
    assert not np.array_equal(a, resample_counts(7, 50, seed=4))
    # every unit is equally likely: the mean count over many resamples is ≈ 1
    assert np.allclose(resample_counts(5, 20000, seed=0).mean(0), 1.0, atol=0.03)


def test_ratio_samples_equal_a_loop_over_resampled_items() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=23)
    values[[2, 9]] = np.nan  # left out, as the metric means leave them out
    units = rng.integers(0, 6, size=23)
    idx, labels = encode_units(units)
    counts = resample_counts(len(labels), 40, seed=1)
    got = ratio_samples(*unit_sums(values, idx, len(labels)), counts)
    for b in range(40):
        drawn = [v for u, c in enumerate(counts[b]) for _ in range(c) for v in values[idx == u] if np.isfinite(v)]
        assert got[b] == pytest.approx(np.mean(drawn))


def test_percentile_interval_needs_the_metric_defined_in_most_resamples() -> None:
    s = np.arange(100, dtype=float)
    assert percentile_interval(s, 0.9) == pytest.approx((4.95, 94.05))
    s[:10] = np.nan  # undefined in 10 % of the resamples: no interval rather than a biased one
    assert percentile_interval(s) is None


def test_bootstrap_interval_covers_the_true_mean_in_at_least_90_percent_of_seeds() -> None:
    """A clustered population: 30 patients, 1–4 lesions each, a patient effect plus lesion noise."""
    true_mean = 0.7
    hits = 0
    seeds = range(200)
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        sizes = rng.integers(1, 5, size=30)
        effect = rng.normal(0.0, 0.15, size=30)
        units = np.repeat(np.arange(30), sizes)
        values = true_mean + effect[units] + rng.normal(0.0, 0.1, size=units.size)
        ci = bootstrap_mean_ci(values, units, n_resamples=1000, seed=seed)
        assert ci is not None
        hits += ci[0] <= true_mean <= ci[1]
    assert hits / len(seeds) >= 0.90, hits


def test_sign_flip_p_value_is_exact_for_few_units() -> None:
    # three units whose differences sum to 1, 2.5 and -0.5 (observed |Σ| = 3): of the 8 sign
    # patterns, those with |Σ ±s| ≥ 3 are (+,+,±) and (-,-,±) → p = 4/8
    a = np.array([1.0, 1.0, 1.5, 0.0])
    b = np.array([0.0, 0.0, 0.0, 0.5])
    units = ["p1", "p2", "p2", "p3"]
    res = paired_test(a, b, units, n_resamples=500, seed=0)
    brute = np.mean([abs(e1 * 1 + e2 * 2.5 + e3 * -0.5) >= 3 - 1e-12
                     for e1, e2, e3 in itertools.product([-1, 1], repeat=3)])
    assert res.exact and res.p_value == pytest.approx(brute) == pytest.approx(0.5)
    assert res.n == 4 and res.n_units == 3 and res.diff == pytest.approx(3 / 4)
    assert res.min_p == pytest.approx(2 / 8) and not res.significant


def test_paired_test_detects_a_real_difference() -> None:
    rng = np.random.default_rng(7)
    units = np.repeat(np.arange(30), 2)
    base = rng.uniform(0.4, 0.9, size=60)
    better = base + 0.05 + rng.normal(0, 0.03, size=60)
    res = paired_test(better, base, units, n_resamples=4000, seed=0)
    assert res.significant and res.p_value < 0.01
    assert res.diff == pytest.approx(np.mean(better - base))
    assert res.ci_low is not None and 0 < res.ci_low < res.diff < res.ci_high
    assert not res.exact  # 30 units: random sign patterns


def test_paired_test_does_not_reject_for_a_run_against_itself() -> None:
    rng = np.random.default_rng(8)
    a = rng.uniform(size=40)
    res = paired_test(a, a.copy(), np.repeat(np.arange(20), 2), seed=0)
    assert res.p_value == 1.0 and not res.significant
    assert res.diff == 0.0 and res.ci_low == 0.0 and res.ci_high == 0.0


def test_paired_test_does_not_reject_pure_noise_too_often() -> None:
    """Two runs that differ only by noise: rejected at 5 % in about 5 % of simulated pairs."""
    rejections = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        base = rng.uniform(size=40)
        res = paired_test(base + rng.normal(0, 0.05, 40), base + rng.normal(0, 0.05, 40),
                          np.repeat(np.arange(20), 2), n_resamples=1000, seed=seed)
        rejections += res.significant
    assert rejections <= 12


def test_paired_test_drops_items_undefined_in_either_run() -> None:
    res = paired_test([1.0, np.nan, 0.5, 0.2], [0.5, 0.3, np.inf, 0.1], seed=0)
    assert res.n == 2 and res.mean_a == pytest.approx(0.6) and res.mean_b == pytest.approx(0.3)
    with pytest.raises(ValueError, match="finite"):
        paired_test([np.nan], [1.0])
    with pytest.raises(ValueError, match="equal-length"):
        paired_test([1.0, 2.0], [1.0])
