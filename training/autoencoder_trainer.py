"""``vpdsr train autoencoder``: the VQGAN f4 whose latent space the diffusion models live in.

Objective: L1 reconstruction + codebook and commitment losses (straight-through estimator inside
:class:`model.VQAutoencoder`), plus an optional PatchGAN term on images (off by default: it sharpens
textures but makes training slower and less stable). The registry entry is autoencoder-only:
``kind: "autoencoder"``, ``inference_steps: 0`` and no ``unet.*`` weights; the teacher trainer takes
its autoencoder from such an entry (``--autoencoder NAME``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from model.autoencoder import DECODER_SIDE, VQAutoencoder
from model.config import AutoencoderConfig, ModelConfig
from model.registry import Registry, RegistryEntry

from . import trainer as trainer_lib
from .adversary import Adversary, DiscriminatorSetup, companions
from .losses import detail_l1
from .resampler_init import check as check_resampler
from .resampler_init import init_as_resampler
from .trainer import Losses, LossTerm, OptimConfig, Publication, RunConfig, StageConfig, Trainer
from .warm_start import warm_start

KIND = "autoencoder"


class AutoencoderTrainConfig(StageConfig):
    """Everything an autoencoder run needs (``training/configs/autoencoder-*.yaml``)."""

    name: str = "vq-f4"
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    """The architecture to train; its defaults are the official VQGAN f4's (3-channel latent, 8192
    codes), which the small presets shrink or make continuous (``n_embed: 0``)."""
    l1: LossTerm = Field(default_factory=LossTerm)
    codebook: LossTerm = Field(default_factory=LossTerm)
    """Weight of codebook + commitment losses (the commitment β is inside the quantiser); off for a
    continuous latent (``autoencoder.n_embed: 0``)."""
    wavelet: LossTerm = Field(default_factory=lambda: LossTerm(enabled=False, weight=1.0))
    """L1 between the Haar detail bands (LH, HL, HH) of reconstruction and target. Pixel L1 is ruled by
    smooth regions, so a briefly trained decoder stays soft at edges and textures, which NIQE and
    viewers notice first; this term weights the detail on its own (as L_HFP does in distillation)."""
    adversarial: LossTerm = Field(default_factory=lambda: LossTerm(enabled=False, weight=0.1))
    adaptive_weight: bool = False
    """Scale the adversarial weight by VQGAN's adaptive factor (:func:`training.adversary.adaptive_weight`,
    against the L1 term): ``adversarial.weight`` is then the GAN's share of the force on the decoder."""
    anchor: LossTerm = Field(default_factory=lambda: LossTerm(enabled=False, weight=1.0))
    """L1 between the latent and the bicubic ×1/f image (needs embed_dim 3). Off for real models; the
    small CPU-trained demo chain uses it so its latent stays image-like: then z_y ≈ z0 and the
    decoder learns most of the super-resolution, which a few CPU minutes can train."""
    init: Literal["random", "resampler"] = "random"
    """``resampler`` starts encoder and decoder as box-down / bilinear-up with identity residual
    blocks (``training/resampler_init.py``), so a short run learns only the detail; pairs with
    ``anchor``. ``random`` is PyTorch's default initialisation, as for the official VQGAN."""
    init_from: str | None = None
    """Registry reference whose autoencoder weights start the run (fine-tuning, see
    ``training/warm_start.py``); replaces ``init``."""
    decoder_only: bool = False
    """Train only the decoder side (``post_quant_conv`` and ``decoder``) of an ``init_from`` model: the
    encoder and codebook, hence every latent, stay bit-identical, so diffusion models trained in that
    latent space keep working with the new decoder (Stable Diffusion's ft-MSE VAE is made this way).
    ``vpdsr registry copy --autoencoder`` then swaps it into a trained model."""
    discriminator: DiscriminatorSetup = Field(default_factory=DiscriminatorSetup)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.5, 0.9)))
    run: RunConfig = Field(default_factory=lambda: RunConfig(ema_decay=None))

    @model_validator(mode="after")
    def _check(self) -> Self:
        factor = self.autoencoder.ddconfig.downsample_factor
        if self.data.crop_size % factor:
            raise ValueError(f"data.crop_size {self.data.crop_size} must be a multiple of the autoencoder's factor {factor}")
        if not (self.l1.enabled or self.codebook.enabled):
            raise ValueError("at least one of l1 and codebook must be enabled")
        if self.codebook.enabled and self.autoencoder.n_embed == 0:
            raise ValueError("a continuous latent (autoencoder.n_embed 0) has no codebook: disable codebook")
        if self.anchor.enabled and self.autoencoder.embed_dim != 3:
            raise ValueError("anchor needs an RGB-like latent: autoencoder.embed_dim must be 3")
        if self.init == "resampler":
            if self.init_from is not None:
                raise ValueError("init_from starts from trained weights: leave init at random")
            check_resampler(self.autoencoder)
        if self.decoder_only and (self.init_from is None or self.codebook.enabled or self.anchor.enabled):
            raise ValueError("decoder_only fine-tunes an init_from model with codebook and anchor off (they "
                             "act on the frozen encoder)")
        if self.adaptive_weight and not (self.adversarial.enabled and self.l1.enabled):
            raise ValueError("adaptive_weight balances the adversarial term against l1: enable both")
        return self


class AutoencoderStage:
    def __init__(self, cfg: AutoencoderTrainConfig, trainer: Trainer, registry: Registry, alias: str | None) -> None:
        self.cfg, self.trainer, self.alias = cfg, trainer, alias
        autoencoder = VQAutoencoder.from_config(cfg.autoencoder)
        if cfg.anchor.enabled and cfg.autoencoder.n_embed > 0:
            # An image-like latent lives in [-1, 1]³: spread the codes over that cube instead of
            # taming's ±1/n_embed start, where nearly every latent would map to a handful of codes.
            with torch.no_grad():
                autoencoder.quantize.embedding.weight.uniform_(-1, 1)
        if cfg.init == "resampler":
            init_as_resampler(autoencoder)
        self.init_from = cfg.init_from and warm_start(autoencoder, registry, cfg.init_from, KIND, trainer.notice)
        if cfg.decoder_only:
            for name, parameter in autoencoder.named_parameters():
                parameter.requires_grad_(name.startswith(DECODER_SIDE))
        self.part = trainer.add_part(KIND, autoencoder, cfg.optim, ema=True)
        self.adversary = (
            Adversary(trainer, cfg.discriminator, in_channels=cfg.autoencoder.ddconfig.out_ch)
            if cfg.adversarial.enabled
            else None
        )

    def losses(self, hr: Tensor, step: int) -> Losses:
        cfg = self.cfg
        target = hr * 2 - 1
        recon, codebook_loss, commitment_loss = self.part.net(target)
        terms: dict[str, tuple[float, Tensor]] = {}
        if cfg.l1.enabled:
            terms["l1"] = cfg.l1.weight, (recon.float() - target).abs().mean()
        if cfg.wavelet.enabled:
            terms["wavelet"] = cfg.wavelet.weight, detail_l1(recon, target)
        if cfg.codebook.enabled:
            terms["codebook"] = cfg.codebook.weight, codebook_loss
            terms["commitment"] = cfg.codebook.weight, commitment_loss
        if cfg.anchor.enabled:
            net = self.part.module  # the plain module, also under DDP
            small = F.interpolate(target, scale_factor=1 / net.downsample_factor, mode="bicubic", antialias=True)
            terms["anchor"] = cfg.anchor.weight, (net.encode(target).float() - small).abs().mean()
        adversarial = self.adversary is not None and self.adversary.active(step)
        if adversarial:
            balance = (terms["l1"][1], self.part.module.decoder.conv_out.weight) if cfg.adaptive_weight else None
            terms["adversarial"] = self.adversary.generator_term(recon, cfg.adversarial.weight, balance)  # type: ignore[union-attr]
        total = sum(weight * value for weight, value in terms.values())
        log = {f"loss/{name}": value for name, (_, value) in terms.items()} | {"loss/total": total}
        if adversarial and cfg.adaptive_weight:
            log["weight/adversarial"] = terms["adversarial"][0]
        minimise = {KIND: total}
        if adversarial:
            minimise["discriminator"] = log["loss/discriminator"] = self.adversary.discriminator_loss(target, recon)  # type: ignore[union-attr]
        return Losses(minimise, log)  # type: ignore[arg-type]

    def publication(self) -> Publication:
        provenance = {"source": f"vpdsr train {KIND}", "init_from": self.init_from}
        config = ModelConfig(autoencoder=self.cfg.autoencoder, inference_steps=0, kind=KIND, provenance=provenance)
        return Publication(self.cfg.name, config, {}, self.trainer.weights(KIND), self.alias, companions(self.adversary))


def train(
    cfg: AutoencoderTrainConfig, registry: Registry, resume: str | Path | None = None, alias: str | None = None
) -> RegistryEntry | None:
    """Train, then write ``<name>:<next version>`` into ``registry`` (rank 0); returns that entry."""
    return trainer_lib.train(cfg, registry, lambda trainer: AutoencoderStage(cfg, trainer, registry, alias), resume)

