"""U-Net augmentation batched on the training device: elastic deformation, flips, intensity, weight map.

The CPU chain (:mod:`medseg.transforms.dictionary`) stays the reference. This module reproduces its
elastic deformation on a whole batch at once with ``torch.nn.functional.grid_sample``:

* **The same dense field as** ``elasticdeform``. ``elasticdeform.deform_grid`` interpolates the
  coarse control-point displacements with a cubic B-spline: the grid is prefiltered
  (``scipy.ndimage.spline_filter1d``, mirror boundary) and evaluated at
  ``cp = (points − 1) · (p + offset) / (extent − 1)`` for output pixel ``p`` of a crop starting at
  ``offset`` in an input of ``extent`` pixels (the control points span the whole input, corner to
  corner). Both steps are linear in the displacements and separable, so the dense field is
  ``A_y · D · A_xᵀ`` with one small ``(out, points)`` matrix per axis — computed once (exactly, by
  SciPy) and applied on the device as one ``einsum`` for the whole batch. Bicubic upsampling
  (``F.interpolate``) is *not* this spline and differs from it by pixels.
* **Sampling.** Labels and instance maps are sampled nearest (``elasticdeform`` order 0; a tie at
  exactly half a pixel may round the other way), images bilinearly (``elasticdeform`` uses a cubic
  B-spline for images: intensities differ slightly, geometry does not). Out-of-bounds positions are
  mirrored at the input's edge pixels (``mode="mirror"``, ``grid_sample``'s ``reflection`` with
  ``align_corners=True``).

Example:
    >>> disp = torch.randn(B, 2, 3, 3) * 10                           # pixels of the training grid
    >>> field = dense_field(disp, extent=(512, 512), out_shape=(128, 128), offsets=offsets)
    >>> image_w, label_w = warp(image, field, "bilinear"), warp(label.float(), field, "nearest")
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg.transforms.functional import spline_axis_weights

__all__ = ["DeviceAugment", "bspline_matrix", "dense_field", "random_displacements", "warp"]


def bspline_matrix(points: int, extent: int, offset: int, length: int) -> np.ndarray:
    """``(length, points)`` matrix: coarse displacements → dense displacements along one axis.

    Args:
        points: control points along the axis.
        extent: the input's size along the axis (the control points span it, corner to corner).
        offset: first output pixel's position in the input (crop start).
        length: output pixels.
    """
    return _weights(int(points), int(extent), int(offset), int(length)).copy()


@functools.lru_cache(maxsize=256)
def _weights(points: int, extent: int, offset: int, length: int) -> np.ndarray:
    if extent < 2:
        return np.zeros((length, points))
    return spline_axis_weights(points, extent, offset, length)


def dense_field(
    displacement: torch.Tensor,
    extent: Sequence[int],
    out_shape: Sequence[int],
    offsets: torch.Tensor | Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Dense displacements ``(B, 2, h, w)`` (pixels, (dy, dx)) for coarse ones ``(B, 2, n, n)``.

    Equals ``elasticdeform.deform_grid``'s field for an input of ``extent`` pixels cropped to
    ``out_shape`` at ``offsets`` (per sample ``(y0, x0)``; None = 0).
    """
    b, _, ny, nx = displacement.shape
    dev, dt = displacement.device, displacement.dtype
    offs = np.zeros((b, 2), np.int64) if offsets is None else np.asarray(
        offsets.cpu() if isinstance(offsets, torch.Tensor) else offsets, np.int64).reshape(b, 2)
    h, w = (int(v) for v in out_shape)
    if (offs == offs[0]).all():  # one pair of matrices serves the batch
        ay = torch.as_tensor(bspline_matrix(ny, extent[0], offs[0, 0], h), dtype=dt, device=dev)
        ax = torch.as_tensor(bspline_matrix(nx, extent[1], offs[0, 1], w), dtype=dt, device=dev)
        return torch.einsum("yk,bckl,xl->bcyx", ay, displacement, ax)
    ay = torch.as_tensor(np.stack([bspline_matrix(ny, extent[0], o, h) for o in offs[:, 0]]), dtype=dt, device=dev)
    ax = torch.as_tensor(np.stack([bspline_matrix(nx, extent[1], o, w) for o in offs[:, 1]]), dtype=dt, device=dev)
    return torch.einsum("byk,bckl,bxl->bcyx", ay, displacement, ax)


def random_displacements(batch: int, sigma: float, points: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Coarse displacements ``(B, 2, points, points)`` ~ N(0, σ²) pixels."""
    d = torch.randn((batch, 2, points, points), generator=generator, dtype=torch.float64)
    return (d * float(sigma)).to(device)


def warp(
    x: torch.Tensor,
    field: torch.Tensor,
    mode: str = "bilinear",
    source_offset: torch.Tensor | Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Sample ``x`` ``(B, C, H, W)`` at ``p + source_offset + field(p)`` for every output pixel ``p``.

    Args:
        x: the input (the whole slice, or a region of it).
        field: ``(B, 2, h, w)`` displacements in pixels, from :func:`dense_field`.
        mode: ``bilinear`` (images) or ``nearest`` (labels; cast back to their dtype by the caller).
        source_offset: per sample ``(y0, x0)`` of the output's first pixel in ``x``'s pixels
            (a crop's start when ``x`` is the whole slice); None = 0.

    Returns:
        ``(B, C, h, w)`` in ``x``'s dtype (float for nearest-sampled integer maps).
    """
    b, _, hin, win = x.shape
    _, _, h, w = field.shape
    dev = x.device
    yy = torch.arange(h, device=dev, dtype=field.dtype).view(1, h, 1)
    xx = torch.arange(w, device=dev, dtype=field.dtype).view(1, 1, w)
    if source_offset is not None:
        so = torch.as_tensor(np.asarray(source_offset.cpu() if isinstance(source_offset, torch.Tensor)
                                        else source_offset), dtype=field.dtype, device=dev).view(b, 2, 1, 1)
        yy, xx = yy + so[:, 0], xx + so[:, 1]
    py = yy + field[:, 0]
    px = xx + field[:, 1]
    # align_corners=True: -1 and 1 are the centres of the first and last pixels
    gy = 2 * py / max(hin - 1, 1) - 1
    gx = 2 * px / max(win - 1, 1) - 1
    grid = torch.stack([gx, gy], -1).to(x.dtype if x.is_floating_point() else torch.float32)
    src = x if x.is_floating_point() else x.float()
    return F.grid_sample(src, grid, mode=mode, padding_mode="reflection", align_corners=True)


class DeviceAugment:
    """The training batch's augmentation on the training device (``transforms.accelerator: true``).

    The CPU workers cut each crop grown by :attr:`margin` pixels and draw every random number
    (:class:`~medseg.transforms.dictionary.RandElasticCropd` with ``defer_margin`` and
    :class:`~medseg.transforms.dictionary.DrawDeviceAugmentd`, seeded per sample as always, so a
    resumed run replays the same augmentation); this applies them to the whole batch at once:
    elastic warp (the field ``W_y · D · W_xᵀ`` as one ``einsum``, ``grid_sample``), flips, intensity
    scale / shift, Gaussian noise, clipping to [0, 1], then the U-Net border weight map. The weight
    map needs exact Euclidean distance transforms, which have no batched GPU kernel in torch: it is
    computed on the CPU from the warped instance maps (a round trip whose cost
    ``benchmarks/bench_augment.py`` reports).

    Args:
        cfg: the ``transforms`` config section.
    """

    def __init__(self, cfg: Any) -> None:
        from medseg.transforms.dictionary import BorderWeightd

        self.cfg = cfg
        self.margin = device_margin(cfg)
        wm = cfg.weight_map
        self.weight = BorderWeightd(w0=wm.w0 if wm.enabled else 0.0, sigma=wm.sigma,
                                    class_balance=wm.class_balance and wm.enabled)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Augment a collated batch whose tensors are on the device; returns the batch the model trains on."""
        out = dict(batch)
        wy, wx, disp = out.pop("elastic_wy"), out.pop("elastic_wx"), out.pop("elastic_disp")
        field = torch.einsum("byk,bckl,bxl->bcyx", wy.float(), disp.float(), wx.float())
        b = field.shape[0]
        off = [[self.margin, self.margin]] * b
        out["image"] = warp(out["image"].float(), field, "bilinear", off)
        for key in ("label", "instance", "truth"):
            if key in out:
                out[key] = warp(out[key].float(), field, "nearest", off).round().to(out[key].dtype)
        aug = out.pop("device_aug").float()  # (B, 4): flip y, flip x, intensity scale, shift
        noise_seed = out.pop("device_noise_seed", None)
        for axis, col in ((-2, 0), (-1, 1)):
            flip = aug[:, col].view(b, 1, 1, 1) > 0.5
            for key in ("image", "label", "instance", "truth"):
                if key in out:
                    out[key] = torch.where(flip, out[key].flip(axis), out[key])
        image = out["image"] * (1.0 + aug[:, 2].view(b, 1, 1, 1)) + aug[:, 3].view(b, 1, 1, 1)
        if self.cfg.noise_std > 0 and noise_seed is not None:
            noise = torch.stack([
                torch.randn(image.shape[1:], generator=torch.Generator(device=image.device).manual_seed(int(s)),
                            device=image.device) for s in noise_seed.view(-1).tolist()])
            image = image + self.cfg.noise_std * noise
        out["image"] = image.clamp(0.0, 1.0)
        # the border weight map: exact EDTs on the CPU (one round trip per batch)
        inst, lab = out["instance"].cpu().numpy(), out["label"].cpu().numpy()
        weights = [self.weight({"instance": inst[i], "label": lab[i]})["weight"] for i in range(b)]
        out["weight"] = torch.from_numpy(np.stack(weights).astype(np.float32)).to(out["image"].device)
        return out


def device_margin(cfg: Any) -> int:
    """Pixels the CPU adds around each crop for the device warp: 4 σ (a coarse displacement beyond it
    has probability ≈ 6e-5; a position that still leaves the grown crop is mirrored at its edge)."""
    el = cfg.elastic
    return int(np.ceil(4 * el.sigma)) + 2 if el.enabled and el.prob > 0 and el.sigma > 0 else 0
