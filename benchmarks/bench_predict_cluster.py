"""``medseg predict --engine ray`` against ``--engine local`` on one machine (outside CI).

1. **Predict** — ``--series`` × ``--slices`` generated CT slices (``--size``², uncompressed; the DICOM
   writer of ``bench_predict.py``) through the quick-start U-Net (random weights, fixed seed) and the
   quick-start pre-processing: the local engine, then Ray on one node (all this machine's CPUs), then
   Ray on two nodes (two raylets on loopback, ``ray.cluster_utils.Cluster``, the CPUs split between
   them); the runs interleaved ``--repeats`` times, the fastest of each kept. The cluster is started
   before the timed runs (it is long-lived in use); the timed run includes everything else (model
   actors started and loaded, headers indexed, every case decoded, predicted, written, committed).
   Reported: slices/s, per-stage seconds (index, decode, model, write; summed over workers), the ratio
   to local (done-when: Ray on one node ≥ 0.9 × local) and whether the outputs are identical.
2. **Index** — a synthetic archive of ``--archive`` one-instance series (headers and an 8×8 pixel
   matrix: the work is the header scan) indexed by the local path (``find_series``) and by Ray with
   one node of ``--node-cpus`` CPUs and with two such nodes (workers started first): the fastest
   of three runs in seconds, and the header tasks.
3. **Driver memory of the index** — a synthetic archive of ``--mem-series`` series of ``--mem-slices``
   instances each (headers only, as in 2.): the cases found (:func:`medseg.predict.readers.discover`,
   the headers read here one after the other) with the in-memory reduce (``group_headers``: every
   instance header held, the local engine's) and with the SQLite index the ray engine streams them into
   (``index_headers``: a summary per series): tracemalloc's peak during the reduce and what stays held
   with the cases, in bytes per instance (SQLite's own page cache, bounded at about 2 MiB, is not
   traced), and that both give the same cases.
4. **Manifest** — 10⁵ series (3 files each) recorded pending in one transaction, then each case
   recorded done (series + file rows) as the run does: with the index on ``files.series`` and one
   transaction per case, against the earlier manifest (no index, each statement its own commit),
   per case in ms; and the pending rows of the start (one transaction against a commit per series).

Run: ``python benchmarks/bench_predict_cluster.py [--quick] [--skip predict,index,memory,manifest]``; prints JSON lines and a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import quick_start_checkpoint, write_series  # noqa: E402
from common import markdown_table, report  # noqa: E402


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("study-*/**/*")):
        if p.is_file() and p.name != "series.json":
            h.update(str(p.relative_to(out)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _checkpoint(path: Path) -> Path:
    return quick_start_checkpoint(path, ["train.device=cpu", "train.amp=off", "tracking.enabled=false",
                                         "predict.overlays=false", "inference.tta_flips=false"])


def _cluster(nodes: int, cpus: int) -> Any:
    import ray
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False,
                                                      "object_store_memory": 200 * 2**20})
    for _ in range(nodes - 1):
        c.add_node(num_cpus=cpus, object_store_memory=200 * 2**20)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    return c


def _stop(c: Any) -> None:
    import ray

    ray.shutdown()
    c.shutdown()


def predict_benchmark(n_series: int, n_slices: int, size: int, repeats: int) -> list[dict[str, Any]]:
    from medseg.predict import run_predict

    cores = max(len(os.sched_getaffinity(0)), 1)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        write_series(t / "in", n_series, n_slices, size)
        ckpt = _checkpoint(t / "model.pt")
        run_predict(ckpt, t / "in", t / "warm", progress=False)  # imports, caches
        setups = {"local": None, "ray-1-node": (1, cores), "ray-2-nodes": (2, max(cores // 2, 1))}
        best: dict[str, dict[str, Any]] = {}
        for rep in range(repeats):
            for name, setup in setups.items():
                c = _cluster(*setup) if setup else None
                try:
                    out = t / f"{name}-{rep}"
                    t0 = time.perf_counter()
                    res = run_predict(ckpt, t / "in", out, progress=False, engine="ray" if setup else "local")
                    wall = time.perf_counter() - t0
                finally:
                    if c is not None:
                        _stop(c)
                assert not res.failed, res.failed
                row = {"engine": name, "slices": res.slices, "wall_s": round(wall, 2),
                       "slices_per_s": round(res.slices / wall, 2),
                       "stages_s": {k: round(v, 2) for k, v in res.stages.items()}, "digest": _digest(out)}
                print(json.dumps({"rep": rep, **row}), flush=True)
                if name not in best or wall < best[name]["wall_s"]:
                    best[name] = row
    ref = best["local"]
    rows = []
    for name in ("ray-1-node", "ray-2-nodes"):
        b = best[name]
        rows.append(report(f"predict {ref['slices']} slices, {name} vs local (stages {b['stages_s']}; local "
                           f"{ref['stages_s']})", b["slices_per_s"], ref["slices_per_s"], "slices/s",
                           "outputs identical to local", ok=b["digest"] == ref["digest"]))
    return rows


def write_archive(root: Path, n: int, slices: int = 1) -> None:
    """``n`` CT series of ``slices`` instances with full geometry headers and an 8×8 pixel matrix."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    for s in range(n * slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        if s % slices == 0:
            study, series, frame = generate_uid(), generate_uid(), generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Bench^Mark", f"B{s}"
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * (s % slices)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness, ds.Rows, ds.Columns = [0.8, 0.8], 2.5, 8, 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
        folder = root / f"p{s // slices // 100:03d}" / (f"s{s // slices:05d}" if slices > 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / (f"i{s % slices:04d}.dcm" if slices > 1 else f"s{s:05d}.dcm"), enforce_file_format=True)


def _pid() -> int:
    import medseg.data.dicom  # noqa: F401 — the imports a header task needs, done before the clock starts

    time.sleep(0.2)
    return os.getpid()


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def index_benchmark(n: int, node_cpus: int, repeats: int = 3) -> list[dict[str, Any]]:
    import ray

    from medseg.data.dicom import find_series
    from medseg.predict.cluster import index_reader

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "archive"
        write_archive(root, n)
        find_series(root)  # warm the page cache
        local = find_series(root)
        times = {"local": min(_timed(lambda: find_series(root)) for _ in range(repeats))}
        tasks = {}
        for nodes in (1, 2):
            c = _cluster(nodes, node_cpus)
            try:
                stats: dict[str, float] = {}
                warm = ray.remote(num_cpus=1)(_pid)
                ray.get([warm.remote() for _ in range(2 * nodes * node_cpus)])  # workers started
                got = find_series(root, read_headers=index_reader(ray, stats))
                reader = index_reader(ray, stats)
                times[f"{nodes}"] = min(_timed(lambda r=reader: find_series(root, read_headers=r))
                                        for _ in range(repeats))
                tasks[f"{nodes}"] = int(stats["index_tasks"])
            finally:
                _stop(c)
            assert [s.key for s in got[0]] == [s.key for s in local[0]] and len(got[1]) == len(local[1])
        print(json.dumps({"archive_series": n, "index_s": times, "tasks": tasks}), flush=True)
    return [report(f"index {n} series, Ray 2 nodes × {node_cpus} CPU vs 1 node × {node_cpus} CPU "
                   f"({tasks['2']} header tasks; local find_series {times['local']:.1f} s, Ray 1 node {times['1']:.1f} s)",
                   times["2"], times["1"], "s", "same series as find_series", ok=True)]


def _traced(fn: Any) -> tuple[Any, int, int]:
    """``(result, peak bytes during fn, bytes still held with the result)`` by tracemalloc."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = fn()
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, peak - base, held - base


def memory_benchmark(n_series: int, slices: int) -> list[dict[str, Any]]:
    from medseg.config import Config
    from medseg.predict.readers import discover

    cfg = Config()
    cfg.predict.min_slices = 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "archive"
        write_archive(root, n_series, slices)
        discover(root, cfg)  # warm the page cache and the imports (both ways)
        discover(root, cfg, index=Path(tmp) / "i.sqlite")
        figures, found = {}, {}
        for name, index in (("in memory (group_headers)", None), ("SQLite index (index_headers)", Path(tmp) / "i.sqlite")):
            (cases, skipped), peak, held = _traced(lambda i=index: discover(root, cfg, index=i))
            n = sum(len(c.info.instances) for c in cases if c.info is not None)
            assert n == n_series * slices and not skipped
            found[name] = [(c.key, list(c.files)) for c in cases]
            figures[name] = {"peak_b_per_instance": round(peak / n), "held_b_per_instance": round(held / n)}
            del cases
            print(json.dumps({"memory": name, "series": n_series, "instances": n, "peak_mb": round(peak / 2**20, 2),
                              "held_mb": round(held / 2**20, 2), **figures[name]}), flush=True)
        old, new = figures["in memory (group_headers)"], figures["SQLite index (index_headers)"]
        same = found["in memory (group_headers)"] == found["SQLite index (index_headers)"]
    return [report(f"driver memory of the index, {n_series} series × {slices} instances: peak during the reduce, "
                   f"SQLite index vs in memory (held after: {new['held_b_per_instance']} vs "
                   f"{old['held_b_per_instance']} B/instance)", new["peak_b_per_instance"], old["peak_b_per_instance"],
                   "B/instance", "same cases", ok=same)]


def manifest_benchmark(n_series: int, n_record: int) -> list[dict[str, Any]]:
    from medseg.predict.manifest import Manifest

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        per_case, pending = {}, {}
        for variant in ("indexed+batched", "no index, autocommit"):
            m = Manifest(Path(tmp) / f"{variant[:2]}.sqlite")
            if variant.startswith("no"):
                m.db.execute("DROP INDEX files_series")
            t0 = time.perf_counter()
            with m.batch():
                for s in range(n_series):
                    m.set_series(f"k{s:06d}", kind="dicom", output=f"o/{s}", n_files=3, status="pending", reason=None)
                m.set_files([(f"f{s:06d}-{j}", f"k{s:06d}", "pending", None) for s in range(n_series) for j in range(3)])
            pending_s = time.perf_counter() - t0
            if variant.startswith("no"):  # the earlier set-up: each pending series its own commit (a sample)
                t0 = time.perf_counter()
                for s in range(n_record):
                    m.set_series(f"x{s:06d}", kind="dicom", output=f"x/{s}", n_files=3, status="pending", reason=None)
                pending_s = (time.perf_counter() - t0) / n_record * n_series
            keys = [f"k{s:06d}" for s in np.random.default_rng(0).choice(n_series, n_record, replace=False)]
            t0 = time.perf_counter()
            for k in keys:
                if variant.startswith("no"):
                    m.set_series(k, status="done", reason=None, n_slices=10)
                    m.set_files_of(k, "done")
                else:
                    with m.batch():
                        m.set_series(k, status="done", reason=None, n_slices=10)
                        m.set_files_of(k, "done")
            per_case[variant] = (time.perf_counter() - t0) / n_record * 1e3
            pending[variant] = pending_s
            assert sqlite3.connect(m.path).execute("SELECT COUNT(*) FROM files WHERE status='done'").fetchone()[0] \
                == 3 * n_record
            print(json.dumps({"manifest": variant, "series": n_series, "pending_all_s": round(pending_s, 2),
                              "record_case_ms": round(per_case[variant], 3)}), flush=True)
            m.close()
        rows.append(report(f"manifest: {n_series} series recorded pending at the start (one transaction vs one commit "
                           f"each, the latter timed on {n_record} and scaled)", pending["indexed+batched"],
                           pending["no index, autocommit"], "s", "same rows", ok=True))
        rows.append(report(f"manifest with {n_series} series: record one case (indexed + one transaction vs "
                           "no index + autocommit)", per_case["indexed+batched"], per_case["no index, autocommit"],
                           "ms", "same rows", ok=True))
    return rows


def main(argv: list[str] | None = None, quick: bool = False) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--slices", type=int, default=50)
    ap.add_argument("--size", type=int, default=320, help="≥ 301 (the generator's margins)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--archive", type=int, default=2000)
    ap.add_argument("--node-cpus", type=int, default=1)
    ap.add_argument("--manifest-series", type=int, default=100_000)
    ap.add_argument("--mem-series", type=int, default=2000)
    ap.add_argument("--mem-slices", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of predict,index,memory,manifest")
    a = ap.parse_args(argv or [])
    if quick or a.quick:
        a.series, a.slices, a.size, a.repeats, a.archive, a.manifest_series = 2, 4, 320, 1, 200, 2000
        a.mem_series, a.mem_slices = 100, 5
    torch.set_num_threads(max(len(os.sched_getaffinity(0)), 1))
    skip = set(filter(None, a.skip.split(",")))
    rows: list[dict[str, Any]] = []
    if "manifest" not in skip:
        rows += manifest_benchmark(a.manifest_series, min(500, a.manifest_series))
    if "memory" not in skip:
        rows += memory_benchmark(a.mem_series, a.mem_slices)
    if "index" not in skip:
        rows += index_benchmark(a.archive, a.node_cpus)
    if "predict" not in skip:
        rows += predict_benchmark(a.series, a.slices, a.size, a.repeats)
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
