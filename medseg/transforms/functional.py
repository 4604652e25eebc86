"""The maths of medseg's transforms on plain NumPy arrays (no dicts, no randomness of their own).

Every function here takes its random draws as arguments (a displacement field, a crop centre),
so the dictionary wrappers in :mod:`medseg.transforms.dictionary` own all randomness through
their seeded ``self.R`` and these functions can be tested alone against direct computations.

Example:
    >>> rng = np.random.RandomState(0)
    >>> image = rng.rand(3, 64, 64).astype(np.float32)
    >>> label = np.zeros((1, 64, 64), np.int64)
    >>> label[0, 20:30, 20:30] = 1
    >>> disp = elastic_displacement(rng, sigma=10.0, points=3)
    >>> image_d, label_d = elastic_deform([image, label], disp, orders=[3, 0])
    >>> w = border_weight_map(label_d[0].astype(np.int32), label_d[0], w0=10.0, sigma=5.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import elasticdeform
import numpy as np
from scipy import ndimage

#: the border term is dropped where it is below this (absolute, in weight units); it bounds the
#: error of the windowed distance computation in :func:`two_nearest_distances`
BORDER_TOLERANCE = 1e-7


# ----------------------------------------------------------------------------- elastic deformation


def elastic_displacement(rng: np.random.RandomState, sigma: float, points: int) -> np.ndarray:
    """Random displacements of a coarse ``points × points`` grid, N(0, sigma²) pixels each.

    Args:
        rng: the caller's seeded generator (a MONAI transform passes ``self.R``).
        sigma: standard deviation of each displacement component, in pixels (U-Net: 10).
        points: control points per spatial axis (U-Net: 3).

    Returns:
        float64 ``(2, points, points)``: the y- then x-displacement of every control point.
    """
    if points < 2:
        raise ValueError(f"elastic grid needs at least 2 points per axis, got points={points}")
    if sigma < 0:
        raise ValueError(f"elastic sigma must be >= 0 pixels, got {sigma}")
    return rng.randn(2, points, points) * float(sigma)


def elastic_deform(
    arrays: Sequence[np.ndarray],
    displacement: np.ndarray,
    orders: Sequence[int],
    mode: str = "mirror",
) -> list[np.ndarray]:
    """Deform several arrays with ONE elastic field (U-Net augmentation), via ``elasticdeform``.

    The coarse displacement grid is interpolated to every pixel with a cubic B-spline and each
    array is resampled at the displaced positions with its own spline order: 3 (bicubic) for
    images, 0 (nearest neighbour) for label / instance maps so that no new ids appear, 1 for
    weight maps. The last two axes are the spatial ones; leading (channel) axes are not deformed.

    Args:
        arrays: arrays of shape ``(..., H, W)``, all with the same ``(H, W)``.
        displacement: ``(2, P, Q)`` control-point displacements in pixels
            (from :func:`elastic_displacement`); all zeros gives the identity.
        orders: spline order per array (0–4).
        mode: how points outside the image are filled (``scipy.ndimage`` modes); ``"mirror"``
            matches U-Net's mirrored borders.

    Returns:
        The deformed arrays, same shapes and dtypes as the inputs.
    """
    arrays = [np.asarray(a) for a in arrays]
    if len(orders) != len(arrays):
        raise ValueError(f"elastic_deform: got {len(arrays)} arrays but {len(orders)} orders")
    if not arrays:
        return []
    disp = np.asarray(displacement, dtype=np.float64)
    if disp.ndim != 3 or disp.shape[0] != 2:
        raise ValueError(f"elastic displacement must have shape (2, P, Q), got {disp.shape}")
    spatial = arrays[0].shape[-2:]
    for a in arrays:
        if a.ndim < 2 or a.shape[-2:] != spatial:
            raise ValueError(
                f"elastic_deform: every array must be (..., H, W) with the same (H, W) = {spatial}, "
                f"got {a.shape}"
            )
    # elasticdeform re-interpolates the displacement for every array it is given, so arrays that
    # share an order are stacked along the channel axis into one (exact: a common dtype holds
    # them all, and each pixel is resampled independently of the others)
    groups: dict[int, list[int]] = {}
    for i, o in enumerate(orders):
        groups.setdefault(int(o), []).append(i)
    stacks = [
        np.ascontiguousarray(
            np.concatenate([arrays[i].reshape(-1, *spatial) for i in idx]).astype(
                np.result_type(*(arrays[i].dtype for i in idx)), copy=False
            )
        )
        for idx in groups.values()
    ]
    deformed = elasticdeform.deform_grid(
        stacks, disp, order=list(groups), mode=mode, axis=[(1, 2)] * len(stacks)
    )
    out: list[np.ndarray] = [arrays[0]] * len(arrays)
    for idx, stack in zip(groups.values(), deformed):
        start = 0
        for i in idx:
            n = int(np.prod(arrays[i].shape[:-2], dtype=np.int64))
            out[i] = stack[start : start + n].reshape(arrays[i].shape).astype(arrays[i].dtype, copy=False)
            start += n
    return out


#: pixels of B-spline prefilter context kept around the sampled region: the prefilter's influence
#: decays as 0.268^k, so 24 px bound the difference to a whole-image prefilter below 1e-13
_PREFILTER_MARGIN = 24


def spline_axis_weights(points: int, span: int, start: int, length: int, origin: float = 0.0) -> np.ndarray:
    """``(length, points)`` weights of the control points along one axis of an elastic grid.

    ``points`` control points are spread evenly over ``span`` pixels from ``origin`` (the first at
    ``origin``, the last at ``origin + span − 1``); the field is their interpolating cubic B-spline
    (mirror boundary), as ``elasticdeform`` builds it. Row ``i`` holds the weights of pixel
    ``start + i``; the field along both axes is ``W_y · D · W_xᵀ`` (:func:`elastic_field`, and the
    accelerator path in :mod:`medseg.transforms.accelerated`).
    """
    n, p = int(span), int(points)
    if n < 2:
        raise ValueError(f"elastic grid must span at least 2 pixels per axis, got {n}")
    pos = np.arange(int(start), int(start) + int(length), dtype=np.float64) - float(origin)
    u = pos * ((p - 1) / (n - 1))
    # interpolating each unit vector gives the weight of each control point (the spline is linear)
    return np.stack([ndimage.map_coordinates(np.eye(p)[i], [u], order=3, mode="mirror") for i in range(p)], 1)


def elastic_field(
    displacement: np.ndarray,
    grid_shape: Sequence[int],
    start: Sequence[int] = (0, 0),
    size: Sequence[int] | None = None,
    grid_origin: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """The dense displacement field of a coarse grid, evaluated only on the window ``[start, start + size)``.

    The ``P × Q`` control points are spread evenly over a region of ``grid_shape`` pixels whose
    first point sits at ``grid_origin`` (the last at ``grid_origin + grid_shape − 1``), and the
    field is their cubic B-spline interpolation (mirrored beyond the region) — exactly the field
    ``elasticdeform.deform_grid`` builds when its input is that region. The field at a pixel
    depends only on the pixel's position relative to the grid, never on the window: the field of a
    crop is the crop's window of the whole slice's field.

    Args:
        displacement: ``(2, P, Q)`` control-point displacements in pixels.
        grid_shape: ``(H, W)`` pixels the grid spans (the whole slice for the U-Net recipe).
        start: window start ``(y, x)`` in the grid's pixel coordinates (may be negative).
        size: window ``(h, w)``; None = ``grid_shape``.
        grid_origin: position of the first control point in the same coordinates.

    Returns:
        float64 ``(2, h, w)``: the y- then x-displacement of every window pixel.
    """
    disp = np.asarray(displacement, dtype=np.float64)
    if disp.ndim != 3 or disp.shape[0] != 2 or min(disp.shape[1:]) < 2:
        raise ValueError(f"elastic displacement must have shape (2, P, Q) with P, Q >= 2, got {disp.shape}")
    size = tuple(grid_shape) if size is None else tuple(size)
    # per axis: (n_window, n_points) 1-D spline weights, so the 2-D spline is separable
    wy, wx = (spline_axis_weights(disp.shape[1 + ax], grid_shape[ax], start[ax], size[ax], grid_origin[ax])
              for ax in range(2))
    field = np.zeros((2, len(wy), len(wx)))
    # a fixed elementwise sum (no BLAS): every pixel's value is computed the same way in any window
    for i in range(disp.shape[1]):
        for j in range(disp.shape[2]):
            basis = wy[:, i, None] * wx[None, :, j]
            field[0] += disp[0, i, j] * basis
            field[1] += disp[1, i, j] * basis
    return field


def elastic_warp(
    arrays: Sequence[np.ndarray],
    field: np.ndarray,
    start: Sequence[int],
    orders: Sequence[int],
    mode: str = "mirror",
) -> list[np.ndarray]:
    """Resample the window ``[start, start + field.shape[1:])`` of arrays at positions displaced by ``field``.

    Output pixel ``p`` of the window takes the input's value at ``p + field[:, p]`` (spline order
    per array: 3 for images, 0 for id maps so that no new ids appear); only the window's pixels
    are computed, and an order > 1 prefilters only the part of the input they can reach (plus a
    margin that makes it equal to prefiltering the whole input, to rounding).

    Args:
        arrays: ``(..., H, W)`` arrays, all with the same ``(H, W)``.
        field: ``(2, h, w)`` displacements in pixels (:func:`elastic_field`).
        start: window start ``(y, x)``, inside the image.
        orders: spline order per array (0–5).
        mode: ``scipy.ndimage`` border mode for positions outside the image.

    Returns:
        ``(..., h, w)`` arrays of the inputs' dtypes.
    """
    arrays = [np.asarray(a) for a in arrays]
    if len(orders) != len(arrays):
        raise ValueError(f"elastic_warp: got {len(arrays)} arrays but {len(orders)} orders")
    if not arrays:
        return []
    field = np.asarray(field, dtype=np.float64)
    h, w = field.shape[1:]
    spatial = arrays[0].shape[-2:]
    if any(a.ndim < 2 or a.shape[-2:] != spatial for a in arrays):
        raise ValueError(f"elastic_warp: every array must be (..., H, W) with the same (H, W) = {spatial}")
    sy, sx = int(start[0]), int(start[1])
    if sy < 0 or sx < 0 or sy + h > spatial[0] or sx + w > spatial[1]:
        raise ValueError(f"elastic_warp: window {h}×{w} at ({sy}, {sx}) is not inside the image {spatial}")
    yy = np.arange(sy, sy + h, dtype=np.float64)[:, None] + field[0]
    xx = np.arange(sx, sx + w, dtype=np.float64)[None, :] + field[1]
    reach = int(math.ceil(np.abs(field).max(initial=0.0))) + 3  # cubic support: 2 pixels each side
    out = []
    for a, order in zip(arrays, orders):
        m = reach + (_PREFILTER_MARGIN if order > 1 else 0)
        y0, y1 = max(sy - m, 0), min(sy + h + m, spatial[0])
        x0, x1 = max(sx - m, 0), min(sx + w + m, spatial[1])
        # integer offsets: the shifted coordinates are exact, so order 0 picks the same pixels
        coords = [yy - y0, xx - x0]
        sub = a[..., y0:y1, x0:x1].reshape(-1, y1 - y0, x1 - x0)
        dtype = np.float64 if order > 1 and not np.issubdtype(a.dtype, np.floating) else a.dtype
        res = np.stack([ndimage.map_coordinates(c.astype(dtype, copy=False), coords, order=int(order), mode=mode)
                        for c in sub])
        if np.issubdtype(a.dtype, np.integer) and res.dtype != a.dtype:
            res = np.rint(res)
        out.append(res.reshape(*a.shape[:-2], h, w).astype(a.dtype, copy=False))
    return out


# ----------------------------------------------------------------------------- weight map


def class_balance_weights(label: np.ndarray) -> np.ndarray:
    """Class-balancing weights ``w_c(x) = N / (K · N_{c(x)})`` (mean exactly 1).

    ``N`` is the number of pixels, ``K`` the number of classes present in ``label`` and ``N_c``
    the pixel count of class ``c`` — inverse-frequency ("median-frequency" for two classes)
    balancing, so every present class carries the same total weight ``N / K``. A slice with
    one class gets 1 everywhere.

    Args:
        label: ``(H, W)`` non-negative integer class map.

    Returns:
        float32 ``(H, W)``.
    """
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an integer class map, got dtype {label.dtype}")
    flat = label.ravel()
    if flat.size and flat.min() < 0:
        raise ValueError("label must hold non-negative class ids")
    counts = np.bincount(flat).astype(np.float64)
    present = counts > 0
    per_class = np.zeros_like(counts)
    per_class[present] = flat.size / (present.sum() * counts[present])
    return per_class[label].astype(np.float32)


def border_cutoff(w0: float, sigma: float, tol: float = BORDER_TOLERANCE) -> float:
    """The distance ``r`` beyond which ``w0·exp(−r²/2σ²) < tol``: farther pixels get no border term."""
    if w0 <= tol:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / tol))


def two_nearest_distances(
    instance: np.ndarray, max_distance: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances ``d1 ≤ d2`` from every pixel to its nearest and second-nearest instance.

    ``d_i(x)`` is the Euclidean distance from ``x`` to the closest pixel of instance ``i``
    (0 inside it). One ``scipy.ndimage.distance_transform_edt`` per instance, restricted to the
    instance's bounding box grown by ``max_distance``: every instance pixel lies in that window,
    so the distances inside it are exact, and a pixel outside it is farther than
    ``max_distance`` from the instance. Hand-written because no library returns the
    second-nearest object distance; the windows keep the cost proportional to the lesions' area
    rather than (instances × image).

    Args:
        instance: ``(H, W)`` non-negative integer instance map, 0 = background.
        max_distance: window margin in pixels; ``None`` = the whole image (exact everywhere).

    Returns:
        float64 ``(H, W)`` arrays ``d1``, ``d2``; ``inf`` where fewer than one / two instances lie
        within ``max_distance`` (so ``d2 = inf`` everywhere when there is at most one instance).
        Wherever the true ``d2 ≤ max_distance`` both values are exact.
    """
    instance = np.asarray(instance)
    if instance.ndim != 2:
        raise ValueError(f"instance map must be (H, W), got shape {instance.shape}")
    if not np.issubdtype(instance.dtype, np.integer):
        raise ValueError(f"instance map must be integer ids, got dtype {instance.dtype}")
    if instance.size and instance.min() < 0:
        raise ValueError("instance map must hold non-negative ids (0 = background)")
    d1 = np.full(instance.shape, np.inf)
    d2 = np.full(instance.shape, np.inf)
    margin = max(instance.shape) if max_distance is None else int(math.ceil(max_distance))
    for idx, box in enumerate(ndimage.find_objects(instance)):
        if box is None:  # an id absent after cropping
            continue
        win = tuple(
            slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, instance.shape)
        )
        d = ndimage.distance_transform_edt(instance[win] != idx + 1)
        a, b = d1[win], d2[win]  # views: the updates land in d1 / d2
        np.minimum(b, np.maximum(a, d), out=b)  # uses the old d1, so before d1 is updated
        np.minimum(a, d, out=a)
    return d1, d2


def border_weight_map(
    instance: np.ndarray,
    label: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_balance: bool = True,
) -> np.ndarray:
    """U-Net border weight map ``w(x) = w_c(x) + w0·exp(−(d1(x) + d2(x))² / (2σ²))``.

    ``w_c`` is :func:`class_balance_weights` (``N / (K·N_c)``, mean 1) or 1 everywhere when
    ``class_balance`` is False. ``d1``/``d2`` are the distances to the nearest and second-nearest
    instance (:func:`two_nearest_distances`). As in the published U-Net weight-map
    implementations, the border term is added only on background pixels (``label == 0`` and
    ``instance == 0``), where it marks the thin gaps separating touching objects; with fewer
    than two instances there is no second border and the term is 0. The term is dropped where
    it is below :data:`BORDER_TOLERANCE` (that is what lets the distances be computed in windows).

    Args:
        instance: ``(H, W)`` integer instance map, 0 = background, one id per object.
        label: ``(H, W)`` integer class map, 0 = background.
        w0: border weight (U-Net: 10); 0 disables the border term.
        sigma: border width in pixels (U-Net: ≈5).
        class_balance: add the class-balancing ``w_c`` (else ``w_c = 1``).

    Returns:
        float32 ``(H, W)`` weights.
    """
    instance = np.asarray(instance)
    label = np.asarray(label)
    if instance.ndim != 2 or label.shape != instance.shape:
        raise ValueError(
            f"border_weight_map expects instance and label of the same (H, W) shape, "
            f"got {instance.shape} and {label.shape}"
        )
    if sigma <= 0:
        raise ValueError(f"weight-map sigma must be > 0 pixels, got {sigma}")
    if w0 < 0:
        raise ValueError(f"weight-map w0 must be >= 0, got {w0}")
    w = class_balance_weights(label) if class_balance else np.ones(label.shape, np.float32)
    cutoff = border_cutoff(w0, sigma)
    if cutoff == 0.0:
        return w
    d1, d2 = two_nearest_distances(instance, max_distance=cutoff)
    near = np.isfinite(d2) & (label == 0) & (instance == 0)
    if near.any():
        s = d1[near] + d2[near]
        w[near] += (w0 * np.exp(-(s * s) / (2.0 * sigma * sigma))).astype(np.float32)
    return w


# ----------------------------------------------------------------------------- cropping


def crop_start(length: int, size: int, centre: float | None) -> int:
    """Start of a ``size`` window on an axis of ``length`` pixels, centred near ``centre``.

    The window is moved to lie inside the image when it fits (so a lesion near the edge is
    still covered); an axis shorter than ``size`` gets the image centred in the window (the
    start is negative; :func:`crop_or_pad` pads). ``centre=None`` centres the window.
    """
    if length < size:
        return -((size - length) // 2)
    if centre is None:
        centre = length / 2.0
    start = int(math.floor(centre)) - size // 2
    return min(max(start, 0), length - size)


def crop_or_pad(array: np.ndarray, start: Sequence[int], size: Sequence[int], value: float = 0) -> np.ndarray:
    """Cut the window ``[start, start + size)`` of the last two axes, padding with ``value`` outside.

    Args:
        array: ``(..., H, W)``.
        start: window start per spatial axis (may be negative or run past the end).
        size: ``(h, w)`` window size.
        value: constant for pixels outside the image.

    Returns:
        ``(..., h, w)`` array of the input's dtype.
    """
    array = np.asarray(array)
    if array.ndim < 2:
        raise ValueError(f"crop_or_pad expects an array (..., H, W), got shape {array.shape}")
    h, w = (int(s) for s in size)
    sy, sx = (int(s) for s in start)
    height, width = array.shape[-2:]
    out = np.full((*array.shape[:-2], h, w), value, dtype=array.dtype)
    y0, y1 = max(sy, 0), min(sy + h, height)
    x0, x1 = max(sx, 0), min(sx + w, width)
    if y1 > y0 and x1 > x0:
        out[..., y0 - sy : y1 - sy, x0 - sx : x1 - sx] = array[..., y0:y1, x0:x1]
    return out
