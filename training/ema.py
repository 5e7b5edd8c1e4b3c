"""Exponential moving average of a network's weights: the weights that get published.

Diffusion models sample visibly better from averaged weights than from the last optimiser
iterate (ResShift keeps a 0.999 EMA and evaluates it), so the registry receives the EMA copy.
Buffers (e.g. Swin's relative position index) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen shadow copy of ``module`` updated as ``shadow ← decay·shadow + (1 − decay)·weights``."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        shadow = list(self.module.parameters())
        current = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(shadow, current, 1.0 - self.decay)
        for mine, theirs in zip(self.module.buffers(), module.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
