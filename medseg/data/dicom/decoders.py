"""Pixel-data decoders for every transfer syntax a PACS sends, through pydicom's plugin system.

pydicom decodes a compressed transfer syntax with the first of its plugins that is installed and
succeeds. medseg depends on these packages (all under licences compatible with Apache-2.0):

==================================== ============================================ ===================
transfer syntax                      decoded by (first that succeeds)             licence
==================================== ============================================ ===================
Implicit / Explicit VR, big endian   pydicom (native)                             MIT
Deflated Explicit VR Little Endian   pydicom (zlib)                               MIT
RLE Lossless                         pylibjpeg-rle, else pydicom (pure Python)    MIT
JPEG Baseline (8-bit)                python-gdcm, Pillow, imagecodecs             BSD/Apache, MIT-CMU, BSD-3
JPEG Extended (12-bit)               imagecodecs (libjpeg-turbo 3)                BSD-3
JPEG Lossless (Process 14, SV1)      python-gdcm, imagecodecs                     BSD/Apache, BSD-3
JPEG-LS lossless / near-lossless     pyjpegls (CharLS), python-gdcm               MIT, BSD/Apache
JPEG 2000 lossless / lossy, HTJ2K    pylibjpeg-openjpeg, python-gdcm, Pillow      MIT, BSD/Apache
==================================== ============================================ ===================

pylibjpeg-libjpeg (the usual JPEG plugin of pylibjpeg) is GPL-3.0 and is deliberately not used.
pydicom's GDCM and Pillow plugins refuse 12-bit JPEG Extended (the GDCM wheel is built without
12-bit libjpeg); :func:`register_decoders` adds a small plugin built on imagecodecs, whose
libjpeg-turbo 3 decodes 12-bit and lossless JPEG, after pydicom's own plugins. It is registered
when :mod:`medseg.data.dicom` (its :mod:`~medseg.data.dicom.series` module) is imported.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from pydicom import uid

__all__ = ["DECODER_TABLE", "DECODER_DEPENDENCIES", "is_available", "register_decoders"]

#: the transfer syntaxes the imagecodecs plugin serves (pydicom's plugin contract)
DECODER_DEPENDENCIES = {
    uid.JPEGBaseline8Bit: ("imagecodecs>=2024.1",),
    uid.JPEGExtended12Bit: ("imagecodecs>=2024.1",),
    uid.JPEGLossless: ("imagecodecs>=2024.1",),
    uid.JPEGLosslessSV1: ("imagecodecs>=2024.1",),
}

#: (transfer syntax, packages that decode it in the order pydicom tries them) — for docs and checks
DECODER_TABLE: list[tuple[str, str]] = [
    (uid.ImplicitVRLittleEndian, "pydicom"),
    (uid.ExplicitVRLittleEndian, "pydicom"),
    (uid.ExplicitVRBigEndian, "pydicom"),
    (uid.DeflatedExplicitVRLittleEndian, "pydicom"),
    (uid.RLELossless, "pylibjpeg-rle, pydicom"),
    (uid.JPEGBaseline8Bit, "python-gdcm, Pillow, imagecodecs"),
    (uid.JPEGExtended12Bit, "imagecodecs (8-bit also python-gdcm, Pillow)"),
    (uid.JPEGLossless, "python-gdcm, imagecodecs"),
    (uid.JPEGLosslessSV1, "python-gdcm, imagecodecs"),
    (uid.JPEGLSLossless, "pyjpegls, python-gdcm"),
    (uid.JPEGLSNearLossless, "pyjpegls, python-gdcm"),
    (uid.JPEG2000Lossless, "pylibjpeg-openjpeg, python-gdcm, Pillow"),
    (uid.JPEG2000, "pylibjpeg-openjpeg, python-gdcm, Pillow"),
    (uid.HTJ2KLossless, "pylibjpeg-openjpeg"),
    (uid.HTJ2K, "pylibjpeg-openjpeg"),
]

_LABEL = "medseg-imagecodecs"
_registered = False


def is_available(transfer_syntax: str) -> bool:
    """pydicom plugin contract: True when imagecodecs is installed and serves ``transfer_syntax``."""
    return transfer_syntax in DECODER_DEPENDENCIES and importlib.util.find_spec("imagecodecs") is not None


def decode_frame(src: bytes, runner: Any) -> bytes:
    """pydicom plugin contract: one encoded JPEG frame → raw little-endian pixel bytes (grayscale only)."""
    import imagecodecs
    import numpy as np

    if runner.samples_per_pixel != 1:
        # colour JPEG needs pydicom's colour-space bookkeeping; the other plugins handle it
        raise NotImplementedError("the medseg imagecodecs plugin decodes grayscale JPEG only")
    arr = np.asarray(imagecodecs.jpeg8_decode(src))
    if arr.ndim != 2:
        raise ValueError(f"decoded JPEG frame has shape {arr.shape}; expected one grayscale frame")
    bits = 8 if arr.dtype.itemsize == 1 else 16
    runner.set_option("bits_allocated", bits)
    # the bytes as decoded; pydicom applies PixelRepresentation (sign) when it builds the array
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def register_decoders() -> None:
    """Add the imagecodecs JPEG plugin to pydicom's decoders (after its own plugins); idempotent."""
    global _registered
    if _registered:
        return
    from pydicom.pixels.decoders.base import get_decoder

    for ts in DECODER_DEPENDENCIES:
        dec = get_decoder(ts)
        if _LABEL not in dec._available and _LABEL not in dec._unavailable:
            dec.add_plugin(_LABEL, ("medseg.data.dicom.decoders", "decode_frame"))
    _registered = True
