"""Overlapping tiles over an image and their seamless re-assembly.

A large input is cut into equal, overlapping square tiles so that memory is bounded by the tile
size and tiles from many images can share a batch. Outputs are blended with a weight that is 1 in
a tile's interior and falls off with a raised cosine across every side that overlaps a neighbour,
then normalised by the summed weights. Unlike a box average (which leaves visible steps where the
number of contributing tiles changes) the blend is continuous, and the tile borders — where
convolutions saw padding instead of context — get the least weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced start offsets covering ``length`` with tiles that overlap by ≥ ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def ramp(length: int, fade: int, fade_start: bool, fade_end: bool) -> Tensor:
    """1-D blending weight: raised-cosine fades of ``fade`` samples on the requested ends."""
    w = torch.ones(length, dtype=torch.float32)
    if fade <= 0:
        return w
    # Strictly positive so that every output pixel has non-zero total weight.
    rise = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(fade, dtype=torch.float32) + 0.5) / fade)
    if fade_start:
        w[:fade] = rise
    if fade_end:
        w[length - fade :] = rise.flip(0)
    return w


@dataclass(frozen=True)
class TileGrid:
    """Tile positions over a (height, width) input; ``scale`` maps them to output pixels."""

    height: int
    width: int
    tile: int
    overlap: int
    scale: int

    @property
    def boxes(self) -> list[tuple[int, int]]:
        """Top-left (y, x) input offsets, row-major."""
        ys = tile_starts(self.height, self.tile, self.overlap)
        xs = tile_starts(self.width, self.tile, self.overlap)
        return [(y, x) for y in ys for x in xs]

    def weight(self, y: int, x: int) -> Tensor:
        """Output-space blending weight (tile·scale)² of the tile at input offset (y, x)."""
        size = self.tile * self.scale
        fade = min(self.overlap * self.scale, size // 2)
        wy = ramp(size, fade, y > 0, y + self.tile < self.height)
        wx = ramp(size, fade, x > 0, x + self.tile < self.width)
        return wy[:, None] * wx[None, :]

    def blend(self, outputs: list[Tensor]) -> Tensor:
        """Assemble per-tile outputs (C, tile·s, tile·s), in ``boxes`` order, into (C, H·s, W·s)."""
        s = self.scale
        channels = outputs[0].shape[0]
        canvas = torch.zeros(channels, self.height * s, self.width * s, dtype=torch.float32)
        total = torch.zeros(1, self.height * s, self.width * s, dtype=torch.float32)
        for (y, x), out in zip(self.boxes, outputs, strict=True):
            w = self.weight(y, x)
            region = (slice(None), slice(y * s, (y + self.tile) * s), slice(x * s, (x + self.tile) * s))
            canvas[region] += out.float().cpu() * w
            total[region] += w
        return canvas / total
