"""The one way medseg writes a file: atomically, durably.

Every file medseg writes (checkpoints, run configs, evaluation tables, predict outputs, previews, the
generated datasets) goes through :func:`atomic_write_bytes` or a helper built on it: the bytes go to a
temporary file in the same folder, are flushed and ``fsync``'d, then renamed over the target name, and
the folder itself is ``fsync``'d so the rename survives a power cut. A process killed at any moment
leaves either the old file or the new one, never a half-written one. A folder of outputs that must
appear whole or not at all (a ``medseg predict`` case) is filled under a temporary name and renamed
into place by :func:`atomic_dir`.

Example:
    >>> atomic_write_text(Path("out/config.yaml"), text)
    >>> with atomic_path(Path("out/mask.nii.gz")) as tmp:   # for writers that want a file name
    ...     nib.save(img, tmp)
    >>> with atomic_dir(Path("out/study-1/series-2")) as folder:   # a whole folder, all or nothing
    ...     atomic_write_text(folder / "series.json", text)
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_path", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "tmp_name",
           "write_rows_csv"]


def tmp_name(path: Path) -> Path:
    """The temporary name beside ``path`` that this process writes before renaming (hidden, per pid)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """``fsync`` a folder, so that a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file name to write ``path`` through: fsync'd and renamed over ``path`` on success,
    removed on failure (for writers such as ``nibabel.save`` or ``torch.save`` that take a file name).

    The temporary name keeps ``path``'s suffixes (``.nii.gz`` stays gzip for nibabel).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: Path, tmp: Path | None = None) -> Iterator[Path]:
    """A temporary folder to fill; on success it is renamed to ``path``, on failure removed.

    A folder already at ``path`` (an earlier, superseded result) is removed just before the rename, so
    ``path`` holds the old folder, nothing, or the whole new folder — never part of one. Files
    written inside should themselves go through :func:`atomic_write_bytes` (fsync'd).

    Args:
        path: the folder to create or replace.
        tmp: the temporary folder (default: a hidden per-process name beside ``path``); on the same
            file system as ``path``. A folder left there by a killed process is removed first.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(tmp)
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: temporary file, fsync, rename, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` of ``obj`` to ``path`` atomically (see :func:`atomic_path`)."""
    import torch

    with atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)


def write_rows_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows of equal keys as a CSV file (header from the first row), written atomically."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())
