"""``medseg predict --engine ray``: the same run as :mod:`medseg.predict.run`, its stages on a Ray cluster.

Ray core (tasks and an actor pool), not Ray Data: each case must reach the driver as its own result
— recorded in the manifest when it arrives, failed alone when its files are bad, committed by the
driver exactly once — and a case is a variable-size stack, not a row. Ray Data's ``map_batches``
streams rows through stages and treats an exception as the dataset's failure (or drops the rows);
tasks with object references give the same streaming (a bounded window of cases in flight, each
stage scheduled where its resources are) with per-case results. See ``docs/cluster.md``.

Stages (each the local engine's own function, so there is one code path per operation):

* index — the DICOM headers read by CPU tasks, a batch of files each
  (:func:`medseg.data.dicom.read_header`), then the one reduce in path order on the driver
  (:func:`medseg.data.dicom.index.index_headers`: the records streamed into an SQLite file in
  OUTPUT_DIR, ``manifest.index.sqlite``, and only a summary per series kept in memory): the series
  are those of a local run; the file is removed at the end of the run;
* decode — :func:`medseg.predict.readers.load_case` in a CPU task per case (its series' instance
  headers read from the index file, on the shared storage);
* model — a pool of :class:`ModelActor` (the model shipped once per actor; one GPU each when the
  cluster has GPUs or ``--device cuda``, else ``predict.actors`` CPU actors: :func:`actor_device`),
  :func:`medseg.predict.case.predict_case`;
* write — :func:`medseg.predict.case.write_case` in a CPU task into its own per-attempt folder
  ``.tmp-part0/<key>.<attempt>``; the driver renames the first finished attempt of a case into place,
  then records it. A worker (or node) that dies mid-case has its task retried by Ray (the model
  actor restarts and reloads); what the dead attempt left in its own folder is never renamed and is
  removed at the end. A case that fails for its own reasons comes back as a message (never retried).

The driver holds the output folder's lock and is the only writer of the manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.inference.predictor import Predictor
from medseg.io import WriteError, fsync_dir, write_error_of
from medseg.predict.case import predict_case, write_case
from medseg.predict.manifest import manifest_name
from medseg.predict.readers import Case, Loaded, load_case
from medseg.predict.run import (
    PredictResult,
    Prepared,
    finish_run,
    first_line,
    predict_threads,
    prepare_run,
    record_done,
    record_failed,
)
from medseg.runtime import TrainingError, hold_freed_memory

log = logging.getLogger("medseg.predict")

__all__ = ["ModelActor", "RAY_MISSING", "actor_device", "check_shared_storage", "import_ray", "index_name",
           "index_reader", "run_ray"]

RAY_MISSING = "--engine ray needs Ray: pip install 'medseg[cluster]' (that is, pip install 'ray[data,default]>=2.40')"
#: retries of a case's task (or model call) whose worker died; then the case is recorded failed (a case
#: that kills its worker every time is not retried forever)
TASK_RETRIES = 3
#: files per header-reading task: about four tasks per CPU, within these bounds
HEADER_BATCH = (16, 256)


def import_ray() -> Any:
    """The ``ray`` module, or :class:`TrainingError` saying in one line what to install."""
    try:
        import ray
    except ImportError:
        raise TrainingError(RAY_MISSING) from None
    return ray


@dataclass
class Failed:
    """A case that failed for its own reasons (``message``), or a write that must stop the run (``stop``)."""

    message: str
    stop: bool = False
    errno: int = 0


# ----------------------------------------------------------------------------- stage functions (run on workers)


def read_headers(paths: list[Path]) -> list[Any]:
    """One index task: :func:`medseg.data.dicom.read_header` of each file, in order."""
    from medseg.data.dicom import read_header

    return [read_header(p) for p in paths]


def decode(case: Case, cfg: Any) -> Loaded | Failed:
    """One decode task: :func:`load_case`, or the case's failure."""
    try:
        return load_case(case, cfg)
    except Exception as e:  # noqa: BLE001 — the case fails, the run goes on
        return Failed(first_line(e))


class ModelActor:
    """Holds the model (deserialised once per actor) and predicts cases on the actor's device."""

    def __init__(self, predictor: Predictor, threads: int | None, device: str) -> None:
        torch.set_num_threads(predict_threads(threads))
        hold_freed_memory(predictor.cfg.predict.hold_freed_mib)
        self.predictor = Predictor(predictor.model, predictor.cfg, torch.device(device))

    def predict(self, loaded: Loaded | Failed) -> tuple[np.ndarray, np.ndarray, float] | Failed:
        """:func:`predict_case` of one case: ``(labels, probabilities, seconds)``."""
        if isinstance(loaded, Failed):
            return loaded
        t0 = time.perf_counter()
        try:
            labels, prob = predict_case(loaded, self.predictor, self.predictor.cfg.predict.batch_size)
        except Exception as e:  # noqa: BLE001
            return Failed(first_line(e))
        return labels, prob, time.perf_counter() - t0

    def pid(self) -> int:
        """The actor's process id."""
        return os.getpid()


def write_attempt(loaded: Loaded | Failed, pred: Any, cfg: Any, fingerprint: str, tmp_root: str
                  ) -> dict[str, Any] | Failed:
    """One write task: :func:`write_case` into this attempt's own folder ``tmp_root/<key>.<attempt>``."""
    if isinstance(loaded, Failed):
        return loaded
    if isinstance(pred, Failed):
        return pred
    labels, prob, predict_s = pred
    folder = Path(tmp_root) / f"{loaded.case.key}.{uuid.uuid4().hex[:12]}"
    try:
        folder.mkdir(parents=True)
        stats = write_case(folder, loaded, labels, prob, cfg, fingerprint, predict_s)
        fsync_dir(folder)
    except Exception as e:  # noqa: BLE001
        shutil.rmtree(folder, ignore_errors=True)
        we = write_error_of(e)
        return Failed(str(we), True, we.errno) if we is not None else Failed(first_line(e))
    return {**stats, "attempt": str(folder), "read_s": loaded.read_s}


def probe(input_file: str, probe_dir: str, token: str) -> str:
    """The shared-storage check on one node: read an input file, write a probe the driver reads (and
    import what the stages need, so that the node's first decode and write tasks do not pay for it)."""
    import highdicom  # noqa: F401
    import nibabel  # noqa: F401

    import medseg.predict.run  # noqa: F401
    with open(input_file, "rb") as f:
        f.read(1024)
    host = socket.gethostname()
    path = Path(probe_dir) / f"{token}-{host}-{os.getpid()}"
    path.write_text(token)
    return str(path)


# ----------------------------------------------------------------------------- the driver


#: connection attempts through Ray Client (``ray://``): its proxy starts a server process per client, and
#: on a loaded head that start sometimes fails ("Starting Ray client server failed"), a transient error
#: that three tries 2 s and 4 s apart did not always outlast in the test suite's full runs: five, 30 s in all
CLIENT_TRIES = 5


def _connect(ray: Any, address: str | None) -> bool:
    """Join (``address``) or start a Ray cluster; True when this call started Ray (and must stop it). A
    Ray Client server that fails to start is tried again (:data:`CLIENT_TRIES` in all, 2, 4, 8, 16 s apart)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
    for attempt in range(1, CLIENT_TRIES + 1):
        try:
            ray.init(**kwargs)
            return True
        except (RuntimeError, ConnectionError) as e:  # the server's failure reaches the client as a
            # ConnectionAbortedError("Initialization failure from server: …RuntimeError: Starting Ray client server failed")
            client = (address or "").startswith("ray://") and "client server failed" in str(e)
            if not client or attempt == CLIENT_TRIES:
                raise
            log.warning("Ray Client at %s: %s (attempt %d of %d); trying again", address, str(e).splitlines()[0],
                        attempt, CLIENT_TRIES)
            time.sleep(2.0 ** attempt)
    return True


def _first_file(root: Path) -> Path | None:
    if root.is_file():
        return root
    for dirpath, _dirs, files in os.walk(root):
        if files:
            return Path(dirpath) / sorted(files)[0]
    return None


def check_shared_storage(ray: Any, root: Path, out: Path) -> int:
    """On every alive node a task reads an input file and writes a probe into OUTPUT_DIR that the
    driver then reads; returns the number of nodes checked.

    Raises:
        TrainingError: a node cannot read INPUT or write OUTPUT_DIR, or the driver cannot see its probe.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    first = _first_file(root)
    if first is None:
        return 0
    probe_dir = out / ".probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(probe)
    refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            str(first), str(probe_dir), token) for n in nodes}
    try:
        for node, ref in refs.items():
            try:
                written = Path(ray.get(ref, timeout=120))
            except Exception as e:  # noqa: BLE001
                raise TrainingError(f"node {node} cannot read {first} or write into {out} ({first_line(e)}); "
                                    "INPUT and OUTPUT_DIR must be on storage every node sees (docs/cluster.md)") from None
            if not written.is_file() or written.read_text() != token:
                raise TrainingError(f"node {node} wrote {written}, which this driver cannot read: OUTPUT_DIR "
                                    "must be on storage every node sees (docs/cluster.md)")
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    return len(refs)


def index_reader(ray: Any, stats: dict[str, float]) -> Any:
    """``read_headers`` for :func:`medseg.data.dicom.find_series`: batches of files in parallel tasks,
    their records yielded in path order (a few batches in flight, so the driver never holds them all
    as futures)."""
    task = ray.remote(num_cpus=1)(read_headers)
    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)

    def run(paths: list[Path]) -> Any:
        size = min(max(len(paths) // (4 * cpus), HEADER_BATCH[0]), HEADER_BATCH[1])
        batches = [paths[i: i + size] for i in range(0, len(paths), size)]
        stats["index_tasks"] = len(batches)
        window = 2 * cpus
        refs = [task.remote(b) for b in batches[:window]]
        nxt = len(refs)
        for k in range(len(batches)):
            records = ray.get(refs[k])
            refs[k] = None
            if nxt < len(batches):
                refs.append(task.remote(batches[nxt]))
                nxt += 1
            yield from records
    return run


def index_name(num_parts: int, part_id: int) -> str:
    """The header index file of a run (part) in OUTPUT_DIR: ``manifest.index.sqlite`` (``manifest-partK-of-N.index.sqlite``)."""
    return Path(manifest_name(num_parts, part_id)).stem + ".index.sqlite"


def actor_device(ray: Any, device: str | None) -> str:
    """The model actors' device: ``cuda`` (one GPU each) when the cluster has GPUs, else ``cpu``; or
    ``--device``'s (``cpu``: CPU actors even where there are GPUs).

    Raises:
        TrainingError: ``--device cuda`` on a cluster without GPUs, or a device neither cpu nor cuda.
    """
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device is None:
        return "cuda" if gpus else "cpu"
    kind = str(device).split(":")[0]
    if kind == "cuda" and not gpus:
        raise TrainingError(f"--device {device}: the Ray cluster has no GPU; run with --device cpu (CPU model actors) "
                            "or without --device")
    if kind not in ("cpu", "cuda"):
        raise TrainingError(f"--device {device}: --engine ray runs its model actors on cpu or cuda")
    return kind


def run_ray(model: str | Path, root: Path, out: Path, overrides: list[str] | None, num_parts: int, part_id: int,
            device: str | None, progress: bool, address: str | None, start: float) -> PredictResult:
    """:func:`medseg.predict.run.run_predict` with ``engine="ray"`` (the caller holds the folder's lock).

    The model actors start (and load the model) while the nodes are probed and the headers indexed.
    """
    ray = import_ray()
    started = _connect(ray, address)
    index = out / index_name(num_parts, part_id)
    try:
        dev = actor_device(ray, device)  # before any work
        out.mkdir(parents=True, exist_ok=True)
        predictor = Predictor.from_ref(model, overrides=list(overrides or []), device="cpu")
        pool, model_ref = _actor_pool(ray, predictor, dev)  # the driver holds model_ref: a restarted actor reloads it
        nodes = check_shared_storage(ray, root, out)
        t0 = time.perf_counter()
        counts: dict[str, float] = {}
        prep = prepare_run(model, root, out, overrides, num_parts, part_id, "cpu",
                           read_headers=index_reader(ray, counts), predictor=predictor, index=index)
        prep.result.engine = "ray"
        prep.result.stages["index"] = time.perf_counter() - t0
        cpus = int(ray.cluster_resources().get("CPU", 0))
        _stream(ray, prep, pool, out, progress)
        del model_ref
        result = finish_run(prep, start)
        result.summary += (f"\nray: {nodes} node(s), {cpus} CPU(s), {len(pool)} model actor(s) on {dev}; index: "
                           f"{int(counts.get('index_tasks', 0))} header task(s)")
        return result
    finally:
        index.unlink(missing_ok=True)
        if started:
            ray.shutdown()


def _actor_pool(ray: Any, predictor: Predictor, device: str) -> tuple[list[Any], Any]:
    """One :class:`ModelActor` per GPU of the cluster (``device`` cuda), else ``predict.actors`` CPU
    actors that ask for no GPU (restarted by Ray when their process or node dies; their calls are
    retried), and the model's object reference, which the caller must hold for the run (a restarting
    actor is constructed from it again)."""
    cfg = predictor.cfg
    gpu = device == "cuda"
    n_actors = int(ray.cluster_resources().get("GPU", 0)) if gpu else max(int(cfg.predict.actors), 1)
    actor_cls = ray.remote(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0, max_restarts=-1,
                           max_task_retries=TASK_RETRIES)(ModelActor)
    model_ref = ray.put(predictor)
    return [actor_cls.remote(model_ref, cfg.predict.threads, device) for _ in range(n_actors)], model_ref


def _stream(ray: Any, prep: Prepared, pool: list[Any], out: Path, progress: bool) -> None:
    """Every case of ``prep.todo`` through decode → model → write with a bounded window in flight; the
    driver commits and records each as it arrives."""
    from tqdm.auto import tqdm

    cfg = prep.predictor.cfg
    n_actors = len(pool)
    decode_task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(decode)
    write_task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(write_attempt)
    cfg_ref = ray.put(cfg)
    tmp_root = prep.tmp_root
    tmp_root.mkdir(parents=True, exist_ok=True)
    window = max(2 * n_actors + int(cfg.predict.prefetch), 2)
    todo = list(prep.todo)
    inflight: dict[Any, tuple[Case, float, int]] = {}
    busy = [0] * n_actors
    committed: set[str] = set()
    bar = tqdm(total=len(todo), unit="series", desc="predict (ray)", disable=not progress)
    t_start = time.perf_counter()

    def submit(case: Case) -> None:
        k = min(range(n_actors), key=lambda i: busy[i])
        busy[k] += 1
        loaded = decode_task.remote(case, cfg_ref)
        pred = pool[k].predict.remote(loaded)
        ref = write_task.remote(loaded, pred, cfg_ref, prep.fingerprint, str(tmp_root))
        inflight[ref] = (case, time.perf_counter(), k)

    try:
        while todo or inflight:
            while todo and len(inflight) < window:
                submit(todo.pop(0))
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            for ref in ready:
                case, t_sub, k = inflight.pop(ref)
                busy[k] -= 1
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayError as e:  # its worker died TASK_RETRIES + 1 times: the case fails
                    res = Failed(first_line(e))
                if isinstance(res, Failed):
                    if res.stop:  # a full disk / failing write stops the run, as locally
                        raise WriteError(out / case.out_rel, res.errno)
                    record_failed(prep, case, res.message)
                else:
                    _commit(prep, case, res, out, committed, time.perf_counter() - t_sub)
                bar.update(1)
                rate = prep.result.slices / max(time.perf_counter() - t_start, 1e-9)
                bar.set_postfix_str(f"{rate:.1f} slices/s")
    finally:
        bar.close()
        for a in pool:
            ray.kill(a)
        shutil.rmtree(tmp_root, ignore_errors=True)  # dead attempts' folders: never a finished output


def _commit(prep: Prepared, case: Case, res: dict[str, Any], out: Path, committed: set[str], total_s: float) -> None:
    """The driver's decision: the first finished attempt of a case is renamed into place and recorded."""
    attempt = Path(res["attempt"])
    if case.key in committed:  # a duplicate attempt: never renamed
        shutil.rmtree(attempt, ignore_errors=True)
        return
    final = out / case.out_rel
    if final.exists():  # renamed by a driver killed before its manifest said done
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(attempt, final)
    fsync_dir(final.parent)
    committed.add(case.key)
    record_done(prep, case, res, res["read_s"], total_s)
