"""The diffusion model's view of the VQGAN: scaled latents of HR and LR images, and decoding.

Inference (:class:`model.SRPipeline`) and the diffusion trainers share this one codec, so the
latents a model is trained on are the latents it is served with:
``z_y = E(bicubic×upscale(LR)) · latent_scaling``, ``z0 = E(HR) · latent_scaling``, images in [-1, 1].
The two numbers are the diffusion config's ``scale_factor`` (the latent scaling) and ``sf`` (the
super-resolution factor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.autoencoder import VQAutoencoder


class LatentCodec:
    """A frozen autoencoder, the latent scaling of the diffusion model (``latent_scaling``: latents
    are multiplied by it after encoding, divided before decoding) and the super-resolution factor
    (``upscale``: LR images are resized by it before encoding)."""

    def __init__(
        self,
        autoencoder: VQAutoencoder,
        latent_scaling: float,
        upscale: int,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.latent_scaling = latent_scaling
        self.upscale = upscale
        self.memory_format = memory_format

    def encode(self, image: Tensor) -> Tensor:
        """Continuous (not quantised) latent of images in [-1, 1], in the autoencoder's dtype.

        ResShift diffuses the encoder output as it is; only decoding snaps to the codebook.
        """
        dtype = self.autoencoder.quant_conv.weight.dtype
        image = image.to(dtype).contiguous(memory_format=self.memory_format)
        return self.autoencoder.encode(image) * self.latent_scaling

    def upsample(self, lr: Tensor) -> Tensor:
        """The LR image upsampled ×upscale with bicubic interpolation (in float32): what z_y encodes."""
        return F.interpolate(lr.float(), scale_factor=self.upscale, mode="bicubic", align_corners=False)

    def encode_lr(self, lr: Tensor) -> Tensor:
        """z_y: latent of the LR image upsampled ×upscale (:meth:`upsample`)."""
        return self.encode(self.upsample(lr))

    def decode(self, z: Tensor) -> Tensor:
        """Image in about [-1, 1]; differentiable in ``z`` (straight-through quantisation)."""
        return self.autoencoder.decode(z / self.latent_scaling, quantize=True)
