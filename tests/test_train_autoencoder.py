"""``vpdsr train autoencoder``: an autoencoder-only registry entry, and exact resumption (GAN on)."""

from __future__ import annotations

from pathlib import Path

from model.autoencoder import VQAutoencoder
from model.checkpoint import load_into
from model.registry import Registry
from tests.test_train_engine import IMAGES, check_resume_is_exact, metrics, train


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
