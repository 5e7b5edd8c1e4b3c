"""``vpdsr train distill``: VPD-SR's one-step student (Algorithm 1 of the paper).

The student is a copy of the teacher's Swin-UNet; the teacher, the VQ autoencoder and the CLIP
image encoder stay frozen. Per micro-batch:

1. HR crops → Real-ESRGAN LR; ``z_y = E(bicubic×4(LR))``, ``z0 = E(HR)``; ``z_T = z_y + κ√η_T ε``;
2. ``z_tch``: the teacher's deterministic T-step sampling from ``z_T`` (no gradients; ``teacher_steps``
   of its schedule, all by default);
   ``z_stu``: the student's one step from the same ``z_T``;
3. ``L = L_distill + λ1 L_HFP + λ2 L_SD + λ3 L_adv`` with
   ``L_distill = MSE(z_tch, z_stu)``, ``L_HFP`` = MSE of the LH/HL/HH wavelet bands of ``z_stu`` and
   ``z_tch`` (MSE alone under-weights the teacher's fine detail), ``L_SD = 1 − cos(CLIP(D(z_stu)), CLIP(HR))`` (gradients through the
   frozen decoder by straight-through quantisation), ``L_adv = −E[D(z_stu)]`` of a latent PatchGAN;
   optionally (off by default, not in the paper) ``L_fid = MSE(z0, z_stu)``, which ties the student
   to the HR latent itself as SinSR's ground-truth consistency term does: a briefly trained teacher
   hallucinates, and without it the student copies that;
4. the discriminator steps in the same iteration with the hinge loss on ``z0`` vs detached ``z_stu``.

Every term can be switched off (``losses.<term>.enabled``) for the paper's ablations. The registry
entry (kind ``student``, ``inference_steps`` 1) holds the EMA student and the teacher's autoencoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from model.checkpoint import load_into
from model.config import ModelConfig
from model.registry import Registry, RegistryEntry
from model.sampler import sample
from model.schedule import ResShiftSchedule
from model.unet import SwinUNet

from . import trainer as trainer_lib
from .adversary import Adversary, DiscriminatorSetup
from .config_files import Config, ConfigError, to_plain
from .data import DataConfig
from .degradations import DegradationConfig, Degrader
from .latents import build_codec, make_pair
from .losses import ClipConfig, ClipSemanticLoss, ClipWeightsMissing, distill_loss, hfp_loss
from .teacher_trainer import check_sizes
from .trainer import Losses, LossTerm, OptimConfig, RunConfig, Trainer

KIND = "student"


class DistillLosses(Config):
    """The four terms of Algorithm 1 and their weights (paper: λ1, λ2, λ3 = 0.1, 1, 0.1), and the
    optional HR-fidelity term (off unless a config switches it on)."""

    distill: LossTerm = Field(default_factory=LossTerm)
    hfp: LossTerm = Field(default_factory=lambda: LossTerm(weight=0.1))
    semantic: LossTerm = Field(default_factory=lambda: LossTerm(weight=1.0))
    adversarial: LossTerm = Field(default_factory=lambda: LossTerm(weight=0.1))
    fidelity: LossTerm = Field(default_factory=lambda: LossTerm(enabled=False, weight=1.0))

    def enabled(self) -> dict[str, float]:
        """Weight of each switched-on term."""
        terms = {name: getattr(self, name) for name in type(self).model_fields}
        return {name: term.weight for name, term in terms.items() if term.enabled}


class DistillTrainConfig(Config):
    """Everything a distillation run needs (``training/configs/distill-*.yaml``); defaults: the paper's."""

    name: str = "vpdsr"
    teacher: str | None = None
    """Registry reference of the teacher (``--teacher REF``)."""
    teacher_steps: int | None = Field(None, ge=1)
    """Sampler steps of the distillation target ``z_tch`` (default: all of the teacher's schedule,
    the paper's). Fewer steps of the same schedule leave less of the noise that a briefly trained
    teacher cannot remove; with the teacher's single step as the target, the fifth real-world
    attempt measured no gain over its four (docs/training.md)."""
    losses: DistillLosses = Field(default_factory=DistillLosses)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    discriminator: DiscriminatorSetup = Field(default_factory=DiscriminatorSetup)
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    run: RunConfig = Field(default_factory=lambda: RunConfig(steps=30_000))
    adaptive_weight: bool = False
    """Scale λ_adv by VQGAN's adaptive factor against L_distill at the student's output layer
    (:func:`training.losses.adaptive_weight`): λ_adv is then L_adv's share of the force on that layer,
    whatever the scale of the discriminator's logits. Small students whose distillation loss is tiny
    are otherwise pulled away from the teacher by a fixed λ_adv = 0.1."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.losses.enabled():
            raise ValueError("every loss term is switched off: enable at least one of losses.*")
        if self.adaptive_weight and not (self.losses.adversarial.enabled and self.losses.distill.enabled):
            raise ValueError("adaptive_weight balances losses.adversarial against losses.distill: enable both")
        return self


class DistillStage:
    def __init__(self, cfg: DistillTrainConfig, trainer: Trainer, registry: Registry, alias: str | None) -> None:
        self.cfg, self.trainer, self.registry, self.alias = cfg, trainer, registry, alias
        if cfg.teacher is None:
            raise ConfigError("no teacher: pass --teacher REF (a registry entry of kind 'teacher')")
        self.teacher_entry = registry.resolve(cfg.teacher)
        self.model_config = self.teacher_entry.config()
        mc = self.model_config
        if mc.kind == "autoencoder":
            raise ConfigError(f"{self.teacher_entry.ref} is an autoencoder; the teacher must be a diffusion model")
        if cfg.degradation.scale != mc.diffusion.sf:
            raise ConfigError(f"degradation.scale {cfg.degradation.scale} differs from the teacher's sf {mc.diffusion.sf}")
        unet_state, ae_state = self.teacher_entry.state_dicts()
        device = trainer.device

        self.teacher = SwinUNet.from_config(mc.unet)
        load_into(self.teacher, unet_state, "teacher UNet")
        self.teacher = self.teacher.to(device).eval().requires_grad_(False)
        check_sizes(cfg.data.crop_size, mc.diffusion.sf, mc.autoencoder.ddconfig.downsample_factor, self.teacher, mc.unet)
        self.latents = build_codec(mc.autoencoder, ae_state, mc.diffusion, device)
        self.schedule = ResShiftSchedule(mc.diffusion)
        self.teacher_steps = cfg.teacher_steps or self.schedule.num_steps
        if self.teacher_steps > self.schedule.num_steps:
            raise ConfigError(f"teacher_steps {cfg.teacher_steps} exceeds the teacher's {self.schedule.num_steps} diffusion steps")
        self.degrader = Degrader(cfg.degradation)
        student = SwinUNet.from_config(mc.unet)
        load_into(student, unet_state, "teacher UNet")
        self.student = trainer.add_part(KIND, student, cfg.optim, ema=True)

        weights = cfg.losses.enabled()
        self.clip: ClipSemanticLoss | None = None
        if "semantic" in weights:
            try:
                self.clip = ClipSemanticLoss(cfg.clip).to(device)
            except ClipWeightsMissing as exc:
                raise ConfigError(
                    f"the semantic loss (L_SD) needs CLIP weights: pass --clip-weights FILE (clip.pretrained_path) "
                    f"or switch it off with --set losses.semantic.enabled=false. {exc}"
                ) from None
        self.adversary = (
            Adversary(trainer, cfg.discriminator, in_channels=mc.autoencoder.embed_dim) if "adversarial" in weights else None
        )

    def losses(self, hr: Tensor, step: int) -> Losses:
        cfg = self.cfg
        pair = make_pair(hr, self.degrader, self.trainer.generator, self.latents)
        noise = torch.randn_like(pair.z_y)
        with torch.no_grad():
            z_tch = sample(self.teacher, self.schedule, pair.z_y, pair.lq, noise, self.teacher_steps).float()
        z_stu = sample(self.student.net, self.schedule, pair.z_y, pair.lq, noise, 1).float()

        terms: dict[str, Tensor] = {}
        if cfg.losses.distill.enabled:
            terms["distill"] = distill_loss(z_tch, z_stu)
        if cfg.losses.fidelity.enabled:
            terms["fidelity"] = F.mse_loss(z_stu, pair.z0)
        if cfg.losses.hfp.enabled:
            # Outside autocast: pytorch_wavelets' autograd function fails in backward on half-precision grads.
            with torch.autocast(hr.device.type, enabled=False):
                terms["hfp"] = hfp_loss(z_stu, z_tch)
        if self.clip is not None:
            terms["semantic"] = self.clip(self.latents.decode(z_stu), pair.hr)
        adversarial = self.adversary is not None and self.adversary.active(step)
        weights: dict[str, float | Tensor] = dict(cfg.losses.enabled())
        if adversarial:
            balance = (terms["distill"], self.student.module.out[-1].weight) if cfg.adaptive_weight else None
            weights["adversarial"], terms["adversarial"] = self.adversary.generator_term(  # type: ignore[union-attr]
                z_stu, weights["adversarial"], balance  # type: ignore[arg-type]
            )
        total = sum(weights[name] * value for name, value in terms.items())
        log = {f"loss/{name}": value for name, value in terms.items()} | {"loss/total": total}
        if adversarial and cfg.adaptive_weight:
            log["weight/adversarial"] = weights["adversarial"]
        minimise = {KIND: total}
        if adversarial:
            minimise["discriminator"] = log["loss/discriminator"] = self.adversary.discriminator_loss(pair.z0, z_stu)  # type: ignore[union-attr]
        return Losses(minimise, log)  # type: ignore[arg-type]

    def publish(self) -> RegistryEntry:
        cfg = self.cfg
        clip = cfg.clip
        provenance = {
            "source": "vpdsr train distill",
            "teacher": self.teacher_entry.ref,
            "teacher_steps": self.teacher_steps,
            "losses": cfg.losses.enabled(),
            "clip": {"model_name": clip.model_name, "weights": Path(clip.pretrained_path).name if clip.pretrained_path else None}
            if self.clip is not None
            else None,
            "discriminator": to_plain(cfg.discriminator) if self.adversary is not None else None,
        }
        config = ModelConfig(
            unet=self.model_config.unet,
            autoencoder=self.model_config.autoencoder,
            diffusion=self.model_config.diffusion,
            inference_steps=1,
            kind=KIND,
            provenance=provenance | self.trainer.provenance(cfg.data),
        )
        version = self.registry.next_version(cfg.name)
        aliases = (self.alias,) if self.alias else ()
        return self.registry.save(
            cfg.name, version, config, self.trainer.weights(KIND), self.latents.autoencoder.state_dict(), aliases=aliases
        )


def train(
    cfg: DistillTrainConfig, registry: Registry, resume: str | Path | None = None, alias: str | None = None
) -> RegistryEntry | None:
    """Distil, then write ``<name>:<next version>`` into ``registry`` (rank 0); returns that entry."""
    return trainer_lib.train(cfg, lambda trainer: DistillStage(cfg, trainer, registry, alias), resume)
