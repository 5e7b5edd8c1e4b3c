"""``vpdsr train teacher``: a ResShift teacher that ``vpdsr upscale`` runs, and exact resumption."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from model.cli import main
from model.registry import Registry
from tests.conftest import TINY_AUTOENCODER, save_tiny_model
from tests.test_trainer import IMAGES, check_resume_is_exact, metrics, train


def test_teacher_from_a_registry_autoencoder_runs_in_vpdsr_upscale(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    save_tiny_model(reg, name="vq")
    train("teacher", "teacher-small", reg, tmp_path / "run", "--steps", "2", "--autoencoder", "vq", "--name", "teacher")
    entry = Registry(reg).resolve("teacher")
    cfg = entry.config()
    assert (cfg.kind, cfg.inference_steps, cfg.diffusion.steps) == ("teacher", 15, 15)
    assert cfg.provenance["autoencoder"] == "vq" and cfg.provenance["steps"] == 2
    # The frozen autoencoder is copied in unchanged.
    _, trained_vq = entry.state_dicts()
    _, source_vq = Registry(reg).resolve("vq").state_dicts()
    assert all(torch.equal(trained_vq[k], v) for k, v in source_vq.items())
    assert "loss/mse" in metrics(tmp_path / "run")[0]

    image, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.open(next(IMAGES.glob("*.jpg"))).crop((0, 0, 24, 16)).save(image)
    assert main(["upscale", str(image), str(out), "--model", "teacher", "--steps", "15",
                 "--registry", str(reg), "--device", "cpu"]) == 0
    assert Image.open(out).size == (96, 64)


def test_teacher_fine_tunes_a_students_unet(tmp_path: Path) -> None:
    """``init_from`` a student of the same UNet: the run starts from its weights, not from scratch."""
    reg = tmp_path / "registry"
    save_tiny_model(reg, name="student")
    train("teacher", "teacher-small", reg, tmp_path / "run", "--steps", "1", "--autoencoder", "student",
          "--name", "teacher", "--set", "init_from=student", "--set", "optim.lr=1.0e-6", "--set", "run.ema_decay=null")
    entry = Registry(reg).resolve("teacher")
    assert entry.config().provenance["init_from"] == "student:1"
    tuned, _ = entry.state_dicts()
    source, _ = Registry(reg).resolve("student").state_dicts()
    assert tuned.keys() == source.keys()
    assert max((tuned[k] - source[k]).abs().max().item() for k in tuned) < 1e-3


def test_teacher_resume_is_exact_with_an_official_checkpoint_and_accumulation(tmp_path: Path) -> None:
    from model.autoencoder import VQAutoencoder

    torch.manual_seed(0)
    pth = tmp_path / "autoencoder_vq_f4.pth"
    # As the official release stores it (a DDP-prefixed state dict in a .pth pickle).
    torch.save({f"module.{k}": v for k, v in VQAutoencoder.from_config(TINY_AUTOENCODER).state_dict().items()}, pth)
    arch = "{embed_dim: 3, n_embed: 64, ddconfig: {resolution: 32, ch: 32, ch_mult: [1, 1, 2], num_res_blocks: 1}}"
    check_resume_is_exact("teacher", "teacher-small", tmp_path / "registry", tmp_path,
                          "--autoencoder-checkpoint", str(pth), "--set", f"autoencoder.config={arch}",
                          "--set", "run.grad_accum=2")
    provenance = Registry(tmp_path / "registry").resolve("resshift-small").config().provenance
    assert provenance["autoencoder"] == "checkpoint:autoencoder_vq_f4.pth"
    assert provenance["samples_seen"] == 4 * 2 * 2


def test_training_latents_match_the_inference_pipeline(tiny_registry: Path) -> None:
    """The trainers' codec, built from registry weights, gives the pipeline's z_y and decoding."""
    from model.pipeline import SRPipeline
    from model.registry import Registry
    from training.latents import build_codec

    # The reference (contiguous) layout: channels-last kernels sum in another order, not bit-equal.
    pipe = SRPipeline.from_registry("tiny", tiny_registry, channels_last=False)
    _, vq_state = Registry(tiny_registry).resolve("tiny").state_dicts()
    codec = build_codec(pipe.config.autoencoder, vq_state, pipe.config.diffusion, torch.device("cpu"))
    lq = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z_y = codec.encode_lr(lq)
    torch.testing.assert_close(z_y, pipe.codec.encode_lr(lq), rtol=0, atol=0)
    torch.testing.assert_close(codec.decode(z_y), pipe.codec.decode(z_y), rtol=0, atol=0)
