"""Colour correction of a super-resolved image by the low frequencies of its input.

A small latent model gets the colour of an image wrong more easily than its detail: a decoder
whose last GroupNorm holds few channels per group cannot carry every tile's mean colour, and a
one-step student briefly trained adds a cast of its own. The LR input, upscaled by bicubic
interpolation, has the right colour and none of the detail. So the output keeps its own high
frequencies and takes its low frequencies from the upscaled input (the "wavelet colour fix"
of diffusion SR models such as StableSR): with an à-trous decomposition (a 3×3 binomial blur,
dilated 1, 2, 4, … times), ``fixed = (sr − low(sr)) + low(reference)``.

The blur of ``levels`` scales reaches about 2**levels output pixels, far wider than the LR's noise
and JPEG blocks, so those stay out of the colour it takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_BINOMIAL = torch.tensor([1.0, 2.0, 1.0]) / 4


def lowpass(x: Tensor, levels: int = 5) -> Tensor:
    """The coarsest band of an à-trous decomposition of (N, C, H, W): ``levels`` dilated binomial blurs."""
    channels = x.shape[1]
    kernel = torch.outer(_BINOMIAL, _BINOMIAL).to(x.device, x.dtype).expand(channels, 1, 3, 3)
    for level in range(levels):
        dilation = 2**level
        # Replicate padding: reflection needs a border wider than the dilation, which small tiles lack.
        x = F.conv2d(F.pad(x, (dilation,) * 4, mode="replicate"), kernel, dilation=dilation, groups=channels)
    return x


def color_fix(sr: Tensor, reference: Tensor, levels: int = 5) -> Tensor:
    """``sr``'s detail on ``reference``'s colour: both (N, C, H, W) of the same size, any value range."""
    return sr - lowpass(sr, levels) + lowpass(reference, levels)
