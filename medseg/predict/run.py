"""``medseg predict``: a trained model over a folder of DICOM series, NIfTI volumes or PNG / TIFF images.

The model is loaded once; a background thread reads, decodes and pre-processes the next cases
(``predict.prefetch`` ahead) while the current one is predicted and written. Each case's outputs go
to a temporary folder, are re-read and checked, and the folder is renamed to
``OUTPUT_DIR/<study>/<series>/`` — a run killed at any moment leaves no half-written case. The
SQLite manifest (:mod:`medseg.predict.manifest`) records every input file and every case; a rerun
skips finished cases and retries failed ones.

One writer per output folder (per part with ``--num-parts``): the run holds an ``flock`` on
``OUTPUT_DIR/manifest.lock`` (a part: ``manifest-partK-of-N.lock``; :func:`medseg.io.exclusive_lock`)
from before it loads the model to its end; a second run on the same folder and part refuses at once with :class:`medseg.io.FolderBusy`
naming the holder, and touches nothing. The working folder ``.tmp-part{K}`` (``-of-{N}`` with parts)
is wiped only by the lock's holder: what is in it was left by a dead run. A full disk or a failing write
(:class:`medseg.io.WriteError`) stops the run: the case being written is neither done nor failed (its
temporary folder is removed) and the rerun predicts it.

Example:
    >>> result = run_predict("outputs/quickstart/unet-20261130-101500", "/data/export", "predictions")
    >>> print(result.summary)
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medseg.data.windowing import annotation_window_warning
from medseg.inference.predictor import Predictor
from medseg.io import WriteError, exclusive_lock, write_error_of
from medseg.predict.case import process_case
from medseg.predict.manifest import Manifest, manifest_name, merge_manifests
from medseg.predict.readers import Case, discover, load_case
from medseg.runtime import compile_model, hold_freed_memory

__all__ = [
    "PredictResult", "Prepared", "finish_run", "first_line", "model_fingerprint", "predict_threads",
    "prepare_run", "record_done", "record_failed", "run_predict", "shard_of",
]

log = logging.getLogger("medseg.predict")


@dataclass
class PredictResult:
    """What a ``medseg predict`` run did."""

    output_dir: Path
    manifest: Path
    processed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    already_done: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    summary: str = ""
    seconds: float = 0.0
    slices: int = 0
    #: seconds per stage (index, decode, model, write), summed over the cases
    stages: dict[str, float] = field(default_factory=dict)
    engine: str = "local"
    #: the resolved config the run used (the model's, with the overrides)
    config: Any = None


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's parameters and buffers (names, shapes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def shard_of(key: str, num_parts: int) -> int:
    """The part (0..num_parts−1) a case belongs to: a hash of its key, stable across reruns and machines."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % num_parts


def first_line(e: BaseException) -> str:
    """The one line a failed case records: ``ExceptionType: first line of its message``."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:500]


# ----------------------------------------------------------------------------- the run


def predict_threads(threads: int | None) -> int:
    """Torch CPU threads for predicting: ``predict.threads``, or every core this process may use.

    Training's ``train.threads`` (often 1 in the CPU recipes, to leave a core to the DataLoader) is
    never inherited: inference with one thread ran about 6× slower than with all cores.
    """
    if threads:
        return max(int(threads), 1)
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # no affinity API (macOS, Windows)
        return max(os.cpu_count() or 1, 1)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def run_predict(model: str | Path, input_path: str | Path, output_dir: str | Path, overrides: list[str] | None = None,
                num_parts: int = 1, part_id: int = 0, device: str | None = None, progress: bool = True,
                engine: str = "local", address: str | None = None) -> PredictResult:
    """Predict every case under ``input_path`` into ``output_dir`` (resumable; see the module doc).

    Args:
        model: checkpoint file, ``medseg train`` run folder or MLflow URI (``runs:/<id>/model``).
        input_path: DICOM folder (any nesting), NIfTI file or folder, PNG / TIFF folder.
        output_dir: where outputs and the manifest go.
        overrides: ``key=value`` on top of the model's own config (``predict.*``, ``inference.*``).
        num_parts, part_id: process only the cases of part ``part_id`` of ``num_parts`` (by key hash);
            under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks split the cases the same way.
        device: ``cpu``, ``cuda``... (default: CUDA when present, else the CPU).
        progress: show a tqdm progress bar.
        engine: ``local`` (this process) or ``ray`` (a Ray cluster: :mod:`medseg.predict.cluster`).
        address: the Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``; None = start Ray here).
    """
    start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if num_parts == 1 and world > 1:
        num_parts, part_id = world, int(os.environ.get("RANK", "0"))
    if not 0 <= part_id < num_parts:
        raise ValueError(f"--part-id must be in 0..{num_parts - 1}, got {part_id}")
    if engine not in ("local", "ray"):
        raise ValueError(f"--engine must be local or ray, got {engine!r}")
    out = Path(output_dir)
    what = "medseg predict" + (f" of part {part_id} of {num_parts}" if num_parts > 1 else "")
    with exclusive_lock(out / Path(manifest_name(num_parts, part_id)).with_suffix(".lock"), what):  # before any work
        if engine == "ray":
            from medseg.predict.cluster import run_ray

            return run_ray(model, Path(input_path), out, overrides, num_parts, part_id, device, progress, address,
                           start)
        return _run_locked(model, Path(input_path), out, overrides, num_parts, part_id, device, progress, world, start)


@dataclass
class Prepared:
    """A run set up (the lock held): the model, the manifest with every case pending, the cases to do."""

    predictor: Predictor
    fingerprint: str
    manifest: Manifest
    result: PredictResult
    todo: list[Case]
    tmp_root: Path


def prepare_run(model: str | Path, root: Path, out: Path, overrides: list[str] | None, num_parts: int, part_id: int,
                device: str | None, read_headers: Any = None, predictor: Predictor | None = None,
                index: Path | None = None) -> Prepared:
    """Load the model (unless ``predictor`` is given), find the cases (``read_headers``, ``index``: see
    :func:`medseg.predict.readers.discover`), record every file and case in the manifest (one
    transaction, a case's file rows at a time) and wipe the dead run's working folder."""
    predictor = predictor or Predictor.from_ref(model, overrides=list(overrides or []), device=device)
    cfg = predictor.cfg
    if (warn := annotation_window_warning(cfg.data)) is not None:
        log.warning("%s", warn)
    torch.set_num_threads(predict_threads(cfg.predict.threads))
    hold_freed_memory(cfg.predict.hold_freed_mib)  # no page faults of every activation at every forward
    fingerprint = model_fingerprint(predictor.model)
    if cfg.predict.compile:  # after the fingerprint: a compiled module's state_dict keys differ
        predictor.model = compile_model(predictor.model, "predict.compile")
    out.mkdir(parents=True, exist_ok=True)
    base = root if root.is_dir() else root.parent
    cases, skipped = discover(root, cfg, exclude=[out], read_headers=read_headers, index=index)
    mine = [c for c in cases if shard_of(c.key, num_parts) == part_id]
    manifest = Manifest(out / manifest_name(num_parts, part_id))
    manifest.set_run(model=str(model), model_fingerprint=fingerprint, num_parts=num_parts, part_id=part_id,
                     started=time.time(), finished="")
    result = PredictResult(out, manifest.path, config=cfg)
    todo: list[Case] = []
    with manifest.batch():
        manifest.set_files([(_rel(p, base), None, "skipped", r) for p, r in skipped])
        for c in mine:
            done = manifest.status(c.key) == "done" and (out / c.out_rel).is_dir()
            if done:
                result.already_done.append(c.key)
            else:
                todo.append(c)
                manifest.set_series(c.key, kind=c.kind, output=c.out_rel, n_files=len(c.files), status="pending",
                                    reason=None)
            manifest.set_files([(_rel(p, base), c.key, "done" if done else "pending", None) for p in c.files])
    tmp_root = out / (f".tmp-part{part_id}" + (f"-of-{num_parts}" if num_parts > 1 else ""))
    if tmp_root.exists():  # left by a dead run (we hold the lock): never a finished output
        shutil.rmtree(tmp_root)
    return Prepared(predictor, fingerprint, manifest, result, todo, tmp_root)


def record_done(prep: Prepared, case: Case, stats: dict[str, Any], read_s: float, total_s: float) -> None:
    """A case written and in place: its series and file rows say done (one transaction)."""
    with prep.manifest.batch():
        prep.manifest.set_series(case.key, status="done", reason=stats.get("note"), n_slices=stats["n_slices"],
                                 n_lesions=stats["n_lesions"], read_s=read_s, predict_s=stats["predict_s"],
                                 write_s=stats["write_s"], total_s=total_s)
        prep.manifest.set_files_of(case.key, "done")
    r = prep.result
    r.processed.append(case.key)
    r.slices += stats["n_slices"]
    for stage, v in (("decode", read_s), ("model", stats["predict_s"]), ("write", stats["write_s"])):
        r.stages[stage] = r.stages.get(stage, 0.0) + v


def record_failed(prep: Prepared, case: Case, msg: str) -> None:
    """A case that failed for its own reasons (its message: :func:`first_line`)."""
    log.warning("case %s (%s) failed: %s", case.key, case.out_rel, msg)
    with prep.manifest.batch():
        prep.manifest.set_series(case.key, status="failed", reason=msg)
        prep.manifest.set_files_of(case.key, "failed", msg)
    prep.result.failed[case.key] = msg


def finish_run(prep: Prepared, start: float) -> PredictResult:
    """Mark the manifest finished, close it and build the summary."""
    prep.manifest.set_run(finished=time.time())
    result = prep.result
    result.counts = prep.manifest.counts()
    result.seconds = time.perf_counter() - start
    result.summary = summary_table(prep.manifest, result)
    prep.manifest.close()
    return result


def _run_locked(model: str | Path, root: Path, out: Path, overrides: list[str] | None, num_parts: int, part_id: int,
                device: str | None, progress: bool, world: int, start: float) -> PredictResult:
    """:func:`run_predict` while holding the output folder's (part's) lock."""
    from tqdm.auto import tqdm

    t_index = time.perf_counter()
    prep = prepare_run(model, root, out, overrides, num_parts, part_id, device)
    prep.result.stages["index"] = time.perf_counter() - t_index
    predictor, cfg, todo, tmp_root = prep.predictor, prep.predictor.cfg, prep.todo, prep.tmp_root

    q: queue.Queue = queue.Queue(maxsize=max(int(cfg.predict.prefetch), 1))
    stop = threading.Event()

    def reader() -> None:
        for c in todo:
            if stop.is_set():
                break
            try:
                q.put((c, load_case(c, cfg), None))
            except Exception as e:  # noqa: BLE001 — a bad case is recorded, the run carries on
                q.put((c, None, e))
        q.put(None)

    def inline() -> Any:  # predict.prefetch = 0: read each case when it is its turn (no overlap)
        for c in todo:
            try:
                yield c, load_case(c, cfg), None
            except Exception as e:  # noqa: BLE001
                yield c, None, e

    if int(cfg.predict.prefetch) > 0:
        threading.Thread(target=reader, name="medseg-predict-reader", daemon=True).start()
        items: Any = iter(q.get, None)
    else:
        items = inline()
    bar = tqdm(total=len(todo), unit="series", desc="predict", disable=not progress)
    try:
        for item in items:
            case, loaded, err = item
            t0 = time.perf_counter()
            try:
                if err is not None:
                    raise err
                stats = process_case(loaded, predictor, out, tmp_root, prep.fingerprint)
                record_done(prep, case, stats, loaded.read_s, loaded.read_s + time.perf_counter() - t0)
            except WriteError:
                raise  # a full disk stops the run (recording the case failed would write to it): the rerun does it
            except Exception as e:  # noqa: BLE001
                we = write_error_of(e) if err is None else None  # an OSError ENOSPC from a writer not ours
                if we is not None:
                    raise we from e
                record_failed(prep, case, first_line(e))
            bar.update(1)
    finally:
        stop.set()
        bar.close()
        if tmp_root.exists() and not any(tmp_root.iterdir()):
            tmp_root.rmdir()
    result = finish_run(prep, start)
    if num_parts > 1 and part_id == 0 and world > 1:
        _wait_for_parts(out, num_parts)
        result.manifest = merge_manifests(out, num_parts)
    return result


def _wait_for_parts(out: Path, num_parts: int, timeout_s: float = 3600.0) -> None:
    """Rank 0 under torchrun: wait until every part's manifest says it finished (or the timeout)."""
    import sqlite3

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        done = 0
        for k in range(num_parts):
            p = out / manifest_name(num_parts, k)
            try:
                with sqlite3.connect(str(p)) as db:
                    row = db.execute("SELECT value FROM run WHERE key = 'finished'").fetchone()
                done += bool(row and row[0])
            except sqlite3.Error:
                pass
        if done == num_parts:
            return
        time.sleep(2.0)
    log.warning("not every part finished within %.0f s; merging the manifests there are", timeout_s)


def summary_table(manifest: Manifest, result: PredictResult) -> str:
    """The end-of-run table: cases and files by status, the most common skip reasons, failures, speed."""
    counts = manifest.counts()
    lines = ["", "status      cases   files"]
    for st in ("done", "skipped", "failed", "pending"):
        lines.append(f"{st:<10}{counts['series'].get(st, 0):>6}{counts['files'].get(st, 0):>8}")
    def kind(reason: str) -> str:
        head, _, rest = reason.partition(": ")
        if head == "series skipped":  # keep the rule that skipped it
            head = f"{head}: {rest.split(' [')[0]}"
        return head.split(" (")[0].strip()[:80]

    reasons = Counter(kind(r["reason"]) for r in manifest.rows("files") if r["status"] == "skipped" and r["reason"])
    if reasons:
        lines.append("")
        lines.append("files not used (most common reasons):")
        lines += [f"  {n:>5}  {reason}" for reason, n in reasons.most_common(8)]
    if result.failed:
        lines.append("")
        lines.append("failed cases:")
        lines += [f"  {k}: {msg}" for k, msg in sorted(result.failed.items())[:20]]
    rate = result.slices / result.seconds if result.seconds > 0 else 0.0
    lines.append("")
    lines.append(f"this run: {len(result.processed)} case(s) predicted ({result.slices} slices, {rate:.1f} slices/s), "
                 f"{len(result.already_done)} already done, {len(result.failed)} failed, {result.seconds:.1f} s")
    if result.stages:
        lines.append("stage time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.stages.items())
                     + (" (summed over parallel workers)" if result.engine == "ray" else ""))
    return "\n".join(lines)
