"""Swin transformer layer used inside ResShift's Swin-UNet.

The layer works directly on ``B x C x H x W`` feature maps: a 1x1 convolution embeds the UNet
channels into the transformer width, ``depth`` Swin blocks run windowed self-attention (every
odd block on cyclically shifted windows), and a 1x1 convolution projects back. Module and
parameter names follow ResShift's ``models/swin_transformer.py`` so that the official checkpoints
load with ``strict=True``; the window attention itself runs through
:func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norm import GroupNorm32

#: Additive logit ResShift puts on token pairs that must not attend to each other (not ``-inf``:
#: the checkpoints' stored masks hold exactly this value, and it keeps fully masked rows finite).
MASK_VALUE = -100.0


def relative_position_index(window: int) -> Tensor:
    """Index into the ``(2w-1)^2`` relative-position bias table for every pair of window tokens.

    Tokens are numbered row-major inside a window; entry ``[p, q]`` encodes the offset
    ``(row_p - row_q, col_p - col_q)`` shifted to be non-negative. Shape ``(w*w, w*w)``, int64.
    """
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + window - 1
    d_col = cols[:, None] - cols[None, :] + window - 1
    return d_row * (2 * window - 1) + d_col


def shifted_window_mask(height: int, width: int, window: int, shift: int, device: torch.device | None = None) -> Tensor:
    """Additive attention mask of the shifted windows, exactly as ResShift computes it.

    Returns ``(num_windows, window*window, window*window)`` float32 holding 0 or ``MASK_VALUE``.

    This is *not* the mask of the original Swin paper. ResShift's ``calculate_mask`` indexes its
    ``1 x 1 x H x W`` label image as if it were ``1 x H x W x 1`` and transposes each window before
    flattening it. The net effect, which the official weights were trained with: only the last row
    of windows is masked, and inside those windows the tokens are split by their *column* ``j``
    into ``j < window - shift`` and ``j >= window - shift`` (the label is read from image row
    ``window_row * window + j``). Reproducing it is required to match the official checkpoints.
    """
    rows = torch.arange(height, device=device)
    # Region of each image row: 0 away from the bottom edge, 1 in the last window minus the
    # wrapped-around band, 2 in the band that the cyclic shift brought over from the top.
    region = (rows >= height - window).long() + (rows >= height - shift).long()
    per_window_row = region.view(height // window, 1, window)  # label of token (i, j) is [wr, 0, j]
    token_label = per_window_row.expand(-1, window, -1).reshape(height // window, window * window)
    differ = token_label[:, :, None] != token_label[:, None, :]
    mask = torch.where(differ, MASK_VALUE, 0.0)
    # Windows are ordered row-major over the window grid; the mask depends on the window row only.
    return mask.repeat_interleave(width // window, dim=0)


def window_partition(x: Tensor, window: int) -> Tensor:
    """``B x C x H x W`` → ``(B * num_windows) x (window*window) x C``, windows row-major per image."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window * window, c)


def window_merge(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, height, width)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.window = window
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def relative_position_bias(self) -> Tensor:
        """The bias added to the attention logits, ``heads x N x N``."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend within each window.

        ``windows``: ``(B * num_windows) x N x C`` from :func:`window_partition`; ``mask``: the
        per-window additive mask ``num_windows x N x N`` of shifted windows, or ``None``.
        """
        n_windows, n, c = windows.shape
        head_dim = c // self.num_heads
        qkv = self.qkv(windows).view(n_windows, n, 3, self.num_heads, head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4).contiguous()  # 3 x (B*nW) x heads x N x d

        bias = self.relative_position_bias()
        per_image = 1
        if mask is not None:
            per_image = mask.shape[0]
            bias = mask.to(bias.dtype).unsqueeze(1) + bias  # nW x heads x N x N
        # Fold each image's windows into the head axis, so the (window, head) bias broadcasts
        # over the batch instead of being materialised once per image.
        q, k, v = (t.view(n_windows // per_image, per_image * self.num_heads, n, head_dim) for t in qkv)
        bias = bias.reshape(1, per_image * self.num_heads, n, n).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.reshape(n_windows, self.num_heads, n, head_dim).transpose(1, 2).reshape(n_windows, n, c)
        return F.dropout(self.proj(out), self.dropout, self.training)


class ConvMlp(nn.Module):
    """Per-pixel two-layer GELU MLP written as 1x1 convolutions (acts on ``B x C x H x W``)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, kernel_size=1)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(self.act(self.fc1(x)), self.dropout, self.training)
        return F.dropout(self.fc2(x), self.dropout, self.training)


class SwinBlock(nn.Module):
    """One Swin block: (shifted) window attention and an MLP, both pre-norm residual.

    ``resolution`` is the feature size the block is built for. If it is no larger than the
    window, the window shrinks to it and the shift is dropped; that choice is part of the
    architecture and holds at every input size. The shifted-window mask for ``resolution`` is a
    persistent buffer (it is in the official state dicts); masks for other sizes are computed on
    demand and cached per size and device.
    """

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if resolution <= window:
            window, shift = resolution, 0
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must lie in [0, window {window})")
        self.window = window
        self.shift = shift
        self.resolution = resolution
        self.norm1 = GroupNorm32(dim)
        self.attn = WindowAttention(dim, window, num_heads, dropout)
        self.norm2 = GroupNorm32(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), dropout)
        self.attn_mask: Tensor | None
        if shift:
            self.register_buffer("attn_mask", shifted_window_mask(resolution, resolution, window, shift))
        else:
            self.attn_mask = None
        self._mask_cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def _mask(self, height: int, width: int, device: torch.device) -> Tensor | None:
        if not self.shift:
            return None
        if self.attn_mask is not None and height == width == self.resolution:
            return self.attn_mask
        if torch.compiler.is_compiling():
            # Traced into the graph, on the device: filling the cache would be a side effect that
            # torch.compile guards on, so the next call would compile the same shape a second time.
            return shifted_window_mask(height, width, self.window, self.shift, device)
        key = (height, width, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = shifted_window_mask(height, width, self.window, self.shift, device)
        return self._mask_cache[key]

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        if height % self.window or width % self.window:
            raise ValueError(f"feature size {height}x{width} is not a multiple of the window {self.window}")
        h = self.norm1(x)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(2, 3))
        h = self.attn(window_partition(h, self.window), self._mask(height, width, x.device))
        h = window_merge(h, self.window, height, width)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(2, 3))
        x = x + h
        return x + self.mlp(self.norm2(x))


class PointwiseProjection(nn.Module):
    """1x1 convolution, optionally followed by :class:`GroupNorm32` (Swin patch (un)embedding
    with patch size 1)."""

    def __init__(self, in_channels: int, out_channels: int, norm: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.norm = GroupNorm32(out_channels) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class SwinLayer(nn.Module):
    """A stage of ``depth`` Swin blocks between a channel embedding and un-embedding.

    Block ``i`` shifts its windows by ``window // 2`` when ``i`` is odd. ``resolution`` is the
    feature size at construction (the UNet's ``image_size`` halved per level); other sizes that
    are multiples of the window work too.
    """

    def __init__(
        self,
        channels: int,
        embed_dim: int,
        num_heads: int,
        window: int,
        depth: int,
        resolution: int,
        mlp_ratio: float,
        dropout: float = 0.0,
        patch_norm: bool = False,
    ) -> None:
        super().__init__()
        # Registration order mirrors ResShift's, so state-dict keys come out in the same order.
        self.patch_embed = PointwiseProjection(channels, embed_dim, patch_norm)
        self.patch_unembed = PointwiseProjection(embed_dim, channels, patch_norm)
        self.blocks = nn.ModuleList(
            SwinBlock(embed_dim, resolution, num_heads, window, window // 2 if i % 2 else 0, mlp_ratio, dropout)
            for i in range(depth)
        )

    @property
    def window(self) -> int:
        """Effective window of the blocks (smaller than requested at tiny resolutions)."""
        return self.blocks[0].window if len(self.blocks) else 1

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed(x)
