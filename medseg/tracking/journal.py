"""The local tracking journal of a training run and the background sender that drains it to MLflow.

A training run records its metrics, params, tags and run-status changes first into an append-only
JSON-lines file in its folder, ``<run_dir>/tracking/journal.jsonl`` (flushed and fsync'd at every
logging call, i.e. at the log interval), and a daemon thread sends the records, in order, to the
tracking store with ``MlflowClient.log_batch`` — with their original timestamps and steps — and
``update_run`` / ``set_terminated`` for status records. Training never waits on the network: a store
that is away makes the journal grow (one warning per outage, the sender retries every
:data:`RETRY_S`), and when it answers again the rest is sent. How many records the store has is kept
in ``<run_dir>/tracking/sent`` (written atomically after each acknowledged batch), so a process that
ends while the store is away leaves the rest for ``medseg track sync RUN_DIR`` (:func:`sync`) or for
``medseg train --resume``, whose tracker sends it first. Every sender — a run's thread, ``track sync``
in another process — sends a batch and counts it while holding ``<run_dir>/tracking/send.lock`` (a
POSIX record lock, and a thread lock within a process) and starts from the count it reads under it, so
two senders neither send a record twice nor write the count back lower.

Format: the first line is ``{"kind": "run", "run_id": ..., "uri": <redacted URI>}``; then one record
per call: ``{"kind": "metrics", "step": 3, "ts": 1733450000000, "data": {"train/loss": 0.5}}``,
``{"kind": "params", "data": {...}}``, ``{"kind": "tags", "data": {...}}``,
``{"kind": "status", "status": "FINISHED", "ts": ...}``, and artifacts:
``{"kind": "artifact", "call": "file" | "dir" | "text" | "table", "file": <staged copy>, "artifact_path": ...}``.

Artifacts (files, folders such as the MLflow model, texts, tables) are staged when they are logged:
hard-linked (a file of the run folder: medseg replaces files by renaming, so the link keeps the content
logged) or copied into ``<run_dir>/tracking/artifacts/<record number>/``; the sender uploads the staged
copy in its turn (``log_artifact`` / ``log_artifacts`` / ``log_text`` / ``log_table``) and removes it.

Example:
    >>> sync("outputs/quickstart/unet-20261206-101500", "http://mlflow.lab:5000")
    {'run_id': '1d80…', 'sent': 42}
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from medseg.io import atomic_write_bytes, atomic_write_text, write_error_of

log = logging.getLogger("medseg.tracking")

__all__ = ["Journal", "RETRY_S", "journal_path", "read_journal", "send_records", "sync"]

#: seconds between tries of the sender while the store is away
RETRY_S = 5.0
#: a sender whose run has ended stops trying after this long away (the journal stays for ``track sync``)
GIVE_UP_S = 300.0
#: MLflow's limits per log_batch call
_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
_MAX_PARAM = 6000


def journal_path(run_dir: str | Path) -> Path:
    """``<run_dir>/tracking/journal.jsonl``."""
    return Path(run_dir) / "tracking" / "journal.jsonl"


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """``dst`` as a hard link of ``src`` (a snapshot: medseg replaces files by renaming), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        atomic_write_bytes(Path(dst), Path(src).read_bytes())


def stage(source: str | Path, folder: Path) -> Path:
    """Snapshot ``source`` (a file or a folder) into ``folder`` under its own name; returns the copy."""
    source = Path(source)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / source.name
    if source.is_dir():
        shutil.copytree(source, dst, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, dst)
    return dst


def table_frame(rows: list[dict[str, Any]]) -> Any:
    """Rows as the ``pandas.DataFrame`` ``MlflowClient.log_table`` takes (a non-finite number: an empty cell)."""
    import pandas as pd

    def cell(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v.item() if hasattr(v, "item") else v

    return pd.DataFrame([{k: cell(v) for k, v in r.items()} for r in rows])


def read_journal(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(header, records, how many records the store has) of a run folder's journal; a torn last line
    (a process killed mid-write) is ignored."""
    path = journal_path(run_dir)
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if not rows or rows[0].get("kind") != "run":
        raise FileNotFoundError(f"{run_dir}: no tracking journal ({path})")
    return rows[0], rows[1:], _acknowledged(path)


def _acknowledged(path: Path) -> int:
    """The count in the journal's ``sent`` file (0 when there is none)."""
    sent_file = path.with_name("sent")
    return int(sent_file.read_text()) if sent_file.is_file() else 0


#: one thread lock per journal's send.lock path: the senders of one process (POSIX locks do not exclude them)
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _send_lock(path: Path):  # noqa: ANN202 — a context manager
    """Hold the journal's ``send.lock``: a thread lock for the senders of this process, and a POSIX record
    lock (``fcntl.lockf``) for those of other processes. Not ``flock``: its lock belongs to the open file,
    which a process forked meanwhile (a DataLoader worker) shares and keeps — the lock would then outlive
    the sender that took it, and every later send would wait on it for good."""
    name = str(path.with_name("send.lock"))
    with _THREAD_LOCKS_GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(name, threading.Lock())
    with thread_lock:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the record lock


def _first_batch(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The next batch to send: consecutive data records within MLflow's per-call limits, or a status or
    artifact record alone; empty when there are none. Reads only as far as the record that ends the batch
    (a sender sends one batch at a time, so sending a long journal stays linear in its length)."""
    batch: list[dict[str, Any]] = []
    counts = dict.fromkeys(_LIMITS, 0)
    for rec in records:
        kind = rec["kind"]
        n = len(rec.get("data") or {})
        if batch and (kind in ("status", "artifact") or batch[0]["kind"] in ("status", "artifact")
                      or counts[kind] + n > _LIMITS[kind]):
            break
        batch.append(rec)
        if kind in counts:
            counts[kind] += n
    return batch


def _send_artifact(client: Any, run_id: str, rec: dict[str, Any], run_dir: Path) -> None:
    """Upload one staged artifact, then remove its staged copy; a copy that is gone (a machine that
    lost power before the folder reached the disk) is a warning, not a record that blocks the rest."""
    path = run_dir / rec["file"]
    if not path.exists():
        log.warning("tracking journal of %s: the staged artifact %s is gone; it is not sent", run_dir, path)
        return
    call, where = rec["call"], rec.get("artifact_path")
    if call == "file":
        client.log_artifact(run_id, str(path), where)
    elif call == "dir":
        client.log_artifacts(run_id, str(path), where)
    elif call == "text":
        client.log_text(run_id, path.read_text(encoding="utf-8"), where)
    else:
        client.log_table(run_id, data=table_frame(json.loads(path.read_text())), artifact_file=where)
    shutil.rmtree(path.parent, ignore_errors=True)


def send_records(client: Any, run_id: str, batch: list[dict[str, Any]], run_dir: str | Path = ".") -> None:
    """Send one batch of :func:`_first_batch` (raises what the client raises); ``run_dir`` holds the staged
    artifacts."""
    from mlflow.entities import Metric, Param, RunTag

    if batch[0]["kind"] == "artifact":
        _send_artifact(client, run_id, batch[0], Path(run_dir))
        return
    if batch[0]["kind"] == "status":
        rec = batch[0]
        if rec["status"] == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=rec["status"], end_time=rec.get("ts"))
        return
    metrics = [Metric(k, float(v), r["ts"], r["step"]) for r in batch if r["kind"] == "metrics"
               for k, v in r["data"].items()]
    params = [Param(k, str(v)[:_MAX_PARAM]) for r in batch if r["kind"] == "params" for k, v in r["data"].items()]
    tags = [RunTag(k, str(v)) for r in batch if r["kind"] == "tags" for k, v in r["data"].items()]
    if metrics or params or tags:
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)


class Journal:
    """The journal of one run folder and its sender thread.

    Args:
        run_dir: the run folder (``tracking/`` is created in it).
        run_id: the MLflow run the records belong to.
        client: an ``MlflowClient``.
        shown_uri: the store, credentials redacted (journal header, messages).
        on_failure / on_success: called by the sender after a failed / successful send (the tracker's
            one-warning-per-outage bookkeeping).
    """

    def __init__(self, run_dir: str | Path, run_id: str, client: Any, shown_uri: str | None,
                 on_failure: Callable[[Exception, str], None], on_success: Callable[[], None]) -> None:
        self.path = journal_path(run_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_id, self.client = run_id, client
        self.on_failure, self.on_success = on_failure, on_success
        if self.path.is_file():  # a resumed run: what the earlier process did not send goes first
            header, records, self.sent = read_journal(run_dir)
            self.pending = records[self.sent:]
            self.total = len(records)
            self._rewrite_if_torn(header, records)
        else:
            self.sent, self.pending, self.total = 0, [], 0
            atomic_write_text(self.path, json.dumps({"kind": "run", "run_id": run_id, "uri": shown_uri}) + "\n")
        self.failing = False
        self.cond = threading.Condition(threading.RLock())
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)  # open for the run's lifetime
        self.thread: threading.Thread | None = None
        self._wake()

    def _wake(self) -> None:
        """Start the sender thread unless it runs (it ends when the run has ended and all is sent)."""
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="medseg-tracking-sender", daemon=True)
            self.thread.start()

    def _rewrite_if_torn(self, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
        text = self.path.read_text()
        if text and not text.endswith("\n") or len(text.splitlines()) != len(records) + 1:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in [header, *records]))

    def append_artifact(self, call: str, source: str | Path | None = None, text: str | None = None,
                        artifact_path: str | None = None) -> None:
        """Stage an artifact (see the module docstring) and append its record: ``call`` ``"file"`` /
        ``"dir"`` (``source``, uploaded under ``artifact_path``), ``"text"`` / ``"table"`` (``text``, the
        artifact file ``artifact_path``; a table's text is its rows as JSON)."""
        run_dir = self.path.parent.parent
        with self.cond:
            folder = self.path.parent / "artifacts" / f"{self.total + 1:06d}"
            if folder.exists():  # left by a process killed before its record was written
                shutil.rmtree(folder)
            try:
                if source is not None:
                    staged = stage(source, folder)
                else:
                    staged = folder / Path(artifact_path or "artifact").name
                    atomic_write_text(staged, text or "")
                self.append("artifact", call=call, file=str(staged.relative_to(run_dir)), artifact_path=artifact_path)
            except OSError as e:  # a full disk: nothing staged is left behind
                shutil.rmtree(folder, ignore_errors=True)
                we = write_error_of(e, folder)
                if we is None or we is e:  # not a failing write, or already one (the journal's own record)
                    raise
                raise we from e

    def append(self, kind: str, **fields: Any) -> None:
        """Append one record (fsync'd) and wake the sender; never waits on the network.

        Raises:
            medseg.io.WriteError: the disk is full (or an I/O error, a read-only file system); the
                journal is left as it was before the call.
        """
        rec = {"kind": kind, **fields}
        if kind == "metrics":
            rec["data"] = {k: float(v) for k, v in rec["data"].items() if v is not None and math.isfinite(float(v))}
            if not rec["data"]:
                return
        data = (json.dumps(rec, default=str) + "\n").encode()
        with self.cond:
            size = os.fstat(self.fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
                os.fsync(self.fd)
            except OSError as e:  # a full disk: the journal as it was (no torn record), one clear error
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, size)
                we = write_error_of(e, self.path, len(data))
                if we is None:
                    raise
                raise we from e
            self.pending.append(rec)
            self.total += 1
            self.cond.notify_all()
        self._wake()

    def _ended(self) -> bool:
        return bool(self.pending) and self.pending[-1]["kind"] == "status" and self.pending[-1]["status"] != "RUNNING"

    def _run(self) -> None:
        away_since: float | None = None
        while True:
            with self.cond:
                while not self.pending:
                    if not self.cond.wait(RETRY_S * 6):  # idle: the thread ends, the next append starts one
                        return
            try:
                with _send_lock(self.path):
                    self._skip_acknowledged()
                    with self.cond:
                        batch = _first_batch(self.pending)
                    if batch:
                        send_records(self.client, self.run_id, batch, self.path.parent.parent)
                        # the count first: whoever sees the records gone sees them counted; on a full
                        # disk the count stays behind (a later one catches up) and the sender goes on
                        with contextlib.suppress(OSError):
                            atomic_write_text(self.path.with_name("sent"), str(self.sent + len(batch)))
            except Exception as e:  # noqa: BLE001 — the store is away: keep the records, try again
                self.failing = True
                away_since = away_since or time.monotonic()
                self.on_failure(e, "sending the journal")
                with self.cond:
                    self.cond.notify_all()
                    if self._ended() and time.monotonic() - away_since > GIVE_UP_S:
                        return  # the journal stays for medseg track sync
                    self._pause(RETRY_S)
                continue
            away_since = None
            with self.cond:
                del self.pending[: len(batch)]
                self.sent += len(batch)
                self.failing = False
                self.cond.notify_all()
            self.on_success()

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` between tries (the caller holds ``cond``). An append does not cut the pause short:
        while the store is away a run logging every step would otherwise retry at every step. The run's end
        does, once, so a store that is back by then gets the rest before the process exits."""
        deadline = time.monotonic() + seconds
        ended = self._ended()
        while (left := deadline - time.monotonic()) > 0 and (ended or not self._ended()):
            self.cond.wait(left)

    def _skip_acknowledged(self) -> None:
        """Drop the pending records another sender (``track sync``) has sent meanwhile (under the lock)."""
        with contextlib.suppress(OSError, ValueError):
            done = _acknowledged(self.path) - self.sent
            if done > 0:
                with self.cond:
                    done = min(done, len(self.pending))
                    del self.pending[:done]
                    self.sent += done
                    self.cond.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the store to have every record (not at all while it is away)."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.pending and not self.failing and time.monotonic() < deadline:
                self.cond.wait(min(0.2, max(deadline - time.monotonic(), 0.0)))
            return not self.pending


def sync(run_dir: str | Path, uri: str) -> dict[str, Any]:
    """Send what a run folder's journal holds beyond what the store acknowledged (``medseg track sync``);
    ``uri`` as :func:`medseg.tracking.resolve_tracking_uri` returns it. Returns the run id and how many
    records were sent.

    Raises:
        FileNotFoundError: no journal in ``run_dir``.
        Exception: what the client raises when the store refuses (the acknowledged count is kept).
    """
    from mlflow.tracking import MlflowClient

    header, records, _ = read_journal(run_dir)
    client = MlflowClient(tracking_uri=uri)
    # MLflow caches a run's artifact repository per run id with the URI it was first reached at (in
    # this process: the address the run was logged to); the store may answer elsewhere now
    import mlflow.tracking._tracking_service.utils as mlflow_utils

    getattr(mlflow_utils, "_artifact_repos_cache", {}).pop(header["run_id"], None)
    path = journal_path(run_dir)
    done = 0
    while True:
        with _send_lock(path):  # a run's own sender may still be trying: one sender at a time
            start = _acknowledged(path)  # never lower than read_journal's: only raised
            batch = _first_batch(itertools.islice(records, start, None))
            if not batch:
                break
            send_records(client, header["run_id"], batch, run_dir)
            done += len(batch)
            atomic_write_text(path.with_name("sent"), str(start + len(batch)))
    return {"run_id": header["run_id"], "sent": done}
