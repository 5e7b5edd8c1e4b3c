"""The `vpdsr` command line: official checkpoint import, upscale, registry listing, clear errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from model.cli import main
from tests.conftest import FIXTURES, tiny_config


def write_official_checkpoints(tmp_path: Path) -> tuple[Path, Path, Path]:
    """.pth files as the official release stores them, plus a ResShift-style YAML for the tiny config."""
    from model import SwinUNet, VQAutoencoder

    cfg = tiny_config()
    torch.manual_seed(0)
    unet, vq = SwinUNet.from_config(cfg.unet), VQAutoencoder.from_config(cfg.autoencoder)
    unet_path, vq_path, yaml_path = tmp_path / "unet.pth", tmp_path / "vq.pth", tmp_path / "tiny.yaml"
    # DDP-wrapped keys inside a {"state_dict": ...} wrapper, as training frameworks save them.
    torch.save({"state_dict": {f"module.{k}": v for k, v in unet.state_dict().items()}}, unet_path)
    torch.save({f"_orig_mod.{k}": v for k, v in vq.state_dict().items()}, vq_path)
    yaml_path.write_text(yaml.safe_dump({
        "model": {"target": "models.unet.UNetModelSwin", "params": dataclasses.asdict(cfg.unet)},
        "autoencoder": {"target": "ldm.models.autoencoder.VQModelTorch", "params": dataclasses.asdict(cfg.autoencoder)},
        "diffusion": {"target": "models.script_util.create_gaussian_diffusion",
                      "params": {"sf": 4, "schedule_name": "exponential", "schedule_kwargs": {"power": 0.3},
                                 "etas_end": 0.99, "steps": 15, "min_noise_level": 0.04, "kappa": 2.0}},
    }))
    return unet_path, vq_path, yaml_path


CROP = (56, 40)  # an odd shape, a few tiles: the whole photo would only cost minutes


def crop_of(photo: Path, out: Path) -> Path:
    """A centre crop of a real photo, saved losslessly."""
    with Image.open(photo) as image:
        x, y = (image.width - CROP[0]) // 2, (image.height - CROP[1]) // 2
        image.crop((x, y, x + CROP[0], y + CROP[1])).save(out)
    return out


def test_import_then_upscale_real_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unet_path, vq_path, yaml_path = write_official_checkpoints(tmp_path)
    reg = tmp_path / "registry"
    assert main(["import-resshift", "--unet", str(unet_path), "--autoencoder", str(vq_path),
                 "--config", str(yaml_path), "--name", "resshift", "--registry", str(reg)]) == 0
    assert (reg / "resshift" / "1" / "model.safetensors").is_file()
    out = tmp_path / "out.png"
    src = crop_of(FIXTURES / "realset" / "bag1.jpeg", tmp_path / "bag1-crop.png")
    assert main(["upscale", str(src), str(out), "--model", "resshift", "--steps", "2",
                 "--registry", str(reg), "--device", "cpu"]) == 0
    assert Image.open(out).size == (4 * CROP[0], 4 * CROP[1])
    assert main(["registry", "list", "--registry", str(reg)]) == 0
    assert "resshift:1\tteacher\tsteps=15\taliases=production" in capsys.readouterr().out


def test_clear_errors(tmp_path: Path, tiny_registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unet_path, vq_path, _ = write_official_checkpoints(tmp_path)
    cases = [
        # Tiny weights against the built-in full-size v1 config: shapes do not fit.
        (["import-resshift", "--unet", str(unet_path), "--autoencoder", str(vq_path), "--name", "x",
          "--registry", str(tmp_path / "r")], "does not match the architecture"),
        (["import-resshift", "--unet", str(tmp_path / "missing.pth"), "--autoencoder", str(vq_path),
          "--name", "x", "--registry", str(tmp_path / "r")], "checkpoint not found"),
        (["upscale", str(tmp_path / "missing.png"), str(tmp_path / "o.png"), "--registry", str(tiny_registry)],
         "input image not found"),
        (["upscale", str(FIXTURES / "realset" / "bears.jpg"), str(tmp_path / "o.png"), "--model", "nope",
          "--registry", str(tiny_registry)], "unknown model"),
        (["upscale", str(FIXTURES / "realset" / "bears.jpg"), str(tmp_path / "o.png"), "--model", "../x",
          "--registry", str(tiny_registry)], "invalid model name"),
        (["upscale", str(unet_path), str(tmp_path / "o.png"), "--model", "tiny", "--registry", str(tiny_registry)],
         "cannot read"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_console_script_runs(tiny_registry: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("vpdsr")
    out = tmp_path / "o.png"
    src = crop_of(FIXTURES / "realset" / "bears.jpg", tmp_path / "bears-crop.png")
    proc = subprocess.run([str(exe), "upscale", str(src), str(out),
                           "--model", "tiny@production", "--registry", str(tiny_registry)],
                          capture_output=True, text=True)  # pytest-timeout bounds a hang; load only slows it
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (CROP[0] * 4, CROP[1] * 4)
