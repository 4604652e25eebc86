"""``medseg compare`` and the table builder it shares with the benchmarks."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg.cli import main
from medseg.evaluation.compare import Column, csv_table, higher_is_better, markdown_table, paired_lesion_test


def test_markdown_table_formats_values_intervals_and_gaps() -> None:
    rows = [{"run": "a|b", "dice": 0.5, "dice_ci_low": 0.41, "dice_ci_high": 0.6, "steps": 3},
            {"run": "c", "dice": float("nan"), "steps": None},
            {"run": "d", "dice": 0.25}]  # no interval logged
    cols = [Column("run", "run", "{}", numeric=False), Column("Dice", "dice", interval=True),
            Column("steps", "steps", "{}")]
    assert markdown_table(rows, cols) == (
        "| run | Dice | steps |\n"
        "|---|---:|---:|\n"
        "| a\\|b | 0.500 [0.410, 0.600] | 3 |\n"
        "| c | – | – |\n"
        "| d | 0.250 | – |\n")
    parsed = list(csv.reader(io.StringIO(csv_table(rows, cols))))
    assert parsed == [["run", "Dice", "Dice ci_low", "Dice ci_high", "steps"],
                      ["a|b", "0.5", "0.41", "0.6", "3"], ["c", "", "", "", ""], ["d", "0.25", "", "", ""]]


def test_direction_of_improvement() -> None:
    assert higher_is_better("roi_dice") and higher_is_better("test/lesion_sensitivity")
    assert higher_is_better("froc_sens_fp1")
    for k in ("roi_hd95", "diameter_error_mm", "test/fp_per_image", "sape_long", "roi_recist_long_error_mm"):
        assert not higher_is_better(k), k


def test_paired_lesion_test_pairs_by_lesion_and_needs_the_same_split() -> None:
    def rows(vals: list[float], units: list[str]) -> list[dict[str, str]]:
        return [{"image_id": f"s{i // 2}", "lesion_id": str(i % 2 + 1), "roi_dice": str(v), "unit": u}
                for i, (v, u) in enumerate(zip(vals, units))]

    units = [f"patient {i // 2}" for i in range(8)]
    a = rows([0.9, 0.8, 0.7, 0.9, 0.6, 0.8, 0.9, 0.7], units)
    b = list(reversed(rows([0.8, 0.7, 0.7, 0.8, 0.5, 0.8, 0.8, 0.6], units)))  # order does not matter
    res, unit = paired_lesion_test(a, b, "roi_dice", seed=0)
    assert unit == "patient" and res.n == 8 and res.n_units == 4 and res.exact
    assert res.diff == pytest.approx(0.075) and res.mean_a == pytest.approx(0.7875)
    # every patient's sum favours A: only the all-plus and all-minus sign patterns reach it → p = 2/16
    assert res.p_value == pytest.approx(2 / 16)
    res, why = paired_lesion_test(a, a[:-1], "roi_dice")
    assert res is None and "different lesions" in why
    res, why = paired_lesion_test(a, a, "nope")
    assert res is None and "no column" in why


def _lesion_csv(uri: str, run_id: str, split: str, tmp: Path, table: str = "lesions") -> list[dict[str, str]]:
    from mlflow.tracking import MlflowClient

    local = MlflowClient(tracking_uri=uri).download_artifacts(run_id, f"evaluation/{table}_{split}.csv", str(tmp))
    with open(local, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_compare_two_tiny_runs_prints_table_and_verdict(tiny_runs: dict[str, Any], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    uri = tiny_runs["uri"]
    a, b = tiny_runs["run_ids"]
    out = tmp_path / "cmp"
    assert main(["compare", a, b, "--tracking-uri", uri, "--split", "all", "--out", str(out),
                 "--resamples", "2000"]) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    runs = [client.get_run(a), client.get_run(b)]

    # one table row per run, its logged value with the logged interval
    for run in runs:
        m = run.data.metrics
        line = next(x for x in printed.splitlines() if x.startswith("| ") and run.info.run_id[:8] in x)
        cell = f"{m['all/dice']:.3f}"
        if "all/dice_ci_low" in m:
            cell += f" [{m['all/dice_ci_low']:.3f}, {m['all/dice_ci_high']:.3f}]"
        assert f"| {cell} |" in line
    assert "95 % bootstrap CI over 8 patients" in printed
    # the parameters that differ: the seed (and nothing about where the outputs went)
    assert "train.seed" in printed and "output_dir" not in printed.split("Parameters that differ")[1]

    # the verdicts, with each run's mean recomputed from its lesion table
    tables = [_lesion_csv(uri, r, "all", tmp_path / r) for r in (a, b)]
    volume_tables = [_lesion_csv(uri, r, "all", tmp_path / r / "vol", "volume_lesions") for r in (a, b)]
    for metric in ("roi_dice", "dice", "dice_3d"):  # dice_3d: the volume protocol's table (demo data has full masks)
        line = next(x for x in printed.splitlines() if x.startswith(f"- **{metric}**:"))
        if metric == "dice_3d":
            tables = volume_tables
        assert re.search(r"(no difference larger than noise|is better — the difference is larger than noise)", line)
        means = [np.mean([float(r[metric]) for r in t]) for t in tables]
        assert f"{means[0]:.3f} vs" in line and f"{means[1]:.3f}, difference" in line
        assert "sign-flip permutation over 8 patients" in line and re.search(r"p = [0-9.e-]+", line)

    # the files: the printed Markdown, a CSV row per run, a plot
    assert (out / "comparison.md").read_text() in printed
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in rows] == [a, b]
    assert float(rows[0]["dice"]) == pytest.approx(runs[0].data.metrics["all/dice"])
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.slow
def test_compare_a_run_with_itself_and_a_whole_experiment(tiny_runs: dict[str, Any], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    uri = tiny_runs["uri"]
    a, _ = tiny_runs["run_ids"]
    assert main(["compare", a, a, "--tracking-uri", uri, "--split", "all", "--out", str(tmp_path / "self")]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("- **roi_dice**:"))
    assert "no difference larger than noise" in line and "p = 1 " in line and "difference +0.000" in line
    assert "Parameters that differ:\n\n(none)" in printed

    # the experiment holds exactly the two runs: both in the table, oldest first, and (two runs) a paired
    # test of each per-lesion metric, the same verdict as naming the two runs
    a, b = tiny_runs["run_ids"]
    assert main(["compare", "--experiment", "tiny", "--tracking-uri", uri, "--split", "all",
                 "--out", str(tmp_path / "exp")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Comparison of 2 runs on the all split")
    rows = [x for x in printed.split("Parameters that differ")[0].splitlines() if x.startswith("| ") and "(" in x]
    assert [r.split("(")[1][:8] for r in rows] == [a[:8], b[:8]]
    assert "Paired test over lesions" in printed
    verdicts = [x for x in printed.splitlines() if x.startswith("- **")]
    assert [v.split("**")[1] for v in verdicts] == ["roi_dice", "dice", "dice_3d"]
    assert main(["compare", a, b, "--tracking-uri", uri, "--split", "all", "--out", str(tmp_path / "ab")]) == 0
    assert verdicts == [x for x in capsys.readouterr().out.splitlines() if x.startswith("- **")]


def test_compare_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", "--tracking-uri", str(tmp_path)]) == 2
    assert "RUN_IDs or --experiment" in capsys.readouterr().err
    # a store that does not exist is not created
    assert main(["compare", "abc", "--tracking-uri", str(tmp_path / "none")]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not (tmp_path / "none").exists()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).create_experiment("empty")
    assert main(["compare", "0123456789abcdef", "--tracking-uri", uri]) == 2
    assert "no MLflow run '0123456789abcdef'" in capsys.readouterr().err
    assert main(["compare", "--experiment", "empty", "--tracking-uri", uri]) == 2
    assert "no finished runs" in capsys.readouterr().err
