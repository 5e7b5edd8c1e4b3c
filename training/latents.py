"""The frozen VQGAN latent space of the diffusion trainers, the training pairs made in it, and the
check that training crops give latents the UNet can take.

Teacher and student both learn in the latent space of a frozen autoencoder through the codec that
inference uses (:class:`model.latent.LatentCodec`), so training and serving latents cannot drift
apart; decoding snaps latents to the codebook with a straight-through gradient so that
image-space losses still train whatever produced the latent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from model.autoencoder import VQAutoencoder
from model.checkpoint import load_into, read_state_dict
from model.config import AutoencoderConfig, DiffusionConfig, UNetConfig
from model.latent import LatentCodec
from model.registry import Registry
from model.unet import SwinUNet

from .config_files import Config, ConfigError
from .degradations import Degrader


class AutoencoderSource(Config):
    """Where the frozen autoencoder comes from: a registry entry (``ref``: any entry with autoencoder
    weights, e.g. one written by ``vpdsr train autoencoder`` or ``vpdsr import-resshift``) or an
    official ``autoencoder_vq_f4.pth`` (``checkpoint``, with ``config`` its architecture)."""

    ref: str | None = None
    checkpoint: Path | None = None
    config: AutoencoderConfig = Field(default_factory=AutoencoderConfig)

    def describe(self) -> str:
        return self.ref if self.ref is not None else f"checkpoint:{Path(self.checkpoint or '').name}"

    def load(self, registry: Registry) -> tuple[AutoencoderConfig, dict[str, Tensor]]:
        """The architecture and weights it names."""
        if (self.ref is None) == (self.checkpoint is None):
            raise ConfigError("give the autoencoder as exactly one of a registry reference (--autoencoder REF) "
                              "or an official checkpoint (--autoencoder-checkpoint FILE)")
        if self.checkpoint is not None:
            return self.config, read_state_dict(self.checkpoint)
        entry = registry.resolve(self.ref)  # type: ignore[arg-type]
        _, state = entry.state_dicts()
        if not state:
            raise ConfigError(f"registry entry {entry.ref} holds no autoencoder weights")
        return entry.config().autoencoder, state


def build_codec(
    config: AutoencoderConfig, state: dict[str, Tensor], diffusion: DiffusionConfig, device: torch.device
) -> LatentCodec:
    """The frozen autoencoder of a diffusion trainer, in float32 on ``device``, with the latent
    scaling (``diffusion.scale_factor``) and super-resolution factor (``diffusion.sf``) of the model."""
    autoencoder = VQAutoencoder.from_config(config)
    load_into(autoencoder, state, "autoencoder")
    return frozen_codec(autoencoder, diffusion, device)


def frozen_codec(autoencoder: VQAutoencoder, diffusion: DiffusionConfig, device: torch.device) -> LatentCodec:
    """The codec of a loaded ``autoencoder`` (frozen, float32, on ``device``) for the model of ``diffusion``."""
    return LatentCodec(autoencoder.to(device), latent_scaling=diffusion.scale_factor, upscale=diffusion.sf)


def check_sizes(crop: int, sf: int, latent_factor: int, unet: SwinUNet, unet_config: UNetConfig) -> None:
    """Fail at start-up, not at the first forward pass, when HR crops of ``crop``² do not give LR
    images and latents that the UNet can take (a teacher's or a student's)."""
    latent = crop // latent_factor
    if crop % (sf * latent_factor) or latent % unet.size_multiple:
        raise ConfigError(
            f"data.crop_size {crop} gives {latent}² latents: it must be a multiple of {sf * latent_factor} "
            f"with latents a multiple of {unet.size_multiple} (the UNet's window × 2^levels)"
        )
    if crop // sf * unet_config.image_size != latent * unet_config.lq_size:
        raise ConfigError(
            f"LR crops of {crop // sf}² and latents of {latent}² do not keep the UNet's lq_size:image_size "
            f"ratio {unet_config.lq_size}:{unet_config.image_size}"
        )


@dataclass(frozen=True)
class Pair:
    """One batch of training pairs: LR image, its latent, the HR latent and the HR image (all [-1, 1])."""

    lq: Tensor
    z_y: Tensor
    z0: Tensor
    hr: Tensor


@torch.no_grad()
def make_pair(hr: Tensor, degrader: Degrader, generator: torch.Generator, latents: LatentCodec) -> Pair:
    """Degrade HR crops in [0, 1] to LR (Real-ESRGAN, on the crops' device) and encode both sides.

    The degradation runs in float32 even under autocast: its blurs and JPEG maths would otherwise
    run in half precision and shift the LR images' 8-bit levels.
    """
    with torch.autocast(hr.device.type, enabled=False):
        lq = degrader(hr, generator) * 2 - 1
    hr = hr * 2 - 1
    return Pair(lq=lq, z_y=latents.encode_lr(lq).float(), z0=latents.encode(hr).float(), hr=hr)
