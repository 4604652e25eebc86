"""Experiment tracking behind a small interface: MLflow for real runs, a null tracker otherwise.

``mlflow`` is imported only inside :class:`MLflowTracker`. The default store is a SQLite database
under the output folder (``sqlite:///<output_dir>/mlflow.db``) with artifacts beside it, which
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db`` opens.

Tracking never stops the work it records: a training run's calls (metrics, params, tags, artifacts, the
model, its end) go through the run's journal (:mod:`medseg.tracking.journal`), sent in the background
and replayed when the store answers again; any other :class:`MLflowTracker` call that fails (a server
gone, a full store) is dropped with one warning per outage, later calls are dropped without waiting until
a retry (every :data:`RETRY_AFTER_S`) succeeds; the run folder and its checkpoints are the record, the
tracking store a copy. Reaching a store (credentials, the start-up probe, ``tracking.offline``) is
:mod:`medseg.tracking.connect`; what medseg writes or prints of a URI goes through
:func:`medseg.runtime.redact_uri`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medseg.config import Config, flatten, public_dict
from medseg.io import WriteError
from medseg.runtime import redact_uri
from medseg.tracking.connect import TrackingError, choose_uri, connect_uri, quiet_http_client
from medseg.tracking.journal import Journal, journal_path, table_frame

log = logging.getLogger("medseg.tracking")

__all__ = ["MLflowTracker", "NullTracker", "RETRY_AFTER_S", "Tracker", "TrackingError", "build_tracker",
           "default_tracking_uri", "reopened_run", "resolve_tracking_uri", "run_params", "start_training_run"]

#: MLflow limits a param value to 6000 characters
_MAX_PARAM = 6000

#: after a failed tracking call, calls are dropped (never waited on) for this many seconds, then retried
RETRY_AFTER_S = 30.0
#: how long ending a run waits for the journal to reach a store that answers
END_WAIT_S = 15.0
#: the calls that go through a run's journal once it has one
_JOURNALED = frozenset({"start", "log_params", "log_metrics", "set_tags", "end", "log_artifact", "log_text",
                        "log_table", "log_model"})


def default_tracking_uri(output_dir: str | Path) -> str:
    """The local store used when ``tracking.uri`` is not set."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None, output_dir: str | Path) -> str:
    """``uri`` or the local default; a bare path becomes a SQLite store inside it. Credentials in
    ``uri`` move out of it (:func:`medseg.tracking.connect.connect_uri`): the result is what MLflow's
    client is given."""
    if uri is None:
        return default_tracking_uri(output_dir)
    if "://" not in uri and not uri.startswith("sqlite:") and not uri.startswith("file:"):
        return default_tracking_uri(uri)
    return connect_uri(uri)


def _redact_text(text: str) -> str:
    """``text`` with every URI in it through :func:`redact_uri` (exception messages)."""
    return re.sub(r"[A-Za-z][\w+.-]*://\S+", lambda m: redact_uri(m.group(0)) or "", text)


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a tracker call through :meth:`MLflowTracker._guard` (a failure never reaches the caller)."""

    @functools.wraps(method)
    def call(self: MLflowTracker, *args: Any, **kwargs: Any) -> Any:
        return self._guard(method, *args, **kwargs)

    return call


class Tracker:
    """The tracking interface (also the null tracker: every call does nothing)."""

    run_id: str | None = None
    #: the store, credentials redacted (None: nothing is recorded)
    shown_uri: str | None = None

    def start(self, experiment: str, run_name: str, run_id: str | None = None) -> str | None:
        """Start (or, with ``run_id``, reopen) a run; returns its id."""
        return None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log flat ``key -> value`` params."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics at ``step`` (non-finite values are skipped)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file into the run's artifacts."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` as an artifact file."""

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Log rows of equal keys as an MLflow table (``mlflow.log_table``: a JSON artifact the UI's
        evaluation view can filter). MLflow records every table in one run tag limited to 5,000
        characters: log one table per evaluation, not one per slice."""

    def log_model(self, model_dir: str | Path, name: str) -> None:
        """Log an MLflow model folder (``MLmodel`` inside, as
        :func:`medseg.models.checkpoint.save_mlflow_model` writes it) as the run's artifacts under
        ``name``, so that ``runs:/<run_id>/<name>`` loads it."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run finished / failed / killed."""

    def attach_journal(self, run_dir: Path, run_id: str) -> None:
        """From now on, record metrics, params, tags and status changes of run ``run_id`` through the
        journal in ``run_dir`` (:mod:`medseg.tracking.journal`)."""


NullTracker = Tracker


class MLflowTracker(Tracker):
    """Log to an MLflow tracking store through ``MlflowClient`` (explicit run ids, no global run).

    Every call is guarded (:meth:`_guard`): a failure is a warning, never an exception.

    Args:
        uri: tracking URI (``sqlite:///...``, ``http://host:5000``, ...), credentials already moved out
            (:func:`resolve_tracking_uri`).
        artifact_root: where new experiments store artifacts (local stores only).
    """

    def __init__(self, uri: str, artifact_root: str | Path | None = None) -> None:
        quiet_http_client()
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.shown_uri = redact_uri(uri)
        self.artifact_root = Path(artifact_root) if artifact_root else None
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = None
        self.down_since: float | None = None  # the outage in progress (monotonic time it began)
        self.retry_at = 0.0
        self.dropped = 0  # calls not recorded (failed, or dropped during an outage)
        self.journal: Journal | None = None
        self.hinted = False  # the `medseg track sync` hint of this outage is printed

    def _failed(self, e: Exception, what: str) -> None:
        """Count a failed call; the first of an outage is one warning."""
        self.retry_at = time.monotonic() + RETRY_AFTER_S
        if self.down_since is None:
            self.down_since = time.monotonic()
            detail = _redact_text(str(e).strip().splitlines()[0] if str(e).strip() else "")[:200]
            kept = ("metrics, params, tags, artifacts and the run's status are kept in the run's journal and sent "
                    "when it answers" if self.journal else
                    f"tracking calls are dropped (retried every {RETRY_AFTER_S:.0f} s)")
            log.warning("tracking store %s failed (%s in %s: %s); the work goes on and its folder is the record: %s",
                        self.shown_uri, e.__class__.__name__, what, detail, kept)

    def _recovered(self) -> None:
        if self.down_since is not None:
            log.info("tracking store %s answers again after %.0f s (%d tracking calls were dropped)",
                     self.shown_uri, time.monotonic() - self.down_since, self.dropped)
            self.down_since, self.hinted = None, False

    def _guard(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``method``; a failure (or, for a call the journal does not take, one during an outage before
        :data:`RETRY_AFTER_S` has passed) returns None and is counted (:meth:`_failed`). A journal that
        cannot be written (a full disk: :class:`medseg.io.WriteError`) is raised: the run folder is the record."""
        if method.__name__ != "start" and self.run_id is None:
            return None
        journaled = self.journal is not None and method.__name__ in _JOURNALED
        if not journaled and self.down_since is not None and time.monotonic() < self.retry_at:
            self.dropped += 1
            return None
        try:
            out = method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 — tracking never stops the work it records
            if journaled and isinstance(e, WriteError):  # the run folder's disk is full: the work cannot go on
                raise
            self.dropped += 1
            self._failed(e, method.__name__)
            return None
        if not journaled:
            self._recovered()
        return out

    def attach_journal(self, run_dir: Path, run_id: str) -> None:
        if self.journal is None or self.journal.path != journal_path(run_dir):
            self.journal = Journal(run_dir, run_id, self.client, self.shown_uri, self._failed, self._recovered)

    @_guarded
    def start(self, experiment: str, run_name: str, run_id: str | None = None) -> str:
        if run_id is not None:
            self.run_id = run_id  # later calls go to this run even when reopening it fails
            if self.journal is not None:
                self.journal.append("status", status="RUNNING", ts=int(time.time() * 1000))
            else:
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if self.artifact_root is not None:
                location = (self.artifact_root / experiment).resolve().as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=run_name)
        self.run_id = run.info.run_id
        return self.run_id

    @_guarded
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self.journal is not None:
            self.journal.append("params", data={k: str(v)[:_MAX_PARAM] for k, v in params.items()})
            return
        existing = self.client.get_run(self.run_id).data.params
        items = [
            Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items() if k not in existing
        ]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @_guarded
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        if self.journal is not None:
            self.journal.append("metrics", step=step, ts=ts, data=metrics)
            return
        items = [
            Metric(k, float(v), ts, step)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    @_guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.journal is not None:
            self.journal.append_artifact("file", path, artifact_path=artifact_path)
            return
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_guarded
    def log_text(self, text: str, artifact_file: str) -> None:
        if self.journal is not None:
            self.journal.append_artifact("text", text=text, artifact_path=artifact_file)
            return
        self.client.log_text(self.run_id, text, artifact_file)

    @_guarded
    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        frame = table_frame(rows)  # JSON has no NaN / inf: an undefined value is an empty cell
        if self.journal is not None:
            self.journal.append_artifact("table", text=frame.to_json(orient="records"), artifact_path=artifact_file)
            return
        self.client.log_table(self.run_id, data=frame, artifact_file=artifact_file)

    @_guarded
    def set_tags(self, tags: dict[str, str]) -> None:
        if self.journal is not None:
            self.journal.append("tags", data={k: str(v) for k, v in tags.items()})
            return
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    @_guarded
    def log_model(self, model_dir: str | Path, name: str) -> None:
        import mlflow

        # files, not a pickled module: the folder is weights + JSON (no code runs when it is loaded);
        # the global URI lets this process load runs:/ URIs from the same store
        mlflow.set_tracking_uri(self.uri)
        if self.journal is not None:
            self.journal.append_artifact("dir", model_dir, artifact_path=name)
            return
        self.client.log_artifacts(self.run_id, str(model_dir), name)

    @_guarded
    def end(self, status: str = "FINISHED") -> None:
        if self.journal is not None:
            try:
                self.journal.append("status", status=status, ts=int(time.time() * 1000))
            except WriteError:
                if status == "FINISHED":
                    raise
                return  # a failure path on a full disk fails quietly: the first failure is the one reported
            if not self.journal.drain(END_WAIT_S) and not self.hinted:
                self.hinted = True
                run_dir = self.journal.path.parent.parent
                log.warning("tracking store %s does not have all of run %s yet: the rest is in %s and is sent "
                            "when the store answers (in this process), by `medseg track sync %s`, or by "
                            "`medseg train --resume %s`", self.shown_uri, self.run_id, self.journal.path, run_dir,
                            run_dir)
            return
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def run_params(cfg: Config, extra: dict[str, Any]) -> dict[str, Any]:
    """The params a training run logs: its resolved config flattened (``train.lr``, ...; credentials
    redacted: :func:`medseg.config.public_dict`), then ``extra``."""
    return {**flatten(public_dict(cfg)), **extra}


def start_training_run(
    tracker: Tracker, cfg: Config, run_dir: Path, run_id: str | None, step: int, pipeline_path: Path | None,
    extra_params: dict[str, Any], environment: dict[str, Any],
) -> str | None:
    """Start (or, with ``run_id``, reopen at ``step``) a training run; a new run logs its params
    (:func:`run_params`), ``config.yaml`` and the pipeline YAML, and ``environment.json``
    (:func:`medseg.runtime.environment_info` updated with ``environment``). Returns the run id."""
    import json

    from medseg.runtime import environment_info

    resumed = run_id is not None
    if resumed:  # what the earlier process left in the journal is sent first
        tracker.attach_journal(run_dir, run_id)
    run_id = tracker.start(cfg.tracking.experiment or cfg.name, run_dir.name, run_id=run_id)
    if run_id and not resumed:
        tracker.attach_journal(run_dir, run_id)
    if resumed:
        tracker.set_tags({"medseg.resumed_at_step": str(step)})
        return run_id
    tracker.set_tags({"medseg.run_dir": str(run_dir.resolve()), "medseg.model": cfg.model.name})
    tracker.log_params(run_params(cfg, extra_params))
    tracker.log_artifact(run_dir / "config.yaml", "config")
    if pipeline_path and pipeline_path.is_file():
        tracker.log_artifact(pipeline_path, "config")
    tracker.log_text(json.dumps({**environment_info(), **environment}, indent=2, default=str), "environment.json")
    return run_id


@contextlib.contextmanager
def reopened_run(tracker: Tracker, run_id: str | None) -> Iterator[None]:
    """Reopen run ``run_id`` (when set) for a block of work; it always ends again: FINISHED, FAILED on an
    error, KILLED on Ctrl-C (what evaluation and calibration after training log into the training run)."""
    if run_id:
        tracker.start("", "", run_id=run_id)
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if run_id:
            tracker.end(status)


def build_tracker(enabled: bool, uri: str | None, output_dir: str | Path, offline: bool | str = False) -> Tracker:
    """An :class:`MLflowTracker` for ``uri`` (or the local default), or the null tracker.

    A remote ``uri`` is probed first (seconds); ``offline`` is ``tracking.offline``
    (:func:`medseg.tracking.connect.choose_uri`).

    Raises:
        TrackingError: a remote ``uri`` that does not answer, with ``offline`` false.
    """
    if not enabled:
        return Tracker()
    resolved = choose_uri(resolve_tracking_uri(uri, output_dir), offline, output_dir)
    root = None
    if resolved.startswith("sqlite:///"):
        root = Path(resolved[len("sqlite:///") :]).parent / "mlartifacts"
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return MLflowTracker(resolved, artifact_root=root)
