"""Start a VQGAN as a plain resampler, so that training only has to learn the detail.

A randomly initialised autoencoder spends most of a short CPU run learning to reproduce colour
and layout at all (10.9 dB PSNR at initialisation). This initialisation sets the weights of the
unchanged VQGAN architecture so that, before any training step,

* the encoder is an f×f box average (≈ the bicubic ×1/f image that the ``anchor`` loss asks
  for) and the decoder is ×2 bilinear upsampling per level;
* every residual branch (second convolution of each ResBlock, output projection of each
  attention block) is zero, so each block starts as the identity and learns a residual — the
  residual-learning idea of VDSR and of "zero-init" residual nets.

The one obstacle is GroupNorm on the main path (``norm_out`` before the last convolution of
encoder and decoder): it removes each group's mean and scale, i.e. the image's brightness and
contrast. Each colour therefore travels in its own group as the four channels ``(+x, -x, +C, -C)``:
the group mean is exactly 0 and its variance is dominated by the constant ``C``, so the norm is
(nearly) a fixed gain. The output convolution then takes ``SiLU(x) - SiLU(-x)``, which is exactly
``x`` (σ(x) + σ(-x) = 1), so no weight has to hold a large offset that the first optimiser
steps would knock about.

Only for image-like latents (``embed_dim == z_channels == 3``) with at least 3 groups of at least
4 channels at every width: the shipped demo chain (``training/configs/autoencoder-demo.yaml``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.autoencoder import AttnBlock, Downsample, ResnetBlock, Upsample, VQAutoencoder
from model.config import AutoencoderConfig

CONSTANT = 10.0
"""Value of the constant channels; large against |x| ≤ 1, so the group std barely depends on x."""
COLOURS = 3


def _slots(channels: int, groups: int) -> list[tuple[int, int, int, int]]:
    """(+x, -x, +C, -C) channel indices of each colour: the first four channels of groups 0, 1, 2."""
    size = channels // groups
    return [(k * size, k * size + 1, k * size + 2, k * size + 3) for k in range(COLOURS)]


def _kernel(taps: list[float]) -> torch.Tensor:
    row = torch.tensor(taps) / sum(taps)
    return torch.outer(row, row)


BOX_DOWN = _kernel([1.0, 1.0, 0.0])
"""Stride-2 window over rows 2i … 2i+2: averaging 2i and 2i+1 keeps the output centred at 2i+0.5."""
BILINEAR_UP = _kernel([1.0, 2.0, 1.0])
"""After nearest ×2, [1, 2, 1]/4 is exactly bilinear ×2 (half-pixel centres)."""


@torch.no_grad()
def _resample(conv: nn.Conv2d, groups: int, kernel: torch.Tensor) -> None:
    """Per-channel ``kernel`` for the signals, a centre tap for the constants."""
    conv.weight.zero_()
    conv.bias.zero_()
    for plus, minus, const_plus, const_minus in _slots(conv.out_channels, groups):
        for c in (plus, minus):
            conv.weight[c, c] = kernel
        for c in (const_plus, const_minus):
            conv.weight[c, c, 1, 1] = 1.0


@torch.no_grad()
def _to_slots(conv: nn.Conv2d, groups: int) -> None:
    """RGB-like input (3 channels) → the slot layout, constants from the bias (1×1 or 3×3 conv)."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.kernel_size[0] // 2
    for k, (plus, minus, const_plus, const_minus) in enumerate(_slots(conv.out_channels, groups)):
        conv.weight[plus, k, centre, centre] = 1.0
        conv.weight[minus, k, centre, centre] = -1.0
        conv.bias[const_plus], conv.bias[const_minus] = CONSTANT, -CONSTANT


@torch.no_grad()
def _between_slots(conv: nn.Conv2d, groups: int) -> None:
    """1×1 shortcut between two widths: each slot channel to the same slot of the new layout."""
    conv.weight.zero_()
    conv.bias.zero_()
    for src, dst in zip(_slots(conv.in_channels, groups), _slots(conv.out_channels, groups)):
        for i, o in zip(src, dst):
            conv.weight[o, i, 0, 0] = 1.0


@torch.no_grad()
def _from_slots(norm: nn.GroupNorm, conv: nn.Conv2d, groups: int) -> None:
    """``norm_out`` → SiLU → ``conv_out`` as (nearly) the identity on the three signals."""
    channels = norm.num_channels
    gain = CONSTANT * math.sqrt(2 * groups / channels)  # std of a (+x, -x, +C, -C, 0 …) group
    norm.weight.zero_()
    norm.bias.zero_()
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.kernel_size[0] // 2
    for k, (plus, minus, _, _) in enumerate(_slots(channels, groups)):
        norm.weight[[plus, minus]] = gain
        conv.weight[k, plus, centre, centre] = 1.0  # SiLU(x) - SiLU(-x) = x
        conv.weight[k, minus, centre, centre] = -1.0


def check(config: AutoencoderConfig) -> None:
    """Raise ``ValueError`` when the architecture cannot carry the slot layout."""
    cfg = config.ddconfig
    if {cfg.in_channels, cfg.out_ch, cfg.z_channels, config.embed_dim} != {COLOURS}:
        raise ValueError("resampler init needs in_channels = out_ch = z_channels = embed_dim = 3")
    if cfg.norm_groups < COLOURS:
        raise ValueError(f"resampler init needs norm_groups >= {COLOURS}, got {cfg.norm_groups}")
    for width in {cfg.ch * m for m in cfg.ch_mult}:
        if width // cfg.norm_groups < 4:
            raise ValueError(f"resampler init needs >= 4 channels per group; width {width} has fewer")


@torch.no_grad()
def init_as_resampler(autoencoder: VQAutoencoder) -> None:
    """Overwrite ``autoencoder``'s weights in place (codebook excepted); see the module docstring."""
    check(AutoencoderConfig(autoencoder.embed_dim, autoencoder.n_embed, autoencoder.ddconfig))
    groups = autoencoder.ddconfig.norm_groups
    for module in autoencoder.modules():
        if isinstance(module, ResnetBlock):
            nn.init.zeros_(module.conv2.weight)
            nn.init.zeros_(module.conv2.bias)
            if module.nin_shortcut is not None:
                _between_slots(module.nin_shortcut, groups)
        elif isinstance(module, AttnBlock):
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)
        elif isinstance(module, Downsample):
            _resample(module.conv, groups, BOX_DOWN)
        elif isinstance(module, Upsample):
            _resample(module.conv, groups, BILINEAR_UP)
    for part in (autoencoder.encoder, autoencoder.decoder):
        _to_slots(part.conv_in, groups)
        _from_slots(part.norm_out, part.conv_out, groups)
    for conv in (autoencoder.quant_conv, autoencoder.post_quant_conv):
        nn.init.eye_(conv.weight.view(COLOURS, COLOURS))
        nn.init.zeros_(conv.bias)
