"""The optimised inference path (channels-last, half precision, torch.compile) computes the same function.

On the CPU these check equivalence, not speed; the GPU numbers live in benchmarks/ and
docs/performance.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from model import SRPipeline
from tests.conftest import FIXTURES
from training.quality import psnr, to_rgb_array

GUARD_DB = 40.0  # PSNR of the fast path's output against float32's (issue 28)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, torch.randn(2, 3, 16, 16, generator=gen)


@pytest.fixture(scope="module")
def reference(tiny_registry: Path, batch) -> torch.Tensor:
    return SRPipeline.from_registry("tiny", tiny_registry).run_tiles(*batch, steps=1)


@pytest.mark.parametrize(
    ("options", "tolerance"),
    [
        ({"channels_last": True}, 1e-4),
        # Random weights amplify rounding far more than trained ones; the GPU target (1e-2 for
        # bf16 on trained weights) is checked by benchmarks/bench_model.py.
        ({"dtype": torch.float16, "channels_last": True}, 2e-2),
        ({"dtype": torch.bfloat16}, 1e-1),
        ({"compile_mode": "default", "compile_backend": "aot_eager"}, 1e-4),
    ],
)
def test_optimised_path_matches_reference(tiny_registry: Path, batch, reference, options, tolerance) -> None:
    out = SRPipeline.from_registry("tiny", tiny_registry, **options).run_tiles(*batch, steps=1)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert rel_err(out, reference) < tolerance


def test_cpu_fast_path_is_within_the_quality_guard_of_float32(tiny_registry: Path) -> None:
    """bf16 autocast + channels-last (``auto`` on a CPU with bf16 units) against the float32 reference
    on a photo: PSNR ≥ 40 dB, issue 28's guard (measured 42.6 dB on this random tiny model, whose
    errors pass through the decoder's quantisation; 46.6 dB on the trained vpdsr-small:2)."""
    image = Image.open(FIXTURES / "realset" / "bears.jpg").convert("RGB").crop((0, 0, 48, 40))
    reference = SRPipeline.from_registry("tiny", tiny_registry, dtype=torch.float32, channels_last=False)
    fast = SRPipeline.from_registry("tiny", tiny_registry, dtype=torch.bfloat16, channels_last=True)
    assert fast.autocast
    assert psnr(to_rgb_array(fast(image, seed=0)), to_rgb_array(reference(image, seed=0))) >= GUARD_DB
