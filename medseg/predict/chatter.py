"""A quiet console for ``medseg predict`` / ``listen``: third-party chatter goes to the run's log file.

highdicom logs an INFO line per copied module for every SEG / SR, pydicom warns about odd VRs and
pynetdicom logs every association: all of it goes to ``OUTPUT_DIR/medseg-<command>.log`` (highdicom
and Python warnings at debug level) and not to the console, which keeps one line a case (or a series)
and the summary.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

__all__ = ["THIRD_PARTY", "quiet_third_party"]

#: loggers routed to the log file only
THIRD_PARTY = ("highdicom", "pydicom", "pynetdicom", "dicomweb_client", "py.warnings", "urllib3")


class _LogFile(logging.FileHandler):
    """Opened at the first record once the output folder exists (records before are dropped: a run that
    stops before it writes anything leaves nothing behind); a record that cannot be written (a full
    disk) is dropped, never a traceback on the console."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None and not Path(self.baseFilename).parent.is_dir():
            return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 — logging's name
        pass


@contextlib.contextmanager
def quiet_third_party(log_file: Path) -> Iterator[logging.Handler]:
    """While inside: :data:`THIRD_PARTY` loggers and Python warnings (pydicom's VR warnings) go to
    ``log_file`` only; on exit the loggers and the warnings' display are as they were."""
    handler = _LogFile(Path(log_file))
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {}
    logging.captureWarnings(True)
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        saved[name] = (lg.level, lg.propagate)
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG if name in ("highdicom", "py.warnings") else logging.INFO)
        lg.propagate = False
    try:
        yield handler
    finally:
        for name, (level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
        logging.captureWarnings(False)
        handler.close()
