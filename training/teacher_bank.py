"""A bank of (LR, pixel-teacher SR, HR) triples: what a one-step student distils from a pixel-space teacher.

Real-ESRGAN x4plus costs about 36 MFLOP per LR pixel, some ten times the student's whole training step
on a CPU, so it runs once per degraded crop, here, not once per training step. The student then sees
every triple many times (with random flips and transposes, which commute with the ×4 mapping).

Each triple is made from a random crop of an HR source, degraded by the Real-ESRGAN second-order chain
(:class:`training.degradations.Degrader`) and upscaled by the teacher with a margin of
:data:`MARGIN` LR pixels on every side, which is cut off afterwards: the teacher's zero-padded
convolutions make its outputs at tile borders worse than inside, and a student must not learn that.

Layout: ``OUT/shard-NNNN.pt``, each a dict of uint8 tensors ``lr`` (N, 3, s, s), ``teacher`` and
``hr`` (N, 3, 4s, 4s) and ``meta`` (teacher, crop, degradation, seed); shards are written as they
fill, so a long run that is stopped keeps what it made, and a later run with the same seed appends.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from .config_files import to_plain
from .data import HRCropDataset, list_images
from .degradations import DegradationConfig, Degrader

MARGIN = 2
"""LR pixels cut from every side of the teacher's output (8 HR pixels)."""
SHARD = 100
TEACHERS = ("realesrgan-x4plus",)


def load_teacher(name: str, dtype: torch.dtype = torch.float32) -> Callable[[Tensor], Tensor]:
    """A pixel-space ×4 teacher on the CPU: LR batch in [0, 1] → float32 SR batch in [0, 1].

    ``torch.bfloat16`` runs it under bf16 autocast in channels-last, the layout of oneDNN's fast
    bf16 convolutions: 4.2× float32's speed on an AMX CPU, and 48.8 dB PSNR against float32's output
    (uint8, four 36² crops of a photo; ``tests/test_pixel_teacher.py`` holds it to 40 dB), rounding
    far below what a student trained on the bank can learn.
    """
    if name != "realesrgan-x4plus":
        raise ValueError(f"unknown pixel teacher {name!r}; known: {', '.join(TEACHERS)}")
    from .realesrgan import load_x4plus

    bf16 = dtype == torch.bfloat16
    model = load_x4plus().to(memory_format=torch.channels_last if bf16 else torch.contiguous_format)

    @torch.inference_mode()
    def teach(lr: Tensor) -> Tensor:
        if bf16:
            lr = lr.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(lr).float().clamp(0, 1)

    return teach


def make_teacher_bank(
    sources: list[Path],
    out_dir: Path,
    *,
    teacher: str = "realesrgan-x4plus",
    dtype: torch.dtype = torch.float32,
    lr_size: int = 32,
    count: int = 1000,
    seed: int = 0,
    degradation: DegradationConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``count`` triples (``lr_size``² LR) into ``out_dir`` in shards; returns the number in the bank."""
    degradation = degradation or DegradationConfig(kind="realesrgan")
    scale = degradation.scale
    teach = load_teacher(teacher, dtype)
    dataset = HRCropDataset(list_images(sources), crop_size=(lr_size + 2 * MARGIN) * scale)
    degrader = Degrader(degradation)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": teacher, "dtype": str(dtype).removeprefix("torch."), "lr_size": lr_size, "scale": scale,
            "seed": seed, "degradation": to_plain(degradation)}
    start = len(list(out_dir.glob("shard-*.pt")))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
    hr_cut, lr_cut = slice(MARGIN * scale, (MARGIN + lr_size) * scale), slice(MARGIN, MARGIN + lr_size)
    made = 0
    for shard in range(start, start + -(-count // SHARD)):
        size = min(SHARD, count - made)
        hr = torch.stack([dataset.load(int(torch.randint(len(dataset), (), generator=generator)), generator)
                          for _ in range(size)])
        lr = degrader(hr, generator)
        sr = torch.cat([teach(part) for part in lr.split(4)])
        triple = {
            "lr": _to_uint8(lr[..., lr_cut, lr_cut]),
            "teacher": _to_uint8(sr[..., hr_cut, hr_cut]),
            "hr": _to_uint8(hr[..., hr_cut, hr_cut]),
            "meta": json.dumps(meta),
        }
        torch.save(triple, out_dir / f"shard-{shard:04d}.pt")
        made += size
        if progress is not None:
            progress(made)
    return start * SHARD + made


def _to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


class TeacherBank:
    """The triples of a bank folder in memory (uint8), served as float batches in [0, 1]."""

    def __init__(self, folder: Path) -> None:
        shards = sorted(Path(folder).glob("shard-*.pt"))
        if not shards:
            raise FileNotFoundError(f"no teacher bank in {folder} (make one with `vpdsr teacher-bank`)")
        parts = [torch.load(path, weights_only=True) for path in shards]
        self.meta = json.loads(parts[0]["meta"])
        self.lr, self.teacher, self.hr = (torch.cat([p[key] for p in parts]) for key in ("lr", "teacher", "hr"))

    def __len__(self) -> int:
        return len(self.lr)

    def batches(self, batch_size: int, seed: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Endless ``(lr, teacher, hr)`` float batches, from the ``start_batch``-th on (resumable): one
        shuffle per epoch from ``seed`` and the epoch, and one of the 8 flips/transposes per triple."""
        per_epoch = len(self) // batch_size
        if per_epoch == 0:
            raise ValueError(f"the bank holds {len(self)} triples, fewer than one batch of {batch_size}")
        batch = start_batch
        while True:
            epoch, index = divmod(batch, per_epoch)
            generator = torch.Generator().manual_seed(seed * 7919 + epoch)
            order = torch.randperm(len(self), generator=generator)
            dihedral = torch.randint(8, (len(self),), generator=generator)
            picked = order[index * batch_size : (index + 1) * batch_size]
            yield tuple(  # type: ignore[misc]
                torch.stack([_dihedral(images[i], int(dihedral[i])) for i in picked]).float().div_(255)
                for images in (self.lr, self.teacher, self.hr)
            )
            batch += 1


def _dihedral(x: Tensor, k: int) -> Tensor:
    """One of the 8 symmetries of the square (k in 0…7): k % 4 quarter turns, mirrored when k ≥ 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x
