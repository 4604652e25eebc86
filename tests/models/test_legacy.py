"""Model files written by an earlier medseg still load and give the same numbers.

The fixtures in ``tests/fixtures/legacy/`` were written by ``tests/fixtures/make_legacy.py`` at commit
313d013, before the package was laid out by pipeline stage (issue 19) and before model files were read
as data (issue 24): a full training checkpoint (``last.pt``), the MLflow model that run logged (a
pickled module in the ``mlflow.pytorch`` flavour), and one input with the logits the model gave for it
then. The checkpoint holds data only, so it loads through the weights-only path (its RNG state as a
NumPy array, which the allow-list covers, and exact resume restores it); the pickled MLflow model
carries code, so it is refused unless the caller trusts it (``--trust-model``).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.models.checkpoint import load_model, read_checkpoint, trust_model_files
from medseg.runtime import TrainingError

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"


def _expected() -> tuple[torch.Tensor, torch.Tensor]:
    io = torch.load(LEGACY / "io.pt", map_location="cpu", weights_only=True)
    return io["input"], io["logits"]


def test_a_checkpoint_written_before_the_layout_loads_and_predicts_the_same() -> None:
    model, info = load_model(LEGACY / "last.pt", trust=False)  # weights_only=True: no trust needed
    x, y = _expected()
    with torch.no_grad():
        out = model(x)
    assert info["config"]["model"]["name"] == "unet"
    torch.testing.assert_close(out, y, rtol=0, atol=1e-6)


def test_the_old_checkpoints_rng_state_loads_as_data_and_restores() -> None:
    from medseg.runtime import rng_state, set_rng_state
    from medseg.training.resume import plain_rng_state, rng_state_from_plain

    rng = read_checkpoint(LEGACY / "last.pt", trust=False)["rng"]
    assert isinstance(rng["numpy"][1], np.ndarray)  # the old form: NumPy's keys as an array
    keep = rng_state()
    try:
        set_rng_state(rng_state_from_plain(rng))
        old = (random.random(), np.random.rand(), torch.rand(1).item())
        set_rng_state(rng_state_from_plain(plain_rng_state(rng)))  # the new form restores the same state
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == old
    finally:
        set_rng_state(keep)


def test_an_mlflow_model_logged_before_the_layout_loads_only_when_trusted() -> None:
    with pytest.raises(TrainingError, match="pickled MLflow PyTorch model.*--trust-model"):
        load_model(LEGACY / "mlflow_model")
    x, y = _expected()
    for model in (load_model(LEGACY / "mlflow_model", trust=True)[0],
                  _trusted_by_context(LEGACY / "mlflow_model")):
        with torch.no_grad():
            out = model(x)
        torch.testing.assert_close(out, y, rtol=0, atol=1e-6)


def _trusted_by_context(path: Path) -> torch.nn.Module:
    with trust_model_files():  # what --trust-model does around a command
        return load_model(path)[0]
