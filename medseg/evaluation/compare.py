"""Compare MLflow runs side by side — what ``medseg compare`` runs — and the one table builder.

:func:`compare_runs` reads runs from an MLflow store (by id, or every finished run of an
experiment) and writes, into one folder:

* ``comparison.md`` — the chosen metrics of the chosen split with their bootstrap intervals, one
  row per run; the parameters that differ between the runs; and, for two runs evaluated on the
  same lesions, a **paired test** over lesions (:func:`medseg.stats.paired_test`: the mean
  per-lesion difference, its cluster-bootstrap interval and a sign-flip permutation p-value over
  the evaluation's resampling units) with a one-line verdict;
* ``comparison.csv`` — the same numbers unformatted (``<metric>``, ``<metric>_ci_low``, …);
* ``comparison.png`` — every metric as a panel, each run a point with its interval.

:class:`Column` and :func:`markdown_table` / :func:`csv_table` are the table builder shared by
``medseg compare``, ``benchmarks/compare_models.py`` and ``benchmarks/ablation.py``.

Example:
    >>> res = compare_runs("sqlite:///outputs/mlflow.db", run_ids=[a, b], out_dir="outputs/compare")
    >>> print(res.markdown); res.paired[0].verdict
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.io import atomic_write_bytes, atomic_write_text
from medseg.metrics.stats import PairedResult, paired_test

__all__ = ["Column", "CompareError", "CompareResult", "Paired", "compare_runs", "csv_table", "higher_is_better",
           "markdown_table"]

log = logging.getLogger("medseg.compare")

#: the metrics compared by default (those a run has)
DEFAULT_METRICS = ("dice", "lesion_dice", "lesion_sensitivity", "fp_per_image", "roi_dice", "roi_hd95",
                   "roi_long_error_mm", "roi_recist_long_error_mm", "froc_sens_fp1", "froc_sens_fp4",
                   # the volume protocol (every slice of each series), where the runs were scored on it
                   "vol_lesion_dice", "vol_slice_dice_key", "vol_slice_dice_nonkey", "vol_fp_per_volume")
#: the per-lesion column of the volume protocol's table (``evaluation/volume_lesions_<split>.csv``)
VOLUME_PAIRED = "dice_3d"
#: per-lesion columns the paired test runs on by default (lesion-ROI Dice, whole-slice lesion Dice)
DEFAULT_PAIRED = ("roi_dice", "dice")
#: parameters that differ between any two runs without saying anything about the model
_NOISE_PARAMS = ("output_dir", "tracking.", "model.num_parameters")


class CompareError(ValueError):
    """Runs that cannot be compared: unknown ids, an empty experiment, a missing store."""


# ----------------------------------------------------------------------------- the table builder


@dataclass(frozen=True)
class Column:
    """One column of a table built from row dicts.

    Attributes:
        header: the column title.
        key: the row key of its value.
        fmt: a ``str.format`` pattern for the value (``"{}"`` for text).
        interval: append ``[low, high]`` from the row's ``<key>_ci_low`` / ``<key>_ci_high``.
        numeric: right-aligned in Markdown.
    """

    header: str
    key: str
    fmt: str = "{:.3f}"
    interval: bool = False
    numeric: bool = True


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and not math.isfinite(value))


def format_cell(row: dict[str, Any], col: Column) -> str:
    """A cell's text: the formatted value (``–`` when missing or not finite), with its interval."""
    value = row.get(col.key)
    if _missing(value):
        return "–"
    text = col.fmt.format(value)
    if col.interval:
        lo, hi = row.get(f"{col.key}_ci_low"), row.get(f"{col.key}_ci_high")
        if not _missing(lo) and not _missing(hi):
            text += f" [{col.fmt.format(lo)}, {col.fmt.format(hi)}]"
    return text.replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table: one line per row, numeric columns right-aligned, ``–`` for missing values."""
    lines = ["| " + " | ".join(c.header.replace("|", "\\|") for c in columns) + " |",
             "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """The same table as CSV with unformatted values; interval columns add ``<header> ci_low`` / ``ci_high``."""
    header: list[str] = []
    for c in columns:
        header += [c.header] + ([f"{c.header} ci_low", f"{c.header} ci_high"] if c.interval else [])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        line: list[Any] = []
        for c in columns:
            line.append("" if _missing(r.get(c.key)) else r.get(c.key))
            if c.interval:
                line += ["" if _missing(r.get(f"{c.key}_ci_{s}")) else r.get(f"{c.key}_ci_{s}") for s in ("low", "high")]
        w.writerow(line)
    return buf.getvalue()


def higher_is_better(metric: str) -> bool:
    """Dice, IoU, sensitivity: higher is better; distances, errors, SAPE, false positives: lower."""
    name = metric.rsplit("/", 1)[-1]
    return not any(t in name for t in ("error", "hd95", "sape", "fp_per_image", "fp_per_volume", "fp_count", "empty",
                                       "loss"))


# ----------------------------------------------------------------------------- comparing runs


@dataclass
class Paired:
    """The paired test of one per-lesion metric between two runs (``result`` None when not possible)."""

    metric: str
    run_a: str
    run_b: str
    unit: str
    result: PairedResult | None
    verdict: str


@dataclass
class CompareResult:
    """What :func:`compare_runs` returns: the Markdown, the written files and the paired tests."""

    markdown: str
    markdown_path: Path
    csv_path: Path
    plot_path: Path
    rows: list[dict[str, Any]]
    paired: list[Paired] = field(default_factory=list)


def _client(tracking_uri: str) -> Any:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise CompareError(f"no MLflow store at {tracking_uri[len('sqlite:///'):]} (opening it would create "
                           "an empty one); pass --tracking-uri of the store the runs were logged to")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri)


def load_runs(client: Any, run_ids: Sequence[str] = (), experiment: str | None = None) -> list[Any]:
    """The runs to compare: ``run_ids`` in order, or every finished run of ``experiment`` (oldest first)."""
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                runs.append(client.get_run(rid))
            except Exception as e:  # noqa: BLE001 — MLflow raises its own exception types per store
                raise CompareError(f"no MLflow run {rid!r} in this store ({e.__class__.__name__})") from e
        return runs
    if experiment is None:
        raise CompareError("name the runs to compare (RUN_ID ...) or an experiment (--experiment NAME)")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(f"no MLflow experiment {experiment!r} in this store")
    runs = list(client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                   order_by=["attributes.start_time ASC"], max_results=1000))
    if not runs:
        raise CompareError(f"experiment {experiment!r} has no finished runs")
    return runs


def _label(run: Any) -> str:
    return f"{run.info.run_name or 'run'} ({run.info.run_id[:8]})"


def _differing_params(runs: Sequence[Any]) -> list[str]:
    """Parameter names whose value differs between the runs (absent counts as a value)."""
    keys = sorted({k for r in runs for k in r.data.params})
    out = []
    for k in keys:
        if any(k.startswith(n) for n in _NOISE_PARAMS):
            continue
        if len({r.data.params.get(k) for r in runs}) > 1:
            out.append(k)
    return out


def _read_lesions(client: Any, run_id: str, split: str, tmp: Path, table: str = "lesions") -> list[dict[str, str]] | None:
    """The run's per-lesion CSV of ``split`` (``table``: ``lesions`` or ``volume_lesions``; None when it logged none)."""
    try:
        local = client.download_artifacts(run_id, f"evaluation/{table}_{split}.csv", str(tmp / run_id / table))
    except Exception:  # noqa: BLE001 — an artifact that is not there
        return None
    with open(local, newline="") as f:
        return list(csv.DictReader(f))


def _num(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except ValueError:
        return 1.0 if v == "True" else 0.0 if v == "False" else math.nan


def paired_lesion_test(rows_a: list[dict[str, str]], rows_b: list[dict[str, str]], metric: str,
                       n_resamples: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[PairedResult | None, str]:
    """The paired test of per-lesion column ``metric`` between two runs' lesion tables.

    Lesions are paired by ``(image_id, lesion_id)``; both tables must hold the same lesions (the
    same split). Units come from the ``unit`` column (else each lesion is its own unit).

    Returns:
        ``(result, unit)``; result None (with the reason as ``unit``) when the runs cannot be paired.
    """
    key = ("image_id", "lesion_id")
    a = {tuple(r[k] for k in key): r for r in rows_a}
    b = {tuple(r[k] for k in key): r for r in rows_b}
    if set(a) != set(b):
        return None, f"the runs were scored on different lesions ({len(a)} vs {len(b)}; not the same split)"
    if not a:
        return None, "the split has no lesions"
    if metric not in rows_a[0]:
        return None, f"the lesion tables have no column {metric!r}"
    order = sorted(a)
    units = [a[k].get("unit") or "lesion " + "/".join(k) for k in order]
    kinds = {u.split(" ", 1)[0] for u in units}
    unit = kinds.pop() if len(kinds) == 1 else "unit"
    try:
        res = paired_test([_num(a[k][metric]) for k in order], [_num(b[k][metric]) for k in order], units,
                          n_resamples, seed, level)
    except ValueError as e:
        return None, str(e)
    return res, unit


def verdict(res: PairedResult, metric: str, name_a: str, name_b: str, unit: str) -> str:
    """One sentence on whether the runs differ on ``metric`` beyond noise."""
    units = f"{res.n_units} {unit}{'s' if res.n_units != 1 else ''}"
    ci = (f", {res.level * 100:g} % CI [{res.ci_low:+.3f}, {res.ci_high:+.3f}]"
          if res.ci_low is not None and res.ci_high is not None else "")
    facts = (f"{metric}: {name_a} {res.mean_a:.3f} vs {name_b} {res.mean_b:.3f}, difference {res.diff:+.3f}{ci}, "
             f"p = {res.p_value:.3g} ({'exact ' if res.exact else ''}sign-flip permutation over {units}, "
             f"{res.n} lesions)")
    alpha = 1.0 - res.level
    if res.significant:
        better = name_a if (res.diff > 0) == higher_is_better(metric) else name_b
        return f"{better} is better — the difference is larger than noise (p < {alpha:g}). {facts}"
    tail = ""
    if res.min_p >= alpha:
        tail = (f" With {units} the test cannot reach p < {alpha:g} (the smallest possible p is "
                f"{res.min_p:.3g}): evaluate on more {unit}s to tell the runs apart.")
    return f"no difference larger than noise (p ≥ {alpha:g}). {facts}.{tail}"


def _plot(rows: list[dict[str, Any]], metrics: list[str], path: Path, title: str) -> Path:
    """Each metric a panel, each run a point with its interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(metrics), 1)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 0.5 * len(rows) * nrows + 1.6 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(metrics):]:
        ax.axis("off")
    labels = [r["run"] for r in rows]
    for ax, m in zip(axes, metrics):
        for i, r in enumerate(rows):
            v, lo, hi = r.get(m), r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")
            if _missing(v):
                continue
            if not _missing(lo) and not _missing(hi):
                ax.errorbar([v], [i], xerr=[[v - lo], [hi - v]], fmt="o", color=f"C{i % 10}", capsize=3)
            else:
                ax.plot([v], [i], "o", color=f"C{i % 10}")
        ax.set_yticks(range(len(rows)), labels if ax is axes[0] or len(rows) <= 3 else [""] * len(rows), fontsize=7)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.invert_yaxis()
        ax.set_title(f"{m} ({'higher' if higher_is_better(m) else 'lower'} is better)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def compare_runs(
    tracking_uri: str,
    run_ids: Sequence[str] = (),
    experiment: str | None = None,
    split: str = "test",
    metrics: Sequence[str] | None = None,
    out_dir: str | Path = "outputs/compare",
    paired_metrics: Sequence[str] = DEFAULT_PAIRED,
    n_resamples: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> CompareResult:
    """Compare runs: metric table with intervals, differing parameters, paired test, plot.

    Args:
        tracking_uri: the MLflow store.
        run_ids: the runs, in table order; or
        experiment: every finished run of this experiment.
        split: the evaluated split whose metrics (``<split>/<metric>``) are compared.
        metrics: metric names without the split prefix (None = :data:`DEFAULT_METRICS` that a run has).
        out_dir: where ``comparison.md`` / ``.csv`` / ``.png`` go.
        paired_metrics: per-lesion columns tested when exactly two runs are compared.
        n_resamples, seed, level: of the paired test.

    Raises:
        CompareError: no such store, run or experiment; fewer than one run.
    """
    client = _client(tracking_uri)
    runs = load_runs(client, run_ids, experiment)
    names = [_label(r) for r in runs]
    chosen = list(metrics) if metrics else [m for m in DEFAULT_METRICS
                                            if any(f"{split}/{m}" in r.data.metrics for r in runs)]
    if not chosen:
        raise CompareError(f"none of the runs has {split}/* metrics; evaluate them on {split!r} first "
                           "(train.evaluate_splits or medseg evaluate)")
    rows: list[dict[str, Any]] = []
    for r, name in zip(runs, names):
        m = r.data.metrics
        row: dict[str, Any] = {"run": name, "run_id": r.info.run_id,
                               "ci": r.data.tags.get(f"medseg.{split}.ci", "")}
        for k in chosen:
            for suffix in ("", "_ci_low", "_ci_high"):
                row[k + suffix] = m.get(f"{split}/{k}{suffix}")
        rows.append(row)
    metric_cols = [Column("run", "run", "{}", numeric=False)] + [Column(k, k, interval=True) for k in chosen]
    diff = _differing_params(runs)
    param_rows = [{"run": n, **{k: r.data.params.get(k) for k in diff}} for r, n in zip(runs, names)]
    param_cols = [Column("run", "run", "{}", numeric=False)] + [Column(k, k, "{}", numeric=False) for k in diff]

    paired: list[Paired] = []
    if len(runs) == 2:
        paired_metrics = list(paired_metrics)
        if all(f"{split}/vol_lesion_dice" in r.data.metrics for r in runs) and VOLUME_PAIRED not in paired_metrics:
            paired_metrics.append(VOLUME_PAIRED)  # both scored on the volume protocol: its 3-D lesion Dice too
        with tempfile.TemporaryDirectory() as tmp:
            tables = [_read_lesions(client, r.info.run_id, split, Path(tmp)) for r in runs]
            vol_tables = ([_read_lesions(client, r.info.run_id, split, Path(tmp), "volume_lesions") for r in runs]
                          if VOLUME_PAIRED in paired_metrics else [None, None])
        for metric in paired_metrics:
            name, pair = ("volume_lesions", vol_tables) if metric == VOLUME_PAIRED else ("lesions", tables)
            if pair[0] is None or pair[1] is None:
                res, why = None, f"a run has no evaluation/{name}_{split}.csv"
            else:
                res, why = paired_lesion_test(pair[0], pair[1], metric, n_resamples, seed, level)
            text = verdict(res, metric, names[0], names[1], why) if res is not None else f"not tested: {why}"
            paired.append(Paired(metric, names[0], names[1], why if res is not None else "", res, text))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cis = sorted({r["ci"] for r in rows if r["ci"]})
    md = [f"# Comparison of {len(runs)} runs on the {split} split", "",
          "Metrics (value [interval]; " + ("; ".join(cis) if cis else "no intervals logged") + "):", "",
          markdown_table(rows, metric_cols)]
    md += ["Parameters that differ:", "", markdown_table(param_rows, param_cols) if diff else "(none)\n"]
    if paired:
        md += [f"Paired test over lesions (each lesion scored by both runs; {level * 100:g} % level):", ""]
        md += [f"- **{p.metric}**: {p.verdict}" for p in paired] + [""]
    text = "\n".join(md)
    md_path, csv_path = out / "comparison.md", out / "comparison.csv"
    atomic_write_text(md_path, text)
    csv_rows = [{**r, **p} for r, p in zip(rows, param_rows)]
    atomic_write_text(csv_path, csv_table(csv_rows, [Column("run_id", "run_id", "{}", numeric=False)]
                                          + metric_cols + param_cols[1:]))
    plot_path = _plot(rows, chosen, out / "comparison.png", f"{split} split: {len(runs)} runs")
    return CompareResult(text, md_path, csv_path, plot_path, rows, paired)
