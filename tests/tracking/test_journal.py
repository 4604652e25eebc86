"""Artifacts through the journal: staged when logged, uploaded in order when the store answers again,
so the record holds what was logged (not a file's later version) and nothing is lost in an outage."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from medseg.io import atomic_write_text
from medseg.tracking.journal import read_journal, sync


class Flaky:
    """An ``MlflowClient`` that fails every call while ``away`` (a store that is gone)."""

    def __init__(self, client: Any) -> None:
        self.client, self.away, self.failed, self.calls = client, False, 0, 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*a: Any, **k: Any) -> Any:
            if self.away:
                self.failed += 1
                raise ConnectionError("server gone")
            self.calls += 1
            return method(*a, **k)

        return call


def _log_artifacts(tracker: Any, run_dir: Path, model_dir: Path) -> None:
    """One call of each artifact kind; the file is replaced (as medseg replaces files) after it was logged."""
    ckpt = run_dir / "checkpoints" / "best.pt"
    atomic_write_text(ckpt, "weights of epoch 1")
    tracker.log_artifact(ckpt, "checkpoints")
    atomic_write_text(ckpt, "weights of epoch 2")  # later than the log call: not what was logged
    tracker.log_text('{"torch": "2"}', "environment.json")
    tracker.log_table([{"case": "a", "dice": 0.5}, {"case": "b", "dice": float("nan")}], "evaluation/lesions.json")
    atomic_write_text(model_dir / "MLmodel", "flavors: {}")
    atomic_write_text(model_dir / "data" / "weights.json", "[1, 2]")
    tracker.log_model(model_dir, "model")


def _artifacts(uri: str, run_id: str, path: str | None = None) -> dict[str, bytes]:
    """Every artifact file of a run → its bytes."""
    import mlflow
    from mlflow.tracking import MlflowClient

    out: dict[str, bytes] = {}
    for info in MlflowClient(uri).list_artifacts(run_id, path):
        if info.is_dir:
            out.update(_artifacts(uri, run_id, info.path))
        else:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=info.path, tracking_uri=uri)
            out[info.path] = Path(local).read_bytes()
    return out


def _tracker(tmp_path: Path, name: str) -> tuple[Any, str, Path, Path]:
    from medseg.tracking import MLflowTracker

    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")
    run_id = tracker.start("e", name)
    run_dir = tmp_path / name
    tracker.attach_journal(run_dir, run_id)
    return tracker, run_id, run_dir, tmp_path / f"{name}-model"


def test_artifacts_logged_during_an_outage_are_sent_when_the_store_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr("medseg.tracking.journal.RETRY_S", 0.2)  # the sender's pause between tries

    # the reference: the same calls on a store that never went away
    ref, ref_id, ref_dir, ref_model = _tracker(tmp_path, "ref")
    _log_artifacts(ref, ref_dir, ref_model)
    ref.end("FINISHED")

    tracker, run_id, run_dir, model_dir = _tracker(tmp_path, "run")
    flaky = Flaky(tracker.client)
    tracker.client = tracker.journal.client = flaky
    flaky.away = True
    with caplog.at_level(logging.WARNING, logger="medseg.tracking"):
        _log_artifacts(tracker, run_dir, model_dir)
        tracker.log_metrics({"train/loss": 0.5}, 3)
        tracker.journal.drain(1.0)
    assert flaky.failed >= 1
    _, records, sent = read_journal(run_dir)
    assert sent == 0 and [r["kind"] for r in records] == ["artifact"] * 4 + ["metrics"]
    staged = [run_dir / r["file"] for r in records[:4]]
    assert all(p.exists() for p in staged)
    assert staged[0].read_text() == "weights of epoch 1"  # the content logged, not the file's later one
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "artifacts" in warnings[0], warnings  # one warning for the outage

    flaky.away = False  # the store is back: the sender's next try sends it all, in order
    tracker.end("FINISHED")
    deadline = time.monotonic() + 30
    while read_journal(run_dir)[2] < len(records) + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert read_journal(run_dir)[2] == len(records) + 1
    assert not any(p.exists() for p in staged)  # staged copies are removed once sent
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    got, want = _artifacts(uri, run_id), _artifacts(uri, ref_id)
    assert set(want) == {"checkpoints/best.pt", "environment.json", "evaluation/lesions.json", "model/MLmodel",
                         "model/data/weights.json"}
    assert got == want
    assert got["checkpoints/best.pt"] == b"weights of epoch 1"
    assert json.loads(got["evaluation/lesions.json"])["data"][1] == ["b", None]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [3]


def test_track_sync_uploads_the_staged_artifacts(tmp_path: Path) -> None:
    """A process that ended while the store was away leaves its artifacts staged; ``sync`` sends them."""
    from mlflow.tracking import MlflowClient

    tracker, run_id, run_dir, model_dir = _tracker(tmp_path, "run")
    flaky = Flaky(tracker.client)
    tracker.client = tracker.journal.client = flaky
    flaky.away = True
    _log_artifacts(tracker, run_dir, model_dir)
    tracker.journal.append("status", status="FINISHED", ts=1)
    tracker.journal.drain(0.5)
    assert read_journal(run_dir)[2] == 0

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert sync(run_dir, uri) == {"run_id": run_id, "sent": 5}
    client = MlflowClient(uri)
    got = _artifacts(uri, run_id)
    assert got["checkpoints/best.pt"] == b"weights of epoch 1"
    assert got["model/data/weights.json"] == b"[1, 2]" and "environment.json" in got
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not (run_dir / "tracking" / "artifacts").exists() or not any((run_dir / "tracking" / "artifacts").iterdir())
    assert sync(run_dir, uri)["sent"] == 0


def test_a_full_disk_keeps_the_journal_whole_and_is_one_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``os.write`` raising ENOSPC for the journal: the call raises :class:`WriteError` naming the journal
    (tracking does not swallow it: the run folder is the record), the file is byte-for-byte as before,
    a failure path's ``end`` fails quietly, and once there is space the journal goes on."""
    import errno
    import os

    from medseg.io import WriteError

    tracker, run_id, run_dir, _ = _tracker(tmp_path, "run")
    tracker.client = tracker.journal.client = Flaky(tracker.client)
    tracker.client.away = True  # nothing is sent: the journal is all there is
    tracker.log_metrics({"train/loss": 0.5}, 1)
    journal = run_dir / "tracking" / "journal.jsonl"
    before = journal.read_bytes()
    real = os.write

    def write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(journal):
            return real(fd, data[: len(data) // 2]) and (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)  # half a record reaches the disk, then it is full
    with pytest.raises(WriteError) as err:
        tracker.log_metrics({"train/loss": 0.25}, 2)
    assert err.value.errno == errno.ENOSPC and str(journal) in str(err.value) and "needed" in str(err.value)
    assert journal.read_bytes() == before  # no torn record
    with pytest.raises(WriteError):
        tracker.log_artifact(journal, "x")  # staging a copy on the full disk: the same error ...
    assert not any((run_dir / "tracking" / "artifacts").glob("*/*"))  # ... and nothing staged left
    tracker.end("FAILED")  # the failure path: quiet
    assert journal.read_bytes() == before
    monkeypatch.undo()
    tracker.log_metrics({"train/loss": 0.25}, 2)
    _, records, _ = read_journal(run_dir)
    assert [r["step"] for r in records if r["kind"] == "metrics"] == [1, 2]


def test_track_sync_beside_the_runs_own_sender_sends_each_record_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run whose sender still retries (the store was away) and ``medseg track sync`` run at once: the
    records reach the store once each and the acknowledged count never goes back (the sender used to
    send its batch again after sync had sent it, and write its own, lower count over sync's)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr("medseg.tracking.journal.RETRY_S", 0.1)
    tracker, run_id, run_dir, _ = _tracker(tmp_path, "run")
    flaky = Flaky(tracker.client)
    tracker.client = tracker.journal.client = flaky
    flaky.away = True
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.journal.append("status", status="FINISHED", ts=1)
    tracker.journal.drain(0.3)
    assert read_journal(run_dir)[2] == 0 and tracker.journal.thread.is_alive()  # still trying

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert sync(run_dir, uri)["sent"] >= 1  # the whole record through another client
    flaky.away = False  # the run's own sender now reaches the store too
    deadline = time.monotonic() + 20
    while tracker.journal.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert not tracker.journal.pending and read_journal(run_dir)[2] == 6
    assert flaky.calls == 0  # the run's sender found everything acknowledged: it sent nothing again
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]  # each once


def test_the_send_lock_is_not_kept_by_a_process_forked_while_it_was_held(tmp_path: Path) -> None:
    """A DataLoader worker forked while the run's sender held the lock must not keep it (with ``flock`` the
    forked child shared the lock, and every later send of the run waited for good: the run ended with
    most of its journal unsent)."""
    import multiprocessing
    import threading

    from medseg.tracking.journal import _send_lock

    path = tmp_path / "tracking" / "journal.jsonl"
    path.parent.mkdir()
    with _send_lock(path):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
    try:
        taken = threading.Event()

        def take() -> None:
            with _send_lock(path):
                taken.set()

        threading.Thread(target=take, daemon=True).start()
        assert taken.wait(5.0), "the forked child kept the send lock"
    finally:
        child.terminate()
        child.join()


def test_a_sender_groups_one_batch_without_reading_the_rest_of_the_journal() -> None:
    """MLflow's per-call limits (1000 metrics, 100 params), a status record alone; a sender takes the first
    batch of a long journal after reading only as far as the record that starts the second."""
    from medseg.tracking.journal import _first_batch

    records = ([{"kind": "metrics", "data": {f"m{i}": 0.0 for i in range(300)}} for _ in range(5)]
               + [{"kind": "params", "data": {"p": "1"}}, {"kind": "status", "status": "FINISHED"}])
    groups, rest = [], records
    while rest:  # the batches a sender sends one after another
        groups.append(_first_batch(rest))
        rest = rest[len(groups[-1]):]
    assert [len(g) for g in groups] == [3, 3, 1]  # 900 metrics; 600 metrics and the params; the status alone
    assert sum(len(r["data"]) for r in groups[0]) <= 1000
    read = []

    def journal():  # type: ignore[no-untyped-def]
        for rec in records * 1000:
            read.append(rec)
            yield rec

    assert _first_batch(journal()) == groups[0]
    assert len(read) == 4  # the first batch's three records and the one that ended it
