"""The one training loop (:class:`Trainer`) shared by the autoencoder, teacher and distillation stages.

A stage builds its networks, hands the trainable ones to :meth:`Trainer.add_part` (each *part*
gets its own AdamW, optional EMA copy and, under ``torchrun``, a DDP wrapper) and implements
:class:`Objective`: one micro-batch of HR crops in, one loss per part out. The trainer does the
rest, nanoGPT-style, in :meth:`Trainer.fit`:

    for step in range(start, steps):
        set every part's learning rate (warm-up, then constant or cosine)
        for each of grad_accum micro-batches:          # DDP gradient sync on the last one only
            losses = objective.losses(next HR batch)   # under bf16/fp16 autocast on GPUs
            backward every part's loss / grad_accum    # through the fp16 grad scaler if enabled
        clip, step and zero each optimiser; update the EMA copies
        log (tqdm + JSONL), checkpoint

After the last step the stage says what it publishes (:class:`Publication`: name, config, weights)
and :func:`train` writes it to the registry: versioning, aliases and the run's provenance are the
loop's, the same for every stage.

A generator and its discriminator are two parts that take a step in the same iteration (the
discriminator's loss uses detached fakes); :func:`frozen` keeps the discriminator's weights out
of the generator's backward pass.

Randomness: every rank seeds torch/NumPy/Python from ``seed + rank`` and owns :attr:`Trainer.generator`
(CPU) for the data side (degradations). Checkpoints store all of it for every rank, so a resumed run
reproduces the uninterrupted one bit for bit on the same hardware.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.config import ModelConfig
from model.device import resolve_dtype
from model.errors import CheckpointError
from model.provenance import git_commit
from model.registry import Registry, RegistryEntry

from . import checkpoints
from .config_files import Config, to_plain
from .data import DataConfig
from .distributed import Distributed
from .ema import EMA
from .stream import hr_batches

METRICS_FILE = "metrics.jsonl"


class OptimConfig(Config):
    """AdamW and its learning-rate schedule: linear warm-up, then constant or cosine to ``min_lr``."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    grad_clip: float | None = None
    """Clip the gradient norm of the part to this value (``None``: no clipping)."""

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of (0-based) optimiser step ``step``: a pure function, so resuming needs no state."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


class RunConfig(Config):
    """How long and how a run trains, where it writes, and how it is seeded.

    The effective batch is ``data.batch_size × grad_accum × number of processes``.
    """

    steps: int = Field(1000, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    """Wall-clock budget of the training loop: the run ends at the first step past it and
    checkpoints and publishes as if ``steps`` were reached. Learning-rate schedules then run on the
    steps the pace so far predicts, so a fixed-time run (a device lease) still anneals to ``min_lr``.
    Such a run depends on the machine's speed, so resuming it does not reproduce it bit for bit."""
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """``auto``: bf16 autocast on CUDA and on CPUs with bf16 matrix units (AMX, AVX-512 BF16), fp32
    elsewhere (emulated bf16 is slower than fp32). fp16 adds a dynamic grad scaler. Loss parts that
    need fp32 (VQ distances, wavelet bands, GroupNorm statistics) leave autocast themselves."""
    ema_decay: float | None = 0.999
    """Decay of the published EMA weights; ``None`` publishes the raw weights (no EMA copy)."""
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    device: str = "auto"
    out_dir: Path = Path("runs/train")


class StageConfig(Config):
    """What every stage's configuration holds for the loop (:func:`train`): the registry name it
    publishes under, its optimiser, its data and its run. A stage's config adds its networks and
    losses, and may change these defaults (``RunConfig(ema_decay=None)`` for the autoencoder)."""

    name: str
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    run: RunConfig = Field(default_factory=RunConfig)


@dataclass
class Part:
    """One trained network: the module itself (weights, EMA), what to call (DDP wrapper), its optimiser."""

    name: str
    module: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    optim: OptimConfig
    ema: EMA | None


class LossTerm(Config):
    """One switchable, weighted term of an objective (switching terms off gives the paper's ablations)."""

    enabled: bool = True
    weight: float = 1.0


@dataclass
class Losses:
    """What one micro-batch produced: a loss to minimise per part, and detached terms to log."""

    minimise: dict[str, Tensor]
    log: dict[str, Tensor] = field(default_factory=dict)


class Objective(Protocol):
    def losses(self, hr: Any, step: int) -> Losses:
        """``hr``: ``(B, 3, crop, crop)`` in [0, 1] on the training device, or a batch of the
        objective's own stream (an optional ``batches(start_batch) -> Iterator | None`` method: the
        trainer uses it when it returns an iterator); ``step``: optimiser step."""
        ...


@dataclass(frozen=True)
class Publication:
    """What a stage publishes after its last step: the model's registry name (and an alias to point
    at the new version), its config with the stage's own provenance, and its weights. :func:`train`
    numbers the version, adds the run's provenance, saves it and sets the alias."""

    name: str
    config: ModelConfig
    unet: dict[str, Tensor]
    autoencoder: dict[str, Tensor]
    alias: str | None = None
    companions: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """Networks trained beside the model but never served (the discriminator), by file stem:
    :func:`train` writes each into the run folder as ``STEM.safetensors`` in float16, small enough
    to commit, so that a later run on another machine can continue with it (its ``init_from``)
    where a full checkpoint, with optimiser moments, is too large to keep."""


class Stage(Objective, Protocol):
    """One training stage (autoencoder, teacher, distillation): an objective that says what it publishes."""

    def publication(self) -> Publication:
        """The trained model to write to the registry (asked on rank 0 after the last step)."""
        ...


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Use ``module`` without accumulating gradients into its weights (gradients still reach its input)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]) & (2**63 - 1)


class Trainer:
    """Device, processes, seeds, precision, parts, the loop, logs and checkpoints of one training run."""

    def __init__(self, run: RunConfig, config: Any) -> None:
        self.run = run
        self.config = to_plain(config)
        self.dist = Distributed.setup(run.device)
        self.device = self.dist.device
        self.out_dir = run.out_dir
        self.seed_rank(_derived_seed(run.seed, self.dist.rank))
        if run.precision == "auto":
            # The serving rule (model.device): bf16 on CUDA and on CPUs with bf16 units, else float32.
            self.amp_dtype = None if resolve_dtype("auto", self.device) == torch.float32 else torch.bfloat16
        else:
            self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[run.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # oneDNN's bf16 convolutions are the fast ones in channels-last (2.2× over contiguous on
        # this project's AMX CPU, docs/training.md); weights in that layout pull activations along.
        self.memory_format = torch.channels_last if self.amp_dtype is not None else torch.contiguous_format
        self.parts: dict[str, Part] = {}
        self.step = 0
        self.elapsed = 0.0

    def seed_rank(self, seed: int) -> None:
        """Seed this rank's torch (CPU and CUDA), NumPy and Python RNGs and its data-side generator."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(_derived_seed(seed, 1))

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def notice(self, message: str) -> None:
        """Tell the user something once (on rank 0), e.g. what a warm start left out."""
        if self.is_main:
            tqdm.write(message)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def add_part(self, name: str, module: nn.Module, optim: OptimConfig, ema: bool = False) -> Part:
        """Register a network to train; call before :meth:`resume` and :meth:`fit`."""
        module = module.to(self.device, memory_format=self.memory_format).train()
        net: nn.Module = module
        if self.dist.enabled:
            net = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        optimizer = torch.optim.AdamW(
            module.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
            fused=self.device.type == "cuda",
        )
        # Only rank 0 publishes weights, so only rank 0 pays for the EMA copy.
        use_ema = ema and self.is_main and self.run.ema_decay is not None
        shadow = EMA(module, self.run.ema_decay) if use_ema else None  # type: ignore[arg-type]
        self.parts[name] = Part(name, module, net, optimizer, optim, shadow)
        return self.parts[name]

    def weights(self, name: str) -> dict[str, Tensor]:
        """The weights to publish for a part: its EMA copy if it has one."""
        part = self.parts[name]
        return (part.ema.module if part.ema is not None else part.module).state_dict()

    def provenance(self, data: DataConfig) -> dict[str, Any]:
        """What every trained registry entry records about its training run."""
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        return {
            "data": [str(source) for source in data.sources],
            "steps": self.step,
            "samples_seen": self.step * data.batch_size * self.run.grad_accum * self.dist.world_size,
            "git_commit": git_commit(),
            "wall_time_s": round(self.elapsed, 1),
            "hardware": {
                "device": device,
                "processes": self.dist.world_size,
                "precision": "fp32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
            },
            "training_config": self.config,
        }

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, objective: Objective, data: DataConfig) -> None:
        """Train from :attr:`step` to ``run.steps`` (or until ``run.max_minutes``), logging and
        checkpointing on the way. Batches are ``data``'s HR crops, unless the objective brings its
        own stream (the optional ``batches`` method of :class:`Objective`, e.g. a pixel teacher's bank of triples)."""
        run = self.run
        start_batch = self.step * run.grad_accum
        batches = objective.batches(start_batch) if hasattr(objective, "batches") else None
        if batches is None:
            batches = hr_batches(
                data, self.device, rank=self.dist.rank, world_size=self.dist.world_size, start_batch=start_batch
            )
        samples_per_step = data.batch_size * run.grad_accum * self.dist.world_size
        log = self._open_metrics() if self.is_main else None
        planned = self.planned_steps()
        bar = tqdm(total=planned, initial=self.step, disable=not self.is_main, dynamic_ncols=True, unit="step")
        window: dict[str, Tensor] = {}
        window_steps, window_time, tick = 0, 0.0, time.perf_counter()
        try:
            while self.step < planned:
                lrs, terms = self.train_step(objective, batches, planned)
                for key, value in terms.items():
                    window[key] = window.get(key, 0.0) + value
                self.step += 1
                bar.update(1)
                now = time.perf_counter()
                self.elapsed += now - tick
                window_steps, window_time, tick = window_steps + 1, window_time + now - tick, now
                planned = bar.total = self.planned_steps()
                last = self.step >= planned
                if self.step % run.log_every == 0 or last:
                    row = self.dist.mean({k: float(v) / window_steps for k, v in window.items()})
                    row |= {f"lr/{name}": lr for name, lr in lrs.items()}
                    row["samples_per_s"] = samples_per_step * window_steps / window_time
                    if log is not None:
                        log.write(json.dumps({"step": self.step, "elapsed_s": round(self.elapsed, 3)} | row) + "\n")
                        log.flush()
                        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith("loss")}, refresh=False)
                    window, window_steps, window_time = {}, 0, 0.0
                if self.step % run.checkpoint_every == 0 or last:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log is not None:
                log.close()

    def planned_steps(self) -> int:
        """The step the run ends at: ``run.steps``, or, under ``run.max_minutes``, fewer when the
        pace so far says the budget runs out first (the current step once it has)."""
        run = self.run
        if run.max_minutes is None or self.step == 0:
            return run.steps
        # The mean over ranks: every rank must stop at, and schedule by, the same step.
        elapsed = self.dist.mean({"elapsed_s": self.elapsed})["elapsed_s"]
        budget = run.max_minutes * 60
        if elapsed >= budget:
            return self.step
        return min(run.steps, max(self.step + 1, round(self.step * budget / elapsed)))

    def train_step(
        self, objective: Objective, batches: Iterator[Any], total_steps: int | None = None
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """One optimiser step of every part at :attr:`step` (which the caller advances) of a run of
        ``total_steps`` (default ``run.steps``): learning rates, ``grad_accum`` micro-batches
        forward and backward, optimisers and EMA copies. Public so that a benchmark times exactly
        the step that :meth:`fit` runs. Returns the learning rates and the step's logged terms."""
        lrs = self._set_learning_rates(total_steps or self.run.steps)
        terms, stepping = self._accumulate(objective, batches)
        return lrs, terms | self._optimise(stepping)

    def _set_learning_rates(self, total_steps: int) -> dict[str, float]:
        lrs = {}
        for name, part in self.parts.items():
            lrs[name] = part.optim.lr_at(self.step, total_steps)
            for group in part.optimizer.param_groups:
                group["lr"] = lrs[name]
        return lrs

    def _accumulate(self, objective: Objective, batches: Iterator[Any]) -> tuple[dict[str, Tensor], list[str]]:
        """Forward and backward ``grad_accum`` micro-batches: the mean of their logged terms, and the
        parts that got a loss."""
        accum = self.run.grad_accum
        totals: dict[str, Tensor] = {}
        stepping: list[str] = []
        for micro in range(accum):
            hr = next(batches)
            if isinstance(hr, Tensor):
                hr = hr.contiguous(memory_format=self.memory_format)
            with self._gradient_sync(micro == accum - 1):
                with self.autocast():
                    out = objective.losses(hr, self.step)
                for name, loss in out.minimise.items():
                    self.scaler.scale(loss.float() / accum).backward()
                    if name not in stepping:
                        stepping.append(name)
            for key, value in out.log.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / accum
        return totals, stepping

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Under DDP, all-reduce gradients only on the last micro-batch of a step."""
        stack = contextlib.ExitStack()
        if not sync:
            for part in self.parts.values():
                if isinstance(part.net, DistributedDataParallel):
                    stack.enter_context(part.net.no_sync())
        return stack

    def _optimise(self, stepping: list[str]) -> dict[str, Tensor]:
        """Step the optimisers of the parts that got a loss (a step without gradients must be skipped
        with a grad scaler), then the EMA copies; returns the gradient norms when clipping."""
        norms = {}
        for name in [n for n in self.parts if n in stepping]:
            part = self.parts[name]
            if part.optim.grad_clip is not None:
                self.scaler.unscale_(part.optimizer)
                norms[f"grad_norm/{name}"] = torch.nn.utils.clip_grad_norm_(part.module.parameters(), part.optim.grad_clip)
            self.scaler.step(part.optimizer)
            part.optimizer.zero_grad(set_to_none=True)
            if part.ema is not None:
                part.ema.update(part.module)
        self.scaler.update()
        return norms

    # -- logs and checkpoints --------------------------------------------------------------------
    def _open_metrics(self) -> TextIO:
        """Open ``metrics.jsonl`` for appending, first dropping rows past the step we resume from
        (written by a run that went on after its last checkpoint, the last one perhaps cut short by
        the crash), so that the log reads as one run."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / METRICS_FILE
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
            path.write_text("".join(kept))
        return path.open("a")

    def save_checkpoint(self) -> None:
        """Write ``out_dir/checkpoints/step-N.pt`` (rank 0), with the random state of every rank."""
        rng = self.dist.gather(checkpoints.capture_rng(self.generator))
        if self.is_main:
            state = {
                "step": self.step,
                "elapsed_s": self.elapsed,
                "world_size": self.dist.world_size,
                "parts": {
                    name: {
                        "model": part.module.state_dict(),
                        "optimizer": part.optimizer.state_dict(),
                        "ema": part.ema.state_dict() if part.ema is not None else None,
                    }
                    for name, part in self.parts.items()
                },
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "config": self.config,
            }
            checkpoints.save(state, self.out_dir / "checkpoints", self.step, self.run.keep_checkpoints)
        self.dist.barrier()

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint (a file, or a checkpoint folder for its newest file)."""
        state = checkpoints.load(path)
        missing = sorted(set(self.parts) - set(state["parts"]))
        if missing:
            raise CheckpointError(f"checkpoint {path} has no state for {missing}")
        for name, part in self.parts.items():
            saved = state["parts"][name]
            part.module.load_state_dict(saved["model"])
            part.optimizer.load_state_dict(saved["optimizer"])
            if part.ema is not None:
                part.ema.load_state_dict(saved["ema"] if saved["ema"] is not None else saved["model"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed_s"])
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            checkpoints.restore_rng(rng[self.dist.rank], self.generator)
        else:
            warnings.warn(
                f"checkpoint was written by {len(rng)} process(es), this run has {self.dist.world_size}: "
                "training continues, but not bit-exactly like the original run",
                stacklevel=2,
            )
            self.seed_rank(_derived_seed(self.run.seed, self.dist.rank, self.step))

    def close(self) -> None:
        self.dist.close()


def train(
    config: StageConfig, registry: Registry, build: Callable[[Trainer], Stage], resume: str | Path | None = None
) -> RegistryEntry | None:
    """The life of a run: set up, build the stage's networks, resume, fit, publish (rank 0), tear down.

    Publishing writes the stage's :class:`Publication` as ``<name>:<next version>`` of ``registry``,
    its provenance extended by the run's (:meth:`Trainer.provenance`). Returns the registry entry on
    rank 0, ``None`` on the other ranks.
    """
    trainer = Trainer(config.run, config)
    try:
        stage = build(trainer)
        if resume is not None:
            trainer.resume(resume)
        trainer.fit(stage, config.data)
        if not trainer.is_main:
            return None
        out = stage.publication()
        model_config = replace(out.config, provenance=out.config.provenance | trainer.provenance(config.data))
        aliases = (out.alias,) if out.alias else ()
        version = registry.next_version(out.name)
        entry = registry.save(out.name, version, model_config, out.unet, out.autoencoder, aliases=aliases)
        for stem, state in out.companions.items():
            checkpoints.save_half(state, trainer.out_dir / f"{stem}.safetensors")
        return entry
    finally:
        trainer.close()
