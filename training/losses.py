"""The loss terms of VPD-SR's one-step distillation (and the wavelet detail term of the autoencoder).

The student's latent x̂0 is pulled towards the teacher's (:func:`distill_loss`), its high-frequency
wavelet bands towards the teacher's (:func:`hfp_loss`, L_HFP: MSE alone favours
smooth latents, so the detail bands get their own term), its decoded image towards the GT image in
CLIP's embedding space (:class:`ClipSemanticLoss`, L_SD: semantic rather than pixel agreement), and a
latent PatchGAN (:mod:`training.adversary`) sharpens what is left.

open_clip and pytorch_wavelets are imported by the first call that needs them, not with this
module: a run with L_SD or the wavelet terms switched off neither waits for nor needs them.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config_files import Config

if TYPE_CHECKING:
    from pytorch_wavelets import DWTForward


# -- distillation ---------------------------------------------------------------------------------
def distill_loss(z_tch: Tensor, z_stu: Tensor) -> Tensor:
    """MSE between the teacher's multi-step and the student's one-step x̂0 latents."""
    return F.mse_loss(z_stu, z_tch)


# -- high-frequency perception (L_HFP) ------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _dwt(wave: str, device: torch.device, dtype: torch.dtype) -> DWTForward:
    """One DWT module per (wavelet, device, dtype): its filters are buffers, built once, never trained.

    Built outside inference mode even when first needed there (a validation pass), so the cached
    filters can still be used in a training step that back-propagates.
    """
    with warnings.catch_warnings():
        # pytorch_wavelets imports pkg_resources (hence setuptools<81), which warns on every start-up.
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        from pytorch_wavelets import DWTForward
    with torch.inference_mode(False):
        return DWTForward(J=1, wave=wave, mode="zero").to(device=device, dtype=dtype)


def high_frequency_bands(x: Tensor, wave: str = "haar") -> Tensor:
    """The detail bands of a one-level 2-D DWT of (N, C, H, W): (N, C, 3, ⌈H/2⌉, ⌈W/2⌉).

    Band order is pytorch_wavelets': 0 = LH (low-pass along W, high-pass along H: horizontal edges),
    1 = HL (vertical edges), 2 = HH (diagonals). Zero padding at the borders.
    """
    _, high = _dwt(wave, x.device, x.dtype)(x)
    return high[0]


def detail_l1(a: Tensor, b: Tensor, wave: str = "haar") -> Tensor:
    """L1 between the LH, HL and HH bands of images ``a`` and ``b``, in float32 outside autocast
    (pytorch_wavelets' autograd function fails in backward on half-precision grads): the detail
    term of the autoencoder and of distillation from a pixel teacher."""
    with torch.autocast(a.device.type, enabled=False):
        return (high_frequency_bands(a.float(), wave) - high_frequency_bands(b.float(), wave)).abs().mean()


def hfp_loss(a: Tensor, b: Tensor, wave: str = "haar") -> Tensor:
    """L_HFP: MSE between the LH, HL and HH bands of ``a`` and ``b`` (mean over all their elements)."""
    return F.mse_loss(high_frequency_bands(a, wave), high_frequency_bands(b, wave))


# -- semantic distillation with CLIP (L_SD) -------------------------------------------------------
class ClipWeightsMissing(ValueError):
    """CLIP weights were asked for but no local file was given (this code never downloads them)."""


class ClipConfig(Config):
    """Which open_clip image encoder to use and where its weights are.

    ``pretrained_path`` is a local checkpoint file (``.bin``/``.pt``/``.safetensors`` of the whole
    CLIP model, as open_clip saves it); ``random_weights_ok`` allows a randomly initialised encoder,
    for tests and smoke runs only. ``model_config_path`` registers an extra open_clip model config
    (a JSON file named ``<model_name>.json``, or a folder of them) before the model is built, for
    architectures open_clip does not ship, such as tiny test encoders.
    """

    model_name: str = "ViT-B-32"
    pretrained_path: str | None = None
    random_weights_ok: bool = False
    model_config_path: str | None = None


def load_clip(config: ClipConfig) -> nn.Module:
    """Build the open_clip model of ``config`` from a local file; raise :class:`ClipWeightsMissing` otherwise."""
    path = config.pretrained_path
    if path is None and not config.random_weights_ok:
        raise ClipWeightsMissing(
            f"ClipSemanticLoss needs {config.model_name} weights: set ClipConfig.pretrained_path to a local "
            "open_clip checkpoint (e.g. open_clip_pytorch_model.bin downloaded from the model's Hugging Face "
            "page) — weights are never downloaded here; random_weights_ok=True is for tests only"
        )
    if path is not None and not Path(path).is_file():
        # open_clip would treat a non-file as a pretrained *tag* and download it.
        raise ClipWeightsMissing(f"CLIP weights file not found: {path}")
    import open_clip

    if config.model_config_path is not None:
        open_clip.add_model_config(config.model_config_path)
    # pretrained_text=False: never fetch a Hugging Face text tower; only the image tower is used.
    return open_clip.create_model(config.model_name, pretrained=path, pretrained_text=False)


class ClipSemanticLoss(nn.Module):
    """L_SD = mean(1 − cos(CLIP(sr), CLIP(gt))) with a frozen CLIP image encoder.

    Pre-processing is done in torch (resize with anti-aliasing, normalise) so that gradients reach
    ``sr``; images are resized straight to the encoder's input size (training crops are square, so
    no centre crop is needed). Only the image tower is kept.
    """

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        clip = load_clip(config)
        import open_clip  # loaded by load_clip: the semantic loss is on

        preprocess = open_clip.get_model_preprocess_cfg(clip)
        size = preprocess.get("size", 224)
        self.input_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[assignment]
        interpolation = preprocess.get("interpolation", "bicubic")
        self.interpolation = interpolation if interpolation in ("bicubic", "bilinear") else "bicubic"
        mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.visual = clip.visual.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "ClipSemanticLoss":
        """Stay in eval mode whatever the trainer asks: the encoder is a fixed measuring instrument."""
        super().train(mode)
        self.visual.eval()
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] → CLIP input: [0, 1], resized to the encoder's size, normalised."""
        # Clamped as the decoded image would be: pixels beyond the range give no semantic signal.
        x = (images.to(self.mean.dtype).clamp(-1, 1) + 1) / 2
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings (N, D) of images in [-1, 1]."""
        return F.normalize(self.visual(self.preprocess(images)), dim=-1)

    def forward(self, sr: Tensor, gt: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.embed(gt)
        return cosine_distance(self.embed(sr), target)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """mean(1 − ⟨a, b⟩) of L2-normalised embeddings: 0 when equal, 2 when opposite."""
    return (1 - (a * b).sum(dim=-1)).mean()
