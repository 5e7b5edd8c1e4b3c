"""The optional PatchGAN of the autoencoder and distillation trainers: the network, its hinge losses,
VQGAN's adaptive weight, and :class:`Adversary`, the discriminator part that a stage trains.

The generator's term runs the discriminator *unwrapped and frozen* (gradients reach the fakes, not
the discriminator's weights, and DDP's hooks stay out of it); the discriminator's term runs it
through its DDP wrapper on real and detached fake samples concatenated into one batch (one forward
per step, as DDP expects). Both parts then step in the same iteration.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from model.checkpoint import load_into

from .checkpoints import load_weights
from .config_files import Config
from .trainer import OptimConfig, Trainer, frozen

PART = "discriminator"


class DiscriminatorConfig(Config):
    """PatchGAN on latents. ``n_layers`` stride-2 convolutions halve the input each, so the input must
    be at least 2**n_layers pixels wide (16×16 latents with 3 layers give 2×2 patch logits).

    ``norm`` is ``"group"`` by default: batch statistics of 1×1 maps or tiny batches are unreliable
    and instance norm fails on 1×1 maps, while group norm works for any batch and size.
    """

    in_channels: int = 3
    base_channels: int = 64
    n_layers: int = 3
    norm: str = "group"  # "group", "batch" or "none"


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {kind!r}: use 'group', 'batch' or 'none'")


class PatchDiscriminator(nn.Module):
    """pix2pix-style PatchGAN: real/fake logits per latent patch, shape (N, 1, H/2**n, W/2**n).

    The ``n_layers`` down-sampling layers are 4×4 stride-2 convolutions (padding 1); the last two
    layers are 3×3 with padding 1 rather than pix2pix's 4×4, so they keep the size and small
    latents still give at least one logit.
    """

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        cfg = config or DiscriminatorConfig()
        if cfg.n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {cfg.n_layers}")
        self.n_layers = cfg.n_layers
        bias = cfg.norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(cfg.in_channels, cfg.base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = cfg.base_channels
        for i in range(1, cfg.n_layers + 1):
            out = cfg.base_channels * min(2**i, 8)
            stride, kernel = (2, 4) if i < cfg.n_layers else (1, 3)
            layers += [
                nn.Conv2d(channels, out, kernel, stride=stride, padding=1, bias=bias),
                _norm(cfg.norm, out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 3, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        smallest = 2**self.n_layers
        if min(z.shape[-2:]) < smallest:
            raise ValueError(
                f"latent {tuple(z.shape[-2:])} is too small for {self.n_layers} down-sampling layers "
                f"(needs at least {smallest}×{smallest}); use fewer n_layers"
            )
        return self.net(z)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss: mean(relu(1 − real)) + mean(relu(1 + fake))."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def adaptive_weight(reconstruction: Tensor, adversarial: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's balance of the two (Esser et al. 2021, eq. 7): ‖∇L_rec‖ / (‖∇L_GAN‖ + 10⁻⁴), gradients
    taken at the decoder's last layer, detached. Times a weight w, the GAN term then pulls on that
    layer with w × the force of the reconstruction loss, whatever the scale of the discriminator's
    logits — a fixed weight that is gentle at one stage of training can wreck reconstruction at
    another."""
    rec_grad = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(max=1e4).detach()


def generator_adv_loss(fake_logits: Tensor) -> Tensor:
    """Generator side of the hinge GAN: −mean(D(fake))."""
    return -fake_logits.mean()



class DiscriminatorSetup(Config):
    """The discriminator network, its optimiser, and the step from which the adversarial terms apply."""

    network: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.5, 0.9)))
    start_step: int = 0
    init_from: Path | None = None
    """A discriminator's weights from an earlier run (its run folder's ``discriminator.safetensors``).
    A GAN continued with a fresh discriminator spends its first hundreds of steps teaching it what
    the old one knew, while the generator is pulled by an uninformed judge; on a CPU that is a
    large share of a sitting."""


class Adversary:
    """A discriminator trained alongside a generator."""

    def __init__(self, trainer: Trainer, setup: DiscriminatorSetup, in_channels: int) -> None:
        network = PatchDiscriminator(setup.network.model_copy(update={"in_channels": in_channels}))
        if setup.init_from is not None:
            load_into(network, load_weights(setup.init_from), f"discriminator.init_from {setup.init_from}")
        self.part = trainer.add_part(PART, network, setup.optim)
        self.start_step = setup.start_step

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def generator_loss(self, fake: Tensor) -> Tensor:
        """−E[D(fake)], differentiable in ``fake`` only."""
        with frozen(self.part.module) as discriminator:
            return generator_adv_loss(discriminator(fake).float())

    def generator_term(
        self, fake: Tensor, weight: float, balance: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(weight, −E[D(fake)]) of the generator's objective. With ``balance`` = (the main loss, the
        generator's last-layer weight), ``weight`` is scaled by VQGAN's adaptive factor
        (:func:`adaptive_weight`), so it is the GAN's share of the force on that layer."""
        loss = self.generator_loss(fake)
        if balance is None:
            return torch.tensor(weight), loss
        return weight * adaptive_weight(balance[0], loss, balance[1]), loss

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        """Hinge loss on real samples vs detached fakes."""
        logits = self.part.net(torch.cat([real, fake.detach().to(real.dtype)])).float()
        real_logits, fake_logits = logits.chunk(2)
        return hinge_d_loss(real_logits, fake_logits)


def companions(adversary: Adversary | None) -> dict[str, dict[str, Tensor]]:
    """A stage's :attr:`Publication.companions <training.trainer.Publication.companions>`: the
    discriminator's weights, under the stem its ``init_from`` is documented by (none without one)."""
    return {PART: adversary.part.module.state_dict()} if adversary is not None else {}
