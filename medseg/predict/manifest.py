"""The run manifest of ``medseg predict``: an SQLite file in OUTPUT_DIR.

Two tables:

* ``series`` — one row per case (DICOM stack, NIfTI volume, image): ``status`` is ``pending``,
  ``done``, ``skipped`` or ``failed``, with ``reason`` / ``error``, the output folder and timings
  (read, predict, write, total seconds).
  ``stored`` / ``store_answer``: what ``--store-back`` sent (SEG / SR SOP instance UIDs and the
  destination, no credentials) and the server's answer (older manifests gain the columns on open).
* ``files`` — one row per input file: the case it belongs to and its status (the case's), or
  ``skipped`` with the reason it was not used.

A rerun skips ``done`` cases whose output folder exists and retries the rest. With ``--num-parts N``
each part writes ``manifest-partK-of-N.sqlite``; :func:`merge_manifests` unites them into
``manifest.sqlite``. Paths are stored relative to INPUT; nothing from a header but hashed UIDs.

Every update is one SQLite transaction: a full disk or an I/O error rolls it back (the manifest keeps
its last committed state) and raises :class:`medseg.io.WriteError` naming the manifest, never a raw
``sqlite3.OperationalError``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medseg.io import write_error_of

__all__ = ["Manifest", "manifest_name", "merge_manifests"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    key TEXT PRIMARY KEY, kind TEXT, output TEXT, n_files INTEGER, n_slices INTEGER,
    status TEXT, reason TEXT, read_s REAL, predict_s REAL, write_s REAL, total_s REAL,
    n_lesions INTEGER, updated REAL, stored TEXT, store_answer TEXT
);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, series TEXT, status TEXT, reason TEXT
);
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT);
"""

#: series columns added after the first release (store-back: what was sent where, and the answer)
_ADDED_COLUMNS = ("stored", "store_answer")


def manifest_name(num_parts: int = 1, part_id: int = 0) -> str:
    """``manifest.sqlite``, or ``manifest-partK-of-N.sqlite`` for one of N parts."""
    return "manifest.sqlite" if num_parts == 1 else f"manifest-part{part_id}-of-{num_parts}.sqlite"


class Manifest:
    """The SQLite manifest (one connection, each update committed at once)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self._writing():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self.db.executescript(_SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(series)")}
            for col in _ADDED_COLUMNS:  # a manifest written before the column existed
                if col not in have:
                    self.db.execute(f"ALTER TABLE series ADD COLUMN {col} TEXT")

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A full disk / I/O error / read-only file system → :class:`medseg.io.WriteError` for the manifest."""
        try:
            yield
        except (sqlite3.Error, OSError) as e:
            we = write_error_of(e, self.path)
            if we is None or we is e:
                raise
            raise we from e

    def close(self) -> None:
        self.db.close()

    def status(self, key: str) -> str | None:
        row = self.db.execute("SELECT status FROM series WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_series(self, key: str, **fields: Any) -> None:
        """Insert or update a case's row (``status``, ``reason``, timings ...)."""
        fields["updated"] = time.time()
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{c} = excluded.{c}" for c in fields)
        with self._writing():
            self.db.execute(f"INSERT INTO series (key, {cols}) VALUES (?, {marks}) ON CONFLICT(key) DO UPDATE SET {updates}",
                            (key, *fields.values()))

    def set_files(self, rows: list[tuple[str, str | None, str, str | None]]) -> None:
        """``(path, series key, status, reason)`` rows, inserted or replaced in one transaction."""
        with self._writing(), self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO files (path, series, status, reason) VALUES (?, ?, ?, ?)", rows)

    def set_files_of(self, key: str, status: str, reason: str | None = None) -> None:
        with self._writing():
            self.db.execute("UPDATE files SET status = ?, reason = ? WHERE series = ?", (status, reason, key))

    def set_run(self, **values: Any) -> None:
        with self._writing():
            for k, v in values.items():
                self.db.execute("INSERT OR REPLACE INTO run (key, value) VALUES (?, ?)", (k, str(v)))

    def rows(self, table: str) -> list[dict[str, Any]]:
        cur = self.db.execute(f"SELECT * FROM {table} ORDER BY 1")  # noqa: S608 — table names are ours
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{"series": {status: n}, "files": {status: n}}``."""
        out: dict[str, dict[str, int]] = {}
        for table in ("series", "files"):
            out[table] = dict(self.db.execute(f"SELECT status, COUNT(*) FROM {table} GROUP BY status").fetchall())
        return out


def merge_manifests(output_dir: Path, num_parts: int) -> Path:
    """Unite the part manifests of OUTPUT_DIR into ``manifest.sqlite`` (a later part's row wins)."""
    target = Manifest(Path(output_dir) / manifest_name())
    for k in range(num_parts):
        part = Path(output_dir) / manifest_name(num_parts, k)
        if not part.is_file():
            continue
        m = Manifest(part)
        for r in m.rows("series"):
            key = r.pop("key")
            target.set_series(key, **{c: v for c, v in r.items() if c != "updated"})
        target.set_files([(r["path"], r["series"], r["status"], r["reason"]) for r in m.rows("files")])
        m.close()
    target.close()
    return Path(output_dir) / manifest_name()
