"""``vpdsr train distill``: every loss on, a loadable one-step student, exact resumption, gradient flow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.cli import main
from model.pipeline import SRPipeline
from model.registry import Registry
from tests.conftest import save_tiny_model
from tests.test_trainer import FAST, IMAGES, assert_identical, check_resume_is_exact, metrics, torchrun, train
from training.config_files import load_config, parse_override
from training.distill_trainer import DistillStage, DistillTrainConfig
from training.trainer import Trainer
from training.stream import hr_batches

# A CLIP whose image tower is one 32² transformer layer: random weights, built in milliseconds.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
ALL_TERMS = {"loss/distill", "loss/hfp", "loss/semantic", "loss/adversarial", "loss/total", "loss/discriminator"}


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    save_tiny_model(root, name="tiny-teacher", kind="teacher", inference_steps=15)
    return root


@pytest.fixture
def tiny_clip(tmp_path: Path) -> list[str]:
    """``--set`` arguments selecting the tiny, randomly initialised CLIP."""
    path = tmp_path / "vpdsr-train-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    sets = [f"clip.model_config_path={path}", "clip.model_name=vpdsr-train-tiny-clip", "clip.random_weights_ok=true",
            "discriminator.network.n_layers=2"]
    return [item for s in sets for item in ("--set", s)]


def test_distill_with_every_loss_writes_a_one_step_student(tmp_path: Path, registry: Path, tiny_clip: list[str]) -> None:
    train("distill", "distill-small", registry, tmp_path / "run", "--steps", "2", "--teacher", "tiny-teacher",
          "--name", "student", *tiny_clip)
    entry = Registry(registry).resolve("student")
    cfg = entry.config()
    assert (cfg.kind, cfg.inference_steps) == ("student", 1)
    prov = cfg.provenance
    assert prov["teacher"] == "tiny-teacher:1" and prov["steps"] == 2
    assert prov["losses"] == {"distill": 1.0, "hfp": 0.1, "semantic": 1.0, "adversarial": 0.1}
    assert prov["clip"] == {"model_name": "vpdsr-train-tiny-clip", "weights": None}
    for row in metrics(tmp_path / "run"):  # each term logged separately
        assert {k for k in row if k.startswith("loss/")} == ALL_TERMS

    pipe = SRPipeline.from_registry("student", registry)
    image = Image.open(next(IMAGES.glob("*.jpg"))).crop((0, 0, 16, 16))
    assert pipe(image, seed=0).size == (64, 64)


def test_distill_resume_is_exact(tmp_path: Path, registry: Path, tiny_clip: list[str]) -> None:
    check_resume_is_exact("distill", "distill-small", registry, tmp_path, "--teacher", "tiny-teacher", *tiny_clip)
    parts = torch.load(tmp_path / "straight" / "checkpoints" / "step-0000004.pt", weights_only=True)["parts"]
    assert set(parts) == {"student", "discriminator"}


def test_distill_under_torchrun_resumes_exactly(tmp_path: Path, registry: Path, tiny_clip: list[str]) -> None:
    """Two processes: DDP student and discriminator, rank 0 alone writes, every rank's RNG in the checkpoint."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--teacher", "tiny-teacher", "--steps", "4", *tiny_clip]
    torchrun("distill", "distill-small", registry, straight, *args)
    checkpoint = straight / "checkpoints" / "step-0000002.pt"
    torchrun("distill", "distill-small", registry, resumed, *args, "--resume", str(checkpoint))
    a = torch.load(straight / "checkpoints" / "step-0000004.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step-0000004.pt", weights_only=True)
    assert_identical(a["parts"], b["parts"], "parts")
    assert_identical(a["rng"], b["rng"], "rng")
    assert metrics(resumed) == metrics(straight)[2:]
    assert a["world_size"] == 2 and len(a["rng"]) == 2
    assert not torch.equal(a["rng"][0]["generator"], a["rng"][1]["generator"])  # ranks degrade differently
    assert Registry(registry).resolve("vpdsr-small").config().provenance["hardware"]["processes"] == 2


def test_gradients_reach_the_student_only(tmp_path: Path, registry: Path, tiny_clip: list[str]) -> None:
    overrides = [parse_override(s) for s in FAST + tiny_clip[1::2]]
    overrides += [("teacher", "tiny-teacher"), ("data.sources", [str(IMAGES)]), ("run.out_dir", str(tmp_path))]
    cfg = load_config(DistillTrainConfig, "distill-small", overrides)
    trainer = Trainer(cfg.run, cfg)
    try:
        stage = DistillStage(cfg, trainer, Registry(registry), alias=None)
        out = stage.losses(next(hr_batches(cfg.data, trainer.device)), step=0)
        assert set(out.log) == ALL_TERMS
        out.minimise["student"].backward()
        student = stage.student.module
        assert all(p.grad is not None for p in student.parameters())
        assert sum(float(p.grad.abs().sum()) for p in student.parameters()) > 0
        discriminator = stage.adversary.part.module  # type: ignore[union-attr]
        frozen = [stage.teacher, stage.latents.autoencoder, stage.clip]
        for module in [*frozen, discriminator]:
            assert all(p.grad is None for p in module.parameters())
        assert not any(p.requires_grad for m in frozen for p in m.parameters())

        before = [p.grad.clone() for p in student.parameters()]
        out.minimise["discriminator"].backward()
        assert all(p.grad is not None for p in discriminator.parameters())
        assert all(torch.equal(a, p.grad) for a, p in zip(before, student.parameters()))  # fakes were detached
    finally:
        trainer.close()


def test_semantic_loss_needs_clip_weights_unless_switched_off(
    tmp_path: Path, registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "distill", "--config", "distill-small", "--data", str(IMAGES), "--registry", str(registry),
            "--teacher", "tiny-teacher", "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs CLIP weights" in err and "--clip-weights" in err and "Traceback" not in err
    assert main([*argv, "--clip-weights", str(tmp_path / "missing.bin")]) == 2
    assert "not found" in capsys.readouterr().err
    # The L_SD ablation runs without any CLIP.
    train("distill", "distill-small", registry, tmp_path / "ablation", "--steps", "1", "--teacher", "tiny-teacher",
          "--set", "losses.semantic.enabled=false", "--set", "losses.adversarial.enabled=false")
    assert {k for k in metrics(tmp_path / "ablation")[0] if k.startswith("loss/")} == {"loss/distill", "loss/hfp", "loss/total"}
    assert Registry(registry).resolve("vpdsr-small").config().provenance["losses"] == {"distill": 1.0, "hfp": 0.1}


def test_fidelity_term_is_off_by_default_and_logged_when_on(tmp_path: Path, registry: Path) -> None:
    """L_fid (MSE to the HR latent) is not the paper's: only a config that asks for it gets it."""
    train("distill", "distill-small", registry, tmp_path / "run", "--steps", "1", "--teacher", "tiny-teacher",
          "--set", "losses.semantic.enabled=false", "--set", "losses.adversarial.enabled=false",
          "--set", "losses.fidelity.enabled=true", "--set", "losses.fidelity.weight=0.5")
    row = metrics(tmp_path / "run")[0]
    assert {k for k in row if k.startswith("loss/")} == {"loss/distill", "loss/hfp", "loss/fidelity", "loss/total"}
    assert row["loss/total"] == pytest.approx(row["loss/distill"] + 0.1 * row["loss/hfp"] + 0.5 * row["loss/fidelity"], rel=1e-5)
    assert Registry(registry).resolve("vpdsr-small").config().provenance["losses"] == {"distill": 1.0, "hfp": 0.1, "fidelity": 0.5}


def test_adaptive_adversarial_weight_is_logged_and_checked(tmp_path: Path, registry: Path, tiny_clip: list[str]) -> None:
    """``adaptive_weight`` scales λ_adv by VQGAN's gradient ratio; the factor is logged every step."""
    train("distill", "distill-small", registry, tmp_path / "run", "--steps", "2", "--teacher", "tiny-teacher",
          "--name", "balanced", "--set", "adaptive_weight=true", *tiny_clip)
    rows = metrics(tmp_path / "run")
    assert rows and all(row["weight/adversarial"] > 0 for row in rows)
    with pytest.raises(Exception, match="adaptive_weight balances"):
        from training.config_files import load_config
        from training.distill_trainer import DistillTrainConfig

        load_config(DistillTrainConfig, "distill-small", [("adaptive_weight", True), ("losses.adversarial.enabled", False)])


def test_teacher_steps_sets_the_distillation_target(
    tmp_path: Path, registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``teacher_steps: 1`` distils the teacher's own single step: the student starts as a copy of
    the teacher, so its first L_distill is zero (up to rounding). More steps than the schedule has is a user error."""
    only_mse = ["--set", "losses.semantic.enabled=false", "--set", "losses.adversarial.enabled=false",
                "--set", "losses.hfp.enabled=false"]
    train("distill", "distill-small", registry, tmp_path / "run", "--steps", "1", "--teacher", "tiny-teacher",
          "--set", "teacher_steps=1", *only_mse)
    assert metrics(tmp_path / "run")[0]["loss/distill"] < 1e-10  # float rounding alone
    assert Registry(registry).resolve("vpdsr-small").config().provenance["teacher_steps"] == 1
    argv = ["train", "distill", "--config", "distill-small", "--data", str(IMAGES), "--registry", str(registry),
            "--teacher", "tiny-teacher", "--out", str(tmp_path / "bad"), "--steps", "1", "--set", "teacher_steps=16",
            *only_mse]
    assert main(argv) == 2
    assert "teacher_steps 16 exceeds the teacher's 15 diffusion steps" in capsys.readouterr().err


def test_image_discriminator_takes_the_hr_without_a_pixel_teacher(tmp_path: Path, registry: Path) -> None:
    """``discriminator_input: image`` with a ResShift teacher: RGB PatchGAN, HR real, decoded student fake."""
    train("distill", "distill-small", registry, tmp_path / "run", "--steps", "1", "--teacher", "tiny-teacher",
          "--set", "losses.semantic.enabled=false", "--set", "discriminator_input=image",
          "--set", "discriminator.network.n_layers=2")
    assert {"loss/adversarial", "loss/discriminator"} <= set(metrics(tmp_path / "run")[0])
    provenance = Registry(registry).resolve("vpdsr-small").config().provenance
    assert provenance["discriminator"]["input"] == "image"
