"""Training benchmark: seconds per VPD-SR distillation step (Algorithm 1) and peak GPU memory.

One step is exactly what ``vpdsr train distill`` runs per iteration (:meth:`training.trainer.Trainer.train_step`):
Real-ESRGAN degradation on the device, the teacher's 15-step sampling, the student's one step
forward and backward through L_distill + L_HFP + L_SD (CLIP image tower) + L_adv, the PatchGAN's
step, AdamW and the EMA update, under bf16 autocast on CUDA. The configuration is the paper's
preset (``training/configs/distill-vpdsr.yaml``: batch 16, 256² crops); the teacher, the autoencoder
and CLIP ViT-B/32 have random weights (speed does not depend on the values, and no pretrained CLIP
can be downloaded here). HR crops are random tensors made on the device, so the data loader is
not timed: the step, not the disk, is what the GPU target is about.

    python benchmarks/bench_train.py --registry REG --teacher random-teacher --device cuda --out train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from bench_model import peak_memory_gib, reset_peak_memory

from model.registry import Registry
from training.config_files import load_config, parse_override
from training.data import DataConfig
from training.distill_trainer import DistillStage, DistillTrainConfig
from training.trainer import Trainer


def distill_config(preset: str, teacher: str, device: str, out_dir: Path, sets: Sequence[str] = ()) -> DistillTrainConfig:
    """The preset with this teacher, a randomly initialised CLIP (unless ``sets`` give weights) and
    ``sets`` (``key=value`` overrides as ``vpdsr train --set`` takes them)."""
    overrides = [
        ("teacher", teacher), ("clip.random_weights_ok", True), ("run.device", device), ("run.out_dir", str(out_dir)),
    ]
    return load_config(DistillTrainConfig, preset, overrides + [parse_override(item) for item in sets])


def random_hr(data: DataConfig, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless HR batches in [0, 1], made on the device."""
    while True:
        yield torch.rand(data.batch_size, 3, data.crop_size, data.crop_size, device=device)


def time_steps(cfg: DistillTrainConfig, registry: Path, steps: int = 5, warmup: int = 2) -> dict[str, object]:
    """Median seconds of ``steps`` distillation steps after ``warmup`` untimed ones, and peak memory."""
    trainer = Trainer(cfg.run, cfg)
    try:
        stage = DistillStage(cfg, trainer, Registry(registry), alias=None)
        batches = random_hr(cfg.data, trainer.device)
        times = []
        for index in range(warmup + steps):
            if index == warmup:
                reset_peak_memory(trainer.device)
            started = time.perf_counter()
            trainer.train_step(stage, batches)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            times.append(time.perf_counter() - started)
        return {
            "batch": cfg.data.batch_size,
            "crop": cfg.data.crop_size,
            "step_s": statistics.median(times[warmup:]),
            "steps_s": times,
            "peak_mem_gib": peak_memory_gib(trainer.device),
            "precision": "fp32" if trainer.amp_dtype is None else str(trainer.amp_dtype).removeprefix("torch."),
        }
    finally:
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, required=True, help="registry holding the teacher")
    parser.add_argument("--teacher", required=True, help="registry reference of the teacher")
    parser.add_argument("--preset", default="distill-vpdsr")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = distill_config(args.preset, args.teacher, args.device, Path(tmp), args.sets)
        result = time_steps(cfg, args.registry, args.steps, args.warmup)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
