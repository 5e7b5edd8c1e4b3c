"""``vpdsr train teacher``: the multi-step ResShift teacher (Swin-UNet predicting x0 in latent space).

Per micro-batch: HR crops → Real-ESRGAN LR (on the device); ``z0 = E(HR)``, ``z_y = E(bicubic×sf(LR))``
with the frozen autoencoder; ``t ~ U{0, …, T−1}``; ``x_t = z0 + η_t (z_y − z0) + κ √η_t ε``; the UNet
sees ``x_t / √(κ² η_t + 1)``, ``t`` and the LR image and is trained with MSE to ``z0`` (ResShift's
``predict_type: xstart``). The registry entry (kind ``teacher``, ``inference_steps = T``) holds the
EMA UNet and a copy of the autoencoder, so ``vpdsr upscale --model NAME`` runs it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from model.config import DiffusionConfig, ModelConfig, UNetConfig
from model.registry import Registry, RegistryEntry
from model.schedule import ResShiftSchedule
from model.unet import SwinUNet

from . import trainer as trainer_lib
from .degradations import DegradationConfig, Degrader
from .latents import AutoencoderSource, build_codec, check_sizes, make_pair
from .trainer import Losses, Publication, StageConfig, Trainer
from .warm_start import warm_start

KIND = "teacher"


class TeacherTrainConfig(StageConfig):
    """Everything a teacher run needs (``training/configs/teacher-*.yaml``); defaults: ResShift v1 ×4."""

    name: str = "resshift-teacher"
    unet: UNetConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    autoencoder: AutoencoderSource = Field(default_factory=AutoencoderSource)
    """The frozen autoencoder whose latent space the teacher diffuses in; its entry (or the official
    checkpoint) travels into the published teacher."""
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    init_from: str | None = None
    """Registry reference (a teacher, or a student of the same UNet) whose UNet weights start the run:
    fine-tuning a trained model to new degradations (``training/warm_start.py``)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.degradation.scale != self.diffusion.sf:
            raise ValueError(f"degradation.scale {self.degradation.scale} must equal diffusion.sf {self.diffusion.sf}")
        return self


class TeacherStage:
    def __init__(self, cfg: TeacherTrainConfig, trainer: Trainer, registry: Registry, alias: str | None) -> None:
        self.cfg, self.trainer, self.alias = cfg, trainer, alias
        ae_config, ae_state = cfg.autoencoder.load(registry)
        unet = SwinUNet.from_config(cfg.unet)
        self.init_from = cfg.init_from and warm_start(unet, registry, cfg.init_from, "unet", trainer.notice)
        check_sizes(cfg.data.crop_size, cfg.diffusion.sf, ae_config.ddconfig.downsample_factor, unet, cfg.unet)
        self.autoencoder_config = ae_config
        self.latents = build_codec(ae_config, ae_state, cfg.diffusion, trainer.device)
        self.schedule = ResShiftSchedule(cfg.diffusion)
        self.degrader = Degrader(cfg.degradation)
        self.unet = trainer.add_part("unet", unet, cfg.optim, ema=True)

    def losses(self, hr: Tensor, step: int) -> Losses:
        pair = make_pair(hr, self.degrader, self.trainer.generator, self.latents)
        t = torch.randint(0, self.schedule.num_steps, (hr.shape[0],), device=hr.device)
        noise = torch.randn_like(pair.z0)
        x_t = self.schedule.q_sample(pair.z0, pair.z_y, t, noise)
        pred = self.unet.net(self.schedule.scale_input(x_t, t), t, pair.lq)
        loss = F.mse_loss(pred.float(), pair.z0)
        return Losses({"unet": loss}, {"loss/mse": loss})

    def publication(self) -> Publication:
        cfg = self.cfg
        provenance = {"source": f"vpdsr train {KIND}", "autoencoder": cfg.autoencoder.describe(), "init_from": self.init_from}
        config = ModelConfig(
            unet=cfg.unet,
            autoencoder=self.autoencoder_config,
            diffusion=cfg.diffusion,
            inference_steps=cfg.diffusion.steps,
            kind=KIND,
            provenance=provenance,
        )
        return Publication(cfg.name, config, self.trainer.weights("unet"), self.latents.autoencoder.state_dict(), self.alias)


def train(
    cfg: TeacherTrainConfig, registry: Registry, resume: str | Path | None = None, alias: str | None = None
) -> RegistryEntry | None:
    """Train, then write ``<name>:<next version>`` into ``registry`` (rank 0); returns that entry."""
    return trainer_lib.train(cfg, registry, lambda trainer: TeacherStage(cfg, trainer, registry, alias), resume)
