"""DeepLesion reading: ``Images_png/`` folders vs the ``Images_png_*.zip`` archives vs naive PIL.

On a generated DeepLesion-format release (``generate_demo_data``, 512² slices) the same
:class:`medseg.data.deeplesion.DeepLesionDataset` samples (``split="all"``, 3 context slices,
DICOM windows, ellipse RECIST masks) are read three ways, in samples/s:

* from the unpacked ``Images_png/<series>/<n>.png`` folder (the reference of the zip rows);
* from ``Images_png_01.zip`` / ``Images_png_02.zip`` written here with ``ZIP_STORED`` (how NIH
  distributes them: PNG is already deflated) and again with ``ZIP_DEFLATED``; every sample must
  equal the folder one exactly;
* a naive reference that only decodes each sample's PNGs (the files its context slices
  interpolate between) with PIL and converts them to HU; the dataset does that *and* windowing,
  interpolation and masks, so this ratio is the whole sample against bare decoding.

The page cache holds every file after the first pass, so this measures decoding and overhead,
not the disk. Run: ``python benchmarks/bench_data.py [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from common import report, set_threads, time_pair
from PIL import Image

from medseg.config import DataConfig
from medseg.data.deeplesion import DeepLesionDataset, png_to_hu
from medseg.data.synthetic import generate_demo_data

ZIPS = 2  # series are split over this many archives, so that the multi-archive lookup is exercised


def make_zip_release(src: Path, dst: Path, compression: int) -> int:
    """A release at ``dst`` with ``src``'s CSV and masks and its images as ``Images_png_0k.zip``.

    Returns:
        The archives' total size in bytes.
    """
    dst.mkdir(parents=True)
    shutil.copy2(src / "DL_info.csv", dst / "DL_info.csv")
    (dst / "Masks_png").symlink_to((src / "Masks_png").resolve(), target_is_directory=True)
    series = sorted(p for p in (src / "Images_png").iterdir() if p.is_dir())
    per_zip = math.ceil(len(series) / ZIPS)
    total = 0
    for k in range(ZIPS):
        path = dst / f"Images_png_{k + 1:02d}.zip"
        with zipfile.ZipFile(path, "w", compression=compression) as zf:
            for s in series[k * per_zip : (k + 1) * per_zip]:
                for png in sorted(s.glob("*.png")):
                    zf.write(png, f"Images_png/{s.name}/{png.name}")
        total += path.stat().st_size
    return total


def read_all(ds: DeepLesionDataset) -> list[dict[str, Any]]:
    """Every sample of ``ds`` (none may be unreadable)."""
    out = []
    for i in range(len(ds)):
        s = ds[i]
        if s is None:
            raise RuntimeError(f"sample {i} of {ds.root} could not be read")
        out.append(s)
    return out


def same_samples(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """True when two sample lists hold identical arrays (image, label, instance, truth)."""
    keys = ("image", "label", "instance", "truth")
    return len(a) == len(b) and all(
        all(
            (x.get(k) is None and y.get(k) is None)
            or (x.get(k) is not None and y.get(k) is not None and np.array_equal(x[k], y[k]))
            for k in keys
        )
        for x, y in zip(a, b)
    )


def sample_files(root: Path, samples: list[dict[str, Any]]) -> list[list[Path]]:
    """Per sample, the PNGs its context slices interpolate between (as the dataset reads them)."""
    out = []
    for s in samples:
        meta = s["meta"]
        idx = sorted({f(p) for p in meta["slice_positions"] for f in (math.floor, math.ceil)})
        out.append([root / "Images_png" / meta["series"] / f"{i:03d}.png" for i in idx])
    return out


def naive_read(files: list[list[Path]]) -> list[list[np.ndarray]]:
    """The naive reference: decode each PNG with PIL and convert to HU (int32), nothing else."""
    return [[np.asarray(Image.open(f), dtype=np.int32) - 32768 for f in fs] for fs in files]


def main(quick: bool = False) -> list[dict[str, Any]]:
    """Generate a release, zip it two ways and time the readers; returns the report rows."""
    set_threads()
    patients, size, n = (3, 128, 2) if quick else (6, 512, 7)
    with tempfile.TemporaryDirectory(prefix="medseg-bench-data-") as tmp:
        tmp_path = Path(tmp)
        folder = generate_demo_data(tmp_path / "folder", patients=patients, seed=0, progress=False, image_size=size)
        sizes = {
            "stored": make_zip_release(folder, tmp_path / "stored", zipfile.ZIP_STORED),
            "deflated": make_zip_release(folder, tmp_path / "deflated", zipfile.ZIP_DEFLATED),
        }
        datasets = {
            name: DeepLesionDataset(DataConfig(root=str(tmp_path / name)), "all")
            for name in ("folder", "stored", "deflated")
        }
        samples = {name: read_all(ds) for name, ds in datasets.items()}  # also warms the page cache
        count = len(samples["folder"])
        rows = []
        for name in ("stored", "deflated"):
            ok = same_samples(samples[name], samples["folder"])
            t_zip, t_folder = time_pair(
                lambda ds=datasets[name]: read_all(ds), lambda: read_all(datasets["folder"]), n
            )
            rows.append(
                report(
                    f"DeepLesionDataset {size}², {count} samples: ZIP_{name.upper()} archives vs Images_png/ folder",
                    count / t_zip,
                    count / t_folder,
                    "samples/s",
                    check=f"samples identical: {ok} ({sizes[name] / 2**20:.1f} MiB of zips)",
                    ok=ok,
                )
            )

        files = sample_files(folder, samples["folder"])
        naive = naive_read(files)
        # the naive decoder must see the same HU as the dataset's OpenCV reader
        ok = all(
            np.array_equal(hu, png_to_hu(cv2.imread(str(f), cv2.IMREAD_UNCHANGED)))
            for fs, hus in zip(files, naive)
            for f, hu in zip(fs, hus)
        )
        n_png = sum(len(fs) for fs in files)
        t_ds, t_naive = time_pair(lambda: read_all(datasets["folder"]), lambda: naive_read(files), n)
        rows.append(
            report(
                f"DeepLesionDataset {size}², {count} samples (folder): full sample vs naive PIL decode→HU",
                count / t_ds,
                count / t_naive,
                "samples/s",
                check=f"PIL HU = OpenCV HU on {n_png} PNGs: {ok}",
                ok=ok,
            )
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    rows = main(parser.parse_args().quick)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)
