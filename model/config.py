"""Typed configuration of a super-resolution model: networks, diffusion and provenance.

The field names of :class:`UNetConfig` and :class:`AutoencoderConfig` are exactly those of the
``model.params`` / ``autoencoder.params`` blocks of ResShift's YAML configs, so an official config
file maps onto them one to one (see :func:`ModelConfig.from_resshift_yaml`). Defaults are the
ResShift v1 x4 real-world SR model (``realsr_swinunet_realesrgan256.yaml``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class UNetConfig:
    """ResShift Swin-UNet hyper-parameters (``models.unet.UNetModelSwin``)."""

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 160
    out_channels: int = 3
    attention_resolutions: tuple[int, ...] = (64, 32, 16, 8)
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    conv_resample: bool = True
    dims: int = 2
    use_fp16: bool = False
    num_head_channels: int = 32
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    swin_depth: int = 2
    swin_embed_dim: int = 192
    window_size: int = 8
    mlp_ratio: float = 4
    cond_lq: bool = True
    lq_size: int = 64
    num_heads: int = 1
    patch_norm: bool = False


@dataclass(frozen=True)
class DDConfig:
    """Encoder/decoder layout of the VQGAN (``ddconfig`` in the YAML)."""

    double_z: bool = False
    z_channels: int = 3
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    padding_mode: str = "zeros"
    attn_type: Literal["vanilla", "none"] = "vanilla"
    """LDM's option of the same name. ``none`` drops every attention block (the mid-block's global
    attention included), so the network is fully convolutional and a model trained on small crops
    serves large tiles; no official checkpoint uses it."""
    norm_groups: int = 32
    """Not a ResShift option (always 32 there). Small demo widths use fewer groups: with one
    channel per group the decoder's last norm erases each channel's mean, i.e. the image colour."""

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class AutoencoderConfig:
    """VQGAN f4 autoencoder (``ldm.models.autoencoder.VQModelTorch``)."""

    embed_dim: int = 3
    n_embed: int = 8192
    """Codebook size; ``0`` means a continuous latent (no codebook, decoding never snaps). Not a
    ResShift option: a small CPU-trained f4 autoencoder with a few more latent channels and no
    codebook keeps the detail that a 3-channel VQ latent loses (docs/training.md)."""
    ddconfig: DDConfig = field(default_factory=DDConfig)


@dataclass(frozen=True)
class DiffusionConfig:
    """ResShift residual-shifting diffusion (``create_gaussian_diffusion`` params)."""

    sf: int = 4
    steps: int = 15
    min_noise_level: float = 0.04
    etas_end: float = 0.99
    kappa: float = 2.0
    power: float = 0.3
    normalize_input: bool = True
    scale_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a registry entry's networks, plus where it came from.

    ``inference_steps`` is how many sampler steps the model runs by default: 1 for a distilled
    VPD-SR student, ``diffusion.steps`` for a ResShift teacher.
    """

    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    inference_steps: int = 1
    kind: str = "student"
    tile_sizes: tuple[int, ...] = ()
    """LR tile sizes (shape buckets) to run; empty = (image_size, 2 × image_size) of the UNet. Small
    CPU models want small tiles: the VQGAN's mid-block attention is global over a tile's latent."""
    color_fix: Literal["none", "wavelet"] = "none"
    """``wavelet``: every output tile keeps its own high frequencies and takes its low frequencies (its
    colour) from the bicubic-upscaled input (:mod:`model.color`). For small CPU-trained models, whose
    decoders shift colours; the official ResShift models need none."""
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, data)

    @classmethod
    def from_resshift_yaml(cls, path: str | Path, **overrides: Any) -> "ModelConfig":
        """Read an official ResShift YAML config (``model``, ``diffusion``, ``autoencoder`` blocks)."""
        import yaml

        raw = yaml.safe_load(Path(path).read_text())
        diff = dict(raw.get("diffusion", {}).get("params", {}))
        diff.update(diff.pop("schedule_kwargs", None) or {})
        data = {
            "unet": raw["model"]["params"],
            "autoencoder": raw["autoencoder"]["params"],
            "diffusion": diff,
            "inference_steps": int(diff.get("steps", DiffusionConfig.steps)),
            "kind": "teacher",
        }
        data.update(overrides)
        return cls.from_dict(data)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a (nested) frozen dataclass from plain JSON/YAML data.

    Unknown keys are ignored (official configs carry extras such as ``schedule_name``); lists
    become tuples so configs stay hashable and compare equal after a JSON round trip.
    """
    hints = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in hints:
            continue
        default = hints[name].default_factory if hints[name].default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        sample = default() if default is not None else hints[name].default
        if dataclasses.is_dataclass(sample) and isinstance(value, dict):
            value = from_dict(type(sample), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
