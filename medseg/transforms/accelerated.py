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
* **A fixed number of kernels.** :class:`DeviceAugment` runs the same operators for a batch of 4
  and of 32, with no host read-back (no ``.item()``, ``nonzero``, ``unique``, generator per sample):
  the border weight map by a batched exact distance transform (:func:`two_nearest_distances_torch`),
  the noise from each sample's seed (:func:`seeded_normal`). ``tests/transforms/test_accelerated_counts.py``
  counts them with ``torch.profiler``.

Example:
    >>> disp = torch.randn(B, 2, 3, 3) * 10                           # pixels of the training grid
    >>> field = dense_field(disp, extent=(512, 512), out_shape=(128, 128), offsets=offsets)
    >>> image_w, label_w = warp(image, field, "bilinear"), warp(label.float(), field, "nearest")
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg.transforms.functional import border_cutoff, spline_axis_weights

__all__ = ["DeviceAugment", "border_weight_map_torch", "bspline_matrix", "dense_field", "random_displacements",
           "seeded_normal", "two_nearest_distances_torch", "warp"]


#: pass 1 of :func:`two_nearest_distances_torch` packs d² · 2³¹ + id (ids < 2³¹) into a float64, exact below 2⁵³
_SHIFT = 2.0**31


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
    """:func:`medseg.transforms.functional.class_balance_weights` for a batch ``(B, H, W)``, per sample.

    Batched with no host read: the count of a pixel's class is read off the sorted labels
    (``searchsorted`` right − left) and the number of classes present is the number of steps in them.
    """
    b = label.shape[0]
    flat = label.reshape(b, -1).long()
    n = flat.shape[1]
    if n == 0:
        return torch.ones(label.shape, device=label.device)
    ordered = flat.sort(1).values
    counts = (torch.searchsorted(ordered, flat, right=True) - torch.searchsorted(ordered, flat)).double()
    present = 1.0 + (ordered[:, 1:] != ordered[:, :-1]).sum(1, keepdim=True).double()
    return (n / (present * counts)).float().view_as(label)


def _row_two_nearest(inst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pixel, along its row: the distance to the nearest instance pixel and its id, and the distance to
    the nearest pixel of another instance and its id (``inf`` / 0 where there is none). Exact, O(1) kernels.

    To the left of ``x``: the last instance pixel ≤ x is a running maximum of positions; the nearest
    pixel of another id is the instance pixel just before the run of equal ids that pixel belongs to —
    a running maximum too, since "the last instance pixel before p" never decreases with ``p``. Each
    position travels with its id (``position · 2³¹ + id`` in a float64, exact), so nothing is gathered.
    The right side is the same on the flipped row; the two sides give both distances exactly.
    """
    left = _left_two_nearest(inst)
    right = [t.flip(-1) for t in _left_two_nearest(inst.flip(-1))]
    (gl1, a, gl2, b), (gr1, c, gr2, d) = left, right
    from_left = gl1 <= gr1
    g1 = torch.minimum(gl1, gr1)
    i1 = torch.where(from_left, a, c)
    # nearest of another id than i1: on i1's side the second candidate, on the other side the first
    # candidate unless it has i1's id (then that side's second)
    differ = a != c
    ga, ia = torch.where(from_left, gl2, gr2), torch.where(from_left, b, d)
    gb = torch.where(from_left, torch.where(differ, gr1, gr2), torch.where(differ, gl1, gl2))
    ib = torch.where(from_left, torch.where(differ, c, d), torch.where(differ, a, b))
    take_a = ga <= gb
    return g1, i1, torch.where(take_a, ga, gb), torch.where(take_a, ia, ib)


def _left_two_nearest(inst: torch.Tensor) -> list[torch.Tensor]:
    """:func:`_row_two_nearest` looking left only: ``[g1, id1, g2, id2]`` (float64 ids)."""
    w = inst.shape[-1]
    ids = inst.double()
    x = torch.arange(w, device=inst.device, dtype=torch.float64)
    is_obj = ids > 0
    last = torch.where(is_obj, x * _SHIFT + ids, -1.0).cummax(-1).values  # last instance pixel ≤ x, packed
    before = F.pad(last[..., :-1], (1, 0), value=-1.0)  # last instance pixel < x
    id_before = before - torch.floor(before * (1.0 / _SHIFT)) * _SHIFT
    second = torch.where(is_obj & (id_before != ids), before, -1.0).cummax(-1).values
    out = []
    for packed in (last, second):
        pos = torch.floor(packed * (1.0 / _SHIFT))
        found = packed >= 0
        out += [torch.where(found, x - pos, float("inf")), torch.where(found, packed - pos * _SHIFT, 0.0)]
    return out


def two_nearest_distances_torch(instance: torch.Tensor, max_distance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched :func:`medseg.transforms.functional.two_nearest_distances` (``(B, H, W)``), a fixed number of kernels.

    Separable exact distances: along rows the two nearest distinct instances
    (:func:`_row_two_nearest`), then along columns ``d1² = min_y' (y − y')² + g1(y')²`` and, with
    ``I`` the nearest instance, ``d2² = min_y' (y − y')² + (g1(y') if id1(y') ≠ I else g2(y'))`` — exact,
    since the nearest pixel of another instance than ``I`` in row ``y'`` is the row's nearest when that
    is not ``I``, else its second. Only ``d1 + d2 ≤ max_distance`` matters to the caller, so the first
    column pass looks ``max_distance / 2`` rows up and down, the second ``max_distance``: one
    elementwise sweep per row offset, whatever the batch or the objects (all sums are integers, exact).

    Returns:
        float32 ``d1``, ``d2`` (``inf`` = none within the window). Where the true ``d1 + d2 ≤ max_distance``
        both are exact; elsewhere ``d1 + d2 > max_distance`` too (each is the distance to a pixel of
        another instance, so ``d1 + d2 ≥ 2·d1_true``, and with ``d1_true`` within the first window
        both are at least the true ones) — so the border term is exact wherever it is not negligible.
    """
    g1, i1, g2, _ = _row_two_nearest(instance)
    b, h, w = instance.shape
    dev = instance.device
    m = int(min(math.ceil(max_distance), math.ceil(math.hypot(h, w))))  # no distance in the crop is longer
    r, r1 = min(m, h - 1), min(int(math.ceil(m / 2)), h - 1)  # the two passes' row windows
    far = float((m + 1) ** 2)  # a squared distance ≥ far: beyond max_distance, "none"
    sq1, sq2 = (g.clamp_max(m + 1).square().float().transpose(1, 2).contiguous() for g in (g1, g2))  # (B, W, H)
    ids = i1.transpose(1, 2).to(torch.int32).contiguous()
    # pass 1: d1² and the nearest instance's id at once, as the minimum of d² · 2³¹ + id (float64: exact)
    packed = F.pad(sq1.double() * _SHIFT + ids.double(), (r1, r1), value=far * _SHIFT)
    best = torch.full((b, w, h), far * _SHIFT, dtype=torch.float64, device=dev)
    tmp = torch.empty_like(best)
    for k in range(2 * r1 + 1):
        torch.add(packed[..., k:k + h], float((k - r1) ** 2) * _SHIFT, out=tmp)
        torch.minimum(best, tmp, out=best)
    d1sq = torch.floor(best * (1.0 / _SHIFT))
    near = (best - d1sq * _SHIFT).to(torch.int32)
    # pass 2: per row, the nearest pixel of another instance than ``near``
    c1 = F.pad(sq1, (r, r), value=far)
    diff = F.pad(sq2 - sq1, (r, r), value=0.0)
    pid = F.pad(ids, (r, r), value=0)
    best2 = torch.full((b, w, h), far, device=dev)
    same = torch.empty_like(best2)
    alt = torch.empty_like(best2)
    for k in range(2 * r + 1):
        torch.eq(pid[..., k:k + h], near, out=same)
        torch.addcmul(c1[..., k:k + h], same, diff[..., k:k + h], out=alt)
        alt.add_(float((k - r) ** 2))
        torch.minimum(best2, alt, out=best2)
    inf = float("inf")
    d1 = torch.where(d1sq >= far, inf, d1sq.float().sqrt())
    d2 = torch.where(best2 >= far, inf, best2.sqrt())
    return d1.transpose(1, 2), d2.transpose(1, 2)


def border_weight_map_torch(instance: torch.Tensor, label: torch.Tensor, w0: float = 10.0, sigma: float = 5.0,
                            class_balance: bool = True) -> torch.Tensor:
    """The U-Net border weight map of a batch on the batch's device: a fixed number of kernels, no host read.

    Same definition as :func:`medseg.transforms.functional.border_weight_map` (``w_c`` plus
    ``w0·exp(−(d1 + d2)² / 2σ²)`` on background pixels, ``d1``/``d2`` the Euclidean distances to the
    nearest and second-nearest instance), computed on the (warped) batch itself by a batched exact
    distance transform (:func:`two_nearest_distances_torch`, window = the cutoff beyond which a term
    is below :data:`~medseg.transforms.functional.BORDER_TOLERANCE`); agrees with the CPU map within
    2 × that tolerance (the CPU drops terms below it). ``w_c`` is counted per sample from the sorted labels.

    Args:
        instance: ``(B, H, W)`` integer instance maps, 0 = background.
        label: ``(B, H, W)`` integer class maps.
        w0, sigma, class_balance: as in the CPU function.

    Returns:
        float32 ``(B, H, W)`` on the inputs' device.
    """
    w = _class_balance_torch(label) if class_balance else torch.ones(label.shape, device=label.device)
    cutoff = border_cutoff(w0, sigma)
    if cutoff == 0.0 or instance.numel() == 0:
        return w
    d1, d2 = two_nearest_distances_torch(instance, cutoff)
    s = d1 + d2
    term = w0 * torch.exp(-(s * s) / (2.0 * sigma * sigma))
    return w + torch.where((instance == 0) & (label == 0), term, 0.0)


_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (``x ^= x >> 16; x *= 0x45d9f3b`` twice) on int64 tensors holding 32-bit values
    (the products stay below 2⁶³: no overflow)."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def seeded_normal(seeds: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise ``(B, *shape)``, sample ``i``'s drawn from ``seeds[i]`` alone, in a fixed number of kernels.

    A counter-based generator: each element's two uniforms are a hash of (the sample's seed, the
    element's index), turned normal by Box–Muller — no generator per sample, no host read, and a
    sample's noise does not depend on the batch it is in (resume replays it).

    Args:
        seeds: ``(B,)`` or ``(B, 1)`` non-negative integer seeds (< 2³¹), on the target device.
        shape: the per-sample shape.
    """
    n = int(np.prod(shape))
    key = _hash32(seeds.reshape(-1, 1).long() & _M32)
    idx = torch.arange(2 * n, device=seeds.device, dtype=torch.int64).view(1, 2, n)
    bits = _hash32(_hash32(idx) ^ key.view(-1, 1, 1)) >> 8  # 24 bits
    u = (bits.float() + 0.5) * (1.0 / (1 << 24))  # (0, 1)
    z = torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos((2.0 * math.pi) * u[:, 1])
    return z.view(-1, *shape)


class DeviceAugment:
    """The training batch's augmentation on the training device (``transforms.accelerator: true``).

    The CPU workers cut each crop grown by :attr:`margin` pixels and draw every random number
    (:class:`~medseg.transforms.dictionary.RandElasticCropd` with ``defer_margin`` and
    :class:`~medseg.transforms.dictionary.DrawDeviceAugmentd`, seeded per sample as always, so a
    resumed run replays the same augmentation); this applies them to the whole batch at once, as a
    fixed number of kernels whatever the batch size, with no host read-back: the field
    ``W_y · D · W_xᵀ`` (one ``einsum``), the flips folded into the sampling grid, one ``grid_sample``
    for the image (bilinear) and one for the id maps stacked (nearest), intensity scale / shift,
    Gaussian noise from each sample's seed (:func:`seeded_normal`), clipping to [0, 1], then the U-Net
    border weight map of the warped maps (:func:`border_weight_map_torch`, a batched exact distance
    transform).

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
        b, _, h, w = field.shape
        image = out["image"].float()
        hin, win = image.shape[-2:]
        dev = image.device
        aug = out.pop("device_aug").to(dev, torch.float32)  # (B, 4): flip y, flip x, intensity scale, shift
        noise_seed = out.pop("device_noise_seed", None)
        # the sampling grid (align_corners=True: -1 and 1 are the centres of the first and last pixels)
        py = field[:, 0] + (torch.arange(h, device=dev, dtype=field.dtype).view(1, h, 1) + self.margin)
        px = field[:, 1] + (torch.arange(w, device=dev, dtype=field.dtype).view(1, 1, w) + self.margin)
        grid = torch.stack([px * (2.0 / max(win - 1, 1)) - 1, py * (2.0 / max(hin - 1, 1)) - 1], -1)
        # a flipped output samples the flipped grid: the flips cost two selects on the grid, not on every map
        grid = torch.where(aug[:, 0].view(b, 1, 1, 1) > 0.5, grid.flip(1), grid)
        grid = torch.where(aug[:, 1].view(b, 1, 1, 1) > 0.5, grid.flip(2), grid)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
        keys = [k for k in ("label", "instance", "truth") if k in out]
        if keys:  # one nearest sampling for every id map (float32 holds ids < 2²⁴ exactly)
            ids = torch.cat([out[k].float() for k in keys], 1)
            ids = F.grid_sample(ids, grid, mode="nearest", padding_mode="reflection", align_corners=True).round()
            start = 0
            for k in keys:
                c = out[k].shape[1]
                out[k] = ids[:, start:start + c].to(out[k].dtype)
                start += c
        image = torch.addcmul(aug[:, 3].view(b, 1, 1, 1), image, 1.0 + aug[:, 2].view(b, 1, 1, 1))
        if self.cfg.noise_std > 0 and noise_seed is not None:
            image = image + self.cfg.noise_std * seeded_normal(noise_seed.to(dev), image.shape[1:])
        out["image"] = image.clamp(0.0, 1.0)
        out["weight"] = border_weight_map_torch(out["instance"][:, 0], out["label"][:, 0], **self.weight_args)[:, None]
        return out


def device_margin(cfg: Any) -> int:
    """Pixels the CPU adds around each crop for the device warp: 4 σ (a coarse displacement beyond it
    has probability ≈ 6e-5; a position that still leaves the grown crop is mirrored at its edge)."""
    el = cfg.elastic
    return int(np.ceil(4 * el.sigma)) + 2 if el.enabled and el.prob > 0 and el.sigma > 0 else 0
