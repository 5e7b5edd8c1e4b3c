"""VQGAN f4 autoencoder, state-dict compatible with ResShift's ``VQModelTorch``.

ResShift runs its diffusion in the latent space of a VQGAN with a 4x spatial reduction
(``autoencoder_vq_f4.pth``). This module rebuilds that network so the official checkpoint loads
with ``strict=True``: every submodule name below (``encoder.down.0.block.1.conv2``,
``decoder.mid.attn_1.q``, ``quantize.embedding`` ...) is chosen to produce the official key.

Behaviour that matters for matching the reference numerically:

* the encoder output is *not* quantised: ResShift diffuses the continuous latent and only the
  decoder snaps it to the codebook (nearest code, straight-through);
* downsampling pads asymmetrically (one zero row/column at the bottom/right) before a stride-2
  3x3 convolution with no padding of its own, so odd sizes shrink like the reference does;
* GroupNorm always computes its statistics in float32, so bf16/fp16 autocast stays stable;
* ``padding_mode`` from the ddconfig applies to every 3x3 convolution except the downsampling
  one, whose padding is the explicit zero pad above.

Two memory guards keep large images tractable: the nearest-code search runs over row chunks so
the (pixels x codes) distance matrix is never built whole, and the single-head global attention
runs through ``scaled_dot_product_attention`` over query chunks, so even when no fused kernel
accepts the wide head (512 channels in the full model) the fallback never holds the full
(tokens x tokens) weight matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.config import AutoencoderConfig, DDConfig, from_dict
from model.norm import GroupNorm32

__all__ = ["Continuous", "VQAutoencoder", "VectorQuantizer"]

# Distance-matrix elements per nearest-code search chunk (4 MiB in float32). The search is memory-bound
# (a 3-channel latent makes the product a rank-3 update): a chunk that stays in the CPU's caches runs
# the five passes over it 3.4x faster than a 64 MiB one (8192 codes, 18k latent pixels, 2 threads).
_SEARCH_CHUNK_ELEMENTS = 1 << 20
# Attention-weight elements per query chunk (256 MiB in float32 if SDPA falls back to maths).
_ATTENTION_CHUNK_ELEMENTS = 1 << 26

DECODER_SIDE = ("decoder.", "post_quant_conv.")
"""State-dict prefixes of what turns a latent into an image; the rest (encoder, quant_conv, codebook)
fixes the latent space, so a decoder can be retrained or swapped without touching models built on it."""


def _norm(channels: int, cfg: DDConfig) -> GroupNorm32:
    return GroupNorm32(channels, eps=1e-6, groups=cfg.norm_groups)


def _conv3x3(in_ch: int, out_ch: int, padding_mode: str) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, padding_mode=padding_mode)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (norm, swish, conv) x 2, with a 1x1 shortcut on width change."""

    def __init__(self, in_ch: int, out_ch: int, cfg: DDConfig) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, cfg)
        self.conv1 = _conv3x3(in_ch, out_ch, cfg.padding_mode)
        self.norm2 = _norm(out_ch, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = _conv3x3(out_ch, out_ch, cfg.padding_mode)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, cfg: DDConfig) -> None:
        super().__init__()
        self.norm = _norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C)
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = _chunked_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


def _chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact softmax(q k^T / sqrt(C)) v, split over queries to bound the fallback's memory.

    Each query row attends to every key, so chunking queries changes nothing numerically.
    """
    tokens = k.shape[-2]
    rows = max(1, _ATTENTION_CHUNK_ELEMENTS // (q.shape[0] * tokens))
    if q.shape[-2] <= rows:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(part, k, v) for part in q.split(rows, dim=-2)], dim=-2)


class Downsample(nn.Module):
    """Halve the resolution: pad one zero row/column at bottom/right, then a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int, padding_mode: str) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels, padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, each followed by attention when the level has it,
    then the encoder's ``downsample`` or the decoder's ``upsample`` (the last level has neither).

    The resampler's attribute name is the official state-dict key (``down.0.downsample.conv``,
    ``up.1.upsample.conv``); the attribute that is not used stays ``None`` and adds no key.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_blocks: int,
        with_attention: bool,
        cfg: DDConfig,
        resample: Literal["down", "up"] | None,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch, cfg) for _ in range(num_blocks if with_attention else 0))
        self.downsample = Downsample(out_ch) if resample == "down" else None
        self.upsample = Upsample(out_ch, cfg.padding_mode) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                x = resample(x)
        return x


class MidBlock(nn.Module):
    """Residual block, global attention (an identity with ``attn_type: none``), residual block at
    the lowest resolution."""

    def __init__(self, channels: int, cfg: DDConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg) if cfg.attn_type == "vanilla" else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _blocks_per_level(cfg: DDConfig) -> tuple[int, ...]:
    """``num_res_blocks`` may be one count for every level or one per level, as in the reference."""
    counts = cfg.num_res_blocks
    if isinstance(counts, int):
        return (counts,) * len(cfg.ch_mult)
    if len(counts) != len(cfg.ch_mult):
        raise ValueError(f"num_res_blocks {counts} needs one entry per ch_mult level {cfg.ch_mult}")
    return tuple(counts)


class Encoder(nn.Module):
    """Image -> ``z_channels`` latent at 1 / 2**(len(ch_mult) - 1) of the resolution."""

    def __init__(self, cfg: DDConfig) -> None:
        super().__init__()
        blocks = _blocks_per_level(cfg)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = _conv3x3(cfg.in_channels, cfg.ch, cfg.padding_mode)
        self.down = nn.ModuleList()
        in_ch, res = cfg.ch, cfg.resolution
        for i, out_ch in enumerate(widths):
            self.down.append(
                Level(
                    in_ch,
                    out_ch,
                    blocks[i],
                    with_attention=cfg.attn_type == "vanilla" and res in cfg.attn_resolutions,
                    cfg=cfg,
                    resample="down" if i != last else None,
                )
            )
            in_ch, res = out_ch, res // 2
        self.mid = MidBlock(in_ch, cfg)
        self.norm_out = _norm(in_ch, cfg)
        self.conv_out = _conv3x3(in_ch, cfg.z_channels, cfg.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``z_channels`` latent -> image, mirroring the encoder with one extra block per level.

    ``up`` is indexed by level like the encoder's ``down`` (``up.0`` is the full-resolution
    level) but runs from the last index to the first.
    """

    def __init__(self, cfg: DDConfig) -> None:
        super().__init__()
        blocks = _blocks_per_level(cfg)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        in_ch = widths[-1]
        res = cfg.resolution // 2**last
        self.conv_in = _conv3x3(cfg.z_channels, in_ch, cfg.padding_mode)
        self.mid = MidBlock(in_ch, cfg)
        levels: list[Level] = []
        for i in reversed(range(len(widths))):
            levels.append(
                Level(
                    in_ch,
                    widths[i],
                    blocks[i] + 1,
                    with_attention=cfg.attn_type == "vanilla" and res in cfg.attn_resolutions,
                    cfg=cfg,
                    resample="up" if i != 0 else None,
                )
            )
            in_ch, res = widths[i], res * 2
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(in_ch, cfg)
        self.conv_out = _conv3x3(in_ch, cfg.out_ch, cfg.padding_mode)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient and the VQ-VAE losses.

    Calling it returns ``(z_q, codebook_loss, commitment_loss)``:

    * ``z_q`` has the values of the nearest codes but the gradient of ``z`` (straight-through),
      so losses on the decoded image still train whatever produced ``z``;
    * ``codebook_loss`` = mean ||sg[z] - e||^2 moves the codes towards the latents;
    * ``commitment_loss`` = beta * mean ||z - sg[e]||^2 keeps the latents near their codes.

    Add the two for the VQ-VAE objective. Note that taming's ``VectorQuantizer2``, which ResShift
    instantiates with its default ``legacy=True``, weights the terms the other way round (beta on
    the codebook term, 1 on the commitment term); this class follows the VQ-VAE paper.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    @torch.no_grad()
    def nearest_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each pixel of ``z`` (B, C, H, W) -> (B, H, W).

        Runs in float32 with autocast off (a bf16 distance would pick wrong codes), over row
        chunks so memory stays at ``_SEARCH_CHUNK_ELEMENTS`` whatever the latent size.
        """
        b, c, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
            codes = self.embedding.weight.float()
            code_sq = codes.square().sum(dim=1)
            rows = max(1, _SEARCH_CHUNK_ELEMENTS // self.n_embed)
            # ||z||^2 + ||e||^2 - 2 z.e, the expression the reference minimises, so near-ties
            # resolve the same way; min's indices are argmin's (the first minimum of a row), found
            # 3-4x faster by PyTorch's CPU kernels.
            indices = [
                (part.square().sum(dim=1, keepdim=True) + code_sq - 2.0 * part @ codes.t()).min(dim=1).indices
                for part in flat.split(rows)
            ]
        return torch.cat(indices).reshape(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for (B, H, W) indices, as a (B, embed_dim, H, W) tensor."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = self.lookup(self.nearest_indices(z))
        codebook_loss = F.mse_loss(codes.float(), z.detach().float())
        commitment_loss = self.beta * F.mse_loss(z.float(), codes.detach().float())
        z_q = z + (codes.to(z.dtype) - z).detach()
        return z_q, codebook_loss, commitment_loss


class Continuous(nn.Module):
    """The quantiser of a codebook-free autoencoder (``n_embed: 0``): latents pass unchanged and
    the VQ losses are zero, so training and decoding code stays the same for both kinds."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zero = z.new_zeros((), dtype=torch.float32)
        return z, zero, zero


def _as_ddconfig(ddconfig: DDConfig | Mapping[str, Any]) -> DDConfig:
    cfg = ddconfig if isinstance(ddconfig, DDConfig) else from_dict(DDConfig, dict(ddconfig))
    if cfg.double_z:
        # VQModelTorch feeds the encoder output straight into a z_channels -> embed_dim 1x1 conv.
        raise ValueError("a VQ autoencoder needs double_z=False")
    return cfg


class VQAutoencoder(nn.Module):
    """ResShift's VQGAN (``ldm.models.autoencoder.VQModelTorch``); images are in [-1, 1].

    With ``n_embed`` 0 there is no codebook (:class:`Continuous`): the latent is continuous.

    ``quantize`` is both the state-dict submodule (``quantize.embedding.weight``) and the
    training entry point: ``model.quantize(z)`` returns ``(z_q, codebook_loss, commitment_loss)``.
    """

    def __init__(self, embed_dim: int, n_embed: int, ddconfig: DDConfig | Mapping[str, Any]) -> None:
        super().__init__()
        self.ddconfig = _as_ddconfig(ddconfig)
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.encoder = Encoder(self.ddconfig)
        self.decoder = Decoder(self.ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25) if n_embed > 0 else Continuous()
        self.quant_conv = nn.Conv2d(self.ddconfig.z_channels, embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, self.ddconfig.z_channels, kernel_size=1)

    @classmethod
    def from_config(cls, cfg: AutoencoderConfig) -> VQAutoencoder:
        return cls(cfg.embed_dim, cfg.n_embed, cfg.ddconfig)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side."""
        return self.ddconfig.downsample_factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> continuous latent (B, embed_dim, H/f, W/f); not quantised."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Latent -> image. ``quantize`` snaps ``z`` to its nearest codes first (straight-through)."""
        if quantize:
            z, _, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: ``(reconstruction, codebook_loss, commitment_loss)``."""
        z_q, codebook_loss, commitment_loss = self.quantize(self.encode(x))
        return self.decoder(self.post_quant_conv(z_q)), codebook_loss, commitment_loss
