"""The shared training machinery: typed configs, the resumable data stream, the LR schedule.

Also holds the helpers of the other ``test_train_*`` files: fast settings for the small presets,
running ``vpdsr train …`` in-process, and comparing two training checkpoints bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

from model.cli import main
from training.autoencoder_trainer import AutoencoderTrainConfig
from training.config_files import PRESETS, ConfigError, load_config, parse_override
from training.distill_trainer import DistillTrainConfig
from training.trainer import OptimConfig, RunConfig, Trainer
from training.stream import ResumableSampler
from training.teacher_trainer import TeacherTrainConfig

IMAGES = Path(__file__).parent / "fixtures" / "images"

# The small presets shrunk further for tests: 32² HR crops (8² LR and latents), batches of 2.
FAST = [
    "data.crop_size=32", "data.batch_size=2", "data.num_workers=0",
    "run.device=cpu", "run.log_every=1", "run.checkpoint_every=2", "run.keep_checkpoints=5",
]


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Every test of this module on one torch thread (conftest's one_thread)."""


def train(stage: str, config: str, registry: Path, out: Path, *args: str) -> None:
    """``vpdsr train <stage>`` on the fixture photos, with the FAST settings."""
    sets = [item for s in FAST for item in ("--set", s)]
    argv = ["train", stage, "--config", config, "--data", str(IMAGES), "--registry", str(registry),
            "--out", str(out), *sets, *args]
    assert main(argv) == 0


def torchrun(stage: str, config: str, registry: Path, out: Path, *args: str) -> None:
    """The same as :func:`train` in two Gloo processes on the CPU, as ``torchrun`` would start them."""
    sets = [item for s in FAST for item in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "model.cli", "train", stage, "--config", config, "--data", str(IMAGES), "--registry", str(registry),
           "--out", str(out), *sets, *args]
    done = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def metrics(out: Path) -> list[dict[str, Any]]:
    """The JSONL log without its timing columns (which differ between runs)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("elapsed_s", "samples_per_s")} for row in rows]


def assert_identical(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Nested state (dicts, lists, tensors, numbers) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def check_resume_is_exact(stage: str, config: str, registry: Path, tmp_path: Path, *args: str) -> None:
    """4 steps straight vs 2 steps + resume + 2 steps: same weights, EMA, optimisers, RNG and losses.

    The interrupted run goes on to step 3 after its step-2 checkpoint, as a crashed job would: the
    resumed run must forget that step, metrics included.
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(stage, config, registry, straight, "--steps", "4", *args)
    train(stage, config, registry, resumed, "--steps", "3", *args)
    checkpoint = resumed / "checkpoints" / "step-0000002.pt"
    train(stage, config, registry, resumed, "--steps", "4", "--resume", str(checkpoint), *args)
    a = torch.load(straight / "checkpoints" / "step-0000004.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step-0000004.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert_identical(a["parts"], b["parts"], "parts")
    assert_identical(a["rng"], b["rng"], "rng")
    assert_identical(a["scaler"], b["scaler"], "scaler")
    assert metrics(straight) == metrics(resumed)
    # Training moved the weights (so the comparison above is not trivially true).
    first = torch.load(straight / "checkpoints" / "step-0000002.pt", weights_only=True)
    name = next(iter(a["parts"]))
    assert any(not torch.equal(first["parts"][name]["model"][k], v) for k, v in a["parts"][name]["model"].items())


# -- configs ---------------------------------------------------------------------------------------
PRESET_CLASSES = {"autoencoder": AutoencoderTrainConfig, "teacher": TeacherTrainConfig, "distill": DistillTrainConfig}


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads(path: Path) -> None:
    cls = PRESET_CLASSES[path.stem.split("-")[0]]
    cfg = load_config(cls, path.stem)
    assert cfg.run.steps > 0 and cfg.data.crop_size % 4 == 0


def test_paper_presets() -> None:
    distill = load_config(DistillTrainConfig, "distill-vpdsr")
    assert distill.data.batch_size * distill.run.grad_accum == 16 and distill.run.steps == 30_000
    assert distill.optim.lr == 5e-5
    assert distill.losses.enabled() == {"distill": 1.0, "hfp": 0.1, "semantic": 1.0, "adversarial": 0.1}
    teacher = load_config(TeacherTrainConfig, "teacher-resshift-v1")
    assert teacher.diffusion.steps == 15 and teacher.unet.model_channels == 160 and teacher.optim.lr == 5e-5


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"run: unknown key\(s\) \['stepz'\]"):
        load_config(TeacherTrainConfig, bad)
    with pytest.raises(ConfigError, match="run.steps: expected int"):
        load_config(TeacherTrainConfig, None, [("run.steps", "many")])
    with pytest.raises(ConfigError, match="losses.hfp.weight: expected a number"):
        load_config(DistillTrainConfig, None, [parse_override("losses.hfp.weight=[1]")])
    with pytest.raises(ConfigError, match="config not found: nope"):
        load_config(TeacherTrainConfig, "nope")


def test_toml_and_partial_nested_blocks_keep_their_defaults(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("[degradation.second]\nblur_prob = 0.5\n[run]\nsteps = 7\n")
    cfg = load_config(TeacherTrainConfig, path)
    defaults = TeacherTrainConfig().degradation.second
    assert cfg.degradation.second.blur_prob == 0.5 and cfg.run.steps == 7
    assert cfg.degradation.second.kernel == defaults.kernel and cfg.degradation.second.resize_range == defaults.resize_range


# -- data stream and schedule ----------------------------------------------------------------------
def test_sampler_resumes_mid_stream_and_shards_ranks() -> None:
    whole = list(islice(ResumableSampler(10, 2, seed=3), 30))
    assert list(islice(ResumableSampler(10, 2, seed=3, start=14), 16)) == whole[14:]
    assert sorted(i for i, _ in whole[:10]) == list(range(10))  # an epoch visits every image once
    assert whole[:10] != whole[10:20]  # and the next epoch reshuffles (new crop seeds too)
    ranks = [list(islice(ResumableSampler(10, 2, seed=3, rank=r, world_size=2), 4)) for r in range(2)]
    seen = [i for shard in ranks for i, _ in shard]
    assert len(set(seen)) == 8  # 10 images → 2 whole batches per rank, no image twice
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ResumableSampler(3, 2, seed=0, world_size=2)


def test_learning_rate_schedule() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr=0.1)
    assert [cfg.lr_at(s, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cfg.lr_at(9, 14) == pytest.approx(0.55)
    assert cfg.lr_at(14, 14) == pytest.approx(0.1)
    assert OptimConfig(lr=2.0).lr_at(10**6, 10) == 2.0


def test_time_budget_plans_the_last_step() -> None:
    """Under run.max_minutes a run ends where its pace says the budget runs out (run.steps at most),
    and its learning-rate schedule is laid over those steps."""
    trainer = Trainer(RunConfig(steps=1000, max_minutes=1.0, device="cpu", out_dir=Path("unused")), {})
    assert trainer.planned_steps() == 1000  # no pace yet
    trainer.step, trainer.elapsed = 10, 30.0
    assert trainer.planned_steps() == 20
    trainer.step, trainer.elapsed = 10, 0.1
    assert trainer.planned_steps() == 1000
    trainer.step, trainer.elapsed = 25, 60.5
    assert trainer.planned_steps() == 25  # out of time: the step just taken was the last
    assert Trainer(RunConfig(steps=7, device="cpu"), {}).planned_steps() == 7


def test_a_config_extends_a_preset_and_changes_only_what_it_names(tmp_path: Path) -> None:
    """``extends``: nested blocks merge key by key over the base preset; a cycle is a clear error."""
    child = tmp_path / "child.yaml"
    child.write_text("extends: distill-esrgan\npixel_teacher: {init_from: vpdsr-small:2}\nrun: {max_minutes: 5}\n")
    base, cfg = load_config(DistillTrainConfig, "distill-esrgan"), load_config(DistillTrainConfig, child)
    assert cfg.pixel_teacher is not None and base.pixel_teacher is not None
    assert cfg.pixel_teacher.init_from == "vpdsr-small:2" and cfg.run.max_minutes == 5
    assert cfg.pixel_teacher.unet == base.pixel_teacher.unet and cfg.run.steps == base.run.steps
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(DistillTrainConfig, tmp_path / "a.yaml")
