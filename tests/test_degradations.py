"""Real-ESRGAN degradation: shapes, seeding, and evidence that each degradation does its job."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from training.degradations import (
    DegradationConfig,
    Degrader,
    StageConfig,
    add_gaussian_noise,
    add_poisson_noise,
    blur,
    resize,
)
from training.jpeg import jpeg_compress, quantisation_tables
from training.kernels import (
    KERNEL_TYPES,
    KernelConfig,
    generalized_gaussian_kernel,
    plateau_kernel,
    random_blur_kernel,
    random_sinc_kernel,
    sinc_kernel,
)

IMAGES = Path(__file__).parent / "fixtures" / "images"


def load(name: str) -> Tensor:
    """A fixture photo as ``(1, 3, H, W)`` in [0, 1]."""
    with Image.open(IMAGES / name) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def photos() -> Tensor:
    """Two 256² crops of real photos."""
    return torch.cat([load("3096.png")[..., :256, :256], load("108005.jpg")[..., 32:288, 100:356]])


def smooth_image(size: int = 256) -> Tensor:
    """A smooth colour image: low-frequency waves, where compression blocks stand out."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    channels = [0.5 + 0.4 * torch.sin(2 * math.pi * (x + f * y)) for f in (0.3, 0.7, 1.1)]
    return torch.stack(channels)[None]


def blockiness(images: Tensor) -> float:
    """Mean jump across 8×8 block boundaries divided by the mean jump inside blocks (≈1 without JPEG)."""
    ratios = []
    for dim in (-1, -2):
        jumps = images.diff(dim=dim).abs().transpose(dim, -1).mean(dim=tuple(range(images.dim() - 1)))
        at_boundary = torch.zeros_like(jumps, dtype=torch.bool)
        at_boundary[7::8] = True
        ratios.append(jumps[at_boundary].mean() / jumps[~at_boundary].mean())
    return float(sum(ratios) / 2)


def high_frequency_energy(images: Tensor) -> float:
    """Mean squared Laplacian response."""
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).expand(3, 1, 3, 3)
    return float(torch.nn.functional.conv2d(images, laplacian, groups=3).pow(2).mean())


def noiseless(stage: StageConfig) -> StageConfig:
    """``stage`` with its noise switched off (Gaussian of σ = 0)."""
    return stage.model_copy(update=dict(gaussian_noise_prob=1.0, gaussian_sigma=(0.0, 0.0)))


# ------------------------------------------------------------------ Degrader end to end


def test_lr_is_a_quarter_of_hr_in_unit_range_on_8bit_levels(photos: Tensor) -> None:
    lr = Degrader()(photos, 0)
    assert lr.shape == (2, 3, 64, 64) and lr.dtype == torch.float32
    assert 0 <= lr.min() and lr.max() <= 1
    assert torch.equal(lr * 255, torch.round(lr * 255))
    assert Degrader()(photos[:1, :, :128, :192], 1).shape == (1, 3, 32, 48)


def test_same_seed_same_lr_other_seed_other_lr(photos: Tensor) -> None:
    degrader = Degrader()
    first = degrader(photos, 7)
    assert torch.equal(first, degrader(photos, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, degrader(photos, 8))
    torch.manual_seed(3)
    global_seeded = degrader(photos)
    torch.manual_seed(3)
    assert torch.equal(global_seeded, degrader(photos))


def test_bicubic_prob_swaps_in_the_clean_lr_per_image(photos: Tensor) -> None:
    """``bicubic_prob`` replaces whole images by their clean bicubic LR and leaves the rest alone."""
    clean = Degrader(DegradationConfig(kind="bicubic"))(photos)
    assert torch.equal(Degrader(DegradationConfig(bicubic_prob=1.0))(photos, 5), clean)
    mixed = Degrader(DegradationConfig(bicubic_prob=0.5))(photos.repeat(8, 1, 1, 1), 5)
    swapped = [torch.equal(image, clean[i % 2]) for i, image in enumerate(mixed)]
    assert 0 < sum(swapped) < len(swapped)


def test_rejects_shapes_it_cannot_quarter() -> None:
    with pytest.raises(ValueError, match="multiples of 4"):
        Degrader()(torch.rand(1, 3, 66, 64), 0)
    with pytest.raises(ValueError):
        Degrader()(torch.rand(1, 1, 64, 64), 0)


def test_default_config_is_resshift_x4_realsr() -> None:
    cfg = DegradationConfig()
    assert cfg.first.kernel.sizes == (3, 5, 7, 9, 11, 13, 15, 17, 19) and cfg.first.kernel.padded_size == 21
    assert cfg.second.kernel.sizes == cfg.final_sinc_sizes == (3, 5, 7, 9, 11, 13) and cfg.final_kernel_size == 15
    assert cfg.first.kernel.type_probs == cfg.second.kernel.type_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (cfg.first.kernel.sigma, cfg.second.kernel.sigma) == ((0.2, 3.0), (0.2, 1.5))
    assert (cfg.first.resize_probs, cfg.first.resize_range) == ((0.2, 0.7, 0.1), (0.15, 1.5))
    assert (cfg.second.resize_probs, cfg.second.resize_range) == ((0.3, 0.4, 0.3), (0.3, 1.2))
    assert (cfg.first.gaussian_sigma, cfg.second.gaussian_sigma) == ((1, 30), (1, 25))
    assert (cfg.first.poisson_scale, cfg.second.poisson_scale) == ((0.05, 3.0), (0.05, 2.5))
    assert (cfg.second_order_prob, cfg.second.blur_prob, cfg.final_sinc_prob) == (0.5, 0.8, 0.8)


def test_degrader_noise_raises_variance_of_a_flat_image() -> None:
    flat = torch.full((2, 3, 128, 128), 0.5)
    base = DegradationConfig()
    quiet = base.model_copy(update=dict(first=noiseless(base.first), second=noiseless(base.second)))
    loud = base.model_copy(update=dict(
        first=base.first.model_copy(update=dict(gaussian_noise_prob=1.0)),
        second=base.second.model_copy(update=dict(gaussian_noise_prob=1.0)),
    ))
    assert Degrader(quiet)(flat, 0).var() < 1e-6
    assert Degrader(loud)(flat, 0).var() > 1e-4


def test_degrader_final_jpeg_leaves_8x8_blocks() -> None:
    base = DegradationConfig()
    first = noiseless(base.first).model_copy(update=dict(jpeg_quality=(95.0, 95.0)))

    def lr(quality: float) -> Tensor:
        second = noiseless(base.second).model_copy(update=dict(jpeg_quality=(quality, quality)))
        cfg = base.model_copy(update=dict(
            first=first, second=second, second_order_prob=0.0, final_sinc_prob=0.0, jpeg_last_prob=1.0
        ))
        return Degrader(cfg)(smooth_image(512), 0)

    assert blockiness(lr(30.0)) > 1.5 * blockiness(lr(95.0))


# ------------------------------------------------------------------ kernels


def one_type(kind: str, **changes: object) -> KernelConfig:
    probs = tuple(float(k == kind) for k in KERNEL_TYPES)
    return KernelConfig(type_probs=probs, sinc_prob=0.0, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KERNEL_TYPES)
def test_each_kernel_type_is_normalised_centred_and_point_symmetric(kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        kernel = random_blur_kernel(generator, one_type(kind))
        assert kernel.shape == (21, 21)
        assert kernel.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert kernel.min() >= 0 and kernel.argmax() == 21 * 10 + 10
        assert torch.allclose(kernel, kernel.flip(0, 1), atol=1e-7)
        if kind.endswith("_iso") or kind == "iso":
            assert torch.allclose(kernel, kernel.T, atol=1e-7) and torch.allclose(kernel, kernel.flip(0), atol=1e-7)


@pytest.mark.parametrize("kind", ["aniso", "generalized_aniso", "plateau_aniso"])
def test_anisotropic_kernels_are_elongated(kind: str) -> None:
    generator = torch.Generator().manual_seed(1)
    cfg = one_type(kind, sizes=(21,))
    assert any(not torch.allclose(k, k.T, atol=1e-4) for k in (random_blur_kernel(generator, cfg) for _ in range(5)))


def test_kernel_sizes_follow_the_stage_ranges() -> None:
    generator = torch.Generator().manual_seed(2)
    cfg = DegradationConfig().second.kernel
    supports = set()
    for _ in range(60):
        kernel = random_blur_kernel(generator, cfg)
        assert kernel.shape == (15, 15)
        rows = kernel.abs().sum(1).nonzero()
        supports.add(int(rows.max() - rows.min() + 1))
    assert supports <= set(range(1, 14, 2)) and max(supports) == 13


def test_family_shapes_differ_as_their_formulas_say() -> None:
    centre = 10
    gauss = generalized_gaussian_kernel(21, 2.0, 2.0, 0.0)
    plateau = plateau_kernel(21, 2.0, 2.0, 0.0, beta=2.0)
    heavy = generalized_gaussian_kernel(21, 2.0, 2.0, 0.0, beta=0.5)
    # plateau: flatter top and heavier tail than the Gaussian of the same σ
    assert plateau[centre, centre + 1] / plateau[centre, centre] > gauss[centre, centre + 1] / gauss[centre, centre]
    assert plateau[centre, -1] / plateau[centre, centre] > gauss[centre, -1] / gauss[centre, centre]
    # generalised Gaussian with β < 1: heavier tail
    assert heavy[centre, -1] / heavy[centre, centre] > gauss[centre, -1] / gauss[centre, centre]


def test_sinc_kernel_has_negative_lobes_and_rings_at_edges() -> None:
    kernel = sinc_kernel(13, math.pi / 3)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-5) and kernel.min() < -1e-3
    assert torch.allclose(kernel, kernel.T) and torch.allclose(kernel, kernel.flip(0, 1))
    step = torch.zeros(1, 3, 32, 32)
    step[..., 16:] = 1.0
    rung = blur(step, kernel[None])
    assert rung.max() > 1.01 and rung.min() < -0.01  # overshoot on both sides of the edge
    generator = torch.Generator().manual_seed(0)
    assert random_sinc_kernel(generator, (3, 5, 7), (math.pi / 3, math.pi), 15).shape == (15, 15)
    assert random_blur_kernel(generator, KernelConfig(sinc_prob=1.0)).min() < 0


# ------------------------------------------------------------------ filtering, resizing, noise


def test_blur_lowers_high_frequency_energy(photos: Tensor) -> None:
    kernels = torch.stack([generalized_gaussian_kernel(13, 2.0, 2.0, 0.0)] * 2)
    blurred = blur(photos, kernels)
    assert blurred.shape == photos.shape
    assert high_frequency_energy(blurred) < 0.1 * high_frequency_energy(photos)


def test_resize_changes_size(photos: Tensor) -> None:
    for mode in ("area", "bilinear", "bicubic"):
        assert resize(photos, mode, scale_factor=0.5).shape == (2, 3, 128, 128)
        assert resize(photos, mode, size=(64, 80)).shape == (2, 3, 64, 80)


def test_gaussian_noise_raises_variance_colour_or_grey() -> None:
    flat = torch.full((2, 3, 64, 64), 0.5)
    generator = torch.Generator().manual_seed(0)
    noisy = add_gaussian_noise(flat, torch.tensor([20.0, 20.0]), torch.tensor([False, True]), generator)
    assert noisy[0].std().item() == pytest.approx(20 / 255, rel=0.1)
    assert not torch.equal(noisy[0, 0], noisy[0, 1])  # colour noise: independent channels
    assert torch.equal(noisy[1, 0], noisy[1, 1]) and torch.equal(noisy[1, 1], noisy[1, 2])  # grey noise


def test_poisson_noise_raises_variance_with_its_scale() -> None:
    ramp = torch.linspace(0.2, 0.8, 64).expand(2, 3, 64, 64).contiguous()
    generator = torch.Generator().manual_seed(0)
    noisy = add_poisson_noise(ramp, torch.tensor([1.0, 2.0]), torch.tensor([False, False]), generator)
    spread = (noisy - ramp).std(dim=(1, 2, 3))
    assert spread[0] > 0.01 and float(spread[1]) == pytest.approx(2 * float(spread[0]), rel=0.15)
    grey = add_poisson_noise(ramp[:1], torch.tensor([1.0]), torch.tensor([True]), generator)
    assert torch.equal(grey[0, 0] - ramp[0, 0], grey[0, 2] - ramp[0, 2])


# ------------------------------------------------------------------ JPEG


def test_jpeg_makes_8x8_block_artefacts() -> None:
    image = smooth_image()
    assert blockiness(image) == pytest.approx(1.0, abs=0.05)
    compressed = jpeg_compress(image, torch.tensor([30.0]))
    assert blockiness(compressed) > 1.5


def test_jpeg_quality_per_image_and_odd_sizes(photos: Tensor) -> None:
    batch = photos[:1, :, :50, :70].expand(2, -1, -1, -1)
    out = jpeg_compress(batch, torch.tensor([30.0, 95.0]))
    assert out.shape == batch.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out * 255, torch.round(out * 255))
    errors = (out - batch).pow(2).mean(dim=(1, 2, 3))
    assert errors[0] > 2 * errors[1]


def test_jpeg_simulation_is_close_to_a_real_encoder(photos: Tensor) -> None:
    image = photos[:1]
    pixels = torch.round(image[0] * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=50)
    real = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1)[None].float() / 255
    simulated = jpeg_compress(image, torch.tensor([50.0]))
    assert (simulated - real).pow(2).mean() < 0.3 * (real - image).pow(2).mean()


def test_quantisation_tables_scale_like_libjpeg() -> None:
    luma, chroma = quantisation_tables(torch.tensor([50.0, 100.0, 10.0]))
    assert luma[0, 0, 0] == 16 and chroma[0, 7, 7] == 99  # quality 50: the standard tables
    assert torch.all(luma[1] == 1) and torch.all(chroma[1] == 1)
    assert luma[2].max() == 255  # clipped to 8-bit steps


def test_bicubic_kind_matches_pil_bicubic_downsampling() -> None:
    import numpy as np
    from PIL import Image

    from training.degradations import DegradationConfig, Degrader

    rng = np.random.default_rng(0)
    hr = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
    hr = np.array(Image.fromarray(hr).resize((48, 32), Image.Resampling.BICUBIC).resize((96, 64)))
    pil = np.asarray(Image.fromarray(hr).resize((24, 16), Image.Resampling.BICUBIC), dtype=np.float32)
    tensor = torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255
    lr = Degrader(DegradationConfig(kind="bicubic"))(tensor, 0)[0].permute(1, 2, 0).numpy() * 255
    assert lr.shape == pil.shape
    assert np.abs(lr - pil).mean() < 1.5
