"""The CPU fast path (issue 28): ``auto`` on CPUs with and without bf16 units (the capability probe
mocked), threads from the cores the process may use, and tile sizes picked by measured cost.

The speed itself is measured by benchmarks/bench_cpu.py (its JSON and docs/performance.md), never
in a timed test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model import SRPipeline, device
from model.device import resolve_threads, usable_cpus


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("bf16_units", [True, False])
def test_the_default_pipeline_is_the_fast_path_of_the_cpu(
    tiny_registry: Path, monkeypatch: pytest.MonkeyPatch, bf16_units: bool
) -> None:
    monkeypatch.setattr(device, "cpu_bf16_units", lambda: bf16_units)
    pipe = SRPipeline.from_registry("tiny", tiny_registry)
    assert pipe.dtype is (torch.bfloat16 if bf16_units else torch.float32)
    assert pipe.autocast is bf16_units  # bf16 on the CPU: autocast over float32 weights
    assert pipe.autoencoder.encoder.conv_in.weight.dtype is torch.float32
    assert pipe.autoencoder.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.describe_path() == {
        "device": "cpu", "dtype": "bfloat16" if bf16_units else "float32", "autocast": bf16_units,
        "channels_last": True, "compile": None, "threads": torch.get_num_threads(),
    }
    reference = SRPipeline.from_registry("tiny", tiny_registry, dtype=torch.float32, channels_last=False)
    assert reference.describe_path()["dtype"] == "float32" and not reference.autocast


def test_usable_cpus_follow_the_cgroup_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == cores  # no cpu.max: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == cores
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still gets a thread
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1


def test_threads_are_capped_at_the_usable_cores(monkeypatch: pytest.MonkeyPatch, restore_threads: None) -> None:
    monkeypatch.setattr(device, "usable_cpus", lambda: 1)
    assert resolve_threads() == 1 == torch.get_num_threads()
    assert resolve_threads(3) == 3 == torch.get_num_threads()  # VPDSR_THREADS / threads= is taken as given


def test_tile_size_is_the_cheapest_measured_for_the_image(tiny_registry: Path) -> None:
    pipe = SRPipeline.from_registry("tiny", tiny_registry, dtype=torch.float32)
    assert pipe.tile_sizes == (16, 32)
    # Before any measurement: the smallest tile that holds the image, else the largest.
    assert pipe.layout(12, 10).tile == 16 and pipe.layout(30, 20).tile == 32 and pipe.layout(100, 60).tile == 32
    pipe.tile_seconds = {16: 1.0, 32: 2.0}  # a 32² tile costs less than its 4× area: fewer, larger tiles
    assert pipe.layout(12, 10).tile == 16 and pipe.layout(100, 60).tile == 32
    pipe.tile_seconds = {16: 1.0, 32: 10.0}  # per-pixel cost grows with the tile: small tiles
    assert pipe.layout(30, 20).tile == 16 and pipe.layout(100, 60).tile == 16
    assert pipe.layout(100, 60, tile=32).tile == 32  # a requested tile is never second-guessed


def test_warmup_measures_what_layout_picks_by(tiny_registry: Path) -> None:
    pipe = SRPipeline.from_registry("tiny", tiny_registry, dtype=torch.float32)
    seconds = pipe.warmup([1])
    assert set(seconds) == {16, 32} and pipe.tile_seconds == seconds and min(seconds.values()) > 0
