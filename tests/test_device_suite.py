"""benchmarks/device_suite.sh, the one command a device session runs for issue 16, in its tiny CPU
mode: every part runs and gpu.json fits the issue's schema, so the suite cannot rot between the
sessions that have a GPU. The budget logic (a failed or stopped part is recorded, the rest goes
on) is checked on the Python side without running models."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# The suite bounds itself: every part has a budget within this total, and is stopped 15 s past
# it (killed 15 s later); merging the parts then takes seconds. The test waits for it to finish,
# however slowly a loaded machine runs it, and its timeout only guards that bound.
SUITE_S = 480


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    """benchmarks/device_suite.py as a module (it imports its neighbours, as when run)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("device_suite")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.timeout(SUITE_S + 120)
def test_tiny_suite_writes_the_schema(tmp_path: Path, suite: ModuleType) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPDSR_")} | {
        "VPDSR_SUITE_TINY": "1", "VPDSR_SUITE_WORK": str(tmp_path / "work"), "OUT": str(out),
        "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "VPDSR_SUITE_SECONDS": str(SUITE_S),
    }
    script = BENCHMARKS / "device_suite.sh"
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((out / "gpu.json").read_text())
    assert suite.schema_problems(doc) == []
    assert doc["errors"] == {}, doc["errors"]
    tiny = suite.TINY
    rows = {(r["path"], r["lr"], r["batch"]) for r in doc["model"]}
    paths = ("optimised", "eager-bf16", "eager-fp32")
    assert rows == {(path, lr, b) for path in paths for lr in tiny.resolutions for b in tiny.batches}
    assert doc["large"]["side"] == tiny.large_side and doc["train"]["batch"] == 2
    assert 0 < doc["bf16_rel_err"] < 1 and doc["ready_s"]["cold"] > 0 and doc["http"]["images_per_s_32_clients"] > 0
    table = (out / "gpu.md").read_text()
    assert "| optimised | 16 → 64 | 1 |" in table and "ready time, warm compile cache" in table
    assert {"suite.log", "server.log"} <= {p.name for p in out.iterdir()}


def test_schema_problems_name_what_is_wrong(suite: ModuleType) -> None:
    row = {"path": "optimised", "lr": 64, "batch": 1, "images_per_s": 1.0, "p50_ms": 1.0, "p95_ms": 1.0,
           "peak_mem_gib": 1.0, "tflops": 1.0}
    doc = {"gpu": "H200", "driver": "580", "torch": "2.11", "command": "bash", "model": [row, row | {"lr": "64"}],
           "large": {"side": 2048, "seconds": float("nan"), "peak_mem_gib": 1},
           "bf16_rel_err": None, "http": {"p50_ms_one_64": 1.0, "images_per_s_32_clients": 2.0},
           "train": {"batch": 16, "step_s": 1.0, "peak_mem_gib": 1.0}, "ready_s": {"cold": 1.0}}
    assert suite.schema_problems(doc) == [
        "gpu.json.model[1].lr: expected int, got '64'",
        "gpu.json.large.seconds: expected float, got nan",
        "gpu.json.bf16_rel_err: expected float, got None",
        "gpu.json.ready_s.warm_cache: missing",
    ]


def test_a_part_that_failed_or_wrote_nothing_is_recorded(tmp_path: Path, suite: ModuleType) -> None:
    """merge still writes gpu.json and gpu.md: the issue's keys hold None and the errors say why."""
    log = suite.PartLog(tmp_path, "model", budget_s=60)
    assert log.attempt("broken", lambda: 1 / 0) is None
    log.set("bf16_rel_err", 0.004)
    past = suite.PartLog(tmp_path, "train", budget_s=-1)
    assert past.attempt("late", lambda: "never run") is None
    doc = suite.merge(tmp_path, "bash benchmarks/device_suite.sh", "reduce-overhead", tiny=False)
    assert doc["bf16_rel_err"] == 0.004 and doc["http"]["p50_ms_one_64"] is None
    assert doc["errors"] == {
        "prepare": ["the part wrote nothing"],
        "http": ["the part wrote nothing"],
        "train": ["late: skipped: the part's time budget is spent"],
        "model": ["broken: ZeroDivisionError: division by zero"],
    }
    assert "gpu.json.http.p50_ms_one_64: expected float, got None" in suite.schema_problems(doc)
    assert "- model: broken: ZeroDivisionError" in suite.markdown(doc)


def test_a_part_interrupted_at_its_limit_keeps_what_it_measured(
    tmp_path: Path, suite: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shell's ``timeout -s INT`` reaches the part as KeyboardInterrupt: it saves and exits 0."""

    def interrupted(log, *_: object) -> None:
        log.set("ready_cold_s", 12.5)
        raise KeyboardInterrupt

    monkeypatch.setattr(suite, "http", interrupted)
    assert suite.main(["http", "--work", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "http.json").read_text())
    assert saved["ready_cold_s"] == 12.5 and saved["errors"] == ["http: stopped at its time limit"]
