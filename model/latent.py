"""The diffusion model's view of the VQGAN: scaled latents of HR and LR images, and decoding.

Inference (:class:`model.SRPipeline`) and the diffusion trainers share this one codec, so the
latents a model is trained on are the latents it is served with:
``z_y = E(bicubic×sf(LR)) · scale_factor``, ``z0 = E(HR) · scale_factor``, images in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.autoencoder import VQAutoencoder


class LatentCodec:
    """A frozen autoencoder and the latent scaling of the diffusion model."""

    def __init__(
        self,
        autoencoder: VQAutoencoder,
        scale_factor: float,
        sf: int,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = scale_factor
        self.sf = sf
        self.memory_format = memory_format

    def encode(self, image: Tensor) -> Tensor:
        """Continuous (not quantised) latent of images in [-1, 1], in the autoencoder's dtype.

        ResShift diffuses the encoder output as it is; only decoding snaps to the codebook.
        """
        dtype = self.autoencoder.quant_conv.weight.dtype
        image = image.to(dtype).contiguous(memory_format=self.memory_format)
        return self.autoencoder.encode(image) * self.scale_factor

    def encode_lr(self, lr: Tensor) -> Tensor:
        """z_y: latent of the LR image upsampled ×sf with bicubic interpolation (in float32)."""
        return self.encode(F.interpolate(lr.float(), scale_factor=self.sf, mode="bicubic", align_corners=False))

    def decode(self, z: Tensor) -> Tensor:
        """Image in about [-1, 1]; differentiable in ``z`` (straight-through quantisation)."""
        return self.autoencoder.decode(z / self.scale_factor, quantize=True)
