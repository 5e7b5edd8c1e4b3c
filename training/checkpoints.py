"""Training checkpoints: everything needed for a resumed run to continue *exactly* like one that never stopped.

A checkpoint holds the step, the networks, their EMA copies and optimisers, the grad scaler, and
every random generator of every rank: torch (CPU and CUDA), NumPy, Python's ``random`` and the
per-rank data-side generator of the Real-ESRGAN degradation. The learning rate is a function of
the step and the data stream's position is step × accumulation × batch (see ``training.stream``),
so neither needs state of its own.

Files are written atomically (temporary file, then rename) so a job killed while saving leaves the
previous checkpoint intact, and read with ``torch.load(weights_only=True)``: only tensors and plain
containers, no pickled code (NumPy's generator state is stored as a tensor for that reason).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.errors import CheckpointError

FORMAT = 1


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """This process's random state, including the data-side ``generator``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
        "generator": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuples(state["python"]))
    generator.set_state(state["generator"])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants the nested tuples back (a round trip may turn them into lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(state: dict[str, Any], folder: Path, step: int, keep: int) -> Path:
    """Write ``step-NNNNNNN.pt`` atomically and delete all but the newest ``keep`` of them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.pt"
    tmp = folder / f".{path.name}.tmp"
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` (a folder means its newest one)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("step-*.pt"))
        if not found:
            raise CheckpointError(f"no step-*.pt checkpoint in {path}")
        path = found[-1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad checkpoint for the user
        raise CheckpointError(f"cannot read training checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vpdsr training checkpoint (format {FORMAT})")
    return state


def save_half(state: dict[str, torch.Tensor], path: Path) -> Path:
    """One network's weights as safetensors, floating-point tensors in float16: what a run leaves
    for a later run on another machine (no optimiser moments, no EMA copy, two bytes a weight)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    half = {k: (t.half() if t.is_floating_point() else t).detach().cpu().contiguous() for k, t in state.items()}
    save_file(half, path)
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights written by :func:`save_half`, in float32 for training."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        state = load_file(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad weights file for the user
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from None
    return {k: t.float() if t.is_floating_point() else t for k, t in state.items()}
