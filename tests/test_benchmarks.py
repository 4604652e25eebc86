"""Smoke tests of benchmarks/: every benchmark runs at its ``--quick`` size and reports finite ratios
with passing agreement checks (computed by the benchmark: a row has no ``ok`` by default); the
helpers compute ratios, verdicts and tables correctly; the benchmark's own weight-map reference
matches brute force. No timing is asserted anywhere."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` the way the scripts import each other (folder on sys.path)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


# ----------------------------------------------------------------------------- helpers


def test_report_ratio_and_verdict() -> None:
    common = _bench("common")
    r = common.report("t", 2.0, 8.0, "ms", check="same", ok=True)
    assert r["ratio"] == 0.25 and r["verdict"] == "4.00× faster" and r["ok"] and r["check"] == "same"
    r = common.report("s", 30.0, 60.0, "samples/s", "", ok=True)  # higher is better: half the throughput
    assert r["ratio"] == 0.5 and r["verdict"] == "2.00× slower"
    r = common.report("m", 300.0, 100.0, "MiB", check="x", ok=False)
    assert r["ratio"] == 3.0 and r["verdict"] == "3.00× more memory"
    assert not r["ok"] and r["check"] == "FAILED: x"
    r = common.report("z", 1.0, 0.0, "ms", "", ok=True)
    assert math.isnan(r["ratio"]) and r["verdict"] == "n/a"


def test_report_has_no_passing_default() -> None:
    """A row's ``ok`` is what its benchmark computed: leaving it out is an error, not a pass."""
    common = _bench("common")
    with pytest.raises(TypeError, match="ok"):
        common.report("t", 1.0, 1.0, "ms", "claimed, never checked")
    with pytest.raises(TypeError):
        common.report("t", 1.0, 1.0, "ms", ok=True)  # nor without saying what was checked


def test_augment_checks_fail_on_disagreeing_outputs() -> None:
    """The augment benchmark's row checks are computed: a NaN or a wrong-size crop fails them."""
    import torch

    bench = _bench("bench_augment")
    good = {"image": torch.zeros(3, 8, 8), "weight": torch.ones(1, 8, 8)}
    assert bench._finite_crop(good, 8)
    assert not bench._finite_crop(good, 16)
    assert not bench._finite_crop({**good, "weight": torch.full((1, 8, 8), float("nan"))}, 8)


def test_time_pair_interleaves_calls() -> None:
    common = _bench("common")
    calls: list[str] = []
    t_ours, t_ref = common.time_pair(lambda: calls.append("o"), lambda: calls.append("r"), n=3, warmup=1)
    assert calls == ["o", "r"] * 4
    assert t_ours >= 0 and t_ref >= 0
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert len(common.repeat(lambda: None, 4, warmup=2)) == 4


def test_markdown_table_escapes_pipes() -> None:
    common = _bench("common")
    rows = [common.report("a|b", 1.0, 2.0, "ms", check="max |d| = 0", ok=True)]
    table = common.markdown_table(rows).splitlines()
    assert len(table) == 3 and table[0].count("|") == table[1].count("|") == len(common.COLUMNS) + 1
    assert table[2].startswith("| a\\|b | 1 | 2 | ms | 0.5 | 2.00× faster | max \\|d\\| = 0 |")


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    run_all = _bench("run_all")
    out = tmp_path / "sub" / "results.md"
    run_all.write_atomic(out, "first\n")
    run_all.write_atomic(out, "second\n")
    assert out.read_text() == "second\n"
    assert [p.name for p in out.parent.iterdir()] == ["results.md"]


# ----------------------------------------------------------------------------- references


def test_weight_map_reference_matches_brute_force() -> None:
    """The benchmark's full-EDT reference against distances from every pixel to every instance pixel."""
    bench = _bench("bench_weight_map")
    inst = np.zeros((12, 14), np.int32)
    inst[2:4, 2:5] = 1
    inst[2:5, 7:9] = 2  # a 2-px gap to instance 1
    inst[9:11, 3:12] = 3
    label = (inst > 0).astype(np.int64)
    w0, sigma = 10.0, 2.0
    yy, xx = np.mgrid[: inst.shape[0], : inst.shape[1]]
    dist = []
    for i in (1, 2, 3):
        py, px = np.nonzero(inst == i)
        dist.append(np.sqrt((yy[..., None] - py) ** 2 + (xx[..., None] - px) ** 2).min(-1))
    d = np.sort(np.stack(dist), axis=0)
    n_fg = label.sum()
    wc = np.where(label == 1, label.size / (2 * n_fg), label.size / (2 * (label.size - n_fg)))
    expected = wc + np.where(inst == 0, w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2)), 0.0)
    np.testing.assert_allclose(bench.reference_weight_map(inst, label, w0, sigma), expected, rtol=1e-12)


def test_make_instances_gives_the_requested_count() -> None:
    inst = _bench("bench_weight_map").make_instances(128, 12, seed=4)
    assert inst.shape == (128, 128) and inst.dtype == np.int32
    assert set(np.unique(inst)) <= set(range(13)) and len(np.unique(inst)) >= 10


def test_same_samples_sees_a_changed_pixel() -> None:
    bench = _bench("bench_data")
    a = [{"image": np.zeros((3, 4, 4), np.float32), "label": np.zeros((1, 4, 4)), "truth": None}]
    b = [{k: (v.copy() if v is not None else None) for k, v in a[0].items()}]
    assert bench.same_samples(a, b)
    b[0]["image"][1, 2, 3] = 1e-6
    assert not bench.same_samples(a, b)
    assert not bench.same_samples(a, [{**a[0], "truth": np.zeros((1, 4, 4))}])


def test_propagate_agreement_sees_one_changed_pixel() -> None:
    import torch

    same = _bench("bench_propagate")._same
    m = torch.zeros((4, 5), dtype=torch.uint8)
    a = {("k#0", 3): (1, 2, m)}
    assert same(a, {("k#0", 3): (1, 2, m.clone())})
    changed = m.clone()
    changed[2, 2] = 1
    assert not same(a, {("k#0", 3): (1, 2, changed)})
    assert not same(a, {("k#0", 3): (1, 3, m)}) and not same(a, {("k#0", 4): (1, 2, m)})


def test_confusion_references_agree_on_hand_counts() -> None:
    bench = _bench("bench_metrics")
    target = np.array([0, 0, 1, 1, 1, 255, 2])
    pred = np.array([0, 1, 1, 1, 0, 1, 2])
    expected = np.array([[1, 1, 0], [1, 2, 0], [0, 0, 1]])  # the 255 (ignore) pixel is skipped
    np.testing.assert_array_equal(bench._numpy_confusion(pred, target, 3), expected)
    np.testing.assert_array_equal(bench._sklearn_like_confusion()[1](pred, target, 3), expected)


# ----------------------------------------------------------------------------- the benchmarks


@pytest.mark.parametrize(
    "name",
    ["bench_weight_map", "bench_metrics", "bench_data", "bench_layout", pytest.param("bench_inference", marks=pytest.mark.slow),
     pytest.param("bench_augment", marks=pytest.mark.slow), pytest.param("bench_trainer", marks=pytest.mark.slow),
     pytest.param("bench_propagate", marks=pytest.mark.slow)],
)
def test_quick_benchmark_reports_finite_ratios(name: str) -> None:
    rows = _bench(name).main(quick=True)
    assert rows
    for r in rows:
        assert r["ok"], r
        for key in ("ours", "reference", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["ratio"] == pytest.approx(r["ours"] / r["reference"])


@pytest.mark.slow  # two interpreters importing torch and MONAI: ~15 s alone, ~30 s on a busy 2-core machine
def test_predict_end_to_end_row_runs_both_processes() -> None:
    """``bench_predict.py``'s end-to-end row on a 256² image: both processes ran, masks agree."""
    row = _bench("bench_predict").e2e_benchmark(256)
    for key in ("medseg_s", "monai_s", "medseg_peak_rss_mib", "monai_peak_rss_mib", "time_vs_monai", "rss_vs_monai"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert row["rss_vs_monai"] == pytest.approx(row["medseg_peak_rss_mib"] / row["monai_peak_rss_mib"])
    assert row["labels_equal"] > 0.99 and row["lesions"] > 0, row


@pytest.mark.slow  # three medseg predict runs over a small DICOM series
def test_predict_dicom_row_runs_with_the_quick_start_window_rule() -> None:
    """``bench_predict.py``'s DICOM row: the model it saves takes the quick start's input channels (three
    windows × the context slices) — it had kept 3 and failed when the default window became ``multi``."""
    row = _bench("bench_predict").dicom_benchmark("cpu", 1, 3, repeats=1)
    assert row["slices"] == 3
    for key in ("forward_s", "end_to_end_s_prefetch0", "end_to_end_s_prefetch2", "ratio_prefetch2"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert row["ratio_prefetch2"] == pytest.approx(row["forward_s"] / row["end_to_end_s_prefetch2"])


def test_run_all_cli_writes_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_all = _bench("run_all")
    monkeypatch.setattr(run_all, "BENCHMARKS", {"weight_map": _bench("bench_weight_map").main})
    out = tmp_path / "results.md"
    assert run_all.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# medseg benchmark results") and "run_all.py --quick" in text
    rows = [line for line in text.splitlines() if line.startswith("| weight map 128²")]
    assert len(rows) == 2 and all("× faster" in r or "× slower" in r for r in rows)


# ----------------------------------------------------------------------------- ablation


def test_touching_lesions_are_told_apart_from_isolated_ones() -> None:
    ablation = _bench("ablation")
    truth = np.zeros((30, 30), np.int32)
    truth[2:8, 2:8] = 1
    truth[2:8, 8:14] = 2  # shares a border with 1
    truth[20:25, 20:25] = 3  # alone
    truth[8:11, 14:17] = 4  # touches 2 at a corner only (8-neighbourhood)
    assert ablation.touching_ids(truth) == {1, 2, 4}
    rows = [{"image_id": "a", "lesion_id": "1", "dice": "0.5", "detected": "True"},
            {"image_id": "a", "lesion_id": "3", "dice": "0.9", "detected": "True"},
            {"image_id": "a", "lesion_id": "2", "dice": "0.0", "detected": "False"}]
    groups = {("a", 1): "touching", ("a", 2): "touching", ("a", 3): "isolated"}
    out = ablation.group_metrics(rows, groups)
    assert out["lesion_dice_touching"] == 0.25 and out["lesion_sensitivity_touching"] == 0.5
    assert out["lesion_dice_isolated"] == 0.9 and out["lesion_count_isolated"] == 1.0


def test_ablation_arms_table_and_resume_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ablation = _bench("ablation")
    arms = ablation.arms_for("cells", ["full", "neither"], [0, 1, 2], 8.0, [])
    assert len(arms) == 6 and len({a.key for a in arms}) == 6
    again = ablation.arms_for("cells", ["full"], [0], 8.0, [])[0]
    assert again.key == arms[0].key  # the same arm is found again (resume)
    assert ablation.arms_for("cells", ["full"], [0], 4.0, [])[0].key != arms[0].key  # another budget: another arm
    # the same name on a pipeline whose files now train something else: another arm (not the old run reused)
    k_full = arms[0].key  # (computed now: a key resolves the pipeline's files when asked)
    changed = tmp_path / "cells_changed.yaml"
    changed.write_text(f"include:\n  - {ablation.PIPELINES['cells']}\ntrain:\n  lr: 0.123\n")
    monkeypatch.setitem(ablation.PIPELINES, "cells", changed)
    k_changed = ablation.arms_for("cells", ["full"], [0], 8.0, [])[0].key
    assert k_changed != k_full
    # a new calibration grid is not a new arm (the finished run is recalibrated instead)
    regrid = tmp_path / "cells_regrid.yaml"
    regrid.write_text(f"include:\n  - {changed}\ncalibration:\n  thresholds: [0.5]\n")
    monkeypatch.setitem(ablation.PIPELINES, "cells", regrid)
    assert ablation.arms_for("cells", ["full"], [0], 8.0, [])[0].key == k_changed
    # seed-major order: an interrupted ablation has every variant at the seeds it reached
    assert [(a.variant, a.seed) for a in arms[:3]] == [("full", 0), ("neither", 0), ("full", 1)]
    ov = arms[1].all_overrides(Path("out"))
    assert "train.seed=0" in ov and "train.time_limit_min=8.0" in ov and "transforms.weight_map.w0=0" in ov
    found = {"full": [{"test/rand_error": 0.2, "test/pixel_error": 0.1, "ablation/steps": 100.0},
                      {"test/rand_error": 0.3, "test/pixel_error": 0.1, "ablation/steps": 110.0}],
             "neither": [{"test/rand_error": 0.4, "test/pixel_error": 0.2, "ablation/steps": 120.0},
                         {"test/rand_error": 0.6, "test/pixel_error": 0.2, "ablation/steps": 130.0}]}
    text = ablation.markdown("cells", found)
    assert "| full | 2 | 0.250 ± 0.071 |" in text
    assert "| neither | 2 | 0.500 ± 0.141 | 0.200 ± 0.000 | – | – | +0.250 ± 0.112 | 125 ± 7 |" in text


def test_ablation_recalibrates_when_the_calibration_grid_changes() -> None:
    ablation = _bench("ablation")
    cfg, overrides = ablation.arm_config(ablation.arms_for("cells", ["full"], [0], 8.0, [])[0], Path("out"))
    assert "train.evaluate_splits=[test]" in overrides or "test" in cfg.train.evaluate_splits
    key = ablation.calibration_key(cfg)
    assert key == ablation.calibration_key(cfg)  # stable: a finished arm on the same grid is left alone
    cfg.calibration.thresholds = [*cfg.calibration.thresholds, 0.95]
    assert ablation.calibration_key(cfg) != key  # a widened grid: the arm is recalibrated, not retrained
    cfg.calibration.thresholds = cfg.calibration.thresholds[:-1]
    cfg.calibration.metric = "pixel_error"
    assert ablation.calibration_key(cfg) != key


def test_cells_benchmark_registers_monai_arm(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from medseg.registry import LOSSES, MODELS

    # the registrations go into copies of the registries, restored after this test: the benchmark's
    # MONAI arm must not leak into the library's registries (tests/training/test_losses.py checks every loss)
    monkeypatch.setattr(LOSSES, "_entries", dict(LOSSES._entries))
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))
    cells = _bench("cells_benchmark")
    cells.register_monai()

    net = MODELS.build("monai_basicunet", {}, in_channels=1, num_classes=2)
    logits = net(torch.zeros(1, 1, 32, 32))
    assert logits.shape == (1, 2, 32, 32)
    loss = LOSSES.build("monai_dicece", {})(logits, torch.zeros(1, 1, 32, 32, dtype=torch.long), None)
    assert torch.isfinite(loss)
    plan = cells.arms([0, 1, 2], 8.0, [])
    assert list(plan) == ["medseg cells pipeline", "medseg, border + elastic off", "MONAI BasicUNet + DiceCELoss"]
    # the 'border + elastic off' arm is the ablation's 'neither' arm: one run serves both commands
    assert plan["medseg, border + elastic off"][0].key == _bench("ablation").arms_for("cells", ["neither"], [0],
                                                                                       8.0, [])[0].key
