"""``medseg predict --merge OUTPUT_DIR``: unite the part manifests of hand-started ``--num-parts`` runs.

Each of N parts (``--num-parts N --part-id K``, on as many machines as there are) writes its own
``manifest-partK-of-N.sqlite`` into the shared OUTPUT_DIR; once they have run, ``--merge`` writes
``manifest.sqlite`` holding every case and file (under ``torchrun`` rank 0 does this itself). The merge
holds the folder's lock (``manifest.lock``) and names the parts that are missing or did not finish.

Example:
    >>> result = merge_parts("predictions")
    >>> print(result.summary)
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from medseg.data.base import DataError
from medseg.io import exclusive_lock
from medseg.predict.manifest import Manifest, manifest_name, merge_manifests, part_counts
from medseg.predict.run import PredictResult, summary_table

__all__ = ["merge_parts", "unfinished_parts"]


def unfinished_parts(output_dir: str | Path, num_parts: int) -> list[int]:
    """The parts of N whose manifest is missing or does not say the part finished."""
    out = []
    for k in range(num_parts):
        p = Path(output_dir) / manifest_name(num_parts, k)
        row = None
        if p.is_file():
            with sqlite3.connect(str(p)) as db:
                row = db.execute("SELECT value FROM run WHERE key = 'finished'").fetchone()
        if not (row and row[0]):
            out.append(k)
    return out


def merge_parts(output_dir: str | Path) -> PredictResult:
    """Merge the part manifests found in OUTPUT_DIR into ``manifest.sqlite`` and summarise it.

    Raises:
        DataError: OUTPUT_DIR holds no part manifest, or parts of different N.
    """
    start = time.perf_counter()
    out = Path(output_dir)
    ns = part_counts(out)
    if len(ns) != 1:
        raise DataError(f"{out}: " + ("no manifest-partK-of-N.sqlite to merge" if not ns else
                                       f"part manifests of different --num-parts ({ns}); remove the stale ones"))
    n = ns[0]
    with exclusive_lock(out / Path(manifest_name()).with_suffix(".lock"), "medseg predict --merge"):
        missing = unfinished_parts(out, n)
        path = merge_manifests(out, n)
        result = PredictResult(out, path)
        m = Manifest(path)
        for r in m.rows("series"):
            if r["status"] == "done":
                result.already_done.append(r["key"])
            elif r["status"] == "failed":
                result.failed[r["key"]] = r["reason"] or ""
        result.counts = m.counts()
        result.seconds = time.perf_counter() - start
        result.summary = summary_table(m, result)
        if missing:
            result.summary += f"\nparts not finished (or missing): {missing} of {n}; rerun them, then --merge again"
        m.close()
    return result
