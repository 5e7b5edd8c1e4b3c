"""ResShift's residual-shifting noise schedule.

ResShift diffuses from the HR latent x0 towards the LR latent y by shifting the residual
e0 = y − x0 while adding noise:  x_t = x0 + η_t·e0 + κ·√η_t·ε  (η increases from ≈0 to ≈1).
So the prior at t = T−1 is  x_T = y + κ·√η_T·ε : sampling starts from the LR latent itself,
which is why few steps suffice and why one step can work at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import DiffusionConfig


def sqrt_eta_schedule(cfg: DiffusionConfig) -> list[float]:
    """√η_t for t = 0…T−1: geometric in a power-warped time axis (ResShift's "exponential" schedule).

    √η_0 = min(min_noise_level / κ, min_noise_level) and √η_{T−1} = etas_end; in between
    √η grows like b^(T−1)·((t/(T−1))^power) so that early steps change the image slowly.
    """
    steps = cfg.steps
    start = min(cfg.min_noise_level / cfg.kappa, cfg.min_noise_level)
    if steps == 1:
        return [cfg.etas_end]
    log_ratio = math.log(cfg.etas_end / start)
    return [start * math.exp(log_ratio * (t / (steps - 1)) ** cfg.power) for t in range(steps)]


class ResShiftSchedule:
    """Holds η_t and the closed-form maths of the forward process, prior and network input."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        self.kappa = cfg.kappa
        self.num_steps = cfg.steps
        self.sqrt_etas = torch.tensor(sqrt_eta_schedule(cfg), dtype=torch.float64)
        self.etas = self.sqrt_etas**2
        # The same values as Python floats, for the sampler's scalar arithmetic: reading a float out
        # of a tensor inside torch.compile'd code is a graph break (one graph per piece, not per call).
        self.sqrt_eta_values: list[float] = self.sqrt_etas.tolist()
        self.eta_values: list[float] = self.etas.tolist()

    def to(self, device: torch.device | str) -> "ResShiftSchedule":
        """Keep the η tables on ``device`` (the model's): a host tensor looked up inside a compiled
        CUDA graph would split it around a copy."""
        self.sqrt_etas, self.etas = self.sqrt_etas.to(device), self.etas.to(device)
        return self

    def _at(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """values[t] broadcast to ``like`` (one value per batch element)."""
        out = values.to(like.device)[t.to(like.device)].to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, z0: Tensor, z_y: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward process: x_t = z0 + η_t (z_y − z0) + κ √η_t ε."""
        eta = self._at(self.etas, t, z0)
        return z0 + eta * (z_y - z0) + self.kappa * self._at(self.sqrt_etas, t, z0) * noise

    def prior_sample(self, z_y: Tensor, noise: Tensor) -> Tensor:
        """The start of sampling: x_T = z_y + κ √η_T ε."""
        return z_y + self.kappa * self.sqrt_eta_values[-1] * noise

    def scale_input(self, x: Tensor, t: Tensor) -> Tensor:
        """Normalise x_t to unit-ish variance for the network: x_t / √(κ² η_t + 1)."""
        if not self.cfg.normalize_input:
            return x
        return x / torch.sqrt(self._at(self.etas, t, x) * self.kappa**2 + 1)

    def timesteps(self, steps: int) -> list[int]:
        """The decreasing timesteps a ``steps``-step sampler visits: T−1 first, 0 last when steps > 1."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be between 1 and {self.num_steps}, got {steps}")
        if steps == 1:
            return [self.num_steps - 1]
        grid = torch.linspace(self.num_steps - 1, 0, steps).round().long()
        return [int(v) for v in grid]
