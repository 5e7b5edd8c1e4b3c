"""Deterministic ResShift sampling (SinSR eq. 3–4): the multi-step teacher and the one-step student.

From x_t and the network's x̂0 the next state is
    x_s = k·x̂0 + m·x_t + j·y,   m = √(η_s/η_t),  j = η_s − √(η_s·η_t),  k = 1 − m − j
(s is the next, smaller timestep), i.e. the posterior mean with the noise term replaced by the
noise implied by x_t. No randomness after the prior, so a teacher run is a fixed function of
(y, ε) that a one-step student can be distilled to; with ``steps=1`` the result is simply x̂0 at
t = T−1.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from .schedule import ResShiftSchedule


class Denoiser(Protocol):
    def __call__(self, x: Tensor, timesteps: Tensor, lq: Tensor) -> Tensor: ...


def predict_x0(unet: Denoiser, schedule: ResShiftSchedule, x_t: Tensor, t: int, lq: Tensor) -> Tensor:
    """The network's x̂0 at integer timestep ``t`` (input scaled as in training)."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    return unet(schedule.scale_input(x_t, tt), tt, lq)


def sample(
    unet: Denoiser,
    schedule: ResShiftSchedule,
    z_y: Tensor,
    lq: Tensor,
    noise: Tensor,
    steps: int,
) -> Tensor:
    """Run the deterministic sampler from the prior x_T = z_y + κ√η_T ε and return x̂0."""
    x = schedule.prior_sample(z_y, noise)
    ts = schedule.timesteps(steps)
    etas = schedule.eta_values
    for t, s in zip(ts, ts[1:]):
        x0 = predict_x0(unet, schedule, x, t, lq)
        m = math.sqrt(etas[s] / etas[t])
        j = etas[s] - math.sqrt(etas[s] * etas[t])
        x = (1 - m - j) * x0 + m * x + j * z_y
    return predict_x0(unet, schedule, x, ts[-1], lq)
