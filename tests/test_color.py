"""The wavelet colour fix: the output's colour comes from the bicubic-upscaled input, its detail stays."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from PIL import Image

from model.color import color_fix, lowpass
from model.pipeline import SRPipeline
from tests.conftest import FIXTURES, save_tiny_model, tiny_config


def test_colour_cast_is_removed_and_detail_kept() -> None:
    reference = torch.tensor([0.6, 0.4, 0.2]).view(1, 3, 1, 1).expand(1, 3, 64, 64)  # colour, no detail
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    detail = ((rows + cols) % 2 * 2 - 1).float().expand(1, 3, 64, 64) * 0.1  # the finest checkerboard
    cast = torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1)
    fixed = color_fix(reference + cast + detail, reference)
    assert torch.allclose(fixed, reference + detail, atol=0.01)  # exact inside; replicate padding at the rim


def test_pipeline_with_colour_fix_keeps_the_input_colour(tmp_path: Path) -> None:
    config = dataclasses.replace(tiny_config(), color_fix="wavelet")
    save_tiny_model(tmp_path, config=config)
    plain = dataclasses.replace(config, color_fix="none")
    save_tiny_model(tmp_path, name="plain", config=plain)
    image = Image.open(next((FIXTURES / "images").glob("*.jpg"))).convert("RGB").crop((0, 0, 32, 32))
    mean = torch.tensor(image.resize((128, 128), Image.Resampling.BICUBIC).getdata(), dtype=torch.float32).mean(0)

    def colour_error(name: str) -> float:
        out = SRPipeline.from_registry(name, tmp_path, dtype="float32")(image, seed=0)
        return float((torch.tensor(out.getdata(), dtype=torch.float32).mean(0) - mean).abs().max())

    assert colour_error("tiny") * 4 < colour_error("plain")  # a random tiny model's colours are far off
