"""An archive's instance headers in an SQLite file: :func:`find_series`'s reduce without holding them all.

:func:`index_headers` is :func:`medseg.data.dicom.group_headers` for an archive of 10⁵–10⁶ series
(``medseg predict --engine ray``): the header records stream, in path order, into the file (one row
per image file: its SOPInstanceUID, series, path and instance headers; batched transactions in WAL
mode; an index on the series), and the reduce keeps in memory only a small summary per series (its
UIDs and description, and per stack of one orientation and image size: the first file, the common
folder, the counts). The duplicate check is the file's: ``sop`` is UNIQUE, so the first file in path
order wins and a later one is skipped as ``duplicate of <first path>``. SEG / RTSTRUCT attachment
(:func:`~medseg.data.dicom.discover.attach_labels`) and the orientation split
(:func:`~medseg.data.dicom.discover.split_parts`) are the in-memory reduce's own code, so the series
and skipped files are the same.

Each series' ``instances`` (and its :attr:`SeriesInfo.distinct_files`) is an :class:`IndexedInstances`:
its length is known, its headers are read from the file each time they are iterated (by the decode
task, on whichever node runs it) and never kept. When the reduce is over the file is switched out of
WAL mode and opened read-only and ``immutable`` by its readers, so that nodes reading it over a
shared file system need no locks and no shared memory.

Example:
    >>> series, skipped = index_headers(root, map(read_header, list_files(root)), out / "headers.sqlite")
    >>> series[0].instances[0]                 # read from the file
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

from medseg.data.dicom.discover import (
    HeaderRecord,
    attach_labels,
    duplicate_reason,
    orientation_name,
    split_parts,
    stack_key,
)
from medseg.data.dicom.records import InstanceHeader, SeriesInfo, SkippedFile

__all__ = ["IndexedFiles", "IndexedInstances", "index_headers"]

_SCHEMA = """
CREATE TABLE files (seq INTEGER PRIMARY KEY, sop TEXT NOT NULL UNIQUE, series TEXT NOT NULL, path TEXT NOT NULL,
                    heads TEXT NOT NULL);
CREATE INDEX files_series ON files (series, seq);
"""
T = TypeVar("T")

#: records per transaction while the index is written
BATCH = 5000


def _encode(heads: list[InstanceHeader]) -> str:
    """An image file's instance headers (one per frame) but their path and SOP UID, as JSON."""
    return json.dumps([[h.position, h.orientation, h.pixel_spacing, h.rows, h.columns, h.slice_thickness, h.frame,
                        h.window] for h in heads])


def _decode(path: str, sop: str, text: str) -> list[InstanceHeader]:
    p = Path(path)
    return [InstanceHeader(p, sop, tuple(pos), tuple(iop), tuple(ps), rows, cols, thick,  # type: ignore[arg-type]
                           frame=frame, window=tuple(win) if win is not None else None)  # type: ignore[arg-type]
            for pos, iop, ps, rows, cols, thick, frame, win in json.loads(text)]


@contextlib.contextmanager
def _reader(index: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a finished index (``immutable``: no locks, no WAL files)."""
    db = sqlite3.connect(Path(index).resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
    try:
        yield db
    finally:
        db.close()


class _Lazy(Sequence[T]):
    """A sequence of known length whose items :meth:`load` reads from the index file on each use."""

    def load(self) -> list[T]:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: Any) -> Any:
        return self.load()[i]

    def __iter__(self) -> Iterator[T]:
        return iter(self.load())


class IndexedInstances(_Lazy[InstanceHeader]):
    """The instance headers of one series (``stack`` None) or one stack of a split series, in path
    order, read from the index file each time they are used (never kept; small to pickle)."""

    def __init__(self, index: Path, series: str, stack: tuple | None, n: int, n_files: int) -> None:
        self.index, self.series, self.stack, self.n, self.n_files = Path(index), series, stack, n, n_files

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"IndexedInstances({self.index}, {self.series}, {self.n} instance(s))"

    def load(self) -> list[InstanceHeader]:
        """The headers, read from the file."""
        with _reader(self.index) as db:
            rows = db.execute("SELECT path, sop, heads FROM files WHERE series = ? ORDER BY seq", (self.series,))
            heads = [h for r in rows for h in _decode(*r)]
        return heads if self.stack is None else [h for h in heads if stack_key(h) == self.stack]

    def files(self) -> IndexedFiles:
        """The files of these instances once each, in path order (lazy as well)."""
        return IndexedFiles(self)


class IndexedFiles(_Lazy[Path]):
    """The distinct files of an :class:`IndexedInstances`, read from the index file when used."""

    def __init__(self, instances: IndexedInstances) -> None:
        self.instances = instances

    def __len__(self) -> int:
        return self.instances.n_files

    def load(self) -> list[Path]:
        """The paths, read from the file."""
        inst = self.instances
        if inst.stack is not None:
            return list(dict.fromkeys(h.path for h in inst.load()))
        with _reader(inst.index) as db:
            return [Path(p) for (p,) in db.execute("SELECT path FROM files WHERE series = ? ORDER BY seq",
                                                   (inst.series,))]


class _Stack:
    """What the reduce keeps of one stack (orientation and image size) of a series."""

    __slots__ = ("first", "folder", "orientation", "n", "n_files", "last")

    def __init__(self, head: InstanceHeader) -> None:
        self.first, self.folder, self.orientation = str(head.path), str(head.path.parent), head.orientation
        self.n = self.n_files = 0
        self.last = -1

    def add(self, seq: int, head: InstanceHeader) -> None:
        self.n += 1
        if seq != self.last:
            self.n_files, self.last = self.n_files + 1, seq
        parent = str(head.path.parent)
        if parent != self.folder:
            self.folder = os.path.commonpath([self.folder, parent])


class _Series:
    """What the reduce keeps of one series: its fields and its stacks (in order of their first instance)."""

    __slots__ = ("fields", "stacks", "n", "n_files")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.stacks: dict[tuple, _Stack] = {}
        self.n = self.n_files = 0

    def add(self, seq: int, heads: list[InstanceHeader]) -> None:
        self.n, self.n_files = self.n + len(heads), self.n_files + 1
        for h in heads:
            key = stack_key(h)
            st = self.stacks.get(key)
            if st is None:
                st = self.stacks[key] = _Stack(h)
            st.add(seq, h)

    def info(self, uid: str, index: Path) -> SeriesInfo:
        f = self.fields
        first = next(iter(self.stacks.values()))
        folder = os.path.commonpath([st.folder for st in self.stacks.values()])
        return SeriesInfo(uid, f["modality"], f["study"], f["for"], f["description"], Path(folder),
                          IndexedInstances(index, uid, None, self.n, self.n_files), body_part=f["body_part"],
                          orientation=orientation_name(first.orientation))

    def parts(self, info: SeriesInfo, index: Path) -> list[SeriesInfo]:
        if len(self.stacks) == 1:
            return [info]
        ordered = sorted(self.stacks.items(), key=lambda kv: kv[1].first)
        return split_parts(info, [(IndexedInstances(index, info.series_uid, key, st.n, st.n_files), Path(st.folder),
                                   st.orientation) for key, st in ordered])


def index_headers(root: Path, records: Iterable[HeaderRecord], index: Path) -> tuple[list[SeriesInfo], list[SkippedFile]]:
    """:func:`medseg.data.dicom.group_headers` with the instance headers streamed into ``index``
    (replaced if it exists): the same series (``instances`` an :class:`IndexedInstances` of the
    file) and the same skipped files. The file must stay until the series' instances are used."""
    index = Path(index)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(str(index), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        skipped: list[SkippedFile] = []
        groups: dict[str, _Series] = {}
        label_cands: list[HeaderRecord] = []
        db.execute("BEGIN")
        for seq, rec in enumerate(records):
            if rec.kind == "skip":
                skipped.append(SkippedFile(rec.path, rec.reason))
                continue
            if rec.kind in ("SEG", "RTSTRUCT"):
                label_cands.append(rec)
                continue
            sop, uid = rec.heads[0].sop_instance_uid, rec.series["uid"]
            cur = db.execute("INSERT OR IGNORE INTO files (seq, sop, series, path, heads) VALUES (?, ?, ?, ?, ?)",
                             (seq, sop, uid, str(rec.path), _encode(rec.heads)))
            if cur.rowcount == 0:  # an earlier file (in path order) holds this SOPInstanceUID
                (first,) = db.execute("SELECT path FROM files WHERE sop = ?", (sop,)).fetchone()
                skipped.append(SkippedFile(rec.path, duplicate_reason(Path(first))))
                continue
            g = groups.get(uid)
            if g is None:
                g = groups[uid] = _Series({k: v for k, v in rec.series.items() if k != "uid"})
            g.add(seq, rec.heads)
            if seq % BATCH == BATCH - 1:
                db.execute("COMMIT")
                db.execute("BEGIN")
        db.execute("COMMIT")
        series = {uid: g.info(uid, index) for uid, g in groups.items()}

        def series_of_sop(sop: str) -> str | None:
            row = db.execute("SELECT series FROM files WHERE sop = ?", (sop,)).fetchone()
            return row[0] if row else None

        attach_labels(root, series, label_cands, series_of_sop, skipped)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("PRAGMA journal_mode=DELETE")  # one plain file for the readers on every node
    finally:
        db.close()
    ordered = sorted(series.values(), key=lambda s: (str(s.folder), s.series_uid))
    return [part for s in ordered for part in groups[s.series_uid].parts(s, index)], skipped
