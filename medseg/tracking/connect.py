"""Reaching a tracking store: credentials out of the URI, a quick probe of a remote server, offline mode.

- :func:`connect_uri` — the URI the MLflow client is given. An ``http(s)://user:password@host`` URI's
  user-info moves into the process environment (``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD``, which MLflow's client sends as basic auth), so nothing the client prints
  or stores carries it. A password already redacted (``***``, from an earlier run's ``config.yaml``) is
  dropped, so the environment (or, for PostgreSQL, ``PGPASSWORD`` / ``~/.pgpass``) supplies it.
- :func:`probe` — one short HTTP GET of ``<uri>/health`` (3 s timeout, 2 tries): a server that does not
  answer is a :class:`TrackingError` in seconds, not MLflow's retries for minutes.
- :func:`choose_uri` — ``tracking.offline``: ``false`` = unreachable is an error; ``"auto"`` = fall back
  to the local store with one warning; ``true`` = the local store, the server is never contacted.

Example:
    >>> uri = choose_uri("http://alice:pw@mlflow.lab:5000", False, "outputs")   # probes the server
    >>> uri, os.environ["MLFLOW_TRACKING_USERNAME"]
    ('http://mlflow.lab:5000', 'alice')
"""

from __future__ import annotations

import base64
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from medseg.runtime import redact_uri

log = logging.getLogger("medseg.tracking")

__all__ = ["TrackingError", "choose_uri", "connect_uri", "is_remote", "probe", "quiet_http_client"]

#: the probe: seconds per try, tries, pause between tries
PROBE_TIMEOUT_S = 3.0
PROBE_TRIES = 2
PROBE_PAUSE_S = 0.5

#: MLflow's HTTP client for medseg's process: a dead server is noticed in seconds (MLflow's defaults
#: retry 7 times with exponential back-off and wait 120 s per request: minutes per call)
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # medseg prints its own closing lines; MLflow's "View run at ..." would repeat them per set_terminated
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class TrackingError(RuntimeError):
    """The tracking store cannot be used as configured (unreachable, credentials refused); one line."""


def quiet_http_client() -> None:
    """Set :data:`HTTP_ENV` in the process environment (values the user set already win)."""
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)


def is_remote(uri: str | None) -> bool:
    """Whether ``uri`` is an MLflow tracking server (``http://`` / ``https://``)."""
    return bool(uri) and urlsplit(uri).scheme in ("http", "https")


def connect_uri(uri: str) -> str:
    """The URI to give MLflow's client: credentials moved out of it (see the module docstring)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    raw_user, sep, password = userinfo.partition(":")
    user, password = unquote(raw_user), unquote(password)
    redacted = password == "***" or (not sep and user == "***")
    if parts.scheme in ("http", "https"):
        if not redacted:
            os.environ["MLFLOW_TRACKING_USERNAME"] = user
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    if redacted:  # a database URI: the driver's own environment / password file supplies it
        netloc = host if user == "***" else f"{raw_user}@{host}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return uri  # a database driver needs the password in the URI: it stays in this process only


def _auth_header() -> dict[str, str]:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def probe(uri: str, timeout_s: float = PROBE_TIMEOUT_S, tries: int = PROBE_TRIES) -> str | None:
    """GET ``<uri>/health`` (``uri`` as :func:`connect_uri` returns it); None when the server answers,
    else the reason it did not (``connection refused``, ``timed out``, ``HTTP 502``, ...).

    Raises:
        TrackingError: the server answered 401 / 403 (the credentials were refused).
    """
    url = uri.rstrip("/") + "/health"
    reason = "no answer"
    for attempt in range(tries):
        if attempt:
            time.sleep(PROBE_PAUSE_S)
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=_auth_header()), timeout=timeout_s):
                return None
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise TrackingError(
                    f"tracking server {redact_uri(uri)} refused the credentials (HTTP {e.code}); set "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
                ) from None
            if e.code < 500:  # it answers (a proxy without /health, ...): reachable
                return None
            reason = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            inner = getattr(e, "reason", e)
            reason = getattr(inner, "strerror", None) or str(inner) or e.__class__.__name__
            reason = str(reason).lower()
    return reason


def choose_uri(uri: str, offline: bool | str, output_dir: str | Path) -> str:
    """The store to record into: ``uri`` (credentials moved out, see :func:`connect_uri`) when it is
    local or answers :func:`probe`; the local store ``sqlite:///<output_dir>/mlflow.db`` with
    ``tracking.offline: true``, or with ``"auto"`` when the server does not answer.

    Raises:
        TrackingError: a remote ``uri`` that does not answer with ``tracking.offline: false``.
    """
    from medseg.tracking import default_tracking_uri

    local = default_tracking_uri(output_dir)
    target = connect_uri(uri)
    if not is_remote(target):
        return target
    shown = redact_uri(uri)
    if offline is True:
        log.info("tracking.offline: true — recording into %s, not %s", local, shown)
        return local
    quiet_http_client()
    tick = time.monotonic()
    reason = probe(target)
    if reason is None:
        return target
    if offline == "auto":
        log.warning("tracking server %s does not answer (%s); tracking.offline: auto — recording into %s",
                    shown, reason, local)
        return local
    raise TrackingError(
        f"tracking server {shown} does not answer ({reason}, {time.monotonic() - tick:.0f} s): start it "
        f"(mlflow server --host HOST --port PORT ...) or set tracking.offline: true to record into {local} "
        f"(tracking.offline: auto does that whenever the server is away)"
    )
