"""The ``vpdsr`` command line.

This module owns the entry point; every package adds its sub-commands through the
``vpdsr.commands`` entry-point group (a ``register(subparsers)`` function), so ``model`` needs no
import of ``service`` or ``training``. User mistakes (bad paths, unknown models, checkpoints that
do not fit) end with a one-line message and exit status 2, never a traceback; Ctrl-C ends with
one line and exit status 130.

Building the parser imports every package's ``cli`` module, so none of them imports PyTorch (or
anything else slow) at module level: ``vpdsr --help`` answers at once, and a command pays only
for what it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from . import batch, images
from .config import ModelConfig
from .errors import CheckpointError, InvalidRequest, ModelNotFound, VPDSRError
from .registry import Registry, RegistryEntry
from .seeds import SEED_LIMIT, check_seed

if TYPE_CHECKING:
    from typing import BinaryIO

    import torch

DEFAULT_MODEL = "vpdsr-small@production"
INTERRUPTED = 128 + 2  # the shell's status for a command ended by SIGINT
# The --options of the limits a local upscale applies (ImageLimits fields), for error messages.
LIMIT_OPTIONS = {"max_pixels": "--max-pixels", "max_side": "--max-side"}


def common_options() -> argparse.ArgumentParser:
    """Options every sub-command accepts (use as ``parents=[common_options()]``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--registry", type=Path, default=None, help="registry folder (default: $VPDSR_REGISTRY or ./registry)"
    )
    return parser


def device_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA and on CPUs with bf16 matrix units, else float32 (the reference)",
    )
    return parser


def upscale(args: argparse.Namespace) -> int:
    """Exit status 0 when every input was written or skipped, 2 when any failed (each is reported,
    and the others still run), as for every other error of the command line."""
    tasks = batch.plan(args.inputs, args.output, args.format)
    return 2 if batch.run(tasks, lambda: make_upscaler(args), overwrite=args.overwrite).failed else 0


def make_upscaler(args: argparse.Namespace) -> batch.Upscaler:
    if args.server is None:
        return LocalUpscaler(args)
    from client.remote import RemoteUpscaler  # the service's HTTP client, only for --server

    options = {"model": args.model, "steps": args.steps, "seed": args.seed, "tile": args.tile}
    return RemoteUpscaler(args.server, args.api_key, options)


class LocalUpscaler:
    """The model in this process. Loading it checks ``--steps``, ``--tile`` and ``--seed`` too (by
    the rules the service applies), so that a bad option stops the command before the first image
    instead of failing every one. Images are read and written by :mod:`model.images`, the
    service's policy, within the service's size limits (unless ``--max-pixels`` / ``--max-side``
    raise them): a small file can claim 13000² pixels, and gigabytes of memory."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .device import resolve_device, resolve_dtype  # heavy: only for the commands that run the model
        from .pipeline import SRPipeline

        self.device = resolve_device(args.device)
        self.pipe = SRPipeline.from_registry(
            args.model or DEFAULT_MODEL, Registry(args.registry, shipped=True),
            device=self.device, dtype=resolve_dtype(args.dtype, self.device),
        )
        self.steps = self.pipe.check_steps(args.steps)
        self.tile = self.pipe.check_tile(args.tile)
        self.seed = check_seed(args.seed)  # out of range: stop before the first image
        given = {"max_pixels": args.max_pixels, "max_side": args.max_side}
        self.limits = images.ImageLimits(**{name: value for name, value in given.items() if value is not None})

    def __call__(self, source: Path, out: BinaryIO, fmt: images.OutputFormat, progress: batch.Progress) -> batch.Upscaled:
        try:
            image = images.read_file(source, self.limits)
        except images.ImageRefused as exc:
            option = LIMIT_OPTIONS.get(exc.setting)
            raise batch.InputFailed(f"{exc}{f' ({option} raises it)' if option else ''}") from None
        except InvalidRequest as exc:  # not an image, corrupt, an unsupported pixel mode
            raise batch.InputFailed(str(exc)) from None
        # Without --seed the plan draws a random one per image, printed with the result.
        plan = self.pipe.plan(image, self.seed, self.tile)
        result = self.pipe.run_plan(plan, self.steps, progress)
        out.write(images.encode(result, fmt))
        pipe = self.pipe
        detail = f"{pipe.name}:{pipe.version}, {self.steps} step(s), seed {plan.seed}, {self.device}"
        return batch.Upscaled(result.size, detail)


def import_resshift(args: argparse.Namespace) -> int:
    from .checkpoint import import_resshift as run_import

    config = None
    if args.config is not None:
        if not args.config.is_file():
            raise VPDSRError(f"config not found: {args.config}")
        config = ModelConfig.from_resshift_yaml(args.config)
    entry = run_import(args.unet, args.autoencoder, Registry(args.registry), args.name,
                       config=config, version=args.version, alias=args.alias or None)
    print(f"imported {entry.ref} into {entry.path}")
    return 0


def registry_list(args: argparse.Namespace) -> int:
    registry = Registry(args.registry, shipped=True)
    rows = registry.list()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {' or '.join(str(root) for root in registry.roots)}")
    for row in rows:
        aliases = ",".join(row["aliases"]) or "-"
        print(f"{row['name']}:{row['version']}\t{row['kind']}\tsteps={row['inference_steps']}\taliases={aliases}")
    return 0


def swap_decoder(
    autoencoder: dict[str, torch.Tensor], config: ModelConfig, source: RegistryEntry
) -> dict[str, torch.Tensor]:
    """``autoencoder`` with the decoder side (``post_quant_conv``, ``decoder``) of ``source``, e.g. a
    ``decoder_only`` fine-tune. Refused unless the architecture, encoder and codebook are identical:
    only then does every latent the UNet was trained on stay the same."""
    import torch

    from .autoencoder import DECODER_SIDE

    _, other = source.state_dicts()
    same = source.config().autoencoder == config.autoencoder and other.keys() == autoencoder.keys() and all(
        torch.equal(other[k], v) for k, v in autoencoder.items() if not k.startswith(DECODER_SIDE)
    )
    if not same:
        raise CheckpointError(f"{source.ref} does not share this model's encoder and codebook: its decoder "
                              "would see latents it was not trained on")
    return {k: other[k] if k.startswith(DECODER_SIDE) else v for k, v in autoencoder.items()}


def registry_copy(args: argparse.Namespace) -> int:
    """Promote a model from one registry (e.g. a training run's) to another, optionally in half precision."""
    from .device import DTYPES

    entry = Registry(args.source).resolve(args.ref)
    unet, autoencoder = entry.state_dicts()
    config = entry.config()
    metrics = entry.metrics() or None
    if args.autoencoder:
        decoder = Registry(args.source).resolve(args.autoencoder)
        autoencoder = swap_decoder(autoencoder, config, decoder)
        config = dataclasses.replace(config, provenance=config.provenance | {"decoder": decoder.ref})
        metrics = None  # they were measured with the old decoder
    if args.tile_sizes:
        config = dataclasses.replace(config, tile_sizes=tuple(int(t) for t in args.tile_sizes.split(",")))
    if args.color_fix:
        config = dataclasses.replace(config, color_fix=args.color_fix)
    target = Registry(args.registry)
    version = args.version or target.next_version(entry.name)
    copied = target.save(
        entry.name, version, config, unet, autoencoder,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        metrics=metrics,
        aliases=(args.alias,) if args.alias else (),
    )
    print(f"copied {entry.ref} from {Registry(args.source).root} to {copied.ref} in {target.root}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    common, device = common_options(), device_options()

    p = sub.add_parser("upscale", parents=[common, device], help="upscale images ×4: files, folders or globs")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder (its images) or quoted glob")
    p.add_argument("output", type=Path, help="output file (for one input file, e.g. out.png) or output folder")
    p.add_argument("--model", default=None,
                   help=f"registry reference: name, name:version or name@alias (default: {DEFAULT_MODEL}; "
                   "with --server: the served model), looked for in --registry, then in the registry "
                   "shipped with vpd-sr")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's own)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"noise seed, 0 to {SEED_LIMIT - 1}: the same seed and options give the same result "
                   "(default: a random seed per image; the seed used is printed with each result)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile size in LR pixels, one of the model's tile sizes (default: automatic)")
    p.add_argument("--format", choices=("png", "jpeg", "webp"), default=None,
                   help="format of the results in an output folder (default: jpeg for JPEG inputs, else png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    limits = images.ImageLimits()
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help=f"skip inputs of more pixels (default: {limits.max_pixels}, the service's limit)")
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help=f"skip inputs with a longer side (default: {limits.max_side}, the service's limit)")
    p.add_argument("--server", metavar="URL", default=None,
                   help="send the images to a running `vpdsr serve` (e.g. http://127.0.0.1:8000) instead of "
                   "loading the model here")
    p.add_argument("--api-key", default=os.environ.get("VPDSR_API_KEY"),
                   help="with --server: the API key, if the server has any (default: $VPDSR_API_KEY)")
    p.set_defaults(handler=upscale)

    p = sub.add_parser("import-resshift", parents=[common], help="import official ResShift .pth checkpoints")
    p.add_argument("--unet", type=Path, required=True, help="e.g. resshift_realsrx4_s15_v1.pth")
    p.add_argument("--autoencoder", type=Path, required=True, help="e.g. autoencoder_vq_f4.pth")
    p.add_argument("--config", type=Path, default=None, help="ResShift YAML (default: v1 x4 real-SR)")
    p.add_argument("--name", required=True)
    p.add_argument("--version", default=None, help="default: next free number")
    p.add_argument("--alias", default="production", help="alias to point at the new version ('' for none)")
    p.set_defaults(handler=import_resshift)

    p = sub.add_parser("registry", help="inspect the model registry")
    reg = p.add_subparsers(dest="registry_command", required=True)
    p = reg.add_parser("list", parents=[common], help="list models, versions and aliases (of --registry, then of the registry shipped with vpd-sr)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=registry_list)
    p = reg.add_parser("copy", parents=[common], help="copy a model from another registry into --registry")
    p.add_argument("ref", help="model reference in the source registry")
    p.add_argument("--from", dest="source", type=Path, required=True, help="source registry folder")
    p.add_argument("--version", default=None, help="version in the target (default: next free number)")
    p.add_argument("--alias", default=None, help="alias to point at the copy, e.g. production")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default=None, help="store weights in half precision")
    p.add_argument("--tile-sizes", default=None, metavar="N,N", help="LR tile buckets to serve with, e.g. 32,64")
    p.add_argument("--color-fix", choices=["none", "wavelet"], default=None,
                   help="take each output tile's colour from the bicubic-upscaled input (model.color)")
    p.add_argument("--autoencoder", default=None, metavar="REF",
                   help="take the decoder from this source-registry entry (a decoder_only fine-tune of the "
                   "model's own autoencoder)")
    p.set_defaults(handler=registry_copy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpdsr", description="VPD-SR one-step diffusion super-resolution")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in sorted(entry_points(group="vpdsr.commands"), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args) or 0)
    except ModelNotFound as exc:
        searched = ", ".join(str(root) for root in exc.searched)
        print(f"vpdsr: error: {exc}{f' (looked in {searched})' if searched else ''}", file=sys.stderr)
        return 2
    except VPDSRError as exc:
        print(f"vpdsr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback; finished results are kept, partial ones removed
        print("vpdsr: interrupted (finished results are kept: run the same command again for the rest)",
              file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
