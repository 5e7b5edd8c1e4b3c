"""``vpdsr train autoencoder``: an autoencoder-only registry entry, and exact resumption (GAN on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.autoencoder import VQAutoencoder
from model.config import AutoencoderConfig, DDConfig
from model.checkpoint import load_into
from model.registry import Registry
from training.autoencoder_trainer import AutoencoderTrainConfig
from training.config_files import ConfigError, load_config
from training.resampler_init import init_as_resampler
from tests.test_trainer import IMAGES, check_resume_is_exact, metrics, train


def test_autoencoder_training_writes_an_autoencoder_only_entry(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    train("autoencoder", "autoencoder-small", reg, tmp_path / "run", "--steps", "2", "--name", "vq")
    entry = Registry(reg).resolve("vq")
    cfg = entry.config()
    assert (cfg.kind, cfg.inference_steps) == ("autoencoder", 0)
    unet_state, vq_state = entry.state_dicts()
    assert unet_state == {}
    load_into(VQAutoencoder.from_config(cfg.autoencoder), vq_state, "autoencoder")
    assert [(row["name"], row["kind"]) for row in Registry(reg).list()] == [("vq", "autoencoder")]
    prov = cfg.provenance
    assert prov["source"] == "vpdsr train autoencoder" and prov["steps"] == 2 and prov["data"] == [str(IMAGES)]
    assert {"git_commit", "wall_time_s", "hardware", "training_config"} <= prov.keys()
    assert [row["step"] for row in metrics(tmp_path / "run")] == [1, 2]
    assert {"loss/l1", "loss/codebook", "loss/commitment", "loss/total"} == {
        k for k in metrics(tmp_path / "run")[0] if k.startswith("loss/")
    }


def test_autoencoder_resume_is_exact_with_the_gan(tmp_path: Path) -> None:
    check_resume_is_exact("autoencoder", "autoencoder-small", tmp_path / "registry", tmp_path,
                          "--set", "adversarial.enabled=true")
    assert "loss/discriminator" in metrics(tmp_path / "straight")[0]


def _resampler(ch: int, ch_mult: tuple[int, ...], norm_groups: int) -> VQAutoencoder:
    ddconfig = DDConfig(resolution=32, ch=ch, ch_mult=ch_mult, num_res_blocks=1, norm_groups=norm_groups,
                        attn_resolutions=(8,))
    autoencoder = VQAutoencoder.from_config(AutoencoderConfig(embed_dim=3, n_embed=64, ddconfig=ddconfig))
    init_as_resampler(autoencoder)
    return autoencoder.eval()


def test_resampler_init_starts_as_box_down_and_bilinear_up() -> None:
    torch.manual_seed(0)
    autoencoder = _resampler(32, (1, 1, 2), 8)
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        latent = autoencoder.encode(image)
        decoded = autoencoder.decode(latent, quantize=False)
    box = F.avg_pool2d(image, 4)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # zero padding touches the rim
    assert (latent - box)[inner].abs().max() < 0.01
    bilinear = F.interpolate(F.interpolate(latent, scale_factor=2, mode="bilinear"), scale_factor=2, mode="bilinear")
    assert (decoded - bilinear)[..., 4:-4, 4:-4].abs().max() < 0.01


def test_resampler_init_refuses_groups_too_narrow_for_its_layout() -> None:
    with pytest.raises(ValueError, match="4 channels per group"):
        _resampler(16, (1, 2), 8)
    with pytest.raises(ConfigError, match="4 channels per group"):  # autoencoder-small: 1 per group
        load_config(AutoencoderTrainConfig, "autoencoder-small", [("init", "resampler")])
