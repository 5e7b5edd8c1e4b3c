"""Device, dtype and CPU-thread choices as users write them (CLI flags, ``VPDSR_DEVICE``/``VPDSR_DTYPE``/
``VPDSR_CHANNELS_LAST``/``VPDSR_THREADS``), and the CPU facts that ``auto`` rests on.

``auto`` is the fast path of the machine at hand: bf16 where the hardware has matrix units for it
(CUDA; CPUs with AMX or AVX-512 BF16), float32 where it does not; channels-last where the
convolution kernels are the fast ones; no more threads than the cores this process may run on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import InvalidRequest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CGROUP_ROOT = Path("/sys/fs/cgroup")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InvalidRequest(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def cpu_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AMX tiles or AVX-512 BF16 dot products.

    oneDNN also runs bf16 on plain AVX-512 and AVX2 by emulation, which is slower than float32
    (measured on an AVX2 EPYC: bf16 3×3 convolutions at a tenth of float32's rate and GEMM at
    under a fiftieth, ``benchmarks/bench_cpu.py``), so only the native instructions count.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and on CPUs with bf16 matrix units (:func:`cpu_bf16_units`),
    where the result stays within the quality guard of float32 at several times its speed, and
    float32 elsewhere, where bf16 is emulated and slower. ``device`` None means the CPU."""
    if name == "auto":
        on_cuda = device is not None and device.type == "cuda"
        return torch.bfloat16 if on_cuda or cpu_bf16_units() else torch.float32
    if name not in DTYPES:
        raise InvalidRequest(f"unknown dtype {name!r}: choose one of {sorted([*DTYPES, 'auto'])}")
    return DTYPES[name]


def resolve_channels_last(name: str) -> bool:
    """``auto`` is on everywhere the model runs: cuDNN's and oneDNN's channels-last convolutions are
    the fast ones (the autoencoder's convolutions are nine tenths of the work). On the CPU a 3×3
    convolution runs 1.3× faster in float32 and 2.2× faster in bf16 (issue 28); ``false`` keeps
    the contiguous reference layout."""
    if name not in ("auto", "true", "false"):
        raise InvalidRequest(f"unknown channels-last setting {name!r}: use auto, true or false")
    return name != "false"


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its CPU affinity, capped by its cgroup's CPU quota.

    A container limited to two CPUs (``cpu.max`` 200000 100000) on a 64-core host still sees 64
    cores in ``os.cpu_count()``; 64 threads time-sliced onto two cores are much slower than two.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota else max(1, cores)


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time per period allowed to this process's cgroup (v2 ``cpu.max`` of its own
    cgroup and every ancestor, the tightest wins; v1 ``cpu.cfs_quota_us``), None when unlimited."""
    quotas = []
    for folder in _cgroup_folders(root):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max":
            quotas.append(int(quota) / int(period))
    v1 = root / "cpu"
    try:
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        if quota_us > 0:
            quotas.append(quota_us / int((v1 / "cpu.cfs_period_us").read_text()))
    except (OSError, ValueError):
        pass
    return min(quotas, default=None)


def _cgroup_folders(root: Path) -> list[Path]:
    """The cgroup v2 folder of this process (from ``/proc/self/cgroup``) and its ancestors up to ``root``."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return [root]
    own = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), "/")
    folder = root / own.strip("/")
    return [folder, *folder.parents[: len(folder.relative_to(root).parts)]]


def resolve_threads(requested: int | None = None) -> int:
    """Intra-op CPU threads of the model, set process-wide (PyTorch has one CPU thread pool):
    ``requested`` when given, else PyTorch's own count (``OMP_NUM_THREADS``, or what the process
    set) capped at :func:`usable_cpus`, since PyTorch counts cores without a container's quota."""
    threads = requested if requested is not None else min(torch.get_num_threads(), usable_cpus())
    if threads < 1:
        raise InvalidRequest(f"threads must be at least 1, got {threads}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
