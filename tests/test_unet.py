"""SwinUNet against reference outputs of ResShift's ``UNetModelSwin`` (fixtures in tests/fixtures).

- ``resshift_unet_small.safetensors``: the shared reference fixture (weights, inputs, output, config).
- ``resshift_unet_small_sizes.safetensors``: the same weights run by the reference at other,
  non-square sizes (inputs ``input.{x,lq,t}.HxW`` and ``output.HxW``).
- ``resshift_unet_{b,c}.safetensors``: two more configurations (see their ``config`` metadata):
  parameters as int8 codes ``weights.*`` times float32 ``scales.*`` (exact; keeps the files
  small), buffers left out, and reference outputs at several sizes.
- ``resshift_unet_realsr_x4_state_dict_shapes.json``: state-dict keys and shapes of the official
  x4 real-world SR model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model.config import UNetConfig
from model.norm import GroupNorm32
from model.unet import SwinUNet

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def read_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    path = FIXTURES / name
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    return config, load_file(str(path))


def cases(data: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removeprefix("output.") for k in data if k.startswith("output."))


def run_case(model: SwinUNet, data: dict[str, torch.Tensor], tag: str) -> float:
    with torch.no_grad():
        out = model(data[f"input.x.{tag}"], data[f"input.t.{tag}"], data[f"input.lq.{tag}"])
    return rel_err(out, data[f"output.{tag}"])


@pytest.fixture(scope="module")
def small() -> tuple[SwinUNet, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    config, data = read_fixture("resshift_unet_small.safetensors")
    model = SwinUNet(**config).eval()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {k.removeprefix("weights."): v for k, v in data.items() if k.startswith("weights.")}
    model.load_state_dict(weights, strict=True)
    return model, data, fresh


def test_small_fixture_matches_at_construction_size(small) -> None:
    model, data, _ = small
    with torch.no_grad():
        out = model(data["input.x"], data["input.t"], data["input.lq"])
    assert out.shape == data["output"].shape and out.dtype == torch.float32
    assert rel_err(out, data["output"]) <= TOLERANCE


def test_fresh_buffers_equal_reference_buffers(small) -> None:
    """Shifted-window masks and relative-position indices are computed exactly as ResShift does."""
    _, data, fresh = small
    buffers = [k for k in fresh if k.endswith(("attn_mask", "relative_position_index"))]
    assert any(k.endswith("attn_mask") for k in buffers)
    for key in buffers:
        assert torch.equal(fresh[key], data[f"weights.{key}"]), key


@pytest.mark.parametrize("tag", cases(read_fixture("resshift_unet_small_sizes.safetensors")[1]))
def test_small_fixture_matches_at_other_sizes(small, tag: str) -> None:
    model, _, _ = small
    _, data = read_fixture("resshift_unet_small_sizes.safetensors")
    assert run_case(model, data, tag) <= TOLERANCE


@pytest.mark.parametrize("name", ["b", "c"])
def test_other_configs_match_reference(name: str) -> None:
    config, data = read_fixture(f"resshift_unet_{name}.safetensors")
    model = SwinUNet(**config).eval()
    state = model.state_dict()
    params = {
        k.removeprefix("weights."): v.float() * data[f"scales.{k.removeprefix('weights.')}"]
        for k, v in data.items()
        if k.startswith("weights.")
    }
    assert set(params) == {k for k, _ in model.named_parameters()}
    state.update(params)
    model.load_state_dict(state, strict=True)
    for tag in cases(data):
        assert run_case(model, data, tag) <= TOLERANCE, tag


def test_full_model_state_dict_matches_official_layout() -> None:
    expected = json.loads((FIXTURES / "resshift_unet_realsr_x4_state_dict_shapes.json").read_text())
    with torch.device("meta"):
        model = SwinUNet.from_config(UNetConfig())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(expected)
    assert shapes == expected
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 2) == 118.59
    assert model.size_multiple == 64


def test_constructor_takes_config_fields() -> None:
    config, _ = read_fixture("resshift_unet_small.safetensors")
    cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    a = SwinUNet.from_config(cfg)
    b = SwinUNet(**dataclasses.asdict(cfg) | {"num_res_blocks": 1})
    assert a.config == cfg
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_bf16_autocast_runs_with_float32_group_norm(small) -> None:
    model, data, _ = small
    seen: list[torch.dtype] = []

    def record(module, args, output) -> None:
        seen.append(output.dtype)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, GroupNorm32)]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(data["input.x"], data["input.t"], data["input.lq"])
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.bfloat16 in seen  # norms hand back the (autocast) input dtype
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, data["output"]) < 5e-2


def test_rejects_bad_inputs(small) -> None:
    model, data, _ = small
    x, t, lq = data["input.x"], data["input.t"], data["input.lq"]
    with pytest.raises(ValueError, match="multiple"):
        model(x[..., :12], t, lq[..., :12])
    with pytest.raises(ValueError, match="lq"):
        model(x, t)
