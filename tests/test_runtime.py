"""medseg.runtime: the one all-gather of Python objects, outside and inside a process group."""

from __future__ import annotations

import socket

import torch.distributed as dist

from medseg.runtime import dist_ready, gather_objects


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gather_objects_without_a_process_group_is_the_object_alone() -> None:
    assert not dist.is_initialized()
    obj = {"rows": [1, 2], "n": 3}
    parts = gather_objects(obj)
    assert parts == [obj] and parts[0] is obj


def test_gather_objects_in_a_one_process_gloo_group() -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        assert not dist_ready()  # one process: the accumulators skip their reductions
        assert gather_objects(("rows", [1.5, 2.5], 3)) == [("rows", [1.5, 2.5], 3)]  # a real all_gather_object
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()
