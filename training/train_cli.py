"""``vpdsr train {autoencoder,teacher,distill}``: the three training stages on the command line.

Registered in the ``vpdsr`` command line through the ``vpdsr.commands`` entry-point group
(``train = "training.train_cli:register"``). Each stage reads a typed config (a YAML/TOML file or a
preset name from ``training/configs``); the common flags below and ``--set section.field=value``
override it. Under ``torchrun`` every process runs the same command (see docs/training.md).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.cli import common_options
from model.registry import Registry

from .config_files import load_config, parse_override


def _train_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", required=True, help="YAML/TOML file, or a preset name such as teacher-small")
    parser.add_argument("--data", type=Path, action="append", default=None, metavar="DIR|LIST",
                        help="HR images: a folder or a .txt list of paths (repeatable; replaces data.sources)")
    parser.add_argument("--name", default=None, help="registry name of the trained model (default: the config's)")
    parser.add_argument("--alias", default=None, help="also point this alias (e.g. production) at the new version")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (run.steps)")
    parser.add_argument("--out", type=Path, default=None, help="run folder for checkpoints and metrics.jsonl (run.out_dir)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda (run.device)")
    parser.add_argument("--resume", type=Path, default=None, metavar="CKPT",
                        help="checkpoint file, or a run's checkpoints/ folder for its newest one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set losses.hfp.enabled=false (repeatable)")
    return parser


def _overrides(args: argparse.Namespace, extra: dict[str, Any]) -> list[tuple[str, Any]]:
    """``--set`` items first, then the dedicated flags that were given (they win)."""
    flags = {
        "name": args.name,
        "run.steps": args.steps,
        "run.out_dir": args.out,
        "run.device": args.device,
        "data.sources": args.data,
    }
    given = [(key, value) for key, value in flags.items() if value is not None]
    return [parse_override(item) for item in args.overrides] + given + list(extra.items())


def _handler(module: str, config_cls: str, extra: Callable[[argparse.Namespace], dict[str, Any]]):
    """The stage's trainer module is imported only when that stage runs: `vpdsr serve` must not pay
    for (or depend on) open_clip and pytorch_wavelets."""

    def run(args: argparse.Namespace) -> int:
        trainer = importlib.import_module(f"training.{module}")
        cfg = load_config(getattr(trainer, config_cls), args.config, _overrides(args, extra(args)))
        entry = trainer.train(cfg, Registry(args.registry), resume=args.resume, alias=args.alias)
        if entry is not None:
            print(f"wrote {entry.ref} ({entry.config().kind}) to {entry.path}")
        return 0

    return run


def _teacher_flags(args: argparse.Namespace) -> dict[str, Any]:
    if args.autoencoder is not None:
        return {"autoencoder.ref": args.autoencoder, "autoencoder.checkpoint": None}
    if args.autoencoder_checkpoint is not None:
        return {"autoencoder.checkpoint": args.autoencoder_checkpoint, "autoencoder.ref": None}
    return {}


def _distill_flags(args: argparse.Namespace) -> dict[str, Any]:
    weights = str(args.clip_weights) if args.clip_weights is not None else None
    flags: dict[str, Any] = {"teacher": args.teacher, "clip.pretrained_path": weights}
    return {key: value for key, value in flags.items() if value is not None}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vpdsr train …`` to the ``vpdsr`` parser."""
    parser = subparsers.add_parser("train", help="train the autoencoder, the teacher or the one-step student")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    parents = [common_options(), _train_options()]

    p = stages.add_parser("autoencoder", parents=parents, help="the VQGAN f4 autoencoder (reconstruction)")
    p.set_defaults(handler=_handler("autoencoder_trainer", "AutoencoderTrainConfig", lambda _: {}))

    p = stages.add_parser("teacher", parents=parents, help="the multi-step ResShift teacher")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--autoencoder", default=None, metavar="REF", help="registry entry holding the frozen autoencoder")
    source.add_argument("--autoencoder-checkpoint", type=Path, default=None, metavar="FILE",
                        help="official autoencoder_vq_f4.pth instead (architecture from autoencoder.config)")
    p.set_defaults(handler=_handler("teacher_trainer", "TeacherTrainConfig", _teacher_flags))

    p = stages.add_parser("distill", parents=parents, help="the one-step VPD-SR student from a teacher")
    p.add_argument("--teacher", default=None, metavar="REF", help="registry entry of the teacher")
    p.add_argument("--clip-weights", type=Path, default=None, metavar="FILE",
                   help="local open_clip weights for the semantic loss (clip.pretrained_path)")
    p.set_defaults(handler=_handler("distill_trainer", "DistillTrainConfig", _distill_flags))
