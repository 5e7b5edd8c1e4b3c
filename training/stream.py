"""An endless, shardable, resumable stream of HR training crops.

:func:`training.data.make_loader` shuffles with a DataLoader's own RNG and crops with the workers'
RNG, which neither splits across ``torchrun`` ranks nor restarts in the middle of an epoch. A
resumed run must see exactly the crops the uninterrupted run would have seen, so here every draw
is a pure function of ``(data seed, epoch, position)``:

* epoch ``e`` shuffles the images with a generator seeded from ``(seed, e)``, which also draws one
  crop seed per position;
* rank ``r`` of ``w`` takes positions ``r, r + w, …`` of the epoch, cut to whole batches on every
  rank so that all ranks run the same number of steps;
* crop and flip use ``HRCropDataset.load(index, generator)`` with that position's seed.

The stream never ends (epochs follow one another inside one DataLoader iterator, so worker start-up
is paid once), and starting it at sample ``n`` of a rank is just arithmetic, no replay.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .config_files import ConfigError
from .data import DataConfig, HRCropDataset


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class ResumableSampler(Sampler[tuple[int, int]]):
    """Endless ``(image index, crop seed)`` pairs of one rank, starting at its ``start``-th sample."""

    def __init__(
        self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        self.per_rank_epoch = (size // (batch_size * world_size)) * batch_size
        if self.per_rank_epoch == 0:
            raise ValueError(f"{size} images cannot fill one batch of {batch_size} on each of {world_size} rank(s)")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank_epoch)
        while True:
            generator = _epoch_generator(self.seed, epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            crop_seeds = torch.randint(2**62, (self.size,), generator=generator).tolist()
            positions = range(self.rank, self.per_rank_epoch * self.world_size, self.world_size)
            for position in positions[offset:]:
                yield order[position], crop_seeds[position]
            epoch, offset = epoch + 1, 0


class SeededCrops(Dataset[Tensor]):
    """``HRCropDataset`` addressed by ``(index, crop seed)``, so a crop does not depend on which worker made it."""

    def __init__(self, dataset: HRCropDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Tensor:  # type: ignore[override]
        index, seed = item
        return self.dataset.load(index, torch.Generator().manual_seed(seed))


def hr_batches(
    cfg: DataConfig, device: torch.device, *, rank: int = 0, world_size: int = 1, start_batch: int = 0
) -> Iterator[Tensor]:
    """HR batches ``(B, 3, crop, crop)`` in [0, 1] on ``device``, from this rank's ``start_batch``-th batch on.

    The image list is read now, so a bad path fails before the first step.
    """
    try:
        dataset = HRCropDataset.from_config(cfg)
        sampler = ResumableSampler(
            len(dataset), cfg.batch_size, cfg.seed, rank, world_size, start=start_batch * cfg.batch_size
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"training data: {exc}") from None
    workers = cfg.num_workers
    loader = DataLoader(
        SeededCrops(dataset),
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        pin_memory=device.type == "cuda",
        # A private generator: the loader must not draw from torch's global RNG, whose state is
        # part of the checkpoint and would otherwise differ between a resumed and a straight run.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return (batch.to(device, non_blocking=True) for batch in loader)
