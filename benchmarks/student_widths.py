"""What a wider one-step student would cost on this CPU, before training one.

    python benchmarks/student_widths.py --model vpdsr-small:5 --registry checkpoints/registry \
        --widths 64,96,128 --out benchmarks/results/cpu-student-widths.json

Each width is the given student's UNet with ``model_channels`` and ``swin_embed_dim`` set to it and
random weights (timing only), served by the same pipeline at its default settings (dtype ``auto``,
the entry's tile sizes and colour fix) with the entry's trained autoencoder. Median seconds per
image over ``--repeats`` runs after one warm-up, one thread, one process, the widths in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from model import Registry, SRPipeline
from model.unet import SwinUNet

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = ROOT / "tests" / "fixtures" / "realset" / "bag1.jpeg"


def time_widths(model: str, registry: Path, widths: list[int], size: int, repeats: int, image: Path) -> list[dict]:
    """One row per width: UNet parameters (millions) and median seconds per ``size``² LR image."""
    source = Registry(registry).resolve(model)
    config = source.config()
    _, autoencoder = source.state_dicts()
    lr = Image.open(image).convert("RGB").crop((0, 0, size, size))
    rows = []
    for width in widths:
        unet_config = dataclasses.replace(config.unet, model_channels=width, swin_embed_dim=width)
        unet = SwinUNet.from_config(unet_config)
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        pipe = SRPipeline.from_state_dicts(dataclasses.replace(config, unet=unet_config), unet.state_dict(), autoencoder)
        pipe(lr, seed=0)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            pipe(lr, seed=0)
            seconds.append(time.perf_counter() - start)
        rows.append({"model_channels": width, "unet_params_m": round(params, 2),
                     "seconds_per_image": statistics.median(seconds)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registry reference of the student to widen")
    p.add_argument("--registry", type=Path, default=ROOT / "registry")
    p.add_argument("--widths", default="64,96,128", help="model_channels to time, comma-separated")
    p.add_argument("--size", type=int, default=128, help="LR side of the test image")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="photo the test image is cut from")
    p.add_argument("--out", type=Path, required=True, help="the JSON report")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    widths = [int(w) for w in args.widths.split(",")]
    rows = time_widths(args.model, args.registry, widths, args.size, args.repeats, args.image)
    report = {"model": args.model, "lr_size": args.size, "threads": 1, "torch": torch.__version__, "widths": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"model_channels {row['model_channels']}: {row['unet_params_m']} M, {row['seconds_per_image']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
