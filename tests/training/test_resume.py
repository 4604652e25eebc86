"""The run folder's lock under ``torchrun``: rank 0 takes it for the run; the other ranks share the
folder by design and never refuse, while a second training of the folder still does."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.io import FolderBusy
from medseg.training.resume import lock_run_dir


def test_only_rank_0_takes_the_run_folder_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir, rank=0):
        assert (run_dir / ".medseg.lock").is_file()
        for rank in (1, 3):  # the other ranks of the same torchrun: no refusal
            with lock_run_dir(run_dir, rank=rank) as d:
                assert d == run_dir
        # the check can fail: a second training's rank 0 (a new open of the lock file) is refused
        with pytest.raises(FolderBusy, match="in use by another medseg train"), lock_run_dir(run_dir, rank=0):
            pass
    with lock_run_dir(run_dir, rank=0):  # released with the block
        pass
