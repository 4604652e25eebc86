"""The one way medseg writes a file: atomically, durably.

Every file medseg writes (checkpoints, run configs, evaluation tables, predict outputs, previews, the
generated datasets) goes through :func:`atomic_write_bytes` or a helper built on it: the bytes go to a
temporary file in the same folder, are flushed and ``fsync``'d, then renamed over the target name, and
the folder itself is ``fsync``'d so the rename survives a power cut. A process killed at any moment
leaves either the old file or the new one, never a half-written one. A folder of outputs that must
appear whole or not at all (a ``medseg predict`` case) is filled under a temporary name and renamed
into place by :func:`atomic_dir`.

A write that fails for a reason outside medseg — a full disk (``ENOSPC``, ``EDQUOT``), an I/O error
(``EIO``), a read-only file system (``EROFS``) — raises :class:`WriteError` (an ``OSError``) naming the
path, the reason and, where known, the bytes it needed and the bytes free; the old file stays, the
temporary is removed, and ``medseg`` ends with that one line and its exit code (``medseg/cli.py``).

One writer per folder: :func:`exclusive_lock` takes an ``flock`` on a lock file (the kernel releases
it when its holder dies, even by ``kill -9``) and writes the holder (host, pid, start time, command)
into it; a second taker gets :class:`FolderBusy` naming that holder. A lock file left by a dead
process is free, so it never blocks a rerun.

Example:
    >>> atomic_write_text(Path("out/config.yaml"), text)
    >>> with atomic_path(Path("out/mask.nii.gz")) as tmp:   # for writers that want a file name
    ...     nib.save(img, tmp)
    >>> with atomic_dir(Path("out/study-1/series-2")) as folder:   # a whole folder, all or nothing
    ...     atomic_write_text(folder / "series.json", text)
    >>> with exclusive_lock(Path("out/.manifest.sqlite.lock"), "medseg predict"):   # FolderBusy if taken
    ...     ...
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["WRITE_ERRNOS", "FolderBusy", "WriteError", "atomic_dir", "atomic_path", "atomic_torch_save",
           "atomic_write_chunks",
           "atomic_write_bytes", "atomic_write_text", "exclusive_lock", "fsync_dir", "tmp_name", "write_error_of",
           "write_rows_csv"]

#: the errnos of a write that failed for a reason outside medseg (what :class:`WriteError` stands for)
WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EIO: "input/output error", errno.EROFS: "read-only file system"}
_SQLITE_ERRNO = {13: errno.ENOSPC, 10: errno.EIO, 8: errno.EROFS}  # SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


class WriteError(OSError):
    """A write that failed for a reason outside medseg: ``errno``, ``filename`` (the path), ``needed``
    (the bytes it was writing, when known) and ``free`` (the bytes free there, when known).

    ``str()`` is the one line ``medseg`` prints, e.g. ``no space left on device writing out/a/mask.nii.gz
    (1.2 MB needed, 0.3 MB free)``.
    """

    def __init__(self, path: str | Path, err: int, needed: int | None = None) -> None:
        super().__init__(err, WRITE_ERRNOS.get(err, os.strerror(err)), str(path))
        self.needed = needed
        self.free = _free_bytes(Path(path)) if err in (errno.ENOSPC, errno.EDQUOT) else None

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (a worker's failure reaches its parent whole)
        return (type(self), (self.filename, self.errno, self.needed))

    def __str__(self) -> str:
        space = [f"{_size(n)} {w}" for n, w in ((self.needed, "needed"), (self.free, "free")) if n is not None]
        return f"{self.strerror} writing {self.filename}" + (f" ({', '.join(space)})" if space else "")


def write_error_of(e: BaseException, path: str | Path | None = None, needed: int | None = None) -> WriteError | None:
    """``e`` as a :class:`WriteError` when it is one: an ``OSError`` with an errno of :data:`WRITE_ERRNOS`,
    or an SQLite error "database or disk is full" / I/O / read-only (the path: ``path`` or the error's own)."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return WriteError(path or e.filename or "?", e.errno, needed)
    code = getattr(e, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _SQLITE_ERRNO:
        return WriteError(path or "an SQLite database", _SQLITE_ERRNO[code & 0xFF], needed)
    return None


@contextlib.contextmanager
def _writing(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a failing write's ``OSError`` (full disk, I/O error, read-only) into a :class:`WriteError` for ``path``."""
    try:
        yield
    except OSError as e:
        we = write_error_of(e, path, needed)
        if we is None or we is e:
            raise
        raise we from e


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
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    try:
        with _writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
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
    with _writing(tmp):
        tmp.mkdir(parents=True)
    try:
        with _writing(path):
            yield tmp
    except WriteError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what the failed case took
        inside = Path(str(e.filename))
        if inside.is_relative_to(tmp):  # name the file as the user will look for it
            raise WriteError(path / inside.relative_to(tmp), e.errno, e.needed) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(tmp)
    if path.exists():
        shutil.rmtree(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: temporary file, fsync, rename, fsync of the folder.

    Raises:
        WriteError: the disk is full, an I/O error, a read-only file system (the old file is kept).
    """
    atomic_write_chunks(path, [data], len(data))


def atomic_write_chunks(path: Path, chunks: Iterable[bytes | bytearray | memoryview], size: int | None = None
                        ) -> int:
    """Write the concatenated ``chunks`` to ``path`` as :func:`atomic_write_bytes` writes one buffer, one
    chunk at a time as the iterable makes them (a file larger than what a writer keeps in memory: a
    streamed CSV, a PNG encoded by bands). ``size``: the whole file's length where known (for the full
    disk's message). Returns the bytes written.

    Raises:
        WriteError: the disk is full, an I/O error, a read-only file system (the old file is kept).
    """
    path = Path(path)
    tmp = tmp_name(path)
    written = 0
    try:
        with _writing(path, size):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:  # os.write: the one system call every medseg file goes through
                        n = os.write(fd, view)
                        written += n
                        view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return written


def atomic_write_text(path: Path, text: str) -> None:
    """Write text (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` of ``obj`` to ``path`` atomically (serialised in memory, then :func:`atomic_write_bytes`:
    a full disk is a :class:`WriteError` and the old checkpoint stays)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getbuffer())


def write_rows_csv(rows: Iterable[dict[str, Any]], path: Path, fieldnames: Sequence[str] | None = None,
                   chunk_rows: int = 4096) -> None:
    """Rows as a CSV file, written atomically a chunk of ``chunk_rows`` rows at a time (never the whole
    text in memory). ``fieldnames``: the columns, in order (keys of a row outside them are not written;
    the header is written even with no rows); None: the first row's keys (no rows: an empty file)."""

    def chunks() -> Iterator[bytes]:
        buf = io.StringIO()
        writer = None
        if fieldnames is not None:
            writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore")
            writer.writeheader()
        for n, row in enumerate(rows, start=1):
            if writer is None:
                writer = csv.DictWriter(buf, fieldnames=list(row.keys()))
                writer.writeheader()
            writer.writerow(row)
            if n % chunk_rows == 0:
                yield buf.getvalue().encode()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue().encode()

    atomic_write_chunks(Path(path), chunks())


# ----------------------------------------------------------------------------- one writer per folder


class FolderBusy(RuntimeError):
    """Another live process holds the lock: ``path`` (the lock file), ``what`` and ``holder`` (its line)."""

    def __init__(self, path: Path, what: str, holder: str) -> None:
        super().__init__(f"{path.parent} is in use by another {what} ({holder}); wait for it to end, "
                         f"or use another folder")
        self.path, self.what, self.holder = path, what, holder


def _holder_line(fd: int) -> str:
    """The holder's record in the lock file, as text (it may be a moment behind its flock)."""
    for _ in range(20):
        try:
            h = json.loads(os.pread(fd, 65536, 0) or b"null")
        except (OSError, ValueError):
            h = None
        if isinstance(h, dict):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h.get("started", 0))))
            return f"host {h.get('host')}, pid {h.get('pid')}, started {started}, command: {h.get('command')}"
        time.sleep(0.05)
    return "holder unknown"


def _command() -> str:
    """This process's command line, with any URI user-info (``user:password@``) masked."""
    argv = list(sys.argv)
    if argv and (argv[0].endswith("__main__.py") or Path(argv[0]).name == "medseg"):
        argv[0] = "medseg"
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", shlex.join(argv))[:500]


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on the lock file ``path`` for the ``with`` block (see the module doc).

    The lock dies with the process (the kernel drops it, even on ``kill -9``); the file itself stays
    (emptied on a clean exit): removing it would let a third process lock a new file while a second
    still holds the old one.

    Args:
        path: the lock file (created with its folder).
        what: the holder's kind for the refusal, e.g. ``"medseg predict"``.

    Raises:
        FolderBusy: a live process holds it; the message names its host, pid, start time and command.
    """
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(path, what, _holder_line(fd)) from None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "command": _command()}
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, its record is empty
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)
