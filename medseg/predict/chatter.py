"""A quiet console for ``medseg predict`` / ``listen``: third-party chatter goes to the run's log file.

highdicom logs an INFO line per copied module for every SEG / SR, pydicom warns about odd VRs and
pynetdicom logs every association: all of it goes, at debug level, to ``OUTPUT_DIR/medseg-<command>.log``
and not to the console, which keeps one line a case (or a series) and the summary.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

__all__ = ["THIRD_PARTY", "quiet_third_party"]

#: loggers routed to the log file only
THIRD_PARTY = ("highdicom", "pydicom", "pynetdicom", "dicomweb_client", "py.warnings", "urllib3")


def quiet_third_party(log_file: Path) -> logging.Handler:
    """Send :data:`THIRD_PARTY` loggers and Python warnings (pydicom's VR warnings) to ``log_file`` only."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    warnings.filterwarnings("default", module="pydicom")
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        for old in [h for h in lg.handlers if isinstance(h, logging.FileHandler)]:
            lg.removeHandler(old)
            old.close()
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG if name in ("highdicom", "py.warnings") else logging.INFO)
        lg.propagate = False
    return handler
