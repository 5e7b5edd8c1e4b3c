"""benchmarks/centre_crops.py and benchmarks/autoencoder_recon.py on fixture images and a tiny model."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import FIXTURES, save_tiny_model

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
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"tiny:1: PSNR-Y \d+\.\d\d NIQE \d+\.\d\d \(1 images of .*\)", line), line
