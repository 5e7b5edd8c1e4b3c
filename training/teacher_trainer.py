"""``vpdsr train teacher``: the multi-step ResShift teacher (Swin-UNet predicting x0 in latent space).

Per micro-batch: HR crops → Real-ESRGAN LR (on the device); ``z0 = E(HR)``, ``z_y = E(bicubic×sf(LR))``
with the frozen autoencoder; ``t ~ U{0, …, T−1}``; ``x_t = z0 + η_t (z_y − z0) + κ √η_t ε``; the UNet
sees ``x_t / √(κ² η_t + 1)``, ``t`` and the LR image and is trained with MSE to ``z0`` (ResShift's
``predict_type: xstart``). The registry entry (kind ``teacher``, ``inference_steps = T``) holds the
EMA UNet and a copy of the autoencoder, so ``vpdsr upscale --model NAME`` runs it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import DiffusionConfig, ModelConfig, UNetConfig
from model.registry import Registry, RegistryEntry
from model.schedule import ResShiftSchedule
from model.unet import SwinUNet

from . import engine as engine_lib
from .config_files import ConfigError
from .data import DataConfig
from .degradations import DegradationConfig, Degrader
from .engine import Engine, Losses, OptimConfig, RunConfig
from .latents import AutoencoderSource, build_codec, make_pair

KIND = "teacher"


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Everything a teacher run needs (``training/configs/teacher-*.yaml``); defaults: ResShift v1 ×4."""

    name: str = "resshift-teacher"
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    autoencoder: AutoencoderSource = field(default_factory=AutoencoderSource)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.degradation.scale != self.diffusion.sf:
            raise ValueError(f"degradation.scale {self.degradation.scale} must equal diffusion.sf {self.diffusion.sf}")


def check_sizes(crop: int, sf: int, latent_factor: int, unet: SwinUNet, unet_config: UNetConfig) -> None:
    """Fail at start-up, not at the first forward pass, when crops do not fit the networks."""
    latent = crop // latent_factor
    if crop % (sf * latent_factor) or latent % unet.size_multiple:
        raise ConfigError(
            f"data.crop_size {crop} gives {latent}² latents: it must be a multiple of {sf * latent_factor} "
            f"with latents a multiple of {unet.size_multiple} (the UNet's window × 2^levels)"
        )
    if crop // sf * unet_config.image_size != latent * unet_config.lq_size:
        raise ConfigError(
            f"LR crops of {crop // sf}² and latents of {latent}² do not keep the UNet's lq_size:image_size "
            f"ratio {unet_config.lq_size}:{unet_config.image_size}"
        )


class TeacherTrainer:
    def __init__(self, cfg: TeacherTrainConfig, engine: Engine, registry: Registry, alias: str | None) -> None:
        self.cfg, self.engine, self.registry, self.alias = cfg, engine, registry, alias
        ae_config, ae_state = cfg.autoencoder.load(registry)
        unet = SwinUNet.from_config(cfg.unet)
        check_sizes(cfg.data.crop_size, cfg.diffusion.sf, ae_config.ddconfig.downsample_factor, unet, cfg.unet)
        self.autoencoder_config = ae_config
        self.latents = build_codec(ae_config, ae_state, cfg.diffusion.scale_factor, cfg.diffusion.sf, engine.device)
        self.schedule = ResShiftSchedule(cfg.diffusion)
        self.degrader = Degrader(cfg.degradation)
        self.unet = engine.add_part("unet", unet, cfg.optim, ema=True)

    def losses(self, hr: Tensor, step: int) -> Losses:
        pair = make_pair(hr, self.degrader, self.engine.generator, self.latents)
        t = torch.randint(0, self.schedule.num_steps, (hr.shape[0],), device=hr.device)
        noise = torch.randn_like(pair.z0)
        x_t = self.schedule.q_sample(pair.z0, pair.z_y, t, noise)
        pred = self.unet.net(self.schedule.scale_input(x_t, t), t, pair.lq)
        loss = F.mse_loss(pred.float(), pair.z0)
        return Losses({"unet": loss}, {"loss/mse": loss})

    def publish(self) -> RegistryEntry:
        cfg = self.cfg
        provenance = {"source": f"vpdsr train {KIND}", "autoencoder": cfg.autoencoder.describe()}
        config = ModelConfig(
            unet=cfg.unet,
            autoencoder=self.autoencoder_config,
            diffusion=cfg.diffusion,
            inference_steps=cfg.diffusion.steps,
            kind=KIND,
            provenance=provenance | self.engine.provenance(cfg.data),
        )
        version = self.registry.next_version(cfg.name)
        aliases = (self.alias,) if self.alias else ()
        return self.registry.save(
            cfg.name, version, config, self.engine.weights("unet"), self.latents.autoencoder.state_dict(), aliases=aliases
        )


def train(
    cfg: TeacherTrainConfig, registry: Registry, resume: str | Path | None = None, alias: str | None = None
) -> RegistryEntry | None:
    """Train, then write ``<name>:<next version>`` into ``registry`` (rank 0); returns that entry."""
    return engine_lib.train(cfg, lambda engine: TeacherTrainer(cfg, engine, registry, alias), resume)
