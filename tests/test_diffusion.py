"""The ResShift schedule and the deterministic sampler against the reference implementation's numbers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model import DiffusionConfig, ModelConfig, ResShiftSchedule, SRPipeline
from model.config import from_dict
from tests.conftest import FIXTURES


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", ["resshift_v1_realsr_x4", "resshift_v3_journal_realsr_x4"])
def test_eta_schedule_matches_reference(name: str) -> None:
    ref = json.loads((FIXTURES / "resshift_eta_schedules.json").read_text())[name]
    cfg = DiffusionConfig(
        steps=ref["steps"], min_noise_level=ref["min_noise_level"], etas_end=ref["etas_end"],
        kappa=ref["kappa"], power=ref["power"],
    )
    schedule = ResShiftSchedule(cfg)
    torch.testing.assert_close(schedule.sqrt_etas, torch.tensor(ref["sqrt_etas"], dtype=torch.float64))
    torch.testing.assert_close(schedule.etas, torch.tensor(ref["etas"], dtype=torch.float64))


def test_forward_process_endpoints() -> None:
    schedule = ResShiftSchedule(DiffusionConfig())
    z0, zy, eps = torch.randn(3, 2, 3, 8, 8).unbind(0)
    last = torch.full((2,), schedule.num_steps - 1)
    # At t = T−1 the forward process is the prior up to (1 − η_T)(z0 − z_y).
    xt = schedule.q_sample(z0, zy, last, eps)
    eta_t = float(schedule.etas[-1])
    torch.testing.assert_close(xt, schedule.prior_sample(zy, eps) + (1 - eta_t) * (z0 - zy))


def test_timesteps() -> None:
    schedule = ResShiftSchedule(DiffusionConfig())
    assert schedule.timesteps(1) == [14]
    assert schedule.timesteps(15) == list(range(14, -1, -1))
    assert schedule.timesteps(4)[0] == 14 and schedule.timesteps(4)[-1] == 0
    with pytest.raises(ValueError):
        schedule.timesteps(16)


def pipeline_fixture() -> tuple[SRPipeline, dict[str, torch.Tensor]]:
    """The small reference UNet + VQGAN wired into a pipeline, with the reference tensors."""
    tensors = load_file(FIXTURES / "resshift_pipeline_small.safetensors")
    with safe_open(FIXTURES / "resshift_pipeline_small.safetensors", "pt") as f:
        meta = f.metadata()
    parts = {}
    for key in ("unet", "vq"):
        path = FIXTURES / meta[f"{key}_fixture"]
        with safe_open(path, "pt") as f:
            parts[key] = json.loads(f.metadata()["config"])
        weights = load_file(path)
        parts[key + "_weights"] = {k.removeprefix("weights."): v for k, v in weights.items() if k.startswith("weights.")}
    config = ModelConfig(
        unet=from_dict(ModelConfig().unet.__class__, parts["unet"]),
        autoencoder=from_dict(ModelConfig().autoencoder.__class__, parts["vq"]),
        diffusion=from_dict(DiffusionConfig, json.loads(meta["diffusion"])),
    )
    return SRPipeline.from_state_dicts(config, parts["unet_weights"], parts["vq_weights"]), tensors


def test_pipeline_reproduces_reference_one_step_and_15_steps() -> None:
    pipe, ref = pipeline_fixture()
    lr, noise = ref["input.lr"], ref["input.noise"]
    with torch.inference_mode():
        z_y = pipe.codec.encode_lr(lr)
        assert rel_err(z_y, ref["output.z_y"]) < 1e-4
        assert rel_err(pipe.schedule.prior_sample(z_y, noise), ref["output.z_T"]) < 1e-4
        from model.sampler import sample

        z1 = sample(pipe.unet, pipe.schedule, z_y, lr, noise, steps=1)
        z15 = sample(pipe.unet, pipe.schedule, z_y, lr, noise, steps=15)
        assert rel_err(z1, ref["output.z0_one_step"]) < 1e-4
        assert rel_err(z15, ref["output.z0_deterministic_15"]) < 1e-4
        assert rel_err(pipe.codec.decode(z1), ref["output.image_one_step"]) < 1e-4
        assert rel_err(pipe.codec.decode(z15), ref["output.image_deterministic_15"]) < 1e-4
    # run_tiles is the same computation end to end.
    assert rel_err(pipe.run_tiles(lr, noise, steps=1), ref["output.image_one_step"]) < 1e-4
