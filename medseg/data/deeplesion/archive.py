"""DeepLesion images as distributed: ``Images_png/<series>/<n>.png`` unpacked or in the 56 zips.

:class:`ImageSource` reads slice ``n`` of a series folder from ``root/Images_png/`` and/or the
archives ``root/Images_png_01.zip`` … ``Images_png_56.zip`` (read in place, members
``Images_png/<series>/<n>.png``; the folder wins where both hold a slice), as HU. An unreadable
or missing slice is warned about once and read as None.

Example:
    >>> src = ImageSource(Path("DeepLesion"))  # doctest: +SKIP
    >>> src.read("000001_01_01", 109).shape  # doctest: +SKIP
    (512, 512)
"""

from __future__ import annotations

import functools
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medseg.data.base import DataError, log
from medseg.data.deeplesion.format import png_to_hu

__all__ = ["ImageSource"]

_MEMBER_RE = re.compile(r"^Images_png/(\d+_\d+_\d+)/(\d+)\.png$")


@functools.lru_cache(maxsize=4)
def _zip_index(zips: tuple[tuple[str, int, int], ...]) -> dict[str, tuple[int, ...]]:
    """Series folder → indices (into ``zips``) of the archives holding its slices.

    Indexed per series rather than per member: about a million member names would cost far more
    memory, and each ZipFile keeps its own name table anyway.
    """
    index: dict[str, list[int]] = {}
    for k, (path, _, _) in enumerate(zips):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(
                f"{path}: not a readable zip archive ({e}); expected Images_png/<series>/<n>.png"
            ) from None
        for name in names:
            m = _MEMBER_RE.match(name)
            if m:
                lst = index.setdefault(m.group(1), [])
                if not lst or lst[-1] != k:
                    lst.append(k)
    return {s: tuple(v) for s, v in index.items()}


class ImageSource:
    """Reads ``<series>/<n>.png`` from ``Images_png/`` and/or the ``Images_png_*.zip`` archives.

    Zip handles are opened lazily per process: DataLoader workers fork, and a handle shared with
    the parent would share its file position.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "Images_png"
        self.has_folder = self.folder.is_dir()
        self.zips = sorted(root.glob("Images_png_*.zip"))
        if not self.has_folder and not self.zips:
            raise DataError(
                f"{root}: no images: expected an Images_png/ folder (Images_png/<series>/<n>.png) "
                "or the archives Images_png_01.zip … Images_png_56.zip"
            )
        stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.zips)
        self.series_zips = _zip_index(stats) if self.zips else {}
        self._handles: dict[int, zipfile.ZipFile] = {}
        self._pid = os.getpid()
        self._warned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, k: int) -> zipfile.ZipFile:
        """This process' handle on zip ``k``."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = zipfile.ZipFile(self.zips[k])
        return self._handles[k]

    def warn(self, source: str, why: str) -> None:
        """Warn once per file and process."""
        if source not in self._warned:
            self._warned.add(source)
            log.warning("%s: %s; skipping it", source, why)

    def key_source(self, series: str, n: int) -> str:
        """Where slice ``n`` of ``series`` is read from (a path, or ``zip:member``)."""
        rel = f"{series}/{n:03d}.png"
        path = self.folder / rel
        if self.has_folder and (not self.series_zips or path.is_file()):
            return str(path)
        zips = self.series_zips.get(series, ())
        return f"{self.zips[zips[0]]}:Images_png/{rel}" if zips else str(path)

    def files(self, keys: list[tuple[str, int]]) -> list[str]:
        """Files to fingerprint: the archives when reading zips, else the key slices' PNGs."""
        if self.zips:
            return [str(p) for p in self.zips]
        return [str(self.folder / series / f"{n:03d}.png") for series, n in keys]

    def read(self, series: str, n: int) -> np.ndarray | None:
        """Slice ``n`` of ``series`` in HU (int32 ``(H, W)``), or None (with a warning) if unreadable."""
        rel = f"{series}/{n:03d}.png"
        member = f"Images_png/{rel}"
        zips = self.series_zips.get(series, ())
        broken = None
        if self.has_folder:
            path = self.folder / rel
            png = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if png is not None:
                return self._to_hu(png, str(path))
            if path.is_file():
                broken = str(path)  # still try an archive copy, if any
            elif not zips:
                self.warn(str(path), "not found; expected a 16-bit PNG")
                return None
        for k in zips:
            zf = self._handle(k)
            source = f"{self.zips[k]}:{member}"
            try:
                data = zf.read(member)
            except KeyError:
                continue
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
                broken = source
                self.warn(source, f"unreadable zip member ({e}); expected a 16-bit PNG")
                continue
            png = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if png is not None:
                return self._to_hu(png, source)
            broken = source
            self.warn(source, "unreadable or truncated; expected a 16-bit PNG")
        if broken is not None:
            self.warn(broken, "unreadable or truncated; expected a 16-bit PNG")
        else:
            where = f"{self.zips[zips[0]]}:{member}" if zips else str(self.folder / rel)
            self.warn(where, "not found; expected a 16-bit PNG")
        return None

    def _to_hu(self, png: np.ndarray, source: str) -> np.ndarray | None:
        """Check the decoded PNG is single-channel 16-bit and convert it to HU."""
        if png.dtype != np.uint16 or png.ndim != 2:
            self.warn(source, f"{png.ndim}-D {png.dtype} image; expected a 16-bit PNG (single channel)")
            return None
        return png_to_hu(png)
