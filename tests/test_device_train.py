"""benchmarks/device_train_real.sh, issue 14's one device call, in its tiny CPU mode: the three
real-world presets train end to end on a budget of seconds (run.max_minutes) from a JPEG crop
bank, and the script leaves what a device session fetches. So it cannot rot between the sessions
that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from model.cli import main
from model.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_chain_trains_the_real_presets_and_packs_the_results(tmp_path: Path) -> None:
    crops = tmp_path / "crops"
    assert main(["crops", str(ROOT / "tests" / "fixtures" / "images"), str(crops), "--size", "256",
                 "--count", "4", "--jpeg-quality", "95"]) == 0
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPDSR_")} | {
        "VPDSR_CHAIN_TINY": "1", "VPDSR_CHAIN_DATA": str(crops), "VPDSR_CHAIN_WORK": str(tmp_path / "work"),
        "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_train_real.sh")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"student.tar", "teacher.tar", "logs.tar", "chain.log"}
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())  # what the device tool brings back

    registry = tmp_path / "fetched"
    for name in ("student.tar", "teacher.tar", "logs.tar"):
        with tarfile.open(out / name) as tar:
            tar.extractall(registry if name != "logs.tar" else tmp_path / "logs", filter="data")
    student = Registry(registry).resolve("vpdsr-small:3")
    config = student.config()
    assert config.kind == "student" and config.tile_sizes == (64, 128)
    assert config.provenance["teacher"] == "resshift-real:1"
    assert config.provenance["training_config"]["run"]["max_minutes"] == 0.02
    assert set(config.provenance["losses"]) == {"distill", "hfp", "adversarial", "fidelity"}
    unet, autoencoder = student.state_dicts()
    assert {t.dtype for t in [*unet.values(), *autoencoder.values()] if t.is_floating_point()} == {torch.float16}
    assert Registry(registry).resolve("resshift-real:1").config().kind == "teacher"

    for stage, term in (("autoencoder", "loss/adversarial"), ("teacher", "loss/mse"), ("distill", "loss/adversarial")):
        rows = [json.loads(line) for line in (tmp_path / "logs" / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows and term in rows[-1], (stage, rows[-1])
