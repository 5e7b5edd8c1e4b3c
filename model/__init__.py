"""VPD-SR inference core: ResShift Swin-UNet, VQGAN f4, residual-shifting diffusion, pipeline, registry.

The names below are imported on first use (PEP 562): every ``vpdsr`` command imports this package
(the entry point is ``model.cli``), and ``vpdsr --help`` must not wait seconds for PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name → the submodule that defines it
_EXPORTS = {
    "AutoencoderConfig": "config",
    "CheckpointError": "errors",
    "DDConfig": "config",
    "DiffusionConfig": "config",
    "InvalidModelRef": "errors",
    "InvalidRequest": "errors",
    "ModelConfig": "config",
    "ModelNotFound": "errors",
    "ModelRef": "registry",
    "Registry": "registry",
    "RegistryEntry": "registry",
    "ResShiftSchedule": "schedule",
    "SEED_LIMIT": "seeds",
    "SRPipeline": "pipeline",
    "SwinUNet": "unet",
    "TilePlan": "pipeline",
    "UNetConfig": "config",
    "VPDSRError": "errors",
    "VQAutoencoder": "autoencoder",
    "sample": "sampler",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .autoencoder import VQAutoencoder
    from .config import AutoencoderConfig, DDConfig, DiffusionConfig, ModelConfig, UNetConfig
    from .errors import CheckpointError, InvalidModelRef, InvalidRequest, ModelNotFound, VPDSRError
    from .pipeline import SRPipeline, TilePlan
    from .registry import ModelRef, Registry, RegistryEntry
    from .sampler import sample
    from .schedule import ResShiftSchedule
    from .seeds import SEED_LIMIT
    from .unet import SwinUNet


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
