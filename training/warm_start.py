"""Starting a run from another registry entry's weights (fine-tuning) instead of from scratch.

``init_from: REF`` in an autoencoder or teacher config loads that entry's autoencoder or UNet weights
before the first step. The load is strict, with one exception that is the point of fine-tuning an
attention autoencoder into a fully convolutional one: an ``attn_type: none`` target has no mid-block
attention (the block is an identity), so the source's ``mid.attn_1`` weights are left out, by name.
"""

from __future__ import annotations

from typing import Callable, Literal

from torch import nn

from model.checkpoint import load_into
from model.registry import Registry

from .config_files import ConfigError


def warm_start(
    module: nn.Module,
    registry: Registry,
    ref: str,
    part: Literal["unet", "autoencoder"],
    notice: Callable[[str], None] = print,
) -> str:
    """Load ``part`` of registry entry ``ref`` into ``module``; returns the resolved ``name:version``."""
    entry = registry.resolve(ref)
    unet, autoencoder = entry.state_dicts()
    state = unet if part == "unet" else autoencoder
    if not state:
        raise ConfigError(f"init_from: registry entry {entry.ref} holds no {part} weights")
    expected = module.state_dict()
    dropped = sorted(k for k in state if k not in expected and ".mid.attn_1." in f".{k}")
    if dropped:
        notice(f"init_from {entry.ref}: {len(dropped)} mid-block attention tensors left out (attn_type: none)")
    load_into(module, {k: v for k, v in state.items() if k not in dropped}, f"init_from {entry.ref} {part}")
    return entry.ref
