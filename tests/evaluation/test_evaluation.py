"""Evaluation: batched = one at a time (slices of different sizes), saved masks on the source grid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import medseg.training.losses  # noqa: F401  (registers the losses)
from medseg.config import load_config
from medseg.data import build_dataset
from medseg.data.loading import TransformedDataset
from medseg.evaluation.evaluate import eval_loader, evaluate, evaluate_loader, validation_metric_names
from medseg.models import build_model
from medseg.registry import LOSSES
from medseg.transforms import build_transforms
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "pipelines" / "quickstart.yaml"


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows comparable with ``==`` (NaN → a marker; a NaN is not equal to itself)."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]


def _key(row: dict[str, Any]) -> tuple[str, int]:
    return row["image_id"], row["lesion_id"]


def assert_same_evaluation(a: Any, b: Any) -> None:
    """Two :class:`EvalResult` (or ``(metrics, rows)``) agree: metrics and the rows' floats to float tolerance
    (a probability may differ in its last bit with the batch's composition), everything else exactly."""
    (ma, ra), (mb, rb) = ((x.metrics, x.rows) if hasattr(x, "metrics") else x for x in (a, b))
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == pytest.approx(mb[k], rel=1e-6, abs=1e-9), k
    assert len(ra) == len(rb)
    for x, y in zip(sorted(_plain(ra), key=_key), sorted(_plain(rb), key=_key)):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float) and isinstance(y[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9), (x.get("image_id"), k)
            else:
                assert x[k] == y[k], (x.get("image_id"), k)


def _unet(cfg: Any, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    from medseg.data.windowing import input_channels

    return build_model(cfg.model.name, input_channels(cfg.data), cfg.data.num_classes, cfg.model.params).eval()


def test_batched_evaluation_equals_one_at_a_time(demo_root: Path, tmp_path: Path) -> None:
    # at 3 mm/px the demo slices (about 2.6–3.4 mm/px, 128 px) resample to many different sizes
    ov = tiny_overrides(demo_root, tmp_path, **{"data.spacing_mm": 3.0, "train.amp": "off"})
    results, layouts = [], []
    for batch_size in (4, 1):
        cfg = load_config(QUICK, [*ov, f"evaluation.batch_size={batch_size}"])
        ds = TransformedDataset(build_dataset(cfg.data, "all"), build_transforms(cfg.transforms, train=False), 0)
        loader = eval_loader(ds, cfg)
        layouts.append([[len(g["image"]) for g in groups] for groups in loader])
        loss = LOSSES.build(cfg.loss.name, cfg.loss.params)
        results.append(evaluate_loader(_unet(cfg), loader, cfg, torch.device("cpu"), loss_fn=loss))
    batched, single = results
    # the batched run really had mixed-size batches split into groups, and groups of several slices
    assert any(len(groups) > 1 for groups in layouts[0]) and any(max(groups) > 1 for groups in layouts[0])
    assert all(groups == [1] for groups in layouts[1])
    assert len({tuple(s["image"].shape) for s in ds}) > 3  # type: ignore[attr-defined]
    assert batched.n == single.n == len(ds) == sum(map(sum, layouts[0]))
    assert "loss" in batched.metrics and batched.rows
    assert set(batched.metrics) <= set(validation_metric_names(cfg))  # what train.monitor may name
    assert_same_evaluation(batched, single)


class _Oracle(nn.Module):
    """Logits that put each pixel in its true class: looked up by the image (on the resampled grid)."""

    def __init__(self, dataset: TransformedDataset) -> None:
        super().__init__()
        self.truth = {}
        for i in range(len(dataset)):
            s = dataset[i]
            self.truth[torch.as_tensor(s["image"]).numpy().tobytes()] = torch.as_tensor(s["truth"][0] > 0).long()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        labels = torch.stack([self.truth[img.float().cpu().numpy().tobytes()] for img in image])
        return 10.0 * nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("spacing_mm", [1.2, 4.0])
def test_saved_predictions_lie_on_the_source_slice(
    spacing_mm: float, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medseg.evaluation.evaluate

    # the oracle knows the key slices only: the key-slice protocol
    cfg = load_config(QUICK, tiny_overrides(demo_root, tmp_path, **{"data.spacing_mm": spacing_mm,
                                                                    "evaluation.protocol": "key"}))
    data = build_dataset(cfg.data, "all")
    oracle = _Oracle(TransformedDataset(data, build_transforms(cfg.transforms, train=False), cfg.train.seed))
    monkeypatch.setattr(medseg.evaluation.evaluate, "load_model", lambda ref, device: (oracle, {"source": str(ref)}))

    out = tmp_path / "pred"
    result = evaluate(cfg, "oracle", "all", save_predictions=out)
    assert result["n"] == len(data) and result["metrics"]["dice"] > 0.99  # on the resampled grid
    inter = total = 0
    for i in range(len(data)):
        meta = data[i]["meta"]
        series, sl = meta["series"], f"{meta['slice']:03d}.png"
        source = cv2.imread(str(demo_root / "Images_png" / series / sl), cv2.IMREAD_UNCHANGED)
        truth = cv2.imread(str(demo_root / "Masks_png" / series / sl), cv2.IMREAD_UNCHANGED) > 0
        pred = cv2.imread(str(out / series / sl), cv2.IMREAD_UNCHANGED)
        assert source.dtype == np.uint16 and data[i]["image"].shape[1:] != source.shape  # resampled
        assert pred.shape == source.shape and set(np.unique(pred)) <= {0, 1}
        both, area = (truth & (pred > 0)).sum(), truth.sum() + (pred > 0).sum()
        assert 2 * both / area > 0.6, (series, sl, 2 * both / area)  # lesions of 6 px and up
        inter, total = inter + both, total + area
    # the nearest-neighbour round trip costs a little on small lesions when downsampling
    assert 2 * inter / total > (0.99 if spacing_mm < 3 else 0.8)
