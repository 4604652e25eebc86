"""Reading image files: 2-D PNG / TIFF / NIfTI images and masks, and 3-D NIfTI volumes.

The file readers the ``folder`` / ``nifti`` datasets and ``medseg predict`` share:

* :func:`file_stem` names a case by its file name without :data:`SUFFIXES_2D` / :data:`SUFFIXES_3D`.
* :func:`read_image_2d` reads a 2-D image in its stored dtype (colour → grayscale, BT.601 luma);
  :func:`read_mask_2d` a 2-D mask as a class map; :func:`image_shape` the size from the header.
* :func:`normalise_2d` maps 2-D image intensities to [0, 1] (dtype range, or ``window_range``).
* :func:`load_canonical` reads a 3-D NIfTI volume in the closest canonical (RAS+) orientation.

Every reader raises :class:`~medseg.data.base.DataError` naming the file when it cannot read it.

Example:
    >>> arr, colour = read_image_2d(Path("images/case01.png"))   # (H, W) uint8 / uint16 / float
    >>> img = normalise_2d(arr, "fixed", [-1000, 1000])           # float32 in [0, 1]
    >>> file_stem("case01.nii.gz", SUFFIXES_3D)                   # "case01"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.base import DataError, apply_window, mask_to_classes

__all__ = [
    "SUFFIXES_2D",
    "SUFFIXES_3D",
    "file_stem",
    "image_shape",
    "intensity_range",
    "is_nifti",
    "load_canonical",
    "nifti_2d",
    "normalise_2d",
    "read_image_2d",
    "read_mask_2d",
]

#: suffixes stripped to form a case stem (longest first, so ``.nii.gz`` wins over ``.gz``)
SUFFIXES_2D = (".nii.gz", ".nii", ".png", ".tiff", ".tif")
SUFFIXES_3D = (".nii.gz", ".nii")


def file_stem(name: str, suffixes: tuple[str, ...]) -> str | None:
    """The case stem of a file name, or None when its suffix is not one of ``suffixes``."""
    low = name.lower()
    for suf in suffixes:
        if low.endswith(suf):
            return name[: -len(suf)]
    return None



def is_nifti(path: Path) -> bool:
    """True for ``.nii`` / ``.nii.gz``."""
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _nifti_2d_axes(shape: tuple[int, ...], path: Path) -> list[int]:
    """The two axes of a 2-D NIfTI (extra axes must be singletons, e.g. ``(H, W, 1)``)."""
    axes = [0, 1] if len(shape) == 2 else [a for a, s in enumerate(shape) if s != 1]
    if len(axes) != 2 or (len(shape) > 2 and axes[1] > 2):
        raise DataError(
            f"{path}: NIfTI of shape {tuple(shape)} is not a 2-D image; 3-D volumes belong to data.name: nifti"
        )
    return axes


def nifti_2d(path: Path) -> tuple[np.ndarray, list[float]]:
    """A 2-D NIfTI's array (as stored, scaled by the header) and its spacing along both axes."""
    import nibabel as nib

    img = nib.load(str(path))
    axes = _nifti_2d_axes(img.shape, path)
    arr = np.asanyarray(img.dataobj).reshape([img.shape[a] for a in axes])
    zooms = [float(z) for z in img.header.get_zooms()]
    return arr, [zooms[a] if a < len(zooms) else 1.0 for a in axes]


def image_shape(path: Path) -> tuple[int, int]:
    """``(H, W)`` of a 2-D image from its header only (PNG, TIFF, NIfTI)."""
    try:
        if is_nifti(path):
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(str(path)).shape)
            a, b = _nifti_2d_axes(shape, path)
            return shape[a], shape[b]
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
            return h, w
        import tifffile

        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            axes, shape = series.axes, series.shape
        return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read the image header ({type(e).__name__}: {e}); "
                        f"expected a 2-D PNG, TIFF or NIfTI file") from None


def read_image_2d(path: Path) -> tuple[np.ndarray, bool]:
    """Read a 2-D image in its stored dtype; colour is converted to grayscale (BT.601 luma).

    Returns:
        ``(array (H, W), was_colour)``.

    Raises:
        DataError: unreadable file or not a 2-D image.
    """
    import cv2

    arr = _read_raw_2d(path)
    if arr.ndim == 2:
        return arr, False
    c = arr.shape[-1]
    if c == 2:  # gray + alpha: the alpha is not an intensity
        return arr[..., 0], False
    code = cv2.COLOR_RGB2GRAY if c == 3 else cv2.COLOR_RGBA2GRAY
    if arr.dtype in (np.uint8, np.uint16, np.float32):
        return cv2.cvtColor(np.ascontiguousarray(arr), code), True
    w = np.array([0.299, 0.587, 0.114])
    return (arr[..., :3].astype(np.float64) @ w).astype(np.float32), True


def _read_raw_2d(path: Path) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` (RGB order) array of a PNG / TIFF / NIfTI file."""
    try:
        if is_nifti(path):
            return nifti_2d(path)[0]
        if path.suffix.lower() == ".png":
            import cv2

            # imdecode (not imread) so that non-ASCII paths work; UNCHANGED keeps 16 bit and
            # never expands grayscale to three channels
            buf = np.fromfile(path, dtype=np.uint8)
            arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise DataError(f"{path}: not a readable PNG image")
            if arr.ndim == 3:  # OpenCV gives BGR(A)
                arr = arr[..., [2, 1, 0] + ([3] if arr.shape[-1] == 4 else [])]
            return arr
        import tifffile

        arr = tifffile.imread(path)
        while arr.ndim > 2 and arr.shape[0] == 1:  # leading page / sample axes of length 1
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)  # planar RGB
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (2, 3, 4)):
            return arr
        raise DataError(f"{path}: TIFF of shape {arr.shape} is not one 2-D (grayscale or RGB) image")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e}); "
                        f"expected a 2-D PNG, TIFF or NIfTI file") from None


def read_mask_2d(path: Path, num_classes: int) -> np.ndarray:
    """Read a 2-D mask as a class map (see :func:`mask_to_classes`); a colour mask must be gray.

    Raises:
        DataError: unreadable, colour with differing channels, or bad values (names the file).
    """
    if path.suffix.lower() == ".png":
        from PIL import Image

        try:
            with Image.open(path) as im:
                palette = im.mode == "P"
                # palette PNGs (VOC-style masks) store the class as the palette index; decoding
                # them to colours would lose it
                arr = np.array(im) if palette else None
        except Exception as e:
            raise DataError(f"{path}: cannot read the mask ({type(e).__name__}: {e}); expected a PNG") from None
        if arr is not None:
            return mask_to_classes(arr, num_classes, path)
    arr = _read_raw_2d(path)
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(f"{path}: colour mask; expected a single-channel label image (0 = background, 1..K)")
        arr = rgb[..., 0]
    return mask_to_classes(arr, num_classes, path)


def normalise_2d(arr: np.ndarray, window: str, window_range: list[float]) -> np.ndarray:
    """Intensities → [0, 1]: ``window_range`` when ``window == "fixed"``, else the dtype's range.

    Integer images map their dtype's full range (uint8 0..255, uint16 0..65535, int16
    −32768..32767) to [0, 1]; float images (no dtype range) use their own min..max
    (:func:`intensity_range`); NaN counts as 0.
    """
    rng = intensity_range(arr, window, window_range)
    if rng is None:
        return np.zeros(arr.shape, np.float32)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating) and window != "fixed":
        # float32 at once (apply_window computes in float32 anyway): no float64 copy of a large image
        arr = np.nan_to_num(arr.astype(np.float32), copy=False)
    return apply_window(arr, *rng)


def intensity_range(arr: np.ndarray, window: str, window_range: list[float]) -> tuple[float, float] | None:
    """The ``(low, high)`` that :func:`normalise_2d` maps to ``[0, 1]``, or None for a float image with no
    range (constant or not finite: all zeros)."""
    if window == "fixed":
        return float(window_range[0]), float(window_range[1])
    if arr.dtype == bool:
        return 0.0, 1.0
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return float(info.min), float(info.max)
    lo, hi = np.inf, -np.inf
    for a in range(0, arr.shape[0], 1024):  # a band of rows at a time: no mask or copy of the whole image
        band = arr[a: a + 1024]
        finite = band[np.isfinite(band)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if hi > lo else None


def load_canonical(path: Path, what: str) -> Any:
    """``nib.as_closest_canonical(nib.load(path))`` with a clear error."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
    except Exception as e:
        raise DataError(f"{path}: cannot read the NIfTI {what} ({type(e).__name__}: {e}); "
                        f"expected a 3-D .nii or .nii.gz volume") from None
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise DataError(f"{path}: NIfTI {what} of shape {img.shape}; expected a 3-D volume")
    return img

