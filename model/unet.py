"""ResShift's Swin-UNet (``models.unet.UNetModelSwin``), state-dict compatible with its checkpoints.

A guided-diffusion style UNet: residual blocks conditioned on the timestep (FiLM scale/shift),
strided-conv down-sampling and nearest up-sampling, skip connections from every encoder stage to
the decoder, and a :class:`~model.swin.SwinLayer` after the first residual block of every level
listed in ``attention_resolutions`` (plus one in the middle block). The network sees the noisy
latent concatenated with the low-quality image and predicts the clean latent x̂0.

Module names, registration order and shapes mirror ResShift's, so ``load_state_dict(...,
strict=True)`` accepts the official ``resshift_realsrx4_s15_v1.pth`` weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import UNetConfig
from .norm import GroupNorm32
from .swin import SwinLayer


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (integer) timesteps: ``[cos(t·f_i), sin(t·f_i)]``, ``N x dim`` float32.

    Frequencies are ``max_period^(-i / (dim // 2))``; an odd ``dim`` is padded with a zero column.
    """
    half = dim // 2
    # Made on the timesteps' device: a CPU tensor inside a compiled CUDA graph would split it.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Upsample(nn.Module):
    """Nearest-neighbour ×2 up-sampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """×2 down-sampling: a stride-2 3x3 convolution, or 2x2 average pooling without ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("average-pool down-sampling cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding.

    ``norm → SiLU → conv``, then the embedding either scales and shifts the second norm's output
    (``use_scale_shift_norm``, FiLM) or is added before it, then ``SiLU → dropout → conv``. With
    ``up``/``down`` the block also resamples (parameter-free) both paths between the first
    activation and convolution. The output convolution starts at zero, so a fresh block is the
    identity on its skip path.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.resample: nn.Module | None = None
        if up:
            self.resample = nn.Upsample(scale_factor=2, mode="nearest")
        elif down:
            self.resample = nn.AvgPool2d(kernel_size=2, stride=2)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample is not None:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.resample(h))
            x = self.resample(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepSequential(nn.Sequential):
    """``nn.Sequential`` that also hands the timestep embedding to its :class:`ResBlock` members."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def lq_feature_extractor(lq_size: int, image_size: int) -> tuple[nn.Module, int]:
    """Module that brings the LQ image to the latent's size, and its output channels.

    When ``lq_size == image_size`` the LQ image is concatenated as is (3 channels). Otherwise
    ResShift learns a pyramid of ``conv3x3 → SiLU → stride-2 conv`` stages (16, 32, 64, … channels
    out), one per factor of two between ``lq_size`` and ``image_size``.
    """
    if lq_size == image_size:
        return nn.Identity(), 3
    ratio = lq_size // image_size
    if lq_size % image_size or ratio & (ratio - 1):
        raise ValueError(f"lq_size {lq_size} must be image_size {image_size} times a power of two")
    layers: list[nn.Module] = []
    in_ch, ch = 3, 16
    for _ in range(ratio.bit_length() - 1):
        layers += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.SiLU(), Downsample(ch, True, out_channels=2 * ch)]
        in_ch = ch = 2 * ch
    return nn.Sequential(*layers), ch


_DEFAULTS = UNetConfig()


class SwinUNet(nn.Module):
    """ResShift's Swin-UNet; the keyword arguments are those of the YAML ``model.params`` block.

    ``forward(x, timesteps, lq)`` takes the (already input-scaled) noisy latent ``x``
    (``N x in_channels x H x W``), integer timestep indices ``timesteps`` (``N``) and the LQ
    image ``lq`` (``N x 3 x H x W``, or ``lq_size / image_size`` times larger), and returns the x0
    prediction ``N x out_channels x H x W``. ``H`` and ``W`` must be multiples of
    :attr:`size_multiple`; ``image_size`` only fixes where Swin layers go and the stored masks.

    ``use_fp16`` is accepted for config compatibility but ignored: precision follows the module's
    dtype or autocast (group norms always compute in float32). ``cond_lq=False`` builds an
    unconditional network (``in_channels`` inputs, no ``lq``); ResShift itself cannot run that
    setting.
    """

    def __init__(
        self,
        *,
        image_size: int = _DEFAULTS.image_size,
        in_channels: int = _DEFAULTS.in_channels,
        model_channels: int = _DEFAULTS.model_channels,
        out_channels: int = _DEFAULTS.out_channels,
        attention_resolutions: Sequence[int] = _DEFAULTS.attention_resolutions,
        dropout: float = _DEFAULTS.dropout,
        channel_mult: Sequence[int] = _DEFAULTS.channel_mult,
        num_res_blocks: int | Sequence[int] = _DEFAULTS.num_res_blocks,
        conv_resample: bool = _DEFAULTS.conv_resample,
        dims: int = _DEFAULTS.dims,
        use_fp16: bool = _DEFAULTS.use_fp16,
        num_head_channels: int = _DEFAULTS.num_head_channels,
        use_scale_shift_norm: bool = _DEFAULTS.use_scale_shift_norm,
        resblock_updown: bool = _DEFAULTS.resblock_updown,
        swin_depth: int = _DEFAULTS.swin_depth,
        swin_embed_dim: int = _DEFAULTS.swin_embed_dim,
        window_size: int = _DEFAULTS.window_size,
        mlp_ratio: float = _DEFAULTS.mlp_ratio,
        cond_lq: bool = _DEFAULTS.cond_lq,
        lq_size: int = _DEFAULTS.lq_size,
        num_heads: int = _DEFAULTS.num_heads,
        patch_norm: bool = _DEFAULTS.patch_norm,
    ) -> None:
        super().__init__()
        if dims != 2:
            raise ValueError(f"only 2-D inputs are supported, got dims={dims}")
        channel_mult = tuple(channel_mult)
        if isinstance(num_res_blocks, int):
            num_res_blocks = (num_res_blocks,) * len(channel_mult)
        num_res_blocks = tuple(num_res_blocks)
        if len(num_res_blocks) != len(channel_mult):
            raise ValueError("num_res_blocks needs one entry per channel_mult level")
        # As in ResShift, num_head_channels (when not -1) overrides num_heads.
        heads = num_heads if num_head_channels == -1 else swin_embed_dim // num_head_channels
        if heads <= 0 or swin_embed_dim % heads:
            raise ValueError(
                f"swin_embed_dim {swin_embed_dim} cannot be split into heads "
                f"(num_heads={num_heads}, num_head_channels={num_head_channels})"
            )
        self.config = UNetConfig(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            attention_resolutions=tuple(attention_resolutions),
            dropout=dropout,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            conv_resample=conv_resample,
            dims=dims,
            use_fp16=use_fp16,
            num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            swin_depth=swin_depth,
            swin_embed_dim=swin_embed_dim,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            cond_lq=cond_lq,
            lq_size=lq_size,
            num_heads=num_heads,
            patch_norm=patch_norm,
        )
        self.model_channels = model_channels
        self.cond_lq = cond_lq

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cond_lq:
            self.feature_extractor, lq_channels = lq_feature_extractor(lq_size, image_size)
        else:
            self.feature_extractor, lq_channels = nn.Identity(), 0

        def res_block(ch_in: int, ch_out: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, up=up, down=down)

        # (level, layer) of every Swin layer, to derive the admissible input sizes.
        swin_layers: list[tuple[int, SwinLayer]] = []

        def swin(ch: int, resolution: int, level: int) -> SwinLayer:
            layer = SwinLayer(
                ch, swin_embed_dim, heads, window_size, swin_depth, resolution, mlp_ratio, dropout, patch_norm
            )
            swin_layers.append((level, layer))
            return layer

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels + lq_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        resolution = image_size
        for level, mult in enumerate(channel_mult):
            for i in range(num_res_blocks[level]):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if i == 0 and resolution in attention_resolutions:
                    layers.append(swin(ch, resolution, level))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepSequential(down))
                skip_channels.append(ch)
                resolution //= 2

        deepest = len(channel_mult) - 1
        self.middle_block = TimestepSequential(res_block(ch), swin(ch, resolution, deepest), res_block(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks[level] + 1):
                layers = [res_block(ch + skip_channels.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if i == 0 and resolution in attention_resolutions:
                    layers.append(swin(ch, resolution, level))
                if level and i == num_res_blocks[level]:
                    layers.append(res_block(ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    resolution *= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

        multiple = 2 ** (len(channel_mult) - 1)
        for level, layer in swin_layers:
            multiple = math.lcm(multiple, layer.window * 2**level)
        self.size_multiple = multiple

    @classmethod
    def from_config(cls, cfg: UNetConfig) -> "SwinUNet":
        """Build the network described by a :class:`~model.config.UNetConfig`."""
        return cls(**dataclasses.asdict(cfg))

    def forward(self, x: Tensor, timesteps: Tensor, lq: Tensor | None = None) -> Tensor:
        """Predict x0 from the scaled noisy latent ``x`` at integer ``timesteps``, given ``lq``.

        Computes in the parameters' dtype (or under the caller's autocast) and returns ``x.dtype``.
        """
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"latent size {height}x{width} must be a multiple of {self.size_multiple} (pad it)")
        if self.cond_lq and lq is None:
            raise ValueError("lq is required: this network is conditioned on the LQ image")
        if not self.cond_lq and lq is not None:
            raise ValueError("this network is not conditioned on lq")
        dtype = self.time_embed[0].weight.dtype
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))

        h = x.to(dtype)
        if lq is not None:
            features = self.feature_extractor(lq.to(dtype))
            if features.shape[-2:] != h.shape[-2:]:
                raise ValueError(
                    f"lq of size {tuple(lq.shape[-2:])} does not map onto the {height}x{width} latent "
                    f"(lq_size / image_size = {self.config.lq_size} / {self.config.image_size})"
                )
            h = torch.cat([h, features], dim=1)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)
