"""Which process this is in a ``torchrun`` job, and the few collective operations training needs.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything degrades to one process
and no ``torch.distributed`` call is made, so the same code runs a laptop test and an 8-GPU job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.device import resolve_device


@dataclass(frozen=True)
class Distributed:
    """Rank, world size and this process's device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and the registry entry."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def setup(cls, device: str = "auto") -> "Distributed":
        """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs, Gloo on CPUs)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(0, 1, 0, resolve_device(device))
        local_rank = int(os.environ["LOCAL_RANK"])
        chosen = resolve_device(device)
        if chosen.type == "cuda":
            chosen = torch.device("cuda", local_rank)
            torch.cuda.set_device(chosen)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
        return cls(dist.get_rank(), world_size, local_rank, chosen)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalars over ranks: logged metrics, and the elapsed time a time budget is checked against."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return {k: float(v) / self.world_size for k, v in zip(keys, tensor.tolist())}

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
