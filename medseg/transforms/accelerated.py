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

from medseg.transforms.functional import border_cutoff, spline_axis_weights

__all__ = ["DeviceAugment", "border_weight_map_torch", "bspline_matrix", "dense_field", "random_displacements",
           "warp"]


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


def _class_balance_torch(label: torch.Tensor) -> torch.Tensor:
    """:func:`medseg.transforms.functional.class_balance_weights` for a batch ``(B, H, W)``, per sample."""
    b = label.shape[0]
    flat = label.reshape(b, -1).long()
    k = int(flat.max().item()) + 1 if flat.numel() else 1
    counts = torch.zeros((b, k), dtype=torch.float64, device=label.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    present = counts > 0
    per_class = torch.where(present, flat.shape[1] / (present.sum(1, keepdim=True) * counts.clamp_min(1)),
                            torch.zeros_like(counts))
    return per_class.gather(1, flat).view_as(label).float()


def border_weight_map_torch(instance: torch.Tensor, label: torch.Tensor, w0: float = 10.0, sigma: float = 5.0,
                            class_balance: bool = True, chunk: int = 4096) -> torch.Tensor:
    """The U-Net border weight map of a batch, on the batch's device (exact distances, no CPU round trip).

    Same definition as :func:`medseg.transforms.functional.border_weight_map` (``w_c`` plus
    ``w0·exp(−(d1 + d2)² / 2σ²)`` on background pixels, ``d1``/``d2`` the Euclidean distances to the
    nearest and second-nearest instance). torch has no distance transform, so the distances are
    computed exactly from the instances' boundary pixels: the pixel of an object nearest to an
    outside point always has a 4-neighbour outside that object, so the minimum over boundary pixels
    (one ``scatter_reduce`` per chunk of background pixels) is the minimum over the object. Agrees
    with the CPU map within :data:`~medseg.transforms.functional.BORDER_TOLERANCE` (the CPU drops
    terms below it).

    Args:
        instance: ``(B, H, W)`` integer instance maps, 0 = background.
        label: ``(B, H, W)`` integer class maps.
        w0, sigma, class_balance: as in the CPU function.
        chunk: background pixels per distance block (memory: ``chunk × boundary pixels`` floats).

    Returns:
        float32 ``(B, H, W)`` on the inputs' device.
    """
    w = _class_balance_torch(label) if class_balance else torch.ones(label.shape, device=label.device)
    cutoff = border_cutoff(w0, sigma)
    if cutoff == 0.0:
        return w
    inst = instance.long()
    pad = F.pad(inst[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0].long()
    edge = ((pad[:, :-2, 1:-1] != inst) | (pad[:, 2:, 1:-1] != inst)
            | (pad[:, 1:-1, :-2] != inst) | (pad[:, 1:-1, 2:] != inst)) & (inst > 0)
    background = (inst == 0) & (label == 0)
    for b in range(inst.shape[0]):
        ids, qid = torch.unique(inst[b][edge[b]], return_inverse=True)
        if len(ids) < 2:  # no second border
            continue
        q = edge[b].nonzero().to(torch.float32)  # (Q, 2), in the same row-major order as inst[b][edge[b]]
        p = background[b].nonzero()
        if not len(p):
            continue
        pf = p.to(torch.float32)
        term = torch.empty(len(p), device=w.device)
        for s in range(0, len(p), chunk):
            d = torch.cdist(pf[s:s + chunk], q)  # (P, Q) Euclidean distances
            per_obj = torch.full((d.shape[0], len(ids)), float("inf"), device=d.device)
            per_obj.scatter_reduce_(1, qid.expand(d.shape[0], -1), d, reduce="amin", include_self=True)
            two = per_obj.topk(2, dim=1, largest=False).values
            ssum = two.sum(1)
            term[s:s + chunk] = w0 * torch.exp(-(ssum * ssum) / (2.0 * sigma * sigma))
        w[b][p[:, 0], p[:, 1]] += term
    return w


class DeviceAugment:
    """The training batch's augmentation on the training device (``transforms.accelerator: true``).

    The CPU workers cut each crop grown by :attr:`margin` pixels and draw every random number
    (:class:`~medseg.transforms.dictionary.RandElasticCropd` with ``defer_margin`` and
    :class:`~medseg.transforms.dictionary.DrawDeviceAugmentd`, seeded per sample as always, so a
    resumed run replays the same augmentation); this applies them to the whole batch at once:
    elastic warp (the field ``W_y · D · W_xᵀ`` as one ``einsum``, ``grid_sample``), flips, intensity
    scale / shift, Gaussian noise, clipping to [0, 1], then the U-Net border weight map, also on the
    device (:func:`border_weight_map_torch`: exact distances from the objects' boundary pixels) — no
    CPU round trip, which computed the batch's maps one after another in the training process.

    Args:
        cfg: the ``transforms`` config section.
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.margin = device_margin(cfg)
        wm = cfg.weight_map
        self.weight_args = dict(w0=wm.w0 if wm.enabled else 0.0, sigma=wm.sigma,
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
        # the border weight map after the warp, on the device
        out["weight"] = border_weight_map_torch(out["instance"][:, 0], out["label"][:, 0], **self.weight_args)[:, None]
        return out


def device_margin(cfg: Any) -> int:
    """Pixels the CPU adds around each crop for the device warp: 4 σ (a coarse displacement beyond it
    has probability ≈ 6e-5; a position that still leaves the grown crop is mirrored at its edge)."""
    el = cfg.elastic
    return int(np.ceil(4 * el.sigma)) + 2 if el.enabled and el.prob > 0 and el.sigma > 0 else 0
