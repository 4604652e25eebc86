"""Where code runs: device, mixed precision, distributed set-up, seeding, RNG state, the C heap, environment info.

The bottom tier of medseg: it imports nothing from the package.

Example:
    >>> device = resolve_device("auto")            # CUDA when present, else the CPU
    >>> with torch.autocast(device.type, dtype=amp_dtype(device), enabled=use_amp("auto", device)):
    ...     logits = model(image.to(device))
"""

from __future__ import annotations

import functools
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "TrainingError", "amp_dtype", "barrier", "broadcast_buffers", "broadcast_object", "compile_model", "dist_ready",
    "environment_info", "gather_objects", "glibc", "hold_freed_memory", "init_distributed", "mean_over_ranks",
    "redact_uri",
    "release_freed_memory", "resolve_device", "rng_state", "sample_seed",
    "seed_everything", "set_rng_state", "use_amp",
]


class TrainingError(RuntimeError):
    """Training or inference cannot go on (non-finite loss, unusable checkpoint, no device, ...)."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(name)``.

    Under ``torchrun`` (``LOCAL_RANK`` set) ``auto`` and a bare ``cuda`` mean this rank's own GPU,
    ``cuda:LOCAL_RANK`` (modulo the GPUs visible), never every rank on ``cuda:0``.
    """
    if name in ("auto", "cuda") and torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local) % torch.cuda.device_count()) if local else torch.device("cuda")
    if name == "auto":
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device={name!r} but CUDA is not available; use train.device=auto")
    return dev


def use_amp(setting: str, device: torch.device) -> bool:
    """Mixed precision: ``auto`` = on for CUDA only; ``on`` = also on the CPU (bfloat16); ``off``."""
    if setting == "auto":
        return device.type == "cuda"
    if setting not in ("on", "off"):
        raise TrainingError(f"train.amp must be auto, on or off, got {setting!r}")
    return setting == "on"


def amp_dtype(device: torch.device) -> torch.dtype:
    """float16 (with loss scaling) on CUDA; bfloat16 on the CPU, where it needs no scaling."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def compile_model(model: torch.nn.Module, setting_name: str = "train.compile") -> torch.nn.Module:
    """``torch.compile(model)`` (TorchInductor); the returned module shares ``model``'s parameters.

    Compilation itself happens at the first call. Inductor builds C++ kernels on the CPU (and Triton
    kernels on CUDA), so without a C++ compiler it cannot work: that is said here, up front.

    Raises:
        TrainingError: no C++ compiler (``$CXX``, ``c++``, ``g++`` or ``clang++``) on the PATH.
    """
    import shutil

    names = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(n and shutil.which(n) for n in names):
        raise TrainingError(f"{setting_name}: torch.compile needs a C++ compiler (g++ or clang++) on the PATH; "
                            f"install one (apt-get install g++) or set {setting_name}=false")
    return torch.compile(model)


# ----------------------------------------------------------------------------- distributed


def init_distributed() -> tuple[int, int, int]:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): (rank, world, local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def dist_ready() -> bool:
    """True inside an initialised process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier(world: int) -> None:
    """Wait for every rank (a no-op for one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """``value`` averaged over the ranks (an all-reduce on the device, no host read); itself for one process."""
    if world <= 1:
        return value
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return value / world


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself outside DDP."""
    if not dist_ready():
        return obj
    import torch.distributed as dist

    shared = [obj]
    dist.broadcast_object_list(shared, src=src)
    return shared[0]


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` (picklable) from every rank, in rank order; ``[obj]`` outside a process group.

    The one all-gather of Python objects (per-lesion rows, per-image records, counts) that every
    accumulator's ``reduce_across_ranks`` uses. Inside a process group every rank must call it.

    Example:
        >>> parts = gather_objects((rows, n_images))       # [(rows of rank 0, n), (rows of rank 1, n), ...]
        >>> rows = [r for p in parts for r in p[0]]
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank; a no-op outside DDP.

    DDP broadcasts buffers at each forward of the *wrapped* model; validation runs the bare model,
    so without this each rank would validate with the statistics of its last training batch.
    """
    if not dist_ready():
        return
    import torch.distributed as dist

    for buf in module.buffers():
        dist.broadcast(buf.data, src)


# ----------------------------------------------------------------------------- randomness


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """The seed of sample ``index`` in ``epoch`` (stable across runs and resumes).

    ``stream`` separates independent uses: 0 = augmentation, 1 = the epoch's sample order.
    """
    return int(np.random.SeedSequence([stream, seed, epoch, index]).generate_state(1)[0])


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's (and CUDA's) RNG states, for a checkpoint."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- the C heap

#: glibc ``mallopt`` parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def glibc(name: str) -> Any:
    """A glibc function by name, looked up once (``find_library`` runs ``ldconfig``); None where the C
    library is not glibc or has no such function."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def hold_freed_memory(mib: int) -> bool:
    """Keep freed blocks up to ``mib`` MiB in the process's heap for reuse (glibc ``mallopt``:
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``); 0 leaves glibc's defaults. Returns whether it was set.

    By default glibc maps every block above 32 MiB on its own and unmaps it when freed, so a CPU
    forward pass whose activations are larger (a U-Net on 4 × 256² tiles: 64 MiB a feature map) faults
    all of them back in, page by page, at every batch: measured on the 4096² sliding window, 5.5 M
    page faults, 10 s of system time beside 24 s of user time, and 1.7× the wall time of the same
    window with the blocks held (``benchmarks/bench_predict.py``; PyTorch's CPU tuning guide gets the
    same effect from jemalloc / tcmalloc). The peak stays the forward's own; what is held is returned by
    :func:`release_freed_memory`. Process-wide: ``medseg predict`` and training set it
    (``predict.hold_freed_mib``, ``train.hold_freed_mib``).
    """
    mallopt = glibc("mallopt")
    if mallopt is None or mib <= 0:
        return False
    size = int(mib) << 20
    return bool(mallopt(_M_MMAP_THRESHOLD, size)) and bool(mallopt(_M_TRIM_THRESHOLD, size))


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    After ``medseg predict``'s window has freed large blocks, glibc serves every later allocation below
    its mmap threshold from the heap, where freed temporaries stay resident between the rows that
    outlive them: ~0.6 KiB a lesion of the lesion table's per-component temporaries, or the model's
    activations after the window (~200 MiB) — memory the next stage's arrays cannot reuse, so it would
    add to the process's peak."""
    trim = glibc("malloc_trim")
    if trim is not None:
        trim(0)


# ----------------------------------------------------------------------------- environment


def environment_info() -> dict[str, Any]:
    """Package versions and the git commit (for the run's environment artifact)."""
    import platform
    import subprocess
    from importlib import metadata

    pkgs = {}
    for name in ("medseg", "torch", "monai", "numpy", "scipy", "mlflow", "pydicom", "highdicom",
                 "nibabel", "SimpleITK", "elasticdeform", "opencv-python-headless"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    commit = None
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": pkgs,
        "git_commit": commit,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


# ----------------------------------------------------------------------------- credentials

#: query parameters whose value is a secret (``?password=...``, ``?token=...``, ``?sig=...``)
_SECRET_QUERY = re.compile(r"(?i)^(.*pass.*|.*secret.*|.*token.*|.*key.*|sig|signature|credential.*)$")


def redact_uri(uri: str | None) -> str | None:
    """``uri`` with its credentials replaced by ``***``: the password of the user-info
    (``http://user:pw@host`` → ``http://user:***@host``, ``postgresql://u:pw@db/x`` → ``postgresql://u:***@db/x``),
    a user-info without a password (a token used as the user name) as a whole (``https://tok@host`` →
    ``https://***@host``) and secret-looking query values (``?password=``, ``?token=``, ``?sig=``).
    Anything else (paths, ``sqlite:///...``, ``None``) is returned unchanged. What medseg writes or prints
    of a URI goes through this function.

    Example:
        >>> redact_uri("http://alice:s3cret@mlflow.lab:5000")
        'http://alice:***@mlflow.lab:5000'
    """
    if not uri or "://" not in uri:
        return uri
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:  # not parseable as a URL: hide everything between the scheme and the host
        return re.sub(r"://[^/@]*@", "://***@", uri)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if sep else f"***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.match(k) for k, _ in pairs):
            query = urlencode([(k, "***" if _SECRET_QUERY.match(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
