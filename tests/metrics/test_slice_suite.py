"""MetricSuite (medseg.metrics.slice_suite): one batch end to end, empty images, reduction across ranks."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch

from medseg.metrics.boundary import hd95, surface_dice
from medseg.metrics.pixel import ConfusionMatrix
from medseg.metrics.slice_suite import MetricSuite
from tests.metrics.cases import P, hand_case, pixels_from

torch.set_num_threads(1)


def test_metric_suite_end_to_end() -> None:
    pred1, true1 = hand_case()
    label = np.stack([true1 > 0, true1 > 0]).astype(np.int64)
    inst = np.stack([true1, true1])
    pred = np.stack([pred1, (true1 > 0).astype(np.uint8)]).astype(np.int64)  # image 2 is perfect
    spacing = [(0.5, 0.5), (0.5, 0.5)]
    metas = [{"id": "a"}, {"id": "b"}]
    suite = MetricSuite(2)
    suite.update(torch.as_tensor(pred)[:, None], torch.as_tensor(label)[:, None], torch.as_tensor(inst), spacing, metas)
    m = suite.compute()
    cm = ConfusionMatrix(2)
    cm.update(pred, label)
    for k, v in cm.compute().items():
        assert m[k] == pytest.approx(v)
    assert m["hd95"] == pytest.approx((hd95(pred[0], label[0], spacing[0]) + 0.0) / 2)
    assert m["surface_dice"] == pytest.approx((surface_dice(pred[0], label[0], 2.0, spacing[0]) + 1.0) / 2)
    assert m["lesion_sensitivity"] == pytest.approx(7 / 8)
    assert m["fp_per_image"] == pytest.approx(1 / 2)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    rows = suite.lesion_rows()
    assert len(rows) == 8 and len({tuple(r) for r in rows}) == 1  # same keys, same order

    # the rows write to CSV and read back unchanged
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    back = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [r["image_id"] for r in back] == [r["image_id"] for r in rows]
    assert [float(r["dice"]) for r in back] == pytest.approx([r["dice"] for r in rows])

    # without an instance map the lesions are the connected components of the label:
    # A and B stay apart (2 px gap), so the same eight lesions are found
    bare = MetricSuite(2)
    bare.update(pred, label, None, spacing, metas)
    assert bare.compute()["lesion_count"] == 8
    assert bare.compute()["lesion_sensitivity"] == pytest.approx(7 / 8)
    suite.reset()
    with pytest.raises(ValueError, match="no pixels"):
        suite.compute()


def test_metric_suite_one_empty_image_is_counted_not_averaged() -> None:
    label = np.zeros((2, 10, 10), np.int64)
    label[0, 2:5, 2:5] = 1
    pred = np.zeros_like(label)
    pred[0, 2:5, 3:6] = 1
    pred[1, 7:9, 7:9] = 1  # a lesion predicted on an empty slice
    suite = MetricSuite(2)
    suite.update(pred, label, None, [(1.0, 1.0)] * 2, None)
    m = suite.compute()
    assert m["hd95"] == pytest.approx(hd95(pred[0], label[0]))
    assert m["hd95_one_empty"] == 1.0
    assert m["fp_per_image"] == pytest.approx(1 / 2)


def test_reduce_across_ranks(tmp_path) -> None:
    import torch.distributed as dist

    target, pred = pixels_from(P)
    suite = MetricSuite(3)
    suite.update(pred.reshape(1, 10, 10), target.reshape(1, 10, 10), None, [(1.0, 1.0)], [{"id": "x"}])
    before = suite.compute()
    suite.reduce_across_ranks()  # no process group: a no-op
    assert suite.compute() == before
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        suite.reduce_across_ranks()  # one rank: the sums and gathered rows must not double
        after = suite.compute()
    finally:
        dist.destroy_process_group()
    np.testing.assert_array_equal(suite.confusion.matrix, P)
    assert after == before
    assert len(suite.lesion_rows()) == before["lesion_count"]
