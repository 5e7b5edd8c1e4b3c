"""VPD-SR loss terms: exact values on hand-computed cases, gradient flow, CLIP weight loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from training.adversary import DiscriminatorConfig, PatchDiscriminator, generator_adv_loss, hinge_d_loss
from training.losses import (
    ClipConfig,
    ClipSemanticLoss,
    ClipWeightsMissing,
    distill_loss,
    hfp_loss,
    high_frequency_bands,
)

# A CLIP small enough to build in milliseconds: 32² input, one transformer layer per tower.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_clip_config(tmp_path: Path) -> Path:
    path = tmp_path / "vpdsr-test-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def haar_bands(x: Tensor) -> Tensor:
    """Orthonormal Haar detail bands from the 2×2 blocks [[a, b], [c, d]], in pytorch_wavelets' order."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    lh = (a + b - c - d) / 2  # top row minus bottom row
    hl = (a - b + c - d) / 2  # left column minus right column
    hh = (a - b - c + d) / 2
    return torch.stack([lh, hl, hh], dim=2)


# -- L_HFP -----------------------------------------------------------------------------------------
def test_haar_bands_match_hand_computed_transform() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2)
    assert high_frequency_bands(x).flatten().tolist() == [-2.5, -1.5, 0.5]
    z = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(high_frequency_bands(z), haar_bands(z))


def test_hfp_loss_exact_values() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    assert hfp_loss(a, a).item() == 0.0
    expected = ((haar_bands(a) - haar_bands(b)) ** 2).mean()
    torch.testing.assert_close(hfp_loss(a, b), expected)
    # A constant offset lives only in the LL band.
    assert hfp_loss(a, a + 3.0).item() == pytest.approx(0.0, abs=1e-10)
    # One changed pixel: each of the three bands moves by ±δ/2 in one coefficient.
    b = a.clone()
    b[0, 0, 0, 0] += 2.0
    assert hfp_loss(a, b).item() == pytest.approx(3 * 1.0 / (2 * 3 * 3 * 4 * 4))


def test_hfp_loss_other_wavelet_and_gradients() -> None:
    a = torch.randn(1, 3, 16, 16, requires_grad=True)
    b = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():  # first use in a validation pass must not spoil the cached filters
        assert hfp_loss(a.detach(), a.detach(), wave="db2").item() == 0.0
    hfp_loss(a, b, wave="db2").backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_distill_loss_is_mse() -> None:
    z = torch.zeros(1, 3, 4, 4)
    assert distill_loss(z, z + 2).item() == 4.0


# -- adversarial -----------------------------------------------------------------------------------
def test_hinge_losses_on_known_logits() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 → 0.25;  fake: relu(1-2)=0, relu(1+0.5)=1.5 → 0.75
    assert hinge_d_loss(real, fake).item() == 1.0
    assert generator_adv_loss(fake).item() == 0.75


@pytest.mark.parametrize(("size", "n_layers", "out"), [(16, 3, 2), (8, 3, 1), (4, 2, 1), (64, 3, 8)])
def test_patch_discriminator_output_sizes(size: int, n_layers: int, out: int) -> None:
    disc = PatchDiscriminator(DiscriminatorConfig(in_channels=3, base_channels=8, n_layers=n_layers))
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, out, out)


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_patch_discriminator_norms_and_gradients(norm: str) -> None:
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, n_layers=2, norm=norm))
    z = torch.randn(2, 3, 8, 8, requires_grad=True)
    generator_adv_loss(disc(z)).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_patch_discriminator_clear_errors() -> None:
    with pytest.raises(ValueError, match="too small"):
        PatchDiscriminator(DiscriminatorConfig(base_channels=8, n_layers=3))(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="unknown discriminator norm"):
        PatchDiscriminator(DiscriminatorConfig(norm="layer"))


# -- L_SD (CLIP) -----------------------------------------------------------------------------------
def test_clip_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ClipWeightsMissing, match="pretrained_path"):
        ClipSemanticLoss(ClipConfig(model_name="ViT-B-32"))
    with pytest.raises(ValueError, match="not found"):
        ClipSemanticLoss(ClipConfig(model_name="ViT-B-32", pretrained_path=str(tmp_path / "missing.bin")))


def test_clip_loads_weights_from_local_file(tmp_path: Path, tiny_clip_config: Path) -> None:
    import open_clip

    name = tiny_clip_config.stem
    open_clip.add_model_config(tiny_clip_config)
    torch.manual_seed(0)
    reference = open_clip.create_model(name).eval()
    weights = tmp_path / "tiny_clip.bin"
    torch.save(reference.state_dict(), weights)

    torch.manual_seed(1)  # a different random init, which the file must overwrite
    loss = ClipSemanticLoss(
        ClipConfig(model_name=name, pretrained_path=str(weights), model_config_path=str(tiny_clip_config))
    )
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = torch.nn.functional.normalize(reference.encode_image(loss.preprocess(images)), dim=-1)
    torch.testing.assert_close(loss.embed(images), expected)
    assert loss.input_size == (32, 32)


def test_clip_loss_zero_for_identical_and_gradients_reach_sr_only(tiny_clip_config: Path) -> None:
    loss = ClipSemanticLoss(ClipConfig(model_name=tiny_clip_config.stem, random_weights_ok=True,
                                       model_config_path=str(tiny_clip_config)))
    loss.train()  # the trainer's .train() must not unfreeze or change the encoder's mode
    assert not loss.visual.training
    assert all(not p.requires_grad for p in loss.parameters())
    gt = torch.rand(2, 3, 48, 40) * 2 - 1  # not the encoder's size: goes through the resize
    assert loss(gt, gt).item() == pytest.approx(0.0, abs=1e-6)

    sr = (torch.rand(2, 3, 48, 40) * 2 - 1).requires_grad_(True)
    value = loss(sr, gt)
    value.backward()
    assert value.item() > 0
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())


class _CentredMean(nn.Module):
    """Stub encoder: undoes the normalisation and returns the image's centred channel means, so that
    the embedding of −x is exactly minus the embedding of x."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.std + self.mean - 0.5).mean(dim=(2, 3))


def test_clip_loss_is_two_for_opposite_embeddings(tiny_clip_config: Path) -> None:
    loss = ClipSemanticLoss(ClipConfig(model_name=tiny_clip_config.stem, random_weights_ok=True,
                                       model_config_path=str(tiny_clip_config)))
    loss.visual = _CentredMean(loss.mean, loss.std)
    sr = torch.rand(3, 3, 32, 32) * 1.8 - 0.9
    torch.testing.assert_close(loss.embed(-sr), -loss.embed(sr))
    assert loss(sr, -sr).item() == pytest.approx(2.0, abs=1e-6)
    assert loss(sr, sr).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer() -> None:
    """VQGAN's balance: weight × GAN gradient has the norm of the reconstruction gradient."""
    from training.adversary import adaptive_weight

    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    out = last(torch.randn(2, 4, 8, 8))
    rec = (out - torch.randn_like(out)).abs().mean()
    gan = -(out * 50).mean()  # a discriminator whose logits are on a much larger scale
    weight = adaptive_weight(rec, gan, last.weight)
    rec_grad = torch.autograd.grad(rec, last.weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(weight * gan, last.weight)[0]
    assert not weight.requires_grad
    assert gan_grad.norm().item() == pytest.approx(rec_grad.norm().item(), rel=1e-3)
