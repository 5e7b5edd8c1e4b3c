"""The default model's chain on tiny sizes: a continuous-latent autoencoder, a Real-ESRGAN teacher bank,
distillation from it into a servable one-step student, and bf16 autocast chosen by the CPU's units."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model.autoencoder import VQAutoencoder
from model.config import AutoencoderConfig, DDConfig
from model.pipeline import SRPipeline
from model.registry import Registry
from tests.test_trainer import IMAGES, check_resume_is_exact, metrics, train
from training.config_files import ConfigError, load_config, parse_override
from training.distill_trainer import DistillStage, DistillTrainConfig
from training.teacher_bank import TeacherBank, load_teacher, make_teacher_bank
from training.trainer import RunConfig, Trainer

CONTINUOUS = AutoencoderConfig(
    embed_dim=4, n_embed=0, ddconfig=DDConfig(resolution=32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                                              norm_groups=8, attn_type="none", z_channels=4)
)
# The distill-esrgan preset shrunk: 8² LR triples (32² HR), a UNet with 4-pixel windows, an autoencoder
# with a 4-channel latent.
TINY_PIXEL = [
    "pixel_teacher.autoencoder=ae-tiny", "pixel_teacher.unet.in_channels=4", "pixel_teacher.unet.out_channels=4",
    "pixel_teacher.unet.model_channels=32", "pixel_teacher.unet.channel_mult=[1, 2]",
    "pixel_teacher.unet.num_res_blocks=[1, 1]", "pixel_teacher.unet.swin_embed_dim=32",
    "pixel_teacher.unet.window_size=4", "pixel_teacher.unet.attention_resolutions=[32]",
]
PIXEL_TERMS = {"loss/distill", "loss/hfp", "loss/fidelity", "loss/pixel", "loss/pixel_hfp", "loss/decoder", "loss/total"}


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six Real-ESRGAN x4plus triples of 8² LR from the fixture photos (two shards of the real teacher)."""
    folder = tmp_path_factory.mktemp("bank")
    with mock.patch("training.teacher_bank.SHARD", 4):
        assert make_teacher_bank([IMAGES], folder, lr_size=8, count=6, seed=0) == 6
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    torch.manual_seed(0)
    from model.config import ModelConfig

    config = ModelConfig(autoencoder=CONTINUOUS, inference_steps=0, kind="autoencoder")
    Registry(root).save("ae-tiny", "1", config, {}, VQAutoencoder.from_config(CONTINUOUS).state_dict())
    return root


def test_continuous_latent_has_no_codebook_and_decodes_unchanged() -> None:
    autoencoder = VQAutoencoder.from_config(CONTINUOUS).eval()
    assert not any(key.startswith("quantize.") for key in autoencoder.state_dict())
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(autoencoder.decode(z, quantize=True), autoencoder.decode(z, quantize=False))
        _, codebook, commitment = autoencoder(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert float(codebook) == float(commitment) == 0.0


def test_autoencoder_with_continuous_latent_trains_with_the_wavelet_term(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    train("autoencoder", "autoencoder-continuous", root, tmp_path / "run", "--steps", "2", "--name", "ae",
          "--set", "data.crop_size=32", "--set", "run.max_minutes=null")
    assert {k for k in metrics(tmp_path / "run")[-1] if k.startswith("loss/")} == {"loss/l1", "loss/wavelet", "loss/total"}
    assert Registry(root).resolve("ae").config().autoencoder.n_embed == 0


def test_codebook_term_needs_a_codebook() -> None:
    from training.autoencoder_trainer import AutoencoderTrainConfig

    with pytest.raises(ConfigError, match="continuous latent"):
        load_config(AutoencoderTrainConfig, "autoencoder-continuous", [parse_override("codebook.enabled=true")])


def test_teacher_bank_holds_aligned_triples_and_streams_them_resumably(bank: Path) -> None:
    triples = TeacherBank(bank)
    assert len(triples) == 6 and len(list(bank.glob("shard-*.pt"))) == 2
    assert triples.meta["teacher"] == "realesrgan-x4plus"
    assert triples.lr.shape == (6, 3, 8, 8) and triples.teacher.shape == triples.hr.shape == (6, 3, 32, 32)
    # The teacher's image is a ×4 of the LR: its 4×4 box average is close to the LR, unlike a random pairing.
    down = torch.nn.functional.avg_pool2d(triples.teacher.float(), 4)
    assert (down - triples.lr.float()).abs().mean() < (down - triples.lr.float().roll(1, 0)).abs().mean()
    straight = triples.batches(2, seed=0)
    expected = [next(straight) for _ in range(5)]  # past an epoch of 3 batches
    resumed = next(triples.batches(2, seed=0, start_batch=4))
    assert all(torch.equal(a, b) for a, b in zip(resumed, expected[4]))


def test_the_bf16_teacher_stays_within_the_quality_guard_of_float32() -> None:
    """bf16 autocast + channels-last makes the bank 4× faster on AMX; its triples must be float32's
    up to rounding that no student can learn (the quality guard of serving: ≥ 40 dB)."""
    from torchvision.transforms.functional import to_tensor

    with Image.open(IMAGES / "101085.jpg") as photo:
        lr = torch.nn.functional.avg_pool2d(to_tensor(photo.convert("RGB"))[None], 4)[..., :24, :24]
    reference, fast = (load_teacher("realesrgan-x4plus", dtype)(lr) for dtype in (torch.float32, torch.bfloat16))
    assert fast.dtype == torch.float32 and fast.shape == reference.shape == (1, 3, 96, 96)
    mse = (fast - reference).pow(2).mean()
    assert 10 * torch.log10(1 / mse) >= 40


def test_distill_from_the_pixel_teacher_writes_a_servable_student(tmp_path: Path, bank: Path, registry: Path) -> None:
    sets = [item for s in [*TINY_PIXEL, f"pixel_teacher.bank={bank}", "run.max_minutes=null"] for item in ("--set", s)]
    train("distill", "distill-esrgan", registry, tmp_path / "run", "--steps", "2", "--name", "student", *sets)
    for row in metrics(tmp_path / "run"):
        assert {k for k in row if k.startswith("loss/")} == PIXEL_TERMS
    cfg = Registry(registry).resolve("student").config()
    assert (cfg.kind, cfg.inference_steps, cfg.autoencoder) == ("student", 1, CONTINUOUS)
    assert cfg.provenance["teacher"].startswith("realesrgan-x4plus") and cfg.provenance["teacher_bank"]["triples"] == 6
    image = Image.open(next(IMAGES.glob("*.jpg"))).crop((0, 0, 32, 32))
    assert SRPipeline.from_registry("student", registry)(image, seed=0).size == (128, 128)


def test_trained_decoder_is_published_and_the_encoder_stays(tmp_path: Path, bank: Path, registry: Path) -> None:
    sets = [*TINY_PIXEL, f"pixel_teacher.bank={bank}", "run.max_minutes=null", "pixel_teacher.train_decoder=true",
            "losses.decoder.enabled=true"]
    train("distill", "distill-esrgan", registry, tmp_path / "run", "--steps", "2", "--name", "student",
          "--set", "run.ema_decay=null", *[item for s in sets for item in ("--set", s)])
    assert "loss/decoder" in metrics(tmp_path / "run")[-1]
    _, before = Registry(registry).resolve("ae-tiny").state_dicts()
    _, after = Registry(registry).resolve("student").state_dicts()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])


def test_distill_from_the_pixel_teacher_resumes_exactly(tmp_path: Path, bank: Path, registry: Path) -> None:
    sets = [item for s in [*TINY_PIXEL, f"pixel_teacher.bank={bank}", "run.max_minutes=null"] for item in ("--set", s)]
    check_resume_is_exact("distill", "distill-esrgan", registry, tmp_path, *sets)


def test_image_discriminator_judges_the_decoded_student_against_the_teacher_image(
    tmp_path: Path, bank: Path, registry: Path
) -> None:
    """distill-esrgan-gan: L_adv's PatchGAN sees RGB images; its generator term reaches the student
    and the trained decoder, and its own loss (teacher image real, detached student fake) only itself."""
    overrides = [parse_override(s) for s in [*TINY_PIXEL, f"pixel_teacher.bank={bank}", "pixel_teacher.init_from=null"]]
    overrides += [("run.out_dir", str(tmp_path)), ("run.device", "cpu"), ("data.crop_size", 32), ("data.batch_size", 2)]
    cfg = load_config(DistillTrainConfig, "distill-esrgan-gan", overrides)
    trainer = Trainer(cfg.run, cfg)
    try:
        stage = DistillStage(cfg, trainer, Registry(registry), alias=None)
        discriminator = stage.adversary.part.module  # type: ignore[union-attr]
        assert discriminator.net[0].in_channels == 3
        out = stage.losses(next(stage.batches(0)), step=0)  # type: ignore[arg-type]
        assert set(out.log) >= PIXEL_TERMS | {"loss/adversarial", "loss/discriminator", "weight/adversarial"}
        out.minimise["student"].backward(retain_graph=True)
        for part in (stage.student.module, stage.decoder.module):  # type: ignore[union-attr]
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
        assert all(p.grad is None for p in discriminator.parameters())
        before = [p.grad.clone() for p in stage.student.module.parameters()]
        out.minimise["discriminator"].backward()
        assert all(p.grad is not None for p in discriminator.parameters())
        assert all(torch.equal(a, p.grad) for a, p in zip(before, stage.student.module.parameters()))  # fakes detached
    finally:
        trainer.close()


def test_a_gan_run_leaves_its_discriminator_for_the_next_one(tmp_path: Path, bank: Path, registry: Path) -> None:
    """A finished GAN run writes its discriminator (float16, no optimiser) into the run folder, and a
    later run's ``discriminator.init_from`` starts from exactly those weights, not a fresh judge."""
    sets = [item for s in [*TINY_PIXEL, f"pixel_teacher.bank={bank}", "pixel_teacher.init_from=null",
                           "data.crop_size=32", "data.batch_size=2"] for item in ("--set", s)]
    first = tmp_path / "first"
    train("distill", "distill-esrgan-gan", registry, first, "--steps", "2", *sets)
    saved = load_file(first / "discriminator.safetensors")
    assert saved and {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float16}
    overrides = [parse_override(s) for s in [*sets[1::2], f"discriminator.init_from={first / 'discriminator.safetensors'}"]]
    overrides += [("run.out_dir", str(tmp_path / "second")), ("run.device", "cpu")]
    cfg = load_config(DistillTrainConfig, "distill-esrgan-gan", overrides)
    trainer = Trainer(cfg.run, cfg)
    try:
        start = DistillStage(cfg, trainer, Registry(registry), alias=None).adversary.part.module.state_dict()  # type: ignore[union-attr]
    finally:
        trainer.close()
    assert start.keys() == saved.keys()
    assert all(torch.equal(start[k], saved[k].float()) for k in saved if saved[k].is_floating_point())


def test_hr_fidelity_in_pixels_reaches_the_student_and_the_decoder(tmp_path: Path, bank: Path, registry: Path) -> None:
    """losses.pixel_hr alone: L1 of the decoded student against the HR trains both trained parts."""
    off = [f"losses.{name}.enabled=false" for name in ("distill", "hfp", "fidelity", "pixel", "pixel_hfp")]
    overrides = [parse_override(s) for s in [*TINY_PIXEL, f"pixel_teacher.bank={bank}", "losses.pixel_hr.enabled=true", *off]]
    overrides += [("run.out_dir", str(tmp_path)), ("run.device", "cpu"), ("data.crop_size", 32), ("data.batch_size", 2)]
    cfg = load_config(DistillTrainConfig, "distill-esrgan", overrides)
    trainer = Trainer(cfg.run, cfg)
    try:
        stage = DistillStage(cfg, trainer, Registry(registry), alias=None)
        out = stage.losses(next(stage.batches(0)), step=0)  # type: ignore[arg-type]
        assert set(out.log) == {"loss/pixel_hr", "loss/decoder", "loss/total"}
        assert 0 < out.log["loss/pixel_hr"].item() < 2  # an L1 of images in [-1, 1]
        out.minimise["student"].backward()
        for part in (stage.student.module, stage.decoder.module):  # type: ignore[union-attr]
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    finally:
        trainer.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher=resshift"], "one teacher"),
        (["pixel_teacher=null", "teacher=resshift"], "losses.pixel"),
        (["teacher_steps=1"], "teacher_steps"),
        (["losses.decoder.enabled=false"], "train_decoder"),
    ],
)
def test_pixel_teacher_settings_are_checked(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(DistillTrainConfig, "distill-esrgan", [parse_override(o) for o in overrides])


@pytest.mark.parametrize(("units", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_precision_is_bf16_only_on_cpus_with_bf16_units(units: bool, expected: torch.dtype | None,
                                                              tmp_path: Path) -> None:
    with mock.patch("model.device.cpu_bf16_units", return_value=units):
        trainer = Trainer(RunConfig(device="cpu", out_dir=tmp_path), {})
    try:
        assert trainer.amp_dtype == expected
        assert trainer.memory_format == (torch.channels_last if units else torch.contiguous_format)
    finally:
        trainer.close()
