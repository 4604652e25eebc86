"""medseg.runtime: the one all-gather of Python objects, outside and inside a process group; compile_model;
each torchrun rank's device."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
import torch.distributed as dist

from medseg.runtime import dist_ready, gather_objects, glibc


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


def test_each_torchrun_rank_gets_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LOCAL_RANK`` picks the GPU (modulo the GPUs visible); without it, CUDA's current device; no CUDA → CPU."""
    from medseg.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for local, want in (("0", 0), ("3", 3), ("5", 1)):
        monkeypatch.setenv("LOCAL_RANK", local)
        assert resolve_device("auto") == torch.device("cuda", want)
        assert resolve_device("cuda") == torch.device("cuda", want)
        assert resolve_device("cuda:2") == torch.device("cuda", 2)  # an explicit index is kept
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                    reason="torch.compile needs a C++ compiler (the no-compiler error is tested below)")
def test_compile_model_same_outputs_and_gradients_on_the_cpu() -> None:
    """train.compile / predict.compile: torch.compile (Inductor, C++ kernels on the CPU) of a tiny
    conv net gives the eager outputs and gradients within float32 tolerance, sharing the parameters."""
    from medseg.runtime import compile_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 1))
    net.eval()
    x = torch.randn(2, 1, 32, 32)
    compiled = compile_model(net)
    assert set(dict(compiled.named_parameters())) == {f"_orig_mod.{k}" for k, _ in net.named_parameters()}
    with torch.no_grad():
        eager_out = net(x)
        comp_out = compiled(x)
    assert not torch.equal(comp_out, torch.zeros_like(comp_out))
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-4, atol=1e-5)
    eager_grads = torch.autograd.grad(net(x).square().mean(), list(net.parameters()))
    comp_grads = torch.autograd.grad(compiled(x).square().mean(), list(net.parameters()))
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_compile_model_without_a_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.runtime import TrainingError, compile_model

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(TrainingError, match=r"predict.compile: torch.compile needs a C\+\+ compiler"):
        compile_model(torch.nn.Linear(2, 2), "predict.compile")


_FAULTS = """
import resource, sys
import numpy as np
from medseg.runtime import hold_freed_memory
held = hold_freed_memory(int(sys.argv[1]))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(64 << 18, np.float32)  # 64 MiB, allocated, touched and freed once before counting
before = faults()
for _ in range(5):
    np.ones(64 << 18, np.float32)
print(held, faults() - before)
"""


@pytest.mark.skipif(glibc("mallopt") is None, reason="needs glibc")
def test_hold_freed_memory_keeps_a_freed_64_mib_block_for_the_next_allocation() -> None:
    """glibc unmaps a freed 64 MiB block and faults the next one in page by page (16 384 pages each
    time, or 32 huge pages at the least with transparent huge pages); held, the five allocations after
    the first reuse its pages. Counted, not timed, in a child process (the setting is process-wide)."""
    import subprocess
    import sys

    def run(mib: int) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, str(mib)], capture_output=True, text=True, check=True)
        held, faults = out.stdout.split()
        return held, int(faults)

    held, default = run(0)
    assert held == "False" and default >= 5 * 32  # every allocation faulted in again
    held, kept = run(256)
    assert held == "True" and kept <= default // 10, (kept, default)
