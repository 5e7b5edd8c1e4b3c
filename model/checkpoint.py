"""Weights into networks: a registry entry's model, and import of the official ResShift checkpoints.

:func:`load_model` is the one way from a registry entry to its loaded Swin-UNet and autoencoder:
the inference pipeline (:meth:`model.SRPipeline.from_registry`) and the distillation trainer's
teacher both take their networks from it, so they cannot read an entry differently.

The official files (``resshift_realsrx4_s15_v1.pth``, ``autoencoder_vq_f4.pth``) are PyTorch pickles;
they are opened with ``torch.load(weights_only=True)`` so that no code inside them runs, checked
against the architecture with ``strict=True`` and written to the registry as safetensors — after
import nothing ever unpickles them again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .autoencoder import VQAutoencoder
from .config import ModelConfig
from .errors import CheckpointError, InvalidRequest
from .provenance import git_commit
from .registry import Registry, RegistryEntry
from .unet import SwinUNet

# Wrappers that training frameworks put around the weights: DDP ("module."), torch.compile
# ("_orig_mod."), and checkpoints that store {"state_dict": ...} or {"model": ...}.
_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict", "model", "params_ema")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a ``.pth``/``.ckpt`` state dict safely and strip wrapper keys and prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise CheckpointError(f"cannot read {path} as a PyTorch state dict: {exc}") from None
    while isinstance(data, dict) and not any(isinstance(v, Tensor) for v in data.values()):
        inner = next((data[k] for k in _WRAPPER_KEYS if isinstance(data.get(k), dict)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path} holds no state dict")
    state: dict[str, Tensor] = {}
    for key, value in data.items():
        if not isinstance(value, Tensor):
            continue
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value
    return state


def load_into(module: nn.Module, state: dict[str, Tensor], label: str) -> None:
    """Strict load with a short, readable error instead of PyTorch's wall of text."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" … (+{len(keys) - 5})" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {what}: {shown}")
    if problems:
        raise CheckpointError(f"{label} checkpoint does not match the architecture: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def build_networks(
    config: ModelConfig, unet_state: dict[str, Tensor], autoencoder_state: dict[str, Tensor]
) -> tuple[SwinUNet, VQAutoencoder]:
    """The Swin-UNet and autoencoder of ``config`` holding the given weights (strict loads).

    Both are built before either is loaded, UNet first: the order in which their random
    initialisation draws from torch's generator, which a trainer that builds more networks after
    them (a student, a discriminator) depends on for its own initial weights.
    """
    unet = SwinUNet.from_config(config.unet)
    autoencoder = VQAutoencoder.from_config(config.autoencoder)
    load_into(unet, unet_state, "UNet")
    load_into(autoencoder, autoencoder_state, "autoencoder")
    return unet, autoencoder


@dataclass(frozen=True)
class LoadedModel:
    """A super-resolution model of the registry with its networks built and loaded (float32, CPU)."""

    entry: RegistryEntry
    config: ModelConfig
    unet: SwinUNet
    autoencoder: VQAutoencoder


def load_model(registry: Registry, ref: str) -> LoadedModel:
    """Resolve ``ref`` and load its networks; an autoencoder-only entry has no UNet to run."""
    entry = registry.resolve(ref)
    config = entry.config()
    if config.kind == "autoencoder":
        raise InvalidRequest(f"{entry.ref} is an autoencoder-only entry, not a super-resolution model")
    unet, autoencoder = build_networks(config, *entry.state_dicts())
    return LoadedModel(entry, config, unet, autoencoder)


def import_resshift(
    unet_path: str | Path,
    autoencoder_path: str | Path,
    registry: Registry,
    name: str,
    *,
    config: ModelConfig | None = None,
    version: str | None = None,
    alias: str | None = "production",
) -> RegistryEntry:
    """Convert official ResShift checkpoints into a registry entry (a multi-step teacher)."""
    config = config or ModelConfig(inference_steps=15, kind="teacher")
    unet, autoencoder = build_networks(config, read_state_dict(unet_path), read_state_dict(autoencoder_path))
    provenance = dict(config.provenance) | {
        "source": "import-resshift",
        "unet_checkpoint": Path(unet_path).name,
        "autoencoder_checkpoint": Path(autoencoder_path).name,
        "git_commit": git_commit(),
    }
    config = dataclasses.replace(config, provenance=provenance)
    version = version or registry.next_version(name)
    aliases = (alias,) if alias else ()
    return registry.save(name, version, config, unet.state_dict(), autoencoder.state_dict(), aliases=aliases)
