"""Group normalisation that always computes its statistics in float32 (shared by both networks)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (32 groups unless told otherwise) computed in float32.

    Under bf16/fp16 autocast, or in a half-precision model, the statistics of large activations
    overflow or lose digits; the input is promoted and the result cast back to its dtype, as in
    ResShift. The group count has no parameters, so it never affects checkpoint compatibility.
    """

    def __init__(self, channels: int, eps: float = 1e-5, groups: int = 32) -> None:
        super().__init__(groups, channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)
