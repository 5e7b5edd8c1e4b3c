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


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidRequest(f"unknown dtype {name!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]
