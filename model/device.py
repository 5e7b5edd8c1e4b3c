"""Device and dtype names as users write them (CLI flags, ``VPDSR_DEVICE``/``VPDSR_DTYPE``)."""

from __future__ import annotations

import torch

from .errors import InvalidRequest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InvalidRequest(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA, where the matrix units run it at full rate and the result stays
    within about 1e-2 of float32, and float32 elsewhere, where half types gain little and cost accuracy."""
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InvalidRequest(f"unknown dtype {name!r}: choose one of {sorted([*DTYPES, 'auto'])}")
    return DTYPES[name]


def resolve_channels_last(name: str, device: torch.device) -> bool:
    """``auto`` is on for CUDA, where cuDNN's channels-last convolutions are the fast ones (the
    autoencoder's convolutions are nine tenths of the work), and off elsewhere."""
    if name not in ("auto", "true", "false"):
        raise InvalidRequest(f"unknown channels-last setting {name!r}: use auto, true or false")
    return device.type == "cuda" if name == "auto" else name == "true"
