"""Shared fixtures: one small generated DeepLesion-format dataset per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated DeepLesion-format release (8 patients, 128×128 slices), shared read-only."""
    from medseg.data.synthetic import generate_demo_data

    return generate_demo_data(tmp_path_factory.mktemp("demo") / "dl", patients=8, seed=3,
                              progress=False, image_size=128)


def tiny_overrides(root: Path, out: Path, **extra: object) -> list[str]:
    """Overrides that make any pipeline train in seconds on ``demo_root``."""
    ov = {
        "data.name": "deeplesion", "data.root": str(root), "data.generate_if_missing": False,
        "data.spacing_mm": None, "data.recist_mask": "ellipse",
        "train.epochs": 1, "train.max_steps": 2, "train.batch_size": 2, "train.threads": 1,
        "train.num_workers": 0, "train.val_every": 1, "train.overlay_count": 2, "train.evaluate_splits": [],
        "train.device": "cpu", "transforms.crop_size": [64, 64], "output_dir": str(out),
        "train.time_limit_min": None, "calibration.after_training": False,
    }
    ov.update(extra)
    import json

    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in ov.items()]
