"""The optional PatchGAN of the autoencoder and distillation trainers: one discriminator part, two hinge losses.

The generator's term runs the discriminator *unwrapped and frozen* (gradients reach the fakes, not
the discriminator's weights, and DDP's hooks stay out of it); the discriminator's term runs it
through its DDP wrapper on real and detached fake samples concatenated into one batch (one forward
per step, as DDP expects). Both parts then step in the same iteration.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .config_files import Config
from .losses import DiscriminatorConfig, PatchDiscriminator, adaptive_weight, generator_adv_loss, hinge_d_loss
from .trainer import OptimConfig, Trainer, frozen

PART = "discriminator"


class DiscriminatorSetup(Config):
    """The discriminator network, its optimiser, and the step from which the adversarial terms apply."""

    network: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.5, 0.9)))
    start_step: int = 0


class Adversary:
    """A discriminator trained alongside a generator."""

    def __init__(self, trainer: Trainer, setup: DiscriminatorSetup, in_channels: int) -> None:
        network = PatchDiscriminator(setup.network.model_copy(update={"in_channels": in_channels}))
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
        (:func:`training.losses.adaptive_weight`), so it is the GAN's share of the force on that layer."""
        loss = self.generator_loss(fake)
        if balance is None:
            return torch.tensor(weight), loss
        return weight * adaptive_weight(balance[0], loss, balance[1]), loss

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        """Hinge loss on real samples vs detached fakes."""
        logits = self.part.net(torch.cat([real, fake.detach().to(real.dtype)])).float()
        real_logits, fake_logits = logits.chunk(2)
        return hinge_d_loss(real_logits, fake_logits)
