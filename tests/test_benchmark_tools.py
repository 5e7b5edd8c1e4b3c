"""benchmarks/centre_crops.py, benchmarks/autoencoder_recon.py, benchmarks/bench_cpu.py and
benchmarks/student_widths.py on fixture images and a tiny model."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import FIXTURES, save_tiny_model, tiny_config

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def benchmarks_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_centre_crops_are_centred_squares_and_small_images_give_their_own(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (300, 200), "white").save(src / "wide.png")
    Image.new("RGB", (100, 90), "white").save(src / "small.jpg")
    assert importlib.import_module("centre_crops").main([str(src), str(tmp_path / "out"), "--size", "128"]) == 0
    sizes = {p.name: Image.open(p).size for p in (tmp_path / "out").iterdir()}
    assert sizes == {"wide.png": (128, 128), "small.png": (90, 90)}


def test_autoencoder_recon_prints_psnr_and_niqe_per_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_tiny_model(tmp_path / "registry", name="tiny")
    data = tmp_path / "hr"
    data.mkdir()
    Image.open(next((FIXTURES / "heldout" / "CSet5").glob("*.png"))).convert("RGB").crop((0, 0, 200, 200)).save(data / "a.png")
    module = importlib.import_module("autoencoder_recon")
    assert module.main(["--registry", str(tmp_path / "registry"), "--data", str(data), "tiny"]) == 0
    references, line = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"HR itself: NIQE \d+\.\d\d; bicubic of the x1/4 LR: PSNR-Y \d+\.\d\d NIQE \d+\.\d\d "
                        r"\(1 images of .*\)", references), references
    assert re.fullmatch(r"tiny:1: PSNR-Y \d+\.\d\d NIQE \d+\.\d\d \(1 images of .*\)", line), line


def test_bench_cpu_quick_reports_every_part_of_issue_28(tmp_path: Path) -> None:
    """benchmarks/bench_cpu.py end to end on a tiny model (Real-ESRGAN aside: its 17 M parameters
    take minutes on a small CPU; compare.py's tests cover loading it): the report's schema, not speed."""
    registry = tmp_path / "registry"
    save_tiny_model(registry, config=dataclasses.replace(tiny_config(), tile_sizes=(16,)))
    out, table = tmp_path / "cpu.json", tmp_path / "cpu.md"
    module = importlib.import_module("bench_cpu")
    assert module.main([
        "--quick", "--model", "tiny", "--registry", str(registry), "--no-full-size", "--sizes", "16",
        "--parts", "ceiling,models,http,compile", "--compile-backend", "eager", "--out", str(out), "--markdown", str(table),
    ]) == 0
    report = json.loads(out.read_text())
    for kernel in ("gemm", "conv3x3"):
        assert set(report["ceiling"][kernel]) == {"float32", "bfloat16"}
        assert all(rate > 0 for rates in report["ceiling"][kernel].values() for rate in rates.values())
    (entry,) = report["models"]
    assert [(row["path"], row["lr"], row["sr"], row["tile"]) for row in entry["rows"]] == [
        ("float32", 16, 64, 16), ("fast", 16, 64, 16),
    ]
    assert entry["fast_path"]["channels_last"] and set(entry["tile_seconds"]) == {"16"}
    assert all(row["gflop_per_image"] > 0 and row["ceiling_pct"] > 0 for row in entry["rows"])
    assert entry["guard_psnr_db"]["16"] >= 40
    http = report["http"]
    assert http["ok"] == http["requests"] and http["healthz_p50_ms"] > 0 and "http_overhead_share" in http
    assert [row["tile"] for row in report["compile"]["rows"]] == [16] and report["compile"]["verdict"]
    assert {"fast_over_float32", "http_overhead_share", "healthz_p50_ms", "guard_min_psnr_db"} <= set(report["targets"])
    assert "| tiny | fast" in table.read_text()


def test_student_widths_times_each_width_with_the_entrys_autoencoder(tmp_path: Path) -> None:
    """benchmarks/student_widths.py on the tiny model: one row per width, more parameters as it widens."""
    save_tiny_model(tmp_path / "registry")
    out = tmp_path / "widths.json"
    module = importlib.import_module("student_widths")
    assert module.main(["--model", "tiny", "--registry", str(tmp_path / "registry"), "--widths", "32,64",
                        "--size", "32", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["widths"]
    assert [row["model_channels"] for row in rows] == [32, 64]
    assert rows[0]["unet_params_m"] < rows[1]["unet_params_m"] and all(row["seconds_per_image"] > 0 for row in rows)
