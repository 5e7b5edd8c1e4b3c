"""benchmarks/compare.py: bicubic, registry models and Real-ESRGAN side by side on tiny images."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from model.errors import VPDSRError

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def compare(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module (it imports its neighbour benchmarks/crops.py, as when run)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("compare")


@pytest.fixture
def registry(tiny_registry: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_registry, tmp_path / "registry"))


@pytest.fixture
def hr_dir(tmp_path: Path) -> Path:
    """Two HR images whose LR (16², 12×16) is one tile of the tiny model; b is greyscale."""
    folder = tmp_path / "mini"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (50, 66), dtype=np.uint8)).save(folder / "b.png")
    return folder


def run(compare: ModuleType, registry: Path, data: Path, out: Path, *extra: str) -> dict:
    assert compare.main(["--data", str(data), "--registry", str(registry), "--device", "cpu",
                         "--out", str(out), "--crop-size", "32", *extra]) == 0
    return json.loads((out / "compare.json").read_text())


def test_compare_registry_models(compare: ModuleType, registry: Path, hr_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run(compare, registry, hr_dir, out, "--model", "tiny", "--model", "tiny-teacher:1",
                 "--no-realesrgan", "--crops", "1")
    assert report["dataset"] == "mini" and report["lr"] == "bicubic" and report["paired"]
    assert report["images"] == 2 and report["threads"] == 1 and report["time_reference"] == "tiny:1"
    methods = {row["method"]: row for row in report["methods"]}
    assert list(methods) == ["bicubic", "tiny:1", "tiny-teacher:1"]
    for row in methods.values():
        assert set(row) == {"method", "psnr_y", "ssim_y", "niqe", "seconds_per_image", "time_ratio"}
        assert isinstance(row["psnr_y"], float) and row["seconds_per_image"] > 0
        assert row["niqe"] is None  # 64² outputs are too small for NIQE: reported, not a crash
    assert methods["tiny:1"]["time_ratio"] == 1.0
    assert set(report["niqe_skipped"]) == {"a", "b"}
    assert [image["name"] for image in report["per_image"]] == ["a", "b"]
    assert set(report["per_image"][0]) == {"name", "bicubic", "tiny:1", "tiny-teacher:1"}

    # The bicubic row is bicubic ×4 of the same LR that `vpdsr evaluate` makes.
    from training.quality import psnr_y

    hr = Image.open(hr_dir / "a.png")
    bicubic = hr.resize((16, 16), Image.Resampling.BICUBIC).resize((64, 64), Image.Resampling.BICUBIC)
    assert report["per_image"][0]["bicubic"]["psnr_y"] == pytest.approx(psnr_y(bicubic, hr, 4))

    assert report["crops"] == {"columns": ["bicubic", "tiny:1", "tiny-teacher:1", "HR"], "files": ["crops/a.png"]}
    assert Image.open(out / "crops" / "a.png").size == (4 * 32 + 3 * 4, 32)
    assert not (out / "crops" / "b.png").exists()
    table = (out / "compare.md").read_text()
    assert "| tiny-teacher:1 |" in table and "PSNR-Y" in table and "](crops/a.png)" in table


def test_compare_unpaired(compare: ModuleType, registry: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(real / "x.png")
    report = run(compare, registry, real, tmp_path / "out", "--unpaired", "--model", "tiny", "--no-realesrgan")
    assert not report["paired"] and report["lr"] == "files"
    assert all("psnr_y" not in row and "niqe" in row for row in report["methods"])
    assert report["crops"]["columns"] == ["bicubic", "tiny:1"]  # no HR panel without ground truth
    assert Image.open(tmp_path / "out" / "crops" / "x.png").size == (2 * 32 + 4, 32)


def test_compare_with_realesrgan(compare: ModuleType, registry: Path, hr_dir: Path, tmp_path: Path) -> None:
    realesrgan = importlib.import_module("training.realesrgan")
    try:
        realesrgan.weight_files()
        importlib.import_module("spandrel")
    except (ImportError, VPDSRError) as exc:
        pytest.skip(f"the 'compare' extra is not installed: {exc}")
    out = tmp_path / "out"
    report = run(compare, registry, hr_dir, out, "--model", "tiny", "--limit", "1", "--crops", "1")
    assert [row["method"] for row in report["methods"]] == ["bicubic", "tiny:1", "Real-ESRGAN x4plus"]
    assert isinstance(report["methods"][2]["psnr_y"], float)
    assert report["crops"]["columns"] == ["bicubic", "tiny:1", "Real-ESRGAN x4plus", "HR"]
    assert Image.open(out / "crops" / "a.png").size == (4 * 32 + 3 * 4, 32)


def test_compare_errors(compare: ModuleType, registry: Path, hr_dir: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--data", str(hr_dir), "--registry", str(registry), "--device", "cpu", "--out", str(tmp_path / "o"),
            "--no-realesrgan"]
    cases = [
        (["--model", "tiny", "--model", "tiny:1"], "more than once"),
        (["--model", "tiny", "--lr-dir", str(hr_dir), "--degrade", "realesrgan"], "the LR are given"),
        (["--model", "missing"], "unknown model"),
        (["--model", "tiny", "--threads", "0"], "must be positive"),
    ]
    for extra, message in cases:
        assert compare.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("compare.py: error: ") and message in err, (extra, err)
