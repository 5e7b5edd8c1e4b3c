"""HR training images: image lists, random crops, and a DataLoader that keeps the CPU cores busy.

Sources are folders (searched recursively for image files) and list files in ResShift's convention:
a ``.txt`` file with one image path per line (blank lines and ``#`` comments skipped; relative paths
are relative to the list file's folder, so a list moves with its images).

Only HR crops are made here; the LR side is made on the training device by
:class:`training.degradations.Degrader`, batched, which is far cheaper than per-image degradation in
the workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .config_files import Config

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class DataConfig(Config):
    """Where the HR images are and how they are cropped and batched.

    ``rescale_gt`` is ResShift's option of the same name: instead of a ``crop_size`` window at native
    resolution, take the largest random square and downscale it (area filter) to ``crop_size``, so
    every crop shows the whole short side of its image.
    """

    sources: tuple[Path, ...] = ()
    crop_size: int = 256
    hflip: bool = True
    rescale_gt: bool = False
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    batch_size: int = 16
    num_workers: int = 2
    prefetch_factor: int = 4
    seed: int = 0


def read_list_file(path: Path) -> list[Path]:
    """Image paths of a ResShift list file (one per line)."""
    paths = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            paths.append(path.parent / line)  # an absolute ``line`` replaces the folder
    return paths


def list_images(sources: Iterable[str | Path], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """All images of the folders and list files in ``sources``, folders sorted for a stable order.

    Raises ``FileNotFoundError`` for a source that does not exist and ``ValueError`` when nothing is
    found, so a bad path fails at start-up rather than as an empty epoch.
    """
    roots = [Path(s) for s in sources]
    suffixes = {e.lower() for e in extensions}
    paths: list[Path] = []
    for source in roots:
        if source.is_dir():
            paths.extend(sorted(p for p in source.rglob("*") if p.suffix.lower() in suffixes and p.is_file()))
        elif source.is_file():
            paths.extend(read_list_file(source))
        else:
            raise FileNotFoundError(f"no such folder or list file: {source}")
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(suffixes))}) in {', '.join(map(str, roots))}")
    return paths


def _fit_short_side(size: tuple[int, int], short: int) -> tuple[int, int]:
    """``size`` scaled so that its shorter side becomes ``short``."""
    factor = short / min(size)
    return max(short, round(size[0] * factor)), max(short, round(size[1] * factor))


def _offset(slack: int, generator: torch.Generator | None) -> int:
    """Uniform crop offset in ``[0, slack]`` (0 when the image is not larger than the window)."""
    return int(torch.randint(slack + 1, (), generator=generator)) if slack > 0 else 0


class HRCropDataset(Dataset[Tensor]):
    """Random ``crop_size``² HR crops, float32 ``(3, crop, crop)`` in [0, 1], randomly mirrored.

    Rule for images smaller than the crop: if the short side is at most half the crop, the image is
    first magnified (bicubic) so that its short side equals the crop, as reflecting more than half of
    it would mostly show mirror copies; otherwise the missing rows/columns are filled by reflection at
    the bottom/right edges. Only the crop is converted to RGB and to a tensor; with ``rescale_gt`` a
    JPEG is decoded at a reduced scale (``Image.draft``) when that still covers the crop.

    Random draws use ``generator`` when :meth:`load` gets one, else torch's global RNG, which
    DataLoader workers seed from the loader's generator: a fixed :attr:`DataConfig.seed` gives the same
    crops run after run.
    """

    def __init__(self, paths: Sequence[Path], crop_size: int = 256, hflip: bool = True, rescale_gt: bool = False):
        if not paths:
            raise ValueError("no images to load")
        self.paths = list(paths)
        self.crop_size = crop_size
        self.hflip = hflip
        self.rescale_gt = rescale_gt

    @classmethod
    def from_config(cls, cfg: DataConfig) -> HRCropDataset:
        return cls(list_images(cfg.sources, cfg.extensions), cfg.crop_size, cfg.hflip, cfg.rescale_gt)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return self.load(index)

    def load(self, index: int, generator: torch.Generator | None = None) -> Tensor:
        """The random crop of image ``index``; raises ``OSError`` naming the file if it is unreadable."""
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                crop = self._crop(image, generator).convert("RGB")
        except OSError as exc:
            raise OSError(f"cannot read image {path}: {exc}") from exc
        pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)
        if self.hflip and torch.rand((), generator=generator) < 0.5:
            pixels = pixels.flip(-1)
        tensor = pixels.float().div_(255)
        missing_h, missing_w = self.crop_size - tensor.shape[1], self.crop_size - tensor.shape[2]
        if missing_h or missing_w:
            tensor = F.pad(tensor, (0, missing_w, 0, missing_h), mode="reflect")
        return tensor

    def _crop(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        """The (possibly magnified or downscaled) crop window, still a PIL image in its own mode."""
        size = self.crop_size
        if self.rescale_gt and min(image.size) > size:
            image.draft("RGB", _fit_short_side(image.size, size))  # no-op for formats other than JPEG
        if min(image.size) * 2 <= size:
            image = image.resize(_fit_short_side(image.size, size), Image.Resampling.BICUBIC)
        width, height = image.size
        window = max(min(width, height), size) if self.rescale_gt else size
        left, top = _offset(width - window, generator), _offset(height - window, generator)
        image = image.crop((left, top, left + min(window, width), top + min(window, height)))
        if window > size:
            image = image.resize((size, size), Image.Resampling.BOX)
        return image


def make_loader(cfg: DataConfig, device: torch.device | str | None = None) -> DataLoader[Tensor]:
    """Shuffled loader of HR batches ``(B, 3, crop, crop)``, incomplete last batches dropped.

    Worker processes decode and crop in parallel (``num_workers``, kept alive across epochs so their
    start-up is paid once); each worker runs single-threaded torch, so two workers fill two cores.
    Batches are pinned when they go to a CUDA device (``device`` or, if ``None``, whenever CUDA is
    available) so the host-to-device copy can overlap compute.
    """
    dataset = HRCropDataset.from_config(cfg)
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"{len(dataset)} images cannot fill one batch of {cfg.batch_size}")
    workers = cfg.num_workers
    pin = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
