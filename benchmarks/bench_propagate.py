"""A GrabCut propagation round (``train.propagate.source: grabcut``): lesions in threads vs one at a time.

The quick start runs one GrabCut round before its first step and pays it from its 8-minute budget, so
every second the round saves is training time. Both sides run :meth:`Propagator.run_round` on the same
generated DeepLesion-format release with the quick start's settings (``pipelines/quickstart.yaml``):

* **ours** — ``train.propagate.workers: 0`` (one thread per CPU core; GrabCut and the PNG reads release
  the GIL, and each lesion's masks depend on that lesion alone);
* **reference** — ``workers: 1``, the lesions one after another.

Seconds per round (median of the repeats, the sides interleaved), and the agreement: the two rounds'
accepted masks compared slice by slice (they must be identical, as must their counts; otherwise the row
is not ok and the script exits 1). The data is generated in a temporary folder (``--patients``, 40 by
default; ``--quick`` 8). Run: ``python benchmarks/bench_propagate.py [--quick] [--patients N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import median, report, set_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg.config import load_config  # noqa: E402
from medseg.data.synthetic import generate_demo_data  # noqa: E402
from medseg.training.trainer import Trainer  # noqa: E402


def _round(trainer: Trainer, workers: int) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """One fresh round with ``workers``: its seconds, its counts and the lesions' masks."""
    prop = trainer.propagator
    assert prop is not None
    prop.lesions, prop.round, prop.cfg.workers = {}, 0, workers
    t0 = time.perf_counter()
    out = prop.run_round(trainer)
    seconds = time.perf_counter() - t0
    counts = {k: v for k, v in out.items() if k != "seconds"}
    masks = {(key, n): (y0, x0, m) for key, st in prop.lesions.items() for n, (y0, x0, m) in st["slices"].items()}
    return seconds, counts, masks


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) for k in a)


def main(quick: bool = False, patients: int | None = None, repeats: int = 2) -> list[dict[str, Any]]:
    """The benchmark's one row."""
    set_threads()
    n = patients or (8 if quick else 40)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_demo_data(Path(tmp) / "dl", patients=n, seed=0, progress=False)
        cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", [
            f"data.root={root}", f"output_dir={Path(tmp) / 'out'}", "tracking.enabled=false",
            "train.cache_samples=false", "train.num_workers=0", "train.propagate.montage=0"])
        trainer = Trainer(cfg)
        ours_s, ref_s, ok, accepted = [], [], True, 0
        for _ in range(repeats):
            t_ours, c_ours, m_ours = _round(trainer, 0)
            t_ref, c_ref, m_ref = _round(trainer, 1)
            ours_s.append(t_ours)
            ref_s.append(t_ref)
            ok = ok and c_ours == c_ref and _same(m_ours, m_ref)
            accepted = c_ours["accepted"]
    cores = os.cpu_count() or 1
    return [report(f"GrabCut propagation round, {n} patients ({accepted} masks): {cores} threads vs 1",
                   median(ours_s), median(ref_s), "s",
                   f"{accepted} accepted masks identical, counts equal" if ok else "rounds differ", ok=ok)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 patients instead of 40")
    ap.add_argument("--patients", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = main(args.quick, args.patients, args.repeats)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)
