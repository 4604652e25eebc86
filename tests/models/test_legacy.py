"""Model files written by an earlier medseg still load and give the same numbers.

The fixtures in ``tests/fixtures/legacy/`` were written by ``tests/fixtures/make_legacy.py`` at commit
313d013, before the package was laid out by pipeline stage (issue 19): a full training checkpoint
(``last.pt``), the MLflow model that run logged (a pickled module in the ``mlflow.pytorch`` flavour),
and one input with the logits the model gave for it then.
"""

from __future__ import annotations

from pathlib import Path

import torch

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"


def _expected() -> tuple[torch.Tensor, torch.Tensor]:
    io = torch.load(LEGACY / "io.pt", map_location="cpu", weights_only=True)
    return io["input"], io["logits"]


def test_a_checkpoint_written_before_the_layout_loads_and_predicts_the_same() -> None:
    from medseg.models.checkpoint import load_model

    model, info = load_model(LEGACY / "last.pt")
    x, y = _expected()
    with torch.no_grad():
        out = model(x)
    assert info["config"]["model"]["name"] == "unet"
    torch.testing.assert_close(out, y, rtol=0, atol=1e-6)


def test_an_mlflow_model_logged_before_the_layout_loads_and_predicts_the_same() -> None:
    import mlflow.pytorch

    model = mlflow.pytorch.load_model(str(LEGACY / "mlflow_model"), map_location="cpu").eval()
    x, y = _expected()
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, y, rtol=0, atol=1e-6)
