"""VPD-SR inference core: ResShift Swin-UNet, VQGAN f4, residual-shifting diffusion, pipeline, registry."""

from .autoencoder import VQAutoencoder
from .config import AutoencoderConfig, DDConfig, DiffusionConfig, ModelConfig, UNetConfig
from .errors import CheckpointError, InvalidModelRef, InvalidRequest, ModelNotFound, VPDSRError
from .pipeline import SRPipeline, TilePlan
from .registry import ModelRef, Registry, RegistryEntry
from .sampler import sample
from .schedule import ResShiftSchedule
from .seeds import SEED_LIMIT
from .unet import SwinUNet

__all__ = [
    "AutoencoderConfig",
    "CheckpointError",
    "DDConfig",
    "DiffusionConfig",
    "InvalidModelRef",
    "InvalidRequest",
    "ModelConfig",
    "ModelNotFound",
    "ModelRef",
    "Registry",
    "RegistryEntry",
    "ResShiftSchedule",
    "SEED_LIMIT",
    "SRPipeline",
    "SwinUNet",
    "TilePlan",
    "UNetConfig",
    "VPDSRError",
    "VQAutoencoder",
    "sample",
]
