"""Evaluation: PSNR/SSIM on known cases, and `vpdsr evaluate` on tiny paired and unpaired folders."""

from __future__ import annotations

import json
import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.cli import main
from training.quality import IQAMetrics, gaussian_window, psnr, psnr_y, rgb_to_y, ssim, ssim_y
from training.niqe import niqe


def random_image(shape: tuple[int, ...], seed: int, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)


def smooth_image(size: tuple[int, int], seed: int) -> np.ndarray:
    """A photo-like RGB image (height, width): smooth random shapes, so NIQE's statistics are defined."""
    small = Image.fromarray(random_image((size[0] // 4 + 1, size[1] // 4 + 1, 3), seed))
    return np.asarray(small.resize(size[::-1], Image.Resampling.BICUBIC))


# -- metrics ---------------------------------------------------------------------------------------
def test_luma_follows_bt601() -> None:
    pixels = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 0, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_y(pixels), [[16.0, 235.0, 16 + 65.481, 16 + 24.966]])
    grey = random_image((9, 7), 0)
    np.testing.assert_array_equal(rgb_to_y(Image.fromarray(grey)), rgb_to_y(np.repeat(grey[..., None], 3, 2)))


def test_psnr_identical_and_constant_offset() -> None:
    img = random_image((40, 36, 3), 1, 50, 200)
    assert psnr_y(img, img, border=4) == math.inf
    # +10 on every channel moves Y by 10·219/255 everywhere (no clipping in [50, 210)).
    expected = 20 * math.log10(255 / (10 * 219 / 255))
    assert psnr_y(img, img + 10, border=4) == pytest.approx(expected, abs=1e-9)
    assert psnr(np.zeros((4, 4)), np.full((4, 4), 2.0), data_range=4.0) == pytest.approx(10 * math.log10(4.0))


def test_border_is_cropped() -> None:
    img = random_image((32, 32, 3), 2, 50, 200)
    damaged = img.copy()
    damaged[:4] = 0
    damaged[:, -4:] = 255
    assert psnr_y(img, damaged, border=4) == math.inf
    assert ssim_y(img, damaged, border=4) == pytest.approx(1.0, abs=1e-12)
    assert psnr_y(img, damaged, border=3) < 20


def reference_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5, peak: float = 255.0) -> float:
    """Direct SSIM: the statistics of every valid window computed with an explicit 2-D Gaussian."""
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    values = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            x, y = a[i : i + size, j : j + size], b[i : i + size, j : j + size]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
            cxy = (w * (x - mx) * (y - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_direct_implementation() -> None:
    a = random_image((17, 15), 3).astype(np.float64)
    b = np.clip(a + np.random.default_rng(4).normal(0, 20, a.shape), 0, 255)
    assert ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-10)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert gaussian_window().sum().item() == pytest.approx(1.0)


def test_ssim_known_values_and_ordering() -> None:
    a = random_image((24, 24), 5).astype(np.float64)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # Constant images: no variance, so SSIM is the luminance term (2μxμy + C1)/(μx² + μy² + C1).
    c1 = (0.01 * 255) ** 2
    assert ssim(np.full((16, 16), 100.0), np.full((16, 16), 150.0)) == pytest.approx(
        (2 * 100 * 150 + c1) / (100**2 + 150**2 + c1)
    )
    rng = np.random.default_rng(6)
    noisy = [ssim(a, np.clip(a + rng.normal(0, s, a.shape), 0, 255)) for s in (5, 20, 60)]
    assert 1 > noisy[0] > noisy[1] > noisy[2]
    with pytest.raises(ValueError, match="at least 11"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def test_optional_iqa_metrics_with_stub_pyiqa(monkeypatch: pytest.MonkeyPatch) -> None:
    def create_metric(name: str, device: torch.device):
        if name == "maniqa":
            raise RuntimeError("weights not available offline")
        return lambda *images: torch.tensor(float(len(images)))

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    notices: list[str] = []
    iqa = IQAMetrics.load(torch.device("cpu"), paired=True, notice=notices.append)
    assert iqa.names == ["clipiqa", "musiq", "lpips"]  # NIQE is the project's own, never pyiqa's
    assert notices == ["note: MANIQA skipped: RuntimeError: weights not available offline"]
    img = Image.fromarray(random_image((8, 8, 3), 7))
    assert iqa(img, img) == {"clipiqa": 1.0, "musiq": 1.0, "lpips": 2.0}
    assert "lpips" not in iqa(img)


def test_iqa_metrics_skipped_without_pyiqa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import fails
    notices: list[str] = []
    iqa = IQAMetrics.load(torch.device("cpu"), paired=False, notice=notices.append)
    assert iqa.names == [] and len(notices) == 1 and "CLIPIQA, MUSIQ, MANIQA skipped" in notices[0]


# -- `vpdsr evaluate` ------------------------------------------------------------------------------
@pytest.fixture
def registry(tiny_registry: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny registry: evaluation writes metrics.json into it."""
    return Path(shutil.copytree(tiny_registry, tmp_path / "registry"))


@pytest.fixture
def paired(tmp_path: Path) -> Path:
    """HR images: RGB of a size that is not a multiple of 4, and a greyscale one (as in CSet14).

    Small enough for the LR (≤ 16²) to be one tile of the tiny model."""
    gt = tmp_path / "mini" / "gt"
    gt.mkdir(parents=True)
    Image.fromarray(random_image((62, 65, 3), 10)).save(gt / "a.png")
    Image.fromarray(random_image((64, 64), 11)).save(gt / "b.png")
    return gt


def run_cli(*args: str) -> int:
    return main(["evaluate", "--device", "cpu", *args])


def test_paired_evaluation_writes_metrics(registry: Path, paired: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    entry = registry / "tiny" / "1"
    (entry / "metrics.json").write_text(json.dumps({"RealSet65": {"images": 65}}))
    out = tmp_path / "report.json"
    assert run_cli("--model", "tiny", "--data", str(paired), "--registry", str(registry), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "psnr_y" in printed and "mean" in printed and "metrics written" in printed

    metrics = json.loads((entry / "metrics.json").read_text())
    assert metrics["RealSet65"] == {"images": 65}  # other datasets are kept
    mini = metrics["mini"]  # named after the parent of a "gt" folder
    assert mini["images"] == 2 and mini["paired"] and mini["lr"] == "bicubic" and mini["steps"] == 1
    assert mini["seconds_per_image"] > 0 and "teacher" not in mini
    for key in ("psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y"):
        assert isinstance(mini[key], float), key
    # 64² outputs hold no two 96² NIQE blocks: NIQE is null, and the output says why, never a crash.
    assert mini["niqe"] is None and mini["bicubic_niqe"] is None
    assert set(mini["niqe_skipped"]) == {"a", "b"} and "96" in mini["niqe_skipped"]["a"]
    assert "a left out of the NIQE means" in printed

    report = json.loads(out.read_text())
    a, b = report["images"]
    assert (a["name"], b["name"]) == ("a", "b") and a["niqe"] is None
    # The bicubic baseline is the HR (cropped to 64×60) against the bicubic round trip.
    hr = Image.open(paired / "a.png").crop((0, 0, 64, 60))
    bicubic = hr.resize((16, 15), Image.Resampling.BICUBIC).resize((64, 60), Image.Resampling.BICUBIC)
    assert a["bicubic_psnr_y"] == pytest.approx(psnr_y(bicubic, hr, border=4))
    assert mini["psnr_y"] == pytest.approx((a["psnr_y"] + b["psnr_y"]) / 2)

    # Given LR files (matched by name) that equal the bicubic ones give the same numbers; the teacher
    # (same seed) adds the student-teacher agreement.
    lq = tmp_path / "mini" / "lq"
    lq.mkdir()
    for name in ("a", "b"):
        hr = Image.open(paired / f"{name}.png")
        hr = hr.crop((0, 0, hr.width // 4 * 4, hr.height // 4 * 4))
        hr.resize((hr.width // 4, hr.height // 4), Image.Resampling.BICUBIC).save(lq / f"{name}.png")
    assert run_cli("--model", "tiny", "--data", str(paired), "--lr-dir", str(lq), "--limit", "1",
                   "--name", "mini-lq", "--teacher", "tiny-teacher:1", "--registry", str(registry)) == 0
    metrics = json.loads((entry / "metrics.json").read_text())
    lq_summary = metrics["mini-lq"]
    assert lq_summary["images"] == 1 and lq_summary["lr"] == "files" and lq_summary["teacher"] == "tiny-teacher:1"
    assert lq_summary["psnr_y"] == pytest.approx(a["psnr_y"])
    assert isinstance(lq_summary["teacher_psnr_y"], float)
    assert set(metrics) == {"RealSet65", "mini", "mini-lq"}


def test_unpaired_evaluation(registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = tmp_path / "RealMini"
    real.mkdir()
    Image.fromarray(random_image((12, 14, 3), 12)).save(real / "x.png")
    Image.fromarray(smooth_image((28, 52), 13)).save(real / "y.png")  # ×4: 2 NIQE blocks after the border
    (real / "README.md").write_text("not an image")
    assert run_cli("--model", "tiny", "--data", str(real), "--unpaired", "--registry", str(registry)) == 0
    printed = capsys.readouterr().out
    if "pyiqa" not in sys.modules:
        assert "skipped: pyiqa is not installed" in printed
    summary = json.loads((registry / "tiny" / "1" / "metrics.json").read_text())["RealMini"]
    assert summary["images"] == 2 and not summary["paired"] and summary["seconds_per_image"] > 0
    assert summary["lr"] == "files" and "psnr_y" not in summary
    # NIQE of the output and of bicubic ×4 of y; x (48×56 out) is left out of the means, with the reason.
    assert list(summary["niqe_skipped"]) == ["x"]
    bicubic = Image.open(real / "y.png").resize((208, 112), Image.Resampling.BICUBIC)
    assert summary["bicubic_niqe"] == pytest.approx(niqe(bicubic, crop_border=4))
    assert isinstance(summary["niqe"], float) and summary["niqe"] != summary["bicubic_niqe"]


def test_clear_errors(registry: Path, paired: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "tiny").mkdir()
    Image.fromarray(random_image((31, 64, 3), 14)).save(tmp_path / "tiny" / "t.png")  # < 32 rows
    cases = [
        (["--data", str(tmp_path / "nope")], "not a folder"),
        (["--data", str(tmp_path / "empty")], "no images"),
        (["--data", str(paired), "--lr-dir", str(tmp_path / "empty")], "no images"),
        (["--data", str(paired), "--lr-dir", str(paired), "--unpaired"], "--lr-dir is for paired data"),
        (["--data", str(paired), "--limit", "0"], "--limit must be positive"),
        (["--data", str(paired), "--model", "missing"], "unknown model"),
        (["--data", str(paired), "--lr-dir", str(paired), "--degrade", "realesrgan"], "with --lr-dir the LR are given"),
        (["--data", str(paired), "--unpaired", "--save-lr", str(tmp_path)], "with --unpaired they are files"),
        (["--data", str(tmp_path / "tiny"), "--degrade", "realesrgan"], "too small for --degrade realesrgan"),
        (["--data", str(paired), "--save-lr", str(paired)], "--save-lr must not be the --data folder"),
    ]
    for extra, message in cases:
        args = ["--model", "tiny", "--registry", str(registry), *extra]
        assert run_cli(*args) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_realesrgan_degradation_is_reproducible(registry: Path, tmp_path: Path) -> None:
    """--degrade realesrgan --seed S: byte-identical LR and identical numbers on every run; the LR of
    an image depends on the seed and its file name only (not on --limit); another seed, other LR."""
    gt = tmp_path / "deg" / "gt"
    gt.mkdir(parents=True)
    Image.fromarray(smooth_image((104, 200), 20)).save(gt / "a.png")  # NIQE-sized output
    Image.fromarray(random_image((37, 34), 21)).save(gt / "b.png")  # greyscale, cropped to 36×32
    Image.fromarray(random_image((48, 64, 3), 22)).save(gt / "c.png")

    def run(seed: int, name: str, *extra: str) -> dict:
        out = tmp_path / f"{name}.json"
        assert run_cli("--model", "tiny", "--data", str(gt), "--degrade", "realesrgan", "--seed", str(seed),
                       "--save-lr", str(tmp_path / name), "--out", str(out), "--registry", str(registry),
                       *extra) == 0
        return json.loads(out.read_text())

    def scores(report: dict) -> list[dict]:
        return [{k: v for k, v in image.items() if k != "seconds"} for image in report["images"]]

    first, second, other = run(0, "first"), run(0, "second"), run(1, "other")
    run(0, "limited", "--limit", "1")
    for name, size in (("a", (50, 26)), ("b", (8, 9)), ("c", (16, 12))):
        lr = (tmp_path / "first" / f"{name}.png").read_bytes()
        assert Image.open(tmp_path / "first" / f"{name}.png").size == size
        assert lr == (tmp_path / "second" / f"{name}.png").read_bytes(), name
        assert lr != (tmp_path / "other" / f"{name}.png").read_bytes(), name
    assert (tmp_path / "limited" / "a.png").read_bytes() == (tmp_path / "first" / "a.png").read_bytes()
    assert scores(first) == scores(second) and scores(first) != scores(other)
    assert isinstance(first["images"][0]["niqe"], float)
    assert first["dataset"] == "deg+realesrgan-s0" and other["dataset"] == "deg+realesrgan-s1"
    metrics = json.loads((registry / "tiny" / "1" / "metrics.json").read_text())
    assert metrics["deg+realesrgan-s0"]["lr"] == "realesrgan" and metrics["deg+realesrgan-s0"]["seed"] == 0
