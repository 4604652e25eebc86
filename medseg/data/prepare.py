"""Make sure a pipeline's data is there before training: generate the demo data, explain what is missing."""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.config import DataConfig
from medseg.data.base import DataError

log = logging.getLogger("medseg.data")

DEEPLESION_HELP = (
    "DeepLesion is distributed by the NIH Clinical Center (search 'NIH DeepLesion download'): "
    "download DL_info.csv and the 56 archives Images_png_01.zip … Images_png_56.zip into one folder "
    "(unzipping is optional: medseg reads the zips directly) and pass it with "
    "--set data.root=/path/to/DeepLesion. To try medseg without it, run the quick start instead: "
    "`medseg train pipelines/quickstart.yaml` (it generates DeepLesion-format demo data), or "
    "`medseg demo-data DIR` and --set data.root=DIR."
)


def prepare_data(cfg: DataConfig) -> None:
    """Generate the demo dataset into ``cfg.root`` when asked and absent; fail clearly when data is missing.

    ``data.generate_if_missing`` writes ``medseg demo-data`` output: DeepLesion-format CT for
    ``data.name: deeplesion``, EM-like cell images (``--kind cells``) for ``data.name: folder``.

    Raises:
        DataError: a DeepLesion root that does not exist (the message says how to get the data).
    """
    root = Path(cfg.root)
    if cfg.name == "deeplesion" and cfg.generate_if_missing and not (root / "DL_info.csv").is_file():
        from medseg.data.synthetic import generate_demo_data

        log.info("generating DeepLesion-format demo data in %s", root)
        generate_demo_data(root, patients=cfg.demo_patients, seed=cfg.demo_seed)
    if cfg.name == "folder" and cfg.generate_if_missing and not (root / "images").is_dir():
        from medseg.data.synthetic import generate_cells_data

        log.info("generating EM-like cell images in %s", root)
        generate_cells_data(root, seed=cfg.demo_seed)
    if not root.exists():
        if cfg.name == "deeplesion":
            raise DataError(f"data.root = {root} does not exist. {DEEPLESION_HELP}")
        raise DataError(f"data.root = {root} does not exist (data.name = {cfg.name})")
