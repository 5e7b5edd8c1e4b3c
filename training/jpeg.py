"""Batched baseline-JPEG simulator in torch, so compression artefacts are made on the GPU.

Encoding and decoding a whole batch through PIL/libjpeg would mean a device round-trip and a Python
loop per image at every training step; this module does the lossy part of baseline JPEG with tensor
ops instead, one quality per image:

1. 8-bit RGB → YCbCr (JFIF matrix), 4:2:0 chroma subsampling (2×2 mean);
2. 8×8 orthonormal 2-D DCT-II per block (the JPEG FDCT);
3. division by the standard quantisation tables (ITU-T T.81 Annex K) scaled for the quality as
   libjpeg does, rounding to integers, multiplication back;
4. inverse DCT, chroma upsampling (libjpeg's default "fancy", i.e. bilinear, upsampling), YCbCr → RGB,
   rounding to 8-bit levels.

The rounding of step 3 is what removes detail independently in each block, hence the 8×8 block
artefacts and ringing of real JPEG files. Entropy coding is lossless and is skipped. Images whose sides
are not multiples of 16 are padded by edge replication, as encoders do, and cropped back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
_YCBCR_TO_RGB = (
    (1.0, 0.0, 1.402),
    (1.0, -0.344136, -0.714136),
    (1.0, 1.772, 0.0),
)


def _block_dct(device: torch.device, dtype: torch.dtype) -> Tensor:
    """JPEG's 2-D FDCT of a flattened 8×8 block as one orthonormal 64×64 matrix.

    ``kron(D, D)`` with ``D`` the orthonormal 8-point DCT-II; one large matrix product over all blocks
    is much faster than many 8×8 ones, and its transpose is the inverse transform.
    """
    u = torch.arange(8, dtype=torch.float64)[:, None]
    x = torch.arange(8, dtype=torch.float64)[None, :]
    dct = torch.cos((2 * x + 1) * u * math.pi / 16) * math.sqrt(2 / 8)
    dct[0] /= math.sqrt(2)
    return torch.kron(dct, dct).to(device, dtype)


def quantisation_tables(quality: Tensor) -> tuple[Tensor, Tensor]:
    """Luma and chroma tables ``(B, 8, 8)`` for qualities ``(B,)`` in [1, 100], libjpeg's scaling.

    As in a real encoder the quality is an integer: it is rounded first.
    """
    q = quality.round().clamp(1, 100)[:, None, None]
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)

    def scaled(table: tuple[tuple[int, ...], ...]) -> Tensor:
        base = torch.tensor(table, dtype=quality.dtype, device=quality.device)
        return torch.floor((base * scale + 50) / 100).clamp(1, 255)

    return scaled(_LUMA_TABLE), scaled(_CHROMA_TABLE)


def _colour(matrix: tuple[tuple[float, ...], ...], image: Tensor) -> Tensor:
    """Apply a 3×3 colour matrix to ``(B, 3, H, W)``."""
    weights = torch.tensor(matrix, dtype=image.dtype, device=image.device)
    return torch.einsum("ij,bjhw->bihw", weights, image)


def _quantise_blocks(plane: Tensor, table: Tensor) -> Tensor:
    """DCT each 8×8 block of ``(B, C, H, W)`` (level-shifted samples), quantise with ``table``
    ``(B, 8, 8)``, and transform back."""
    b, c, h, w = plane.shape
    transform = _block_dct(plane.device, plane.dtype)
    blocks = plane.reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, -1, 64)
    step = table.reshape(b, 1, 64)
    coefficients = torch.round(blocks @ transform.T / step) * step
    restored = (coefficients @ transform).reshape(b, c, h // 8, w // 8, 8, 8)
    return restored.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def jpeg_compress(image: Tensor, quality: Tensor) -> Tensor:
    """JPEG-compress and decode ``(B, 3, H, W)`` RGB in [0, 1] at per-image ``quality`` ``(B,)``.

    Returns the decoded images, same shape, 8-bit levels in [0, 1].
    """
    b, _, h, w = image.shape
    padded = F.pad(image, (0, -w % 16, 0, -h % 16), mode="replicate")
    # Y in [0, 255]; Cb and Cr come out centred on 0, i.e. already level-shifted by 128.
    ycbcr = _colour(_RGB_TO_YCBCR, torch.round(padded.clamp(0, 1) * 255))
    luma_table, chroma_table = quantisation_tables(quality.to(image.device, image.dtype))
    luma = _quantise_blocks(ycbcr[:, :1] - 128, luma_table) + 128
    chroma = _quantise_blocks(F.avg_pool2d(ycbcr[:, 1:], 2), chroma_table)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    rgb = _colour(_YCBCR_TO_RGB, torch.cat([luma, chroma], dim=1))
    return (torch.round(rgb).clamp(0, 255) / 255)[:, :, :h, :w]
