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
   frozen decoder by straight-through quantisation), ``L_adv = −E[D(z_stu)]`` of a latent PatchGAN
   (or ``−E[D(D_ae(z_stu))]`` of an image PatchGAN, ``discriminator_input: image``);
   optionally (off by default, not in the paper) ``L_fid = MSE(z0, z_stu)``, which ties the student
   to the HR latent itself as SinSR's ground-truth consistency term does: a briefly trained teacher
   hallucinates, and without it the student copies that;
4. the discriminator steps in the same iteration with the hinge loss on ``z0`` vs detached ``z_stu``
   (image PatchGAN: the teacher's image, or the HR without a pixel teacher, vs the decoded student).

Every term can be switched off (``losses.<term>.enabled``) for the paper's ablations. The registry
entry (kind ``student``, ``inference_steps`` 1) holds the EMA student and the teacher's autoencoder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from model.autoencoder import DECODER_SIDE
from model.checkpoint import load_into, load_model
from model.config import DiffusionConfig, ModelConfig, UNetConfig
from model.registry import Registry, RegistryEntry
from model.sampler import sample
from model.schedule import ResShiftSchedule
from model.unet import SwinUNet

from . import trainer as trainer_lib
from .adversary import Adversary, DiscriminatorSetup, companions
from .config_files import Config, ConfigError, to_plain
from .degradations import DegradationConfig, Degrader
from .latents import AutoencoderSource, Pair, build_codec, check_sizes, frozen_codec, make_pair
from .losses import ClipConfig, ClipSemanticLoss, ClipWeightsMissing, detail_l1, distill_loss, hfp_loss
from .teacher_bank import TeacherBank
from .trainer import Losses, LossTerm, Publication, RunConfig, StageConfig, Trainer
from .warm_start import warm_start

KIND = "student"
DECODER = "decoder"


class DistillLosses(Config):
    """The four terms of Algorithm 1 and their weights (paper: λ1, λ2, λ3 = 0.1, 1, 0.1), and the
    optional HR-fidelity term (off unless a config switches it on)."""

    distill: LossTerm = Field(default_factory=LossTerm)
    hfp: LossTerm = Field(default_factory=lambda: LossTerm(weight=0.1))
    semantic: LossTerm = Field(default_factory=lambda: LossTerm(weight=1.0))
    adversarial: LossTerm = Field(default_factory=lambda: LossTerm(weight=0.1))
    fidelity: LossTerm = Field(default_factory=lambda: LossTerm(enabled=False, weight=1.0))
    pixel: LossTerm = Field(default_factory=lambda: LossTerm(enabled=False, weight=1.0))
    """Pixel teachers only: L1 between the decoded student ``D(z_stu)`` and the teacher's image."""
    pixel_hfp: LossTerm = Field(default_factory=lambda: LossTerm(enabled=False, weight=1.0))
    """Pixel teachers only: L1 between the Haar detail bands of ``D(z_stu)`` and of the teacher's image
    (L_HFP's idea in pixel space: the detail is what pixel L1 under-weights)."""
    pixel_hr: LossTerm = Field(default_factory=lambda: LossTerm(enabled=False, weight=1.0))
    """L1 between the decoded student ``D(z_stu)`` and the HR: ground-truth fidelity in pixels, which
    holds PSNR while an image-space L_adv pulls texture in (the latent ``fidelity`` term does not reach
    a trained decoder)."""
    decoder: LossTerm = Field(default_factory=lambda: LossTerm(enabled=False, weight=1.0))
    """``pixel_teacher.train_decoder`` only: L1 and Haar-detail L1 of ``D(E(teacher image))`` against
    that image, the decoder's own loss (an autoencoder fine-tuned on sharp images)."""

    def student_terms(self) -> dict[str, float]:
        """Weight of each switched-on term of the student's loss (all but the decoder's own)."""
        return {name: weight for name, weight in self.enabled().items() if name != "decoder"}

    def enabled(self) -> dict[str, float]:
        """Weight of each switched-on term."""
        terms = {name: getattr(self, name) for name in type(self).model_fields}
        return {name: term.weight for name, term in terms.items() if term.enabled}


class PixelTeacherSetup(Config):
    """Distil from a pixel-space ×4 teacher (Real-ESRGAN x4plus) through a bank of its outputs
    (``vpdsr teacher-bank``) instead of a ResShift teacher. There is no teacher UNet to copy, so the
    student's architecture, latent space and schedule are given here; ``z_tch = E(teacher image)``
    is the target of L_distill and L_HFP, and the ``pixel`` terms reach the student through the frozen
    decoder."""

    bank: Path
    autoencoder: str
    """Registry reference of the autoencoder whose latent space the student works in."""
    unet: UNetConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    init_from: str | None = None
    """Registry reference of a student (same architecture) to start from; random weights otherwise."""
    train_decoder: bool = False
    """Train the decoder side of the autoencoder too (the encoder, hence every latent, stays frozen):
    the student's pixel terms reach it, and ``losses.decoder`` keeps it an autoencoder of the teacher's
    sharp images. The published student carries the trained decoder."""


class DistillTrainConfig(StageConfig):
    """Everything a distillation run needs (``training/configs/distill-*.yaml``); defaults: the paper's."""

    name: str = "vpdsr"
    teacher: str | None = None
    """Registry reference of the teacher (``--teacher REF``)."""
    pixel_teacher: PixelTeacherSetup | None = None
    """A pixel-space teacher instead of ``teacher`` (:class:`PixelTeacherSetup`)."""
    teacher_steps: int | None = Field(None, ge=1)
    """Sampler steps of the distillation target ``z_tch`` (default: all of the teacher's schedule,
    the paper's). Fewer steps of the same schedule leave less of the noise that a briefly trained
    teacher cannot remove; with the teacher's single step as the target, the fifth real-world
    attempt measured no gain over its four (docs/training.md)."""
    losses: DistillLosses = Field(default_factory=DistillLosses)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    discriminator: DiscriminatorSetup = Field(default_factory=DiscriminatorSetup)
    discriminator_input: Literal["latent", "image"] = "latent"
    """What L_adv's PatchGAN sees: the paper's latents (``z0`` real, ``z_stu`` fake), or decoded images
    (the pixel teacher's image, else the HR, real; ``D_ae(z_stu)`` fake). Judged in pixels, the
    sharpness that a one-step regression averages away is what the generator is pushed to restore,
    and its gradient reaches a trained decoder too."""
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    run: RunConfig = Field(default_factory=lambda: RunConfig(steps=30_000))
    adaptive_weight: bool = False
    """Scale λ_adv by VQGAN's adaptive factor against L_distill at the student's output layer
    (:func:`training.adversary.adaptive_weight`): λ_adv is then L_adv's share of the force on that layer,
    whatever the scale of the discriminator's logits. Small students whose distillation loss is tiny
    are otherwise pulled away from the teacher by a fixed λ_adv = 0.1."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.losses.enabled():
            raise ValueError("every loss term is switched off: enable at least one of losses.*")
        if self.adaptive_weight and not (self.losses.adversarial.enabled and self.losses.distill.enabled):
            raise ValueError("adaptive_weight balances losses.adversarial against losses.distill: enable both")
        if self.pixel_teacher is not None and self.teacher is not None:
            raise ValueError("give one teacher: teacher (a ResShift registry entry) or pixel_teacher, not both")
        if self.pixel_teacher is None and (self.losses.pixel.enabled or self.losses.pixel_hfp.enabled):
            raise ValueError("losses.pixel and losses.pixel_hfp compare with a pixel teacher's image: set pixel_teacher")
        if self.losses.decoder.enabled != (self.pixel_teacher is not None and self.pixel_teacher.train_decoder):
            raise ValueError("losses.decoder is the loss of pixel_teacher.train_decoder: enable both or neither")
        if self.pixel_teacher is not None and self.teacher_steps is not None:
            raise ValueError("teacher_steps counts a ResShift teacher's sampler steps; a pixel teacher has none")
        return self


class DistillStage:
    """The student, its frozen latent codec and teacher, and the objective of one distillation run."""

    def __init__(self, cfg: DistillTrainConfig, trainer: Trainer, registry: Registry, alias: str | None) -> None:
        self.cfg, self.trainer, self.registry, self.alias = cfg, trainer, registry, alias
        device = trainer.device
        if cfg.pixel_teacher is not None:
            student = self._pixel_teacher(cfg.pixel_teacher)
        else:
            student = self._resshift_teacher()
        mc = self.model_config
        if cfg.degradation.scale != mc.diffusion.sf:
            raise ConfigError(f"degradation.scale {cfg.degradation.scale} differs from the model's sf {mc.diffusion.sf}")
        check_sizes(cfg.data.crop_size, mc.diffusion.sf, mc.autoencoder.ddconfig.downsample_factor, student, mc.unet)
        self.schedule = ResShiftSchedule(mc.diffusion)
        self.student = trainer.add_part(KIND, student, cfg.optim, ema=True)
        self.decoder = None
        if cfg.pixel_teacher is not None and cfg.pixel_teacher.train_decoder:
            autoencoder = self.latents.autoencoder
            for name, parameter in autoencoder.named_parameters():
                parameter.requires_grad_(name.startswith(DECODER_SIDE))
            self.decoder = trainer.add_part(DECODER, autoencoder, cfg.optim, ema=True)

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
        channels = mc.autoencoder.ddconfig.out_ch if cfg.discriminator_input == "image" else mc.autoencoder.embed_dim
        self.adversary = Adversary(trainer, cfg.discriminator, in_channels=channels) if "adversarial" in weights else None

    def _resshift_teacher(self) -> SwinUNet:
        """The paper's setting: a frozen multi-step ResShift teacher, whose UNet the student starts as."""
        cfg, device = self.cfg, self.trainer.device
        if cfg.teacher is None:
            raise ConfigError("no teacher: pass --teacher REF (a registry entry of kind 'teacher') or set pixel_teacher")
        teacher = load_model(self.registry, cfg.teacher)
        self.model_config = mc = teacher.config
        self.teacher = teacher.unet.to(device).eval().requires_grad_(False)
        self.teacher_name = teacher.entry.ref
        self.latents = frozen_codec(teacher.autoencoder, mc.diffusion, device)
        self.teacher_steps: int | None = cfg.teacher_steps or mc.diffusion.steps
        if self.teacher_steps > mc.diffusion.steps:
            raise ConfigError(f"teacher_steps {cfg.teacher_steps} exceeds the teacher's {mc.diffusion.steps} diffusion steps")
        self.degrader = Degrader(cfg.degradation)
        self.bank: TeacherBank | None = None
        # A fresh module rather than a copy: its random initialisation (overwritten here) keeps the
        # draws from torch's generator, hence the discriminator's initial weights, those of earlier runs.
        student = SwinUNet.from_config(mc.unet)
        load_into(student, self.teacher.state_dict(), "teacher UNet")
        return student

    def _pixel_teacher(self, setup: PixelTeacherSetup) -> SwinUNet:
        """A pixel-space teacher's bank, the autoencoder it names, and a student of the given architecture."""
        ae_config, ae_state = AutoencoderSource(ref=setup.autoencoder).load(self.registry)
        if setup.unet.in_channels != ae_config.embed_dim or setup.unet.out_channels != ae_config.embed_dim:
            raise ConfigError(f"pixel_teacher.unet in/out channels must be the autoencoder's embed_dim {ae_config.embed_dim}")
        try:
            self.bank = TeacherBank(setup.bank)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        crop = self.bank.lr.shape[-1] * setup.diffusion.sf
        if crop != self.cfg.data.crop_size:
            raise ConfigError(f"the bank's HR crops are {crop}²: set data.crop_size to {crop}")
        self.model_config = ModelConfig(unet=setup.unet, autoencoder=ae_config, diffusion=setup.diffusion)
        self.latents = build_codec(ae_config, ae_state, setup.diffusion, self.trainer.device)
        self.teacher_name = f"{self.bank.meta['teacher']} (bank {Path(setup.bank).name}, {len(self.bank)} triples)"
        self.teacher_steps = None
        student = SwinUNet.from_config(setup.unet)
        self.init_from = setup.init_from and warm_start(student, self.registry, setup.init_from, "unet", self.trainer.notice)
        return student

    def batches(self, start_batch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]] | None:
        """A pixel teacher's triples (``None``: the trainer's HR crops, degraded on the fly)."""
        if self.bank is None:
            return None
        data = self.cfg.data
        return self.bank.batches(data.batch_size, data.seed, start_batch)

    def targets(self, batch: Tensor | tuple[Tensor, Tensor, Tensor]) -> tuple[Pair, Tensor, Tensor, Tensor | None]:
        """The training pair, the noise of x_T, the teacher's latent ``z_tch`` (from that same x_T for
        a ResShift teacher) and, for a pixel teacher, its image in [-1, 1]."""
        if self.bank is None:
            pair = make_pair(batch, self.degrader, self.trainer.generator, self.latents)  # type: ignore[arg-type]
            noise = torch.randn_like(pair.z_y)
            with torch.no_grad():
                z_tch = sample(self.teacher, self.schedule, pair.z_y, pair.lq, noise, self.teacher_steps).float()  # type: ignore[arg-type]
            return pair, noise, z_tch, None
        device = self.trainer.device
        lr, teacher, hr = (x.to(device) * 2 - 1 for x in batch)
        with torch.no_grad():
            pair = Pair(lq=lr, z_y=self.latents.encode_lr(lr).float(), z0=self.latents.encode(hr).float(), hr=hr)
            z_tch = self.latents.encode(teacher).float()
        return pair, torch.randn_like(pair.z_y), z_tch, teacher

    def losses(self, batch: Tensor | tuple[Tensor, Tensor, Tensor], step: int) -> Losses:
        cfg = self.cfg
        pair, noise, z_tch, teacher_image = self.targets(batch)
        z_stu = sample(self.student.net, self.schedule, pair.z_y, pair.lq, noise, 1).float()

        terms: dict[str, Tensor] = {}
        if cfg.losses.distill.enabled:
            terms["distill"] = distill_loss(z_tch, z_stu)
        if cfg.losses.fidelity.enabled:
            terms["fidelity"] = F.mse_loss(z_stu, pair.z0)
        image_adversary = self.adversary is not None and cfg.discriminator_input == "image"
        needs_image = self.clip is not None or teacher_image is not None or image_adversary or cfg.losses.pixel_hr.enabled
        decoded = self.latents.decode(z_stu) if needs_image else None
        # Outside autocast: pytorch_wavelets' autograd function fails in backward on half-precision grads.
        with torch.autocast(z_stu.device.type, enabled=False):
            if cfg.losses.hfp.enabled:
                terms["hfp"] = hfp_loss(z_stu, z_tch)
            image = decoded.float() if decoded is not None else None
            if teacher_image is not None and image is not None:
                if cfg.losses.pixel.enabled:
                    terms["pixel"] = F.l1_loss(image, teacher_image)
                if cfg.losses.pixel_hfp.enabled:
                    terms["pixel_hfp"] = detail_l1(image, teacher_image)
            if cfg.losses.pixel_hr.enabled and image is not None:
                terms["pixel_hr"] = F.l1_loss(image, pair.hr)
        if self.clip is not None:
            terms["semantic"] = self.clip(decoded, pair.hr)
        adversarial = self.adversary is not None and self.adversary.active(step)
        weights: dict[str, float | Tensor] = dict(cfg.losses.student_terms())
        if adversarial:
            if image_adversary:
                fake, real = decoded, (teacher_image if teacher_image is not None else pair.hr)
            else:
                fake, real = z_stu, pair.z0
            balance = (terms["distill"], self.student.module.out[-1].weight) if cfg.adaptive_weight else None
            weights["adversarial"], terms["adversarial"] = self.adversary.generator_term(  # type: ignore[union-attr]
                fake, weights["adversarial"], balance  # type: ignore[arg-type]
            )
        total = sum(weights[name] * value for name, value in terms.items())
        log = {f"loss/{name}": value for name, value in terms.items()} | {"loss/total": total}
        if adversarial and cfg.adaptive_weight:
            log["weight/adversarial"] = weights["adversarial"]
        minimise = {KIND: total}
        if adversarial:
            minimise["discriminator"] = log["loss/discriminator"] = self.adversary.discriminator_loss(real, fake)  # type: ignore[union-attr]
        if self.decoder is not None and teacher_image is not None:
            minimise[DECODER] = log["loss/decoder"] = cfg.losses.decoder.weight * self.decoder_loss(z_tch, teacher_image)
        return Losses(minimise, log)  # type: ignore[arg-type]

    def decoder_loss(self, z_tch: Tensor, teacher_image: Tensor) -> Tensor:
        """L1 + Haar-detail L1 of the decoded teacher latent against the teacher's image."""
        image = self.latents.decode(z_tch).float()
        return F.l1_loss(image, teacher_image) + detail_l1(image, teacher_image)

    def publication(self) -> Publication:
        cfg = self.cfg
        clip = cfg.clip
        provenance = {
            "source": "vpdsr train distill",
            "teacher": self.teacher_name,
            "teacher_steps": self.teacher_steps,
            "losses": cfg.losses.enabled(),
            "clip": {"model_name": clip.model_name, "weights": Path(clip.pretrained_path).name if clip.pretrained_path else None}
            if self.clip is not None
            else None,
            "discriminator": to_plain(cfg.discriminator) | {"input": cfg.discriminator_input} if self.adversary is not None else None,
        }
        if self.bank is not None:
            provenance["teacher_bank"] = self.bank.meta | {"triples": len(self.bank)}
            provenance["init_from"] = self.init_from
        config = ModelConfig(
            unet=self.model_config.unet,
            autoencoder=self.model_config.autoencoder,
            diffusion=self.model_config.diffusion,
            inference_steps=1,
            kind=KIND,
            provenance=provenance,
        )
        autoencoder = self.trainer.weights(DECODER) if self.decoder is not None else self.latents.autoencoder.state_dict()
        return Publication(
            cfg.name, config, self.trainer.weights(KIND), autoencoder, self.alias, companions(self.adversary)
        )


def train(
    cfg: DistillTrainConfig, registry: Registry, resume: str | Path | None = None, alias: str | None = None
) -> RegistryEntry | None:
    """Distil, then write ``<name>:<next version>`` into ``registry`` (rank 0); returns that entry."""
    return trainer_lib.train(cfg, registry, lambda trainer: DistillStage(cfg, trainer, registry, alias), resume)
