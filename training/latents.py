"""The frozen VQGAN latent space of the diffusion trainers, and the training pairs made in it.

Teacher and student both learn in the latent space of a frozen autoencoder, with the same maths as
inference (:class:`model.SRPipeline`): ``z_y = E(bicubic×sf(LR)) · scale_factor``, ``z0 = E(HR) ·
scale_factor``, images in [-1, 1], and decoding snaps latents to the codebook with a
straight-through gradient so that image-space losses still train whatever produced the latent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from model.autoencoder import VQAutoencoder
from model.checkpoint import load_into, read_state_dict
from model.config import AutoencoderConfig
from model.registry import Registry

from .config_files import ConfigError
from .degradations import Degrader


@dataclass(frozen=True)
class AutoencoderSource:
    """Where the frozen autoencoder comes from: a registry entry (``ref``: any entry with autoencoder
    weights, e.g. one written by ``vpdsr train autoencoder`` or ``vpdsr import-resshift``) or an
    official ``autoencoder_vq_f4.pth`` (``checkpoint``, with ``config`` its architecture)."""

    ref: str | None = None
    checkpoint: Path | None = None
    config: AutoencoderConfig = field(default_factory=AutoencoderConfig)

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


class LatentSpace:
    """A frozen autoencoder and the latent scaling of the diffusion model."""

    def __init__(self, autoencoder: VQAutoencoder, scale_factor: float, sf: int) -> None:
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = scale_factor
        self.sf = sf

    @classmethod
    def build(
        cls, config: AutoencoderConfig, state: dict[str, Tensor], scale_factor: float, sf: int, device: torch.device
    ) -> "LatentSpace":
        autoencoder = VQAutoencoder.from_config(config)
        load_into(autoencoder, state, "autoencoder")
        return cls(autoencoder.to(device), scale_factor, sf)

    def encode(self, image: Tensor) -> Tensor:
        """Continuous (not quantised) latent of images in [-1, 1], as float32."""
        return self.autoencoder.encode(image).float() * self.scale_factor

    def encode_lr(self, lq: Tensor) -> Tensor:
        """z_y: latent of the bicubic-upsampled LR image."""
        up = F.interpolate(lq.float(), scale_factor=self.sf, mode="bicubic", align_corners=False)
        return self.encode(up)

    def decode(self, z: Tensor) -> Tensor:
        """Image in about [-1, 1]; differentiable in ``z`` (straight-through quantisation)."""
        return self.autoencoder.decode(z / self.scale_factor, quantize=True)


@dataclass(frozen=True)
class Pair:
    """One batch of training pairs: LR image, its latent, the HR latent and the HR image (all [-1, 1])."""

    lq: Tensor
    z_y: Tensor
    z0: Tensor
    hr: Tensor


@torch.no_grad()
def make_pair(hr: Tensor, degrader: Degrader, generator: torch.Generator, latents: LatentSpace) -> Pair:
    """Degrade HR crops in [0, 1] to LR (Real-ESRGAN, on the crops' device) and encode both sides.

    The degradation runs in float32 even under autocast: its blurs and JPEG maths would otherwise
    run in half precision and shift the LR images' 8-bit levels.
    """
    with torch.autocast(hr.device.type, enabled=False):
        lq = degrader(hr, generator) * 2 - 1
    hr = hr * 2 - 1
    return Pair(lq=lq, z_y=latents.encode_lr(lq), z0=latents.encode(hr), hr=hr)
