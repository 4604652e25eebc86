"""A tracking server that does not answer, or goes away mid-run: one clear line, and training is never lost."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from medseg.cli import main
from medseg.tracking.connect import choose_uri
from tests.conftest import tiny_overrides
from tests.mlflow_server import free_port, start_server

ROOT = Path(__file__).resolve().parents[2]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_unreachable_server_is_one_line_within_10_s(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tick = time.monotonic()
    rc = main(["train", str(ROOT / "pipelines" / "quickstart.yaml"), "--set", f"tracking.uri={uri}",
               "--set", f"output_dir={tmp_path / 'out'}"])
    elapsed = time.monotonic() - tick
    err = capsys.readouterr().err
    assert rc != 0
    assert elapsed < 10, elapsed
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("medseg train: error:") and uri in lines[0]
    assert "tracking.offline: true" in lines[0] and "start it" in lines[0]
    assert not (tmp_path / "out").exists()  # stopped before anything was prepared or written


def test_offline_modes_choose_the_local_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    local = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert choose_uri(uri, True, tmp_path) == local  # never contacted
    with caplog.at_level(logging.WARNING, logger="medseg.tracking"):
        tick = time.monotonic()
        assert choose_uri(uri, "auto", tmp_path) == local
        assert time.monotonic() - tick < 10
    assert any(uri in r.getMessage() and "does not answer" in r.getMessage() for r in caplog.records)
    assert choose_uri(local, False, tmp_path) == local  # a local store is never probed


@pytest.mark.slow
def test_server_killed_mid_training_exit_0_then_track_sync_completes_the_record(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    """The server dies right after the run started (at the first checkpoint) and does not come back
    during the run: every metric goes to the journal, the overlays and model upload and
    ``set_terminated`` fail; the command exits 0 with one warning for the outage and one pointing to
    ``medseg track sync``. Restarted on the same store, ``track sync`` completes the run's record."""
    from mlflow.tracking import MlflowClient

    from medseg.tracking.journal import read_journal
    from medseg.training.trainer import Trainer

    backend, workdir = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}", tmp_path / "server"
    server = start_server(backend, workdir)
    save = Trainer.save_checkpoint

    def save_then_kill(self: Trainer, name: str = "last.pt") -> Path:
        path = save(self, name)
        server.stop()  # the server is gone from here on
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_kill)
    out = tmp_path / "out"
    ov = tiny_overrides(demo_root, out, **{"tracking.uri": server.uri, "train.max_steps": 3, "train.log_every": 1})
    try:
        with caplog.at_level(logging.INFO):
            tick = time.monotonic()
            assert main(["train", str(ROOT / "pipelines" / "quickstart.yaml"), *_sets(ov)]) == 0
            elapsed = time.monotonic() - tick
    finally:
        server.stop()
    assert elapsed < 60, elapsed  # nothing waited on the dead server
    # this run's warnings (a sender thread left by an earlier test of another store may still be retrying)
    warnings = [r.getMessage() for r in caplog.records if r.name == "medseg.tracking" and r.levelno >= logging.WARNING
                and server.uri in r.getMessage()]
    assert len(warnings) == 2, warnings  # the outage, once; where the rest of the record is
    assert server.uri in warnings[0] and "medseg track sync" in warnings[1]
    (run_dir,) = (out / "quickstart").iterdir()
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "history.json").is_file()
    header, records, sent = read_journal(run_dir)
    assert sent < len(records) and records[-1] == {**records[-1], "kind": "status", "status": "FINISHED"}

    server = start_server(backend, workdir)  # back, on another port
    try:
        capsys.readouterr()
        assert main(["track", "sync", str(run_dir), "--tracking-uri", server.uri]) == 0
        assert "journal records sent" in capsys.readouterr().out
        client = MlflowClient(server.uri)
        run = client.get_run(header["run_id"])
        assert run.info.status == "FINISHED"
        expected: dict[str, set[int]] = {}
        for rec in records:
            if rec["kind"] == "metrics":
                for key in rec["data"]:
                    expected.setdefault(key, set()).add(rec["step"])
        assert {"train/loss", "val/dice", "train/epoch_loss"} <= set(expected)
        for key, steps in expected.items():
            assert {m.step for m in client.get_metric_history(run.info.run_id, key)} == steps, key
        assert run.data.params["train.max_steps"] == "3"
        assert read_journal(run_dir)[2] == len(records)  # all acknowledged: a second sync sends nothing
        assert main(["track", "sync", str(run_dir), "--tracking-uri", server.uri]) == 0
        assert " 0 journal records sent" in capsys.readouterr().out
    finally:
        server.stop()


def test_a_failing_store_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every tracker call on a store that fails returns; one warning, the rest dropped without a try."""
    from medseg.tracking import MLflowTracker

    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.start("e", "r")
    assert run_id
    calls: list[str] = []

    class Broken:
        def __getattr__(self, name: str) -> Any:
            def fail(*a: Any, **k: Any) -> None:
                calls.append(name)
                raise ConnectionError("server gone")

            return fail

    tracker.client = Broken()
    with caplog.at_level(logging.WARNING, logger="medseg.tracking"):
        tracker.log_params({"a": 1})
        tracker.log_metrics({"x": 1.0}, 1)
        tracker.set_tags({"t": "v"})
        tracker.log_artifact(tmp_path / "mlflow.db")
        tracker.log_text("x", "x.txt")
        tracker.log_model(tmp_path, "model")
        tracker.end("FINISHED")
    assert calls == ["get_run"]  # the first call failed; the others were dropped, not tried
    # (this tracker's warnings: a background journal of an earlier test may log beside it in a full run)
    mine = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("medseg")
            and str(tmp_path) in r.getMessage()]
    assert len(mine) == 1
    assert tracker.dropped == 7


def test_a_resumed_run_sends_what_its_journal_holds_first(tmp_path: Path) -> None:
    """What a process left unsent (the store was away until it ended) goes first when the run is
    resumed (``start_training_run`` attaches the journal before reopening the run), in order."""
    from mlflow.tracking import MlflowClient

    from medseg.tracking import MLflowTracker
    from medseg.tracking.journal import read_journal

    uri, run_dir = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    first = MLflowTracker(uri)
    run_id = first.start("e", "r")

    class Away:
        def __getattr__(self, name: str) -> Any:
            def fail(*a: Any, **k: Any) -> None:
                raise ConnectionError("server gone")

            return fail

    first.client = Away()
    first.attach_journal(run_dir, run_id)
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": 1.0 / step}, step)
    first.end("KILLED")
    assert read_journal(run_dir)[2] == 0  # nothing reached the store

    second = MLflowTracker(uri)
    second.attach_journal(run_dir, run_id)
    second.start("", "", run_id=run_id)
    second.log_metrics({"train/loss": 0.2}, 4)
    second.end("FINISHED")
    _, records, sent = read_journal(run_dir)
    assert sent == len(records) == 7  # 3 metrics, KILLED, RUNNING, 1 metric, FINISHED
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"
