"""How well registry autoencoders reconstruct held-out HR images: PSNR-Y (4-pixel border) and NIQE.

    python benchmarks/autoencoder_recon.py --registry runs/real-registry --data ../shared/data/eval/CSet5 \
        vq-f4-real vq-f4-real-decoder

The ceiling of every model in that latent space: the diffusion stages can at best hand the decoder
the HR image's own latent. Any entry with autoencoder weights works (autoencoders, teachers,
students). Prints the bar first (the HR images' own NIQE; bicubic of their ×1/4 LR), then one line
per entry; one CPU thread.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.autoencoder import VQAutoencoder
from model.checkpoint import load_into
from model.registry import Registry
from training.data import list_images
from training.eval_data import read_image
from training.niqe import niqe
from training.quality import psnr_y


def reconstruct(autoencoder: VQAutoencoder, image: Image.Image) -> Image.Image:
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        y = autoencoder.decode(autoencoder.encode(x), quantize=True)
    return Image.fromarray(((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())


def print_references(images: list[Image.Image], data: Path) -> None:
    """The bar of the same run: the HR images' own NIQE, and bicubic of their ×1/4 LR (PIL)."""
    own, psnr, quality = [], [], []
    for image in images:
        hr = image.crop((0, 0, image.width // 4 * 4, image.height // 4 * 4))
        lr = hr.resize((hr.width // 4, hr.height // 4), Image.Resampling.BICUBIC)
        bicubic = lr.resize(hr.size, Image.Resampling.BICUBIC)
        own.append(niqe(np.asarray(hr)))
        psnr.append(psnr_y(bicubic, hr, border=4))
        quality.append(niqe(np.asarray(bicubic)))
    print(f"HR itself: NIQE {statistics.fmean(own):.2f}; bicubic of the x1/4 LR: PSNR-Y {statistics.fmean(psnr):.2f} "
          f"NIQE {statistics.fmean(quality):.2f} ({len(images)} images of {data})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="REF")
    parser.add_argument("--registry", type=Path, default=None)
    parser.add_argument("--data", type=Path, required=True, help="folder of HR images")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = [read_image(p).convert("RGB") for p in list_images([args.data])]
    print_references(images, args.data)
    for ref in args.models:
        entry = Registry(args.registry).resolve(ref)
        autoencoder = VQAutoencoder.from_config(entry.config().autoencoder)
        load_into(autoencoder, {k: v.float() for k, v in entry.state_dicts()[1].items()}, "autoencoder")
        factor = autoencoder.downsample_factor
        psnr, quality = [], []
        for image in images:
            hr = image.crop((0, 0, image.width // factor * factor, image.height // factor * factor))
            out = reconstruct(autoencoder.eval(), hr)
            psnr.append(psnr_y(out, hr, border=4))
            quality.append(niqe(np.asarray(out)))
        print(f"{entry.ref}: PSNR-Y {statistics.fmean(psnr):.2f} NIQE {statistics.fmean(quality):.2f} "
              f"({len(images)} images of {args.data})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
