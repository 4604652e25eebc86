"""Pixel metrics: a confusion matrix over class ids and the scores read from it (PA, MPA, MIoU, FWIoU, Dice).

Also the array helpers every metric module shares: :func:`to_numpy` (a tensor or array as NumPy) and
:func:`mask2d` (an ``(H, W)`` mask from ``(H, W)`` or ``(1, ..., 1, H, W)``).

Definitions (the design notes): ``p_ij`` = pixels of true class i predicted as j; one
``torch.bincount`` per batch accumulates the ``(K, K)`` matrix, rows true, columns predicted.

Example:
    >>> cm = ConfusionMatrix(num_classes=2)
    >>> cm.update(pred, label)                 # class ids, any equal shapes
    >>> cm.compute()["miou"], cm.compute()["dice"]
"""

from __future__ import annotations

import numpy as np
import torch

from medseg.runtime import dist_ready

__all__ = ["ArrayLike", "ConfusionMatrix", "mask2d", "pixel_metrics", "to_numpy"]

ArrayLike = np.ndarray | torch.Tensor


def to_numpy(x: ArrayLike) -> np.ndarray:
    """A NumPy view/copy of a tensor or array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def mask2d(x: ArrayLike, name: str) -> np.ndarray:
    """A 2-D array, dropping leading singleton axes (``(1, H, W)`` → ``(H, W)``).

    Raises:
        ValueError: what is left is not 2-D (``name`` says which argument).
    """
    a = to_numpy(x)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {a.shape}")
    return a


def pixel_metrics(matrix: ArrayLike) -> dict[str, float]:
    """PA, MPA, MIoU, FWIoU and Dice from a ``(K, K)`` confusion matrix (rows true, columns predicted).

    With ``p_ij`` the pixels of class i predicted as j, ``t_i = Σ_j p_ij`` and ``s_i = Σ_j p_ji``:
    PA = Σ p_ii / Σ p_ij; MPA = mean_i p_ii / t_i; MIoU = mean_i p_ii / (t_i + s_i − p_ii);
    FWIoU = Σ_i t_i · IoU_i / Σ p_ij; Dice_i = 2 p_ii / (t_i + s_i).

    A class absent from both truth and prediction (t_i = s_i = 0) has no defined IoU or Dice: it is
    left out of the means, and its ``dice_class_<i>`` is reported as 1.0 (nothing to find, nothing
    found). MPA averages the classes present in the truth (t_i > 0; recall is undefined otherwise).
    ``"dice"`` is the mean Dice of the foreground classes 1..K−1 that are present (for K = 2 the
    lesion Dice); 1.0 when no foreground class is present anywhere.

    Returns:
        ``{"pa", "mpa", "miou", "fwiou", "dice", "dice_class_0", ..., "dice_class_<K-1>"}``.

    Raises:
        ValueError: an empty matrix (no pixels) or one that is not square.
    """
    p = to_numpy(matrix).astype(np.float64)
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"a confusion matrix is (K, K); got shape {p.shape}")
    n = p.sum()
    if n == 0:
        raise ValueError("the confusion matrix is empty: no pixels were accumulated (update() first)")
    k = p.shape[0]
    tp = np.diag(p)
    t = p.sum(1)
    s = p.sum(0)
    present = (t + s) > 0
    iou = np.divide(tp, t + s - tp, out=np.ones(k), where=present)
    dice = np.divide(2 * tp, t + s, out=np.ones(k), where=present)
    acc = np.divide(tp, t, out=np.zeros(k), where=t > 0)
    fg = present[1:]
    out = {
        "pa": float(tp.sum() / n),
        "mpa": float(acc[t > 0].mean()),
        "miou": float(iou[present].mean()),
        # t_i = 0 for an absent class, so its placeholder IoU carries no weight
        "fwiou": float((t * iou).sum() / n),
        "dice": float(dice[1:][fg].mean()) if fg.any() else 1.0,
    }
    out.update({f"dice_class_{i}": float(dice[i]) for i in range(k)})
    return out


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` pixel confusion matrix (rows true class, columns predicted).

    Args:
        num_classes: K, including the background class 0.

    Example:
        >>> cm = ConfusionMatrix(2)
        >>> cm.update(pred, label)  # class ids, any equal shapes
        >>> cm.compute()["miou"]
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
        self.num_classes = num_classes
        self._mat: torch.Tensor | None = None

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add a batch. ``pred`` and ``target`` are class ids of any (equal) shape.

        Target values outside ``[0, K)`` (e.g. an ignore index of 255) are skipped; a predicted id
        outside ``[0, K)`` is an error.
        """
        pred_t = torch.as_tensor(pred)
        target_t = torch.as_tensor(target, device=pred_t.device)
        if pred_t.shape != target_t.shape:
            raise ValueError(f"pred {tuple(pred_t.shape)} and target {tuple(target_t.shape)} differ in shape")
        k = self.num_classes
        p = pred_t.reshape(-1).long()
        t = target_t.reshape(-1).long()
        if p.numel() == 0:
            return
        pmin, pmax = torch.aminmax(p)
        if pmin < 0 or pmax >= k:
            bad = (p < 0) | (p >= k)
            raise ValueError(f"pred holds class ids outside [0, {k}): {sorted(p[bad].unique().tolist())[:5]}")
        tmin, tmax = torch.aminmax(t)
        if tmin < 0 or tmax >= k:  # boolean indexing is slow: only when an ignore value is present
            valid = (t >= 0) & (t < k)
            t, p = t[valid], p[valid]
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        if self._mat is None:
            self._mat = counts
        else:
            self._mat += counts.to(self._mat.device)

    @property
    def matrix(self) -> np.ndarray:
        """The accumulated ``(K, K)`` int64 matrix (zeros before any update)."""
        if self._mat is None:
            return np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        return self._mat.cpu().numpy().astype(np.int64)

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._mat = None

    def reduce_across_ranks(self) -> None:
        """Sum the matrix over all ranks (``torch.distributed.all_reduce``); a no-op outside DDP."""
        if not dist_ready():
            return
        # NCCL reduces only CUDA tensors; gloo only CPU ones
        nccl = torch.distributed.get_backend() == "nccl"
        dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        mat = torch.as_tensor(self.matrix, device=dev)
        torch.distributed.all_reduce(mat)
        self._mat = mat

    def compute(self) -> dict[str, float]:
        """The metrics of :func:`pixel_metrics` on the accumulated matrix."""
        return pixel_metrics(self.matrix)
