"""Timing and reporting helpers shared by the benchmarks.

Every benchmark compares medseg ("ours") with a reference measured in the same run, on the same
inputs, and reports the ratio ``ours / reference``: on a shared machine the absolute numbers drift
with the load, the ratio much less. Timings alternate between the two sides
(:func:`time_pair`) so that a burst of load from elsewhere hits both.

A row is a plain dict (see :func:`report`); :mod:`run_all` turns the rows into one markdown table.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

#: units where a larger number is better; every other unit (s, ms, MiB, ...) is lower-is-better
HIGHER_IS_BETTER_UNITS = ("samples/s", "slices/s", "steps/s", "MB/s")

#: torch intra-op threads for every benchmark. One, because the NumPy / SciPy references are
#: single-threaded and because on a shared 2-core machine torch's thread pool loses more to
#: contention than it gains (a 2M-element ``torch.bincount`` measured 8× slower on 2 threads there)
THREADS = 1

#: the columns of a result row, in table order
COLUMNS = ("benchmark", "ours", "reference", "unit", "ratio", "verdict", "check")


def set_threads(n: int = THREADS) -> None:
    """Pin torch to ``n`` intra-op threads (NumPy / SciPy references run on one thread anyway)."""
    import torch

    torch.set_num_threads(n)


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def repeat(fn: Callable[[], Any], n: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``n`` calls of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def time_pair(
    ours: Callable[[], Any], reference: Callable[[], Any], n: int, warmup: int = 1
) -> tuple[float, float]:
    """Median seconds per call of ``ours`` and ``reference``, their calls interleaved.

    Interleaving (ours, reference, ours, ...) rather than timing one block after the other means a
    load spike from another process slows both sides alike, which keeps the ratio meaningful.
    """
    for _ in range(warmup):
        ours()
        reference()
    t_ours: list[float] = []
    t_ref: list[float] = []
    for _ in range(n):
        for fn, acc in ((ours, t_ours), (reference, t_ref)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return median(t_ours), median(t_ref)


def _verdict(ratio: float, unit: str) -> str:
    """``ratio`` in words: '3.2× faster', '0.5× the memory', ..."""
    if not math.isfinite(ratio) or ratio <= 0:
        return "n/a"
    higher = unit in HIGHER_IS_BETTER_UNITS
    better = ratio > 1 if higher else ratio < 1
    factor = max(ratio, 1.0 / ratio)
    if unit in ("MiB", "MB", "GiB", "B/instance"):
        return f"{factor:.2f}× {'less' if better else 'more'} memory"
    return f"{factor:.2f}× {'faster' if better else 'slower'}"


def report(name: str, ours: float, reference: float, unit: str, check: str, *, ok: bool) -> dict[str, Any]:
    """Print one result row and return it.

    Args:
        name: what is compared, e.g. ``"weight map 512², 20 instances: windowed vs full EDT"``.
        ours: medseg's number.
        reference: the reference's number, measured in the same run.
        unit: the numbers' unit; ``samples/s`` (and the other :data:`HIGHER_IS_BETTER_UNITS`) are
            higher-is-better, everything else lower-is-better.
        check: how the two sides' outputs were checked to agree (e.g. ``"max |Δ| = 2e-07"``), in
            words with the number measured; a claim the benchmark does not compute does not belong here.
        ok: the result of that check, computed by the caller; required (no default that passes
            silently). False marks the row ``FAILED`` (the row is still reported).

    Returns:
        ``{"benchmark", "ours", "reference", "unit", "ratio", "verdict", "check", "ok"}`` with
        ``ratio = ours / reference`` (NaN when the reference is 0).
    """
    ratio = ours / reference if reference else math.nan
    row = {
        "benchmark": name,
        "ours": float(ours),
        "reference": float(reference),
        "unit": unit,
        "ratio": float(ratio),
        "verdict": _verdict(ratio, unit),
        "check": check if ok else f"FAILED: {check}",
        "ok": bool(ok),
    }
    print(format_row(row), flush=True)
    return row


def _num(x: float) -> str:
    """A number with about 4 significant digits."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def format_row(row: dict[str, Any]) -> str:
    """One markdown table row for a result dict."""
    cells = [
        row["benchmark"],
        _num(row["ours"]),
        _num(row["reference"]),
        row["unit"],
        _num(row["ratio"]),
        row["verdict"],
        row["check"],
    ]
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (header included), ending with a newline."""
    header = "| benchmark | ours | reference | unit | ours/ref | verdict | agreement check |"
    rule = "|" + "---|" * len(COLUMNS)
    return "\n".join([header, rule, *(format_row(r) for r in rows)]) + "\n"


def max_abs_diff(a: Any, b: Any) -> float:
    """``max |a − b|`` of two equal-shape arrays (0.0 for empty ones)."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).max()) if a.size else 0.0
