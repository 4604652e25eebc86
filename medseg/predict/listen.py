"""``medseg listen``: a DICOM C-STORE SCP (and C-ECHO) for push workflows (pynetdicom).

A PACS router pushes each new study to ``--ae-title``/``--port``. Every instance is written to
``OUTPUT_DIR/.incoming/<study hash>/<series hash>/<instance hash>.dcm`` — temporary file, fsync,
rename (:func:`medseg.io.atomic_write_bytes`) — *before* the success status is returned, so nothing
acknowledged is lost if the process dies. A series is complete when the association that sent it is
released, or after ``quiet_s`` seconds without a new instance (an aborted association); it is then
predicted like a folder (:func:`medseg.predict.run_predict`, the same manifest in OUTPUT_DIR), its
SEG / SR are stored back by C-STORE to ``predict.store`` when asked, and its received files are removed.
A restart finds received, unpredicted series under ``.incoming`` and predicts them first.

Only the calling AE titles given (``--calling-aet``, repeatable) may associate; an instance above
``max_instance_mb`` or one that would leave less than ``min_free_mb`` free on the disk is refused
with "out of resources" (0xA700), so the sender keeps it and retries. The log has one line a series:
hashed UIDs, counts and the store-back answer, no patient identifiers.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.io import atomic_write_bytes
from medseg.predict.manifest import Manifest
from medseg.predict.run import PredictResult, run_predict
from medseg.predict.store import PacsError, cstore_sender, store_back

__all__ = ["Listener", "ListenOptions", "store_to_node"]

log = logging.getLogger("medseg.listen")

INCOMING = ".incoming"
OUT_OF_RESOURCES = 0xA700


def _hash(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def store_to_node(result: PredictResult, keys: list[str] | None = None) -> dict[str, str]:
    """C-STORE the SEG / SR of a run's done cases to ``predict.store`` (recorded in the manifest)."""
    st = result.config.predict.store
    if not st.ae_title or not st.host:
        raise PacsError("--store-back needs a destination: --set predict.store.ae_title=AE predict.store.host=HOST "
                        "predict.store.port=PORT")
    dest, send = cstore_sender(st.ae_title, st.host, int(st.port), st.calling_ae_title)
    m = Manifest(result.manifest)
    try:
        return store_back(result.output_dir, m, lambda _study: (dest, send), keys)
    finally:
        m.close()


@dataclass
class ListenOptions:
    """How ``medseg listen`` accepts and predicts."""

    ae_title: str = "MEDSEG"
    port: int = 11112
    host: str = "127.0.0.1"
    #: calling AE titles allowed to associate (required: an empty list refuses every caller)
    calling_aets: list[str] = field(default_factory=list)
    #: seconds without a new instance after which a series counts as complete
    quiet_s: float = 30.0
    max_instance_mb: float = 1024.0
    min_free_mb: float = 1024.0
    store_back: bool = False
    overrides: list[str] = field(default_factory=list)
    device: str | None = None


class Listener:
    """The C-STORE SCP and the worker that predicts complete series (see the module doc)."""

    def __init__(self, model: str | Path, output_dir: str | Path, opts: ListenOptions) -> None:
        if not opts.calling_aets:
            raise PacsError("medseg listen needs at least one --calling-aet (the AE titles allowed to send)")
        self.model, self.out, self.opts = model, Path(output_dir), opts
        self.incoming = self.out / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.last_seen: dict[Path, float] = {}
        self.by_assoc: dict[int, set[Path]] = {}
        self.ready: queue.Queue[Path | None] = queue.Queue()
        self.lock = threading.Lock()
        self.server: Any = None
        self.worker: threading.Thread | None = None
        self.predicted: list[str] = []

    # ------------------------------------------------------------------ receiving

    def on_store(self, event: Any) -> int:
        """Write the instance (fsync'd) before answering success; refuse what breaks a limit."""
        raw = event.request.DataSet.getvalue() if hasattr(event.request.DataSet, "getvalue") else b""
        if len(raw) > self.opts.max_instance_mb * 2**20:
            log.warning("instance refused: %.1f MB is over the %.0f MB limit", len(raw) / 2**20, self.opts.max_instance_mb)
            return OUT_OF_RESOURCES
        if shutil.disk_usage(self.incoming).free - 2 * len(raw) < self.opts.min_free_mb * 2**20:
            log.warning("instance refused: less than %.0f MB would stay free on the disk", self.opts.min_free_mb)
            return OUT_OF_RESOURCES
        ds = event.dataset
        folder = self.incoming / _hash(str(ds.StudyInstanceUID)) / _hash(str(ds.SeriesInstanceUID))
        atomic_write_bytes(folder / f"{_hash(str(ds.SOPInstanceUID))}.dcm", event.encoded_dataset())
        with self.lock:
            self.last_seen[folder] = time.monotonic()
            self.by_assoc.setdefault(id(event.assoc), set()).add(folder)
        return 0x0000

    def on_released(self, event: Any) -> None:
        with self.lock:
            folders = self.by_assoc.pop(id(event.assoc), set())
            for f in folders:
                self.last_seen.pop(f, None)
        for f in sorted(folders):
            self.ready.put(f)

    # ------------------------------------------------------------------ predicting

    def pending_on_disk(self) -> list[Path]:
        """Received, unpredicted series (left by a run that stopped or died)."""
        return sorted(p for p in self.incoming.glob("*/*") if p.is_dir() and any(p.glob("*.dcm")))

    def predict_series(self, folder: Path) -> None:
        n = len(list(folder.glob("*.dcm")))
        try:
            result = run_predict(self.model, folder, self.out, self.opts.overrides, device=self.opts.device,
                                 progress=False)
        except Exception as e:  # noqa: BLE001 — the files stay for the next start
            log.warning("series %s: %d instances, prediction failed (%s); kept for a retry", folder.name, n,
                        type(e).__name__)
            return
        keys = result.processed + result.already_done
        lesions = sum(r["n_lesions"] or 0 for r in _rows(result) if r["key"] in keys)
        stored = ""
        if self.opts.store_back and keys:
            try:
                answers = store_to_node(result, keys)
                stored = "; stored back: " + (", ".join(sorted(set(a.split(":")[0] for a in answers.values())))
                                              if answers else "already there")
            except Exception as e:  # noqa: BLE001 — the outputs stay; the manifest has no store row
                stored = f"; not stored back: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
        if result.failed:
            log.warning("series %s: %d instances, %d case(s) failed: %s", folder.name, n, len(result.failed),
                        "; ".join(result.failed.values())[:300])
        else:
            log.info("series %s: %d instances, %d case(s) predicted, %d lesion(s)%s", folder.name, n, len(keys),
                     lesions, stored)
            shutil.rmtree(folder, ignore_errors=True)
            if folder.parent.is_dir() and not any(folder.parent.iterdir()):
                folder.parent.rmdir()
        self.predicted.append(folder.name)

    def _work(self) -> None:
        while True:
            try:
                item = self.ready.get(timeout=0.5)
            except queue.Empty:
                item = self._quiet_one()
                if item is None:
                    continue
            if item is None or item == Path():
                return
            if item.is_dir():
                self.predict_series(item)

    def _quiet_one(self) -> Path | None:
        now = time.monotonic()
        with self.lock:
            for f, t in list(self.last_seen.items()):
                if now - t >= self.opts.quiet_s:
                    self.last_seen.pop(f)
                    for s in self.by_assoc.values():
                        s.discard(f)
                    return f
        return None

    # ------------------------------------------------------------------ serving

    def start(self) -> None:
        """Queue the series left on disk, start the worker and the SCP (non-blocking)."""
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        for f in self.pending_on_disk():
            self.ready.put(f)
        self.worker = threading.Thread(target=self._work, name="medseg-listen-predict", daemon=True)
        self.worker.start()
        ae = AE(ae_title=self.opts.ae_title)
        ae.require_calling_aet = list(self.opts.calling_aets)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_RELEASED, self.on_released)]
        self.server = ae.start_server((self.opts.host, int(self.opts.port)), block=False, evt_handlers=handlers)
        log.info("listening as %s on %s:%d (calling AE titles: %s)", self.opts.ae_title, self.opts.host,
                 int(self.opts.port), ", ".join(self.opts.calling_aets))

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        self.ready.put(Path())
        if self.worker is not None:
            self.worker.join(timeout=600)

    def serve_forever(self) -> None:
        """Serve until SIGINT or SIGTERM (a service manager's stop), then stop cleanly (:meth:`stop`).

        Both signals are handled here whatever the process inherited: a listener started by a parent that
        ignores SIGINT (``SIG_IGN`` survives ``exec``, and Python then installs no handler of its own) would
        otherwise ignore Ctrl-C and its stop."""

        def _interrupt(signum: int, _frame: Any) -> None:
            raise KeyboardInterrupt(signal.Signals(signum).name)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, _interrupt)
        self.start()
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt as e:
            log.info("stopping (%s): finishing the series being predicted", e.args[0] if e.args else "SIGINT")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _rows(result: PredictResult) -> list[dict[str, Any]]:
    m = Manifest(result.manifest)
    try:
        return m.rows("series")
    finally:
        m.close()
