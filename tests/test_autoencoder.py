"""VQAutoencoder against ResShift's VQModelTorch: state-dict layout and numerics.

Fixtures (``tests/fixtures``) were produced by running the reference implementation on CPU in
float32: ``resshift_vqf4_small`` (copied from ../shared/reference) holds a small config's weights,
inputs and outputs; ``resshift_vqf4_sizes`` and ``resshift_vqf4_reflect`` reuse those weights at
other (non-square, odd) sizes and with ``padding_mode="reflect"``; ``resshift_vq_attn`` is a
second config with attention inside the levels and its own (float16-stored) weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import model.autoencoder as autoencoder
from model.autoencoder import AttnBlock, VQAutoencoder
from model.norm import GroupNorm32
from model.config import AutoencoderConfig, from_dict

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def read_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(FIXTURES / name, "pt") as f:
        return json.loads(f.metadata()["config"]), {k: f.get_tensor(k) for k in f.keys()}


def build(cfg: dict, weights: dict[str, torch.Tensor]) -> VQAutoencoder:
    vq = VQAutoencoder(cfg["embed_dim"], cfg["n_embed"], cfg["ddconfig"]).eval()
    vq.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return vq


def weights_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}


def cases(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Prefixes of the fixture's cases ('' for a single unprefixed case)."""
    return sorted({k[: -len("input.image")] for k in tensors if k.endswith("input.image")})


@pytest.fixture(scope="module")
def small() -> tuple[dict, dict[str, torch.Tensor]]:
    return read_fixture("resshift_vqf4_small.safetensors")


def check_case(vq: VQAutoencoder, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    with torch.no_grad():
        z = vq.encode(tensors[prefix + "input.image"])
        decoded = vq.decode(z)
        not_quantized = vq.decode(z, quantize=False)
    assert z.shape == tensors[prefix + "output.latent"].shape
    assert decoded.shape == tensors[prefix + "output.decoded"].shape
    errors = {
        "latent": rel_err(z, tensors[prefix + "output.latent"]),
        "decoded": rel_err(decoded, tensors[prefix + "output.decoded"]),
        "decoded_not_quantized": rel_err(not_quantized, tensors[prefix + "output.decoded_not_quantized"]),
    }
    assert max(errors.values()) <= TOLERANCE, (prefix, errors)


def test_small_fixture_matches_reference(small: tuple[dict, dict[str, torch.Tensor]]) -> None:
    cfg, tensors = small
    check_case(build(cfg, weights_of(tensors)), tensors, "")


@pytest.mark.parametrize("name", ["resshift_vqf4_sizes.safetensors", "resshift_vqf4_reflect.safetensors"])
def test_other_sizes_and_padding_mode(name: str, small: tuple[dict, dict[str, torch.Tensor]]) -> None:
    """Non-square, batch 2, odd sizes (asymmetric downsampling pad) and reflect padding."""
    cfg, tensors = read_fixture(name)
    vq = build(cfg, weights_of(small[1]))
    assert vq.ddconfig.padding_mode == cfg["ddconfig"]["padding_mode"]
    for prefix in cases(tensors):
        check_case(vq, tensors, prefix)


def test_second_config_with_attention_in_levels() -> None:
    cfg, tensors = read_fixture("resshift_vq_attn.safetensors")
    vq = build(cfg, weights_of(tensors))
    assert len(vq.encoder.down[1].attn) == 2 and len(vq.encoder.down[0].attn) == 0
    assert len(vq.decoder.up[1].attn) == 3 and len(vq.decoder.up[0].attn) == 0
    for prefix in cases(tensors):
        check_case(vq, tensors, prefix)


def test_full_config_state_dict_matches_official_checkpoint() -> None:
    vq = VQAutoencoder.from_config(AutoencoderConfig())
    reference = json.loads((FIXTURES / "resshift_vqgan_f4_state_dict_shapes.json").read_text())
    assert {k: list(v.shape) for k, v in vq.state_dict().items()} == reference
    assert round(sum(p.numel() for p in vq.parameters()) / 1e6, 2) == 55.32
    assert vq.downsample_factor == 4


def test_ddconfig_as_dict_or_dataclass(small: tuple[dict, dict[str, torch.Tensor]]) -> None:
    cfg, _ = small
    from_yaml_dict = VQAutoencoder(cfg["embed_dim"], cfg["n_embed"], cfg["ddconfig"])
    typed = from_dict(AutoencoderConfig, cfg)
    from_dataclass = VQAutoencoder.from_config(typed)
    assert from_yaml_dict.ddconfig == typed.ddconfig
    assert from_yaml_dict.state_dict().keys() == from_dataclass.state_dict().keys()
    with pytest.raises(ValueError, match="double_z"):
        VQAutoencoder(3, 64, dataclasses.replace(typed.ddconfig, double_z=True))


def test_gradients_flow_through_quantised_decode(small: tuple[dict, dict[str, torch.Tensor]]) -> None:
    """decode(quantize=True) is straight-through: dL/dz equals dL/dcode at the chosen codes."""
    cfg, tensors = small
    vq = build(cfg, weights_of(tensors))
    z = tensors["output.latent"].clone().requires_grad_(True)
    vq.decode(z, quantize=True).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and torch.isfinite(z.grad).all()

    codes = vq.quantize(z.detach())[0].clone().requires_grad_(True)
    vq.decode(codes, quantize=False).square().mean().backward()
    assert codes.grad is not None
    torch.testing.assert_close(z.grad, codes.grad)


def test_quantize_returns_codes_and_vq_losses(small: tuple[dict, dict[str, torch.Tensor]]) -> None:
    cfg, tensors = small
    vq = build(cfg, weights_of(tensors)).train()
    z = tensors["output.latent"].clone().requires_grad_(True)
    z_q, codebook_loss, commitment_loss = vq.quantize(z)

    codebook = vq.quantize.embedding.weight
    brute = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]), codebook).argmin(1)
    codes = codebook[brute].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, codes.detach())
    torch.testing.assert_close(codebook_loss, F.mse_loss(codes, z.detach()))
    torch.testing.assert_close(commitment_loss, 0.25 * F.mse_loss(z.detach(), codes))

    # the codebook term trains only the codebook, the commitment term only the latent
    codebook_loss.backward(retain_graph=True)
    assert z.grad is None and codebook.grad is not None and codebook.grad.abs().sum() > 0
    codebook.grad = None
    commitment_loss.backward()
    assert codebook.grad is None and z.grad is not None and z.grad.abs().sum() > 0

    reconstruction, cb, cm = vq(tensors["input.image"])
    assert reconstruction.shape == tensors["input.image"].shape and cb.ndim == 0 and cm.ndim == 0


def test_chunked_search_and_attention_are_exact(
    small: tuple[dict, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny chunk budgets (many chunks, ragged last one) give the same result as one chunk."""
    cfg, tensors = small
    vq = build(cfg, weights_of(tensors))
    x = tensors["input.image"]
    with torch.no_grad():
        whole = vq.decode(vq.encode(x))
        monkeypatch.setattr(autoencoder, "_SEARCH_CHUNK_ELEMENTS", 7 * cfg["n_embed"])
        monkeypatch.setattr(autoencoder, "_ATTENTION_CHUNK_ELEMENTS", 2 * 64 * 5)
        chunked = vq.decode(vq.encode(x))
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_every_attention_uses_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, tensors = read_fixture("resshift_vq_attn.safetensors")
    vq = build(cfg, weights_of(tensors))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        vq.decode(vq.encode(tensors["size_24x40.input.image"]))
    assert len(calls) == sum(isinstance(m, AttnBlock) for m in vq.modules()) == 7


def test_group_norm_computes_in_float32() -> None:
    norm = GroupNorm32(64)
    x = (torch.randn(1, 64, 4, 4) * 100 + 1000).bfloat16()
    out = norm.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    expected = F.group_norm(x.float(), 32, eps=1e-6)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


def test_bf16_autocast_runs_and_stays_close(small: tuple[dict, dict[str, torch.Tensor]]) -> None:
    cfg, tensors = small
    vq = build(cfg, weights_of(tensors))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = vq.encode(tensors["input.image"])
        decoded = vq.decode(z, quantize=False)
    assert torch.isfinite(decoded.float()).all()
    assert rel_err(z, tensors["output.latent"]) < 5e-2
    assert rel_err(decoded, tensors["output.decoded_not_quantized"]) < 5e-2


def test_attn_type_none_is_fully_convolutional() -> None:
    """LDM's ``attn_type: none`` drops every attention block: no attention keys, any input size."""
    ddconfig = {"resolution": 32, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16],
                "norm_groups": 4, "attn_type": "none"}
    vq = VQAutoencoder(3, 16, ddconfig).eval()
    assert not [key for key in vq.state_dict() if "attn" in key]
    assert not any(isinstance(m, AttnBlock) for m in vq.modules())
    with torch.no_grad():
        for size in (8, 24, 40):
            assert vq.decode(vq.encode(torch.zeros(1, 3, size, size))).shape == (1, 3, size, size)
    with_attention = VQAutoencoder(3, 16, ddconfig | {"attn_type": "vanilla"})
    assert any(isinstance(m, AttnBlock) for m in with_attention.modules())
