"""``vpdsr train autoencoder``: an autoencoder-only registry entry, and exact resumption (GAN on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.autoencoder import VQAutoencoder
from model.config import AutoencoderConfig, DDConfig
from model.checkpoint import load_into
from model.cli import main
from model.registry import Registry
from training.autoencoder_trainer import AutoencoderTrainConfig
from training.config_files import ConfigError, load_config
from training.resampler_init import init_as_resampler
from tests.conftest import save_tiny_model
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


def test_fine_tune_an_attention_autoencoder_into_a_convolutional_one(tmp_path: Path) -> None:
    """``init_from`` starts from a registry entry's weights; ``attn_type: none`` leaves out exactly the
    source's mid-block attention, and one small step keeps the rest close to the source."""
    reg = tmp_path / "registry"
    save_tiny_model(reg, name="source")
    train("autoencoder", "autoencoder-small", reg, tmp_path / "run", "--steps", "1", "--name", "vq",
          "--set", "init_from=source", "--set", "autoencoder.ddconfig.attn_type=none", "--set", "optim.lr=1.0e-6")
    entry = Registry(reg).resolve("vq")
    assert entry.config().provenance["init_from"] == "source:1"
    _, tuned = entry.state_dicts()
    _, source = Registry(reg).resolve("source").state_dicts()
    assert {k for k in source if k not in tuned} == {k for k in source if ".mid.attn_1." in k} != set()
    assert max((tuned[k] - source[k]).abs().max().item() for k in tuned) < 1e-3


def test_decoder_only_keeps_every_latent_and_swaps_into_a_model(tmp_path: Path) -> None:
    """``decoder_only`` trains the decoder side alone, so ``registry copy --autoencoder`` accepts it."""
    reg = tmp_path / "registry"
    save_tiny_model(reg, name="student")
    train("autoencoder", "autoencoder-small", reg, tmp_path / "run", "--steps", "2", "--name", "decoder",
          "--set", "init_from=student", "--set", "decoder_only=true", "--set", "codebook.enabled=false",
          "--set", "autoencoder.ddconfig.resolution=32")
    _, tuned = Registry(reg).resolve("decoder").state_dicts()
    _, source = Registry(reg).resolve("student").state_dicts()
    changed = {k for k in source if not torch.equal(tuned[k], source[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert main(["registry", "copy", "student", "--from", str(reg), "--registry", str(tmp_path / "serve"),
                 "--autoencoder", "decoder"]) == 0
    with pytest.raises(ValueError, match="decoder_only fine-tunes an init_from model"):
        AutoencoderTrainConfig(decoder_only=True, codebook={"enabled": False})


def test_init_from_a_different_architecture_is_a_readable_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = tmp_path / "registry"
    save_tiny_model(reg, name="source")
    argv = ["train", "autoencoder", "--config", "autoencoder-small", "--data", str(IMAGES), "--registry", str(reg),
            "--out", str(tmp_path / "run"), "--steps", "1", "--set", "run.device=cpu",
            "--set", "init_from=source", "--set", "autoencoder.n_embed=32"]
    assert main(argv) == 2
    assert "init_from source:1 autoencoder checkpoint does not match the architecture: 1 wrong shape" in capsys.readouterr().err
    with pytest.raises(ValueError, match="init_from starts from trained weights"):
        AutoencoderTrainConfig(init_from="source", init="resampler")


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
