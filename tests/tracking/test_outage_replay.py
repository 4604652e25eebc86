"""A tracking server killed mid-training for longer than MLflow's retry window, then restarted where it
was: the training thread sends no request while it is dead (counted, so it cannot wait on the network),
training exits 0, and the server's record of the run equals an uninterrupted run's on the same seed once
the journal is replayed."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from medseg.cli import main
from tests.conftest import tiny_overrides
from tests.mlflow_server import start_server

ROOT = Path(__file__).resolve().parents[2]
#: the server is killed after this step's metrics were logged, and is back before step HOLD_AT + 1
KILL_AT, HOLD_AT, STEPS = 20, 65, 80
#: the least time the server stays dead: longer than medseg's MLflow client gives a request (1 retry,
#: back-off 1 s: ~2 s on a refused connection) and than the journal sender's pause between tries (5 s)
OUTAGE_MIN_S = 8.0


def _train(demo_root: Path, out: Path, uri: str) -> Path:
    ov = tiny_overrides(demo_root, out, **{
        "tracking.uri": uri, "train.max_steps": STEPS, "train.epochs": 100, "train.log_every": 1,
        "train.val_every": 1, "train.overlay_count": 1, "model.params.base_channels": 4, "model.params.depth": 2,
    })
    before = set((out / "quickstart").iterdir()) if (out / "quickstart").is_dir() else set()
    assert main(["train", str(ROOT / "pipelines" / "quickstart.yaml"), *[a for o in ov for a in ("--set", o)]]) == 0
    (run_dir,) = set((out / "quickstart").iterdir()) - before
    return run_dir


def _wait_sent(run_dir: Path, timeout_s: float = 90) -> list[dict[str, Any]]:
    """The journal's records, once the store acknowledged every one (the sender may still be replaying)."""
    from medseg.tracking.journal import read_journal

    deadline = time.monotonic() + timeout_s
    while True:
        _, records, sent = read_journal(run_dir)
        if sent == len(records) or time.monotonic() > deadline:
            assert sent == len(records), f"{sent} of {len(records)} journal records sent"
            return records
        time.sleep(0.5)


def _record(client: Any, run_id: str) -> dict[str, Any]:
    """What the server holds of a run: status, params, tag keys, metric (key, step, value), artifact files."""
    run = client.get_run(run_id)

    def files(path: str | None = None) -> set[str]:
        out: set[str] = set()
        for info in client.list_artifacts(run_id, path):
            out |= files(info.path) if info.is_dir else {info.path}
        return out

    metrics = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        # throughput is a measurement of the machine, not of the run: its steps only
        metrics[key] = sorted((m.step, None if key == "train/images_per_s" else m.value) for m in history)
    tags = {k for k in run.data.tags if k not in ("medseg.run_dir", "mlflow.runName")}
    return {"status": run.info.status, "params": run.data.params, "tags": tags, "metrics": metrics,
            "artifacts": files()}


@pytest.mark.slow
def test_server_killed_and_restarted_mid_training_does_not_wait_on_it_and_keeps_the_record(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.tracking import MlflowClient
    from requests.adapters import HTTPAdapter

    from medseg.tracking import MLflowTracker
    from medseg.tracking.journal import RETRY_S, read_journal

    workdir = tmp_path / "server"
    servers = [start_server(f"sqlite:///{workdir / 'mlflow.db'}", workdir)]
    uri = servers[0].uri
    try:
        reference = _train(demo_root, tmp_path / "out", uri)  # uninterrupted, same seed

        events: dict[str, float] = {}
        log_metrics = MLflowTracker.log_metrics

        def log_then_fault(self: MLflowTracker, metrics: dict[str, float], step: int) -> None:
            log_metrics(self, metrics, step)
            if "train/loss" not in metrics:
                return
            if step == KILL_AT:
                events["killing"] = time.time()
                servers[-1].kill()
                events["killed"] = time.time()
            elif step == HOLD_AT:  # the test's own pause (excluded from the rates): the server must be
                # dead at least OUTAGE_MIN_S, and back before training ends
                time.sleep(max(0.0, events["killed"] + OUTAGE_MIN_S - time.time()))
                events["restarting"] = time.time()
                servers.append(start_server(servers[0].backend_store_uri, workdir, port=int(uri.rsplit(":", 1)[1])))
                events["back"] = time.time()

        monkeypatch.setattr(MLflowTracker, "log_metrics", log_then_fault)
        # every HTTP request this process sends, with the thread that sent it and when
        requests_sent: list[tuple[str, float]] = []
        send = HTTPAdapter.send

        def counted_send(self: HTTPAdapter, *args: Any, **kwargs: Any) -> Any:
            requests_sent.append((threading.current_thread().name, time.time()))
            return send(self, *args, **kwargs)

        monkeypatch.setattr(HTTPAdapter, "send", counted_send)
        with caplog.at_level(logging.WARNING, logger="medseg.tracking"):
            run_dir = _train(demo_root, tmp_path / "out", uri)  # exit 0 (asserted in _train)
        monkeypatch.undo()
        records = _wait_sent(run_dir)
        _wait_sent(reference)
        client = MlflowClient(uri)
        want, got = _record(client, read_journal(reference)[0]["run_id"]), _record(client, read_journal(run_dir)[0]["run_id"])
        logged = {m.step: m.timestamp for m in client.get_metric_history(read_journal(run_dir)[0]["run_id"], "train/loss")}
    finally:
        for server in servers:
            server.stop()

    assert events["restarting"] - events["killed"] >= OUTAGE_MIN_S
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "failed (" in r.getMessage()]
    # one warning for the outage, not one per failing call (dozens of sends and log calls failed in it)
    during = [r for r in warned if events["killing"] <= r.created <= events["back"]]
    assert len(during) == 1, [r.getMessage() for r in warned]
    # none before the kill; one after the restart is a new failure of its own (on a loaded machine a
    # replayed upload can outlast the client's 10 s request timeout) and is warned once too
    assert all(r.created > events["back"] for r in warned if r not in during), [r.getMessage() for r in warned]
    assert len(warned) <= 2, [r.getMessage() for r in warned]

    # steps/s: the trainer's own timestamps (the journal keeps each log call's), step by step
    ts = {r["step"]: r["ts"] / 1000 for r in records if r["kind"] == "metrics" and "train/loss" in r["data"]}
    ends = {r["step"] for r in records if r["kind"] == "metrics" and "train/epoch_loss" in r["data"]}
    durations = {s: ts[s] - ts[s - 1] for s in ts if s - 1 in ts and s - 1 not in ends}  # no validation inside
    during = [d for s, d in durations.items() if KILL_AT + 1 < s <= HOLD_AT
              and events["killed"] < ts[s - 1] and ts[s] < events["restarting"]]
    normal = [d for s, d in durations.items() if 2 < s <= KILL_AT or s > HOLD_AT + 1]
    assert len(during) >= 30 and len(normal) >= 25, (len(during), len(normal))
    rate_during, rate_normal = 1 / statistics.median(during), 1 / statistics.median(normal)
    # the training thread sent nothing while the server was dead: its log calls only append to the journal,
    # so no step can wait on a refused connection or a retry (counted, not timed); the sender thread did
    # try, at its own pace (a pause of RETRY_S between tries, not a busy loop)
    outage = [name for name, t in requests_sent if events["killed"] < t < events["restarting"]]
    senders = [name for name in outage if name == "medseg-tracking-sender"]
    print(f"steps/s: {rate_normal:.2f} normal, {rate_during:.2f} with the server dead "
          f"({rate_during / rate_normal:.2f}x; {len(normal)} and {len(during)} steps); requests in the outage: "
          f"{len(senders)} from the sender, {len(outage) - len(senders)} from elsewhere")
    assert outage == senders, sorted(set(outage))
    outage_s = events["restarting"] - events["killed"]
    assert 1 <= len(senders) <= 4 * (outage_s / RETRY_S + 1), (len(senders), outage_s)
    # a step that waited on the network would take seconds (the client's retry) against a normal step's
    # tens of milliseconds: a loose bound that a loaded machine's jitter cannot cross (the count above is
    # the exact check)
    assert rate_during >= 0.5 * rate_normal, (rate_during, rate_normal)

    # the replayed record equals the uninterrupted run's: metric keys x steps (and values), params, tags,
    # artifacts; the metrics logged while the server was dead carry their original timestamps
    assert got["status"] == want["status"] == "FINISHED"
    assert got["params"] == want["params"]
    assert got["tags"] == want["tags"]
    assert got["metrics"].keys() == want["metrics"].keys()
    for key in want["metrics"]:
        assert got["metrics"][key] == want["metrics"][key], key
    assert got["artifacts"] == want["artifacts"]
    assert {"checkpoints/best.pt", "model/MLmodel", "history.json"} <= got["artifacts"]
    # an overlay was logged while the server was dead (it went through the journal, and arrived)
    order = [r.get("step") if r["kind"] == "metrics" else r.get("artifact_path") for r in records]
    first, last = order.index(KILL_AT + 1), order.index(HOLD_AT)
    assert "overlays" in order[first:last], order[first:last]
    assert all(logged[s] == round(ts[s] * 1000) for s in ts)  # the original timestamps
