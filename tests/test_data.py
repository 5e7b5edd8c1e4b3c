"""HR datasets, crops, list files, the loader factory, and the ``vpdsr degrade`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.cli import main
from training.data import DataConfig, HRCropDataset, list_images, make_loader

IMAGES = Path(__file__).parent / "fixtures" / "images"


def coded_image(path: Path, width: int, height: int) -> Path:
    """A PNG whose red channel is the column index and green the row index (mod 256)."""
    x, y = np.meshgrid(np.arange(width) % 256, np.arange(height) % 256)
    pixels = np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_folder_listing_finds_the_fixture_photos_in_order() -> None:
    paths = list_images([IMAGES])
    assert [p.name for p in paths] == ["101085.jpg", "108005.jpg", "14037.jpg", "3096.png"]


def test_crops_of_real_photos_are_unit_range_chw() -> None:
    dataset = HRCropDataset(list_images([IMAGES]), crop_size=256)
    for index in range(len(dataset)):
        crop = dataset[index]
        assert crop.shape == (3, 256, 256) and crop.dtype == torch.float32
        assert 0 <= crop.min() and crop.max() <= 1 and crop.std() > 0.05


def test_crop_is_a_native_resolution_window_and_flips(tmp_path: Path) -> None:
    dataset = HRCropDataset([coded_image(tmp_path / "coded.png", 300, 280)], crop_size=128)
    generator = torch.Generator().manual_seed(0)
    steps = set()
    for _ in range(8):
        crop = torch.round(dataset.load(0, generator) * 255)
        columns, rows = crop[0].diff(dim=1) % 256, crop[1].diff(dim=0) % 256
        assert torch.all(rows == 1)  # a contiguous window, no scaling
        assert torch.all(columns == 1) or torch.all(columns == 255)  # left-to-right or mirrored
        steps.add(int(columns[0, 0]))
    assert steps == {1, 255}
    no_flip = HRCropDataset(dataset.paths, crop_size=128, hflip=False)
    assert all(torch.all(torch.round(no_flip[0] * 255)[0].diff(dim=1) % 256 == 1) for _ in range(4))


def test_same_generator_seed_same_crop() -> None:
    dataset = HRCropDataset(list_images([IMAGES]), crop_size=128)
    first = dataset.load(3, torch.Generator().manual_seed(5))
    assert torch.equal(first, dataset.load(3, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, dataset.load(3, torch.Generator().manual_seed(6)))


def test_slightly_small_images_are_reflect_padded(tmp_path: Path) -> None:
    dataset = HRCropDataset([coded_image(tmp_path / "small.png", 200, 150)], crop_size=256, hflip=False)
    crop = torch.round(dataset[0] * 255)
    assert crop.shape == (3, 256, 256)
    original = torch.from_numpy(np.array(Image.open(tmp_path / "small.png"))).permute(2, 0, 1).float()
    assert torch.equal(crop[:, :150, :200], original)
    assert torch.equal(crop[:, 150:, :200], original.flip(1)[:, 1:107])  # rows mirrored about the last one
    assert torch.equal(crop[:, :150, 200:], original.flip(2)[:, :, 1:57])


def test_much_smaller_images_are_magnified_not_mirrored(tmp_path: Path) -> None:
    dataset = HRCropDataset([coded_image(tmp_path / "tiny.png", 60, 40)], crop_size=128, hflip=False)
    crop = torch.round(dataset[0] * 255)
    assert crop.shape == (3, 128, 128)
    green = crop[1, :, 0]  # the row index, magnified 128/40 = 3.2×: slowly increasing, never mirrored
    assert torch.all(green.diff() >= 0) and green[-1] - green[0] > 30


def test_rescale_gt_downscales_the_largest_square(tmp_path: Path) -> None:
    photo = IMAGES / "101085.jpg"  # 481×321 JPEG: decoded at half scale, the whole short side kept
    crop = HRCropDataset([photo], crop_size=128, rescale_gt=True, hflip=False)[0]
    assert crop.shape == (3, 128, 128)
    dataset = HRCropDataset([coded_image(tmp_path / "coded.png", 300, 200)], crop_size=100, rescale_gt=True)
    green = torch.round(dataset[0] * 255)[1, :, 0]
    assert green[0] <= 2 and green[-1] >= 197  # all 200 rows squeezed into 100


def test_list_file_with_relative_and_absolute_paths(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    coded_image(folder / "a.png", 300, 300)
    listing = tmp_path / "train.txt"
    listing.write_text(f"images/a.png\n\n# a comment\n{(IMAGES / '3096.png').resolve()}\n")
    paths = list_images([listing])
    assert paths == [folder / "a.png", (IMAGES / "3096.png").resolve()]
    dataset = HRCropDataset(paths, crop_size=64)
    assert dataset[0].shape == dataset[1].shape == (3, 64, 64)


def test_bad_sources_fail_early_and_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images([tmp_path / "missing"])
    with pytest.raises(ValueError, match="no images"):
        list_images([tmp_path])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(OSError, match="broken.png"):
        HRCropDataset([broken])[0]


def test_loader_batches_crops_and_keeps_workers() -> None:
    cfg = DataConfig(sources=(IMAGES,), crop_size=64, batch_size=2, num_workers=0)
    batches = list(make_loader(cfg, device="cpu"))
    assert len(batches) == 2 and all(b.shape == (2, 3, 64, 64) for b in batches)
    loader = make_loader(DataConfig(sources=(IMAGES,), batch_size=4), device="cpu")
    assert loader.num_workers == 2 and loader.persistent_workers and not loader.pin_memory
    assert make_loader(DataConfig(sources=(IMAGES,), batch_size=4, num_workers=0), device="cuda").pin_memory
    with pytest.raises(ValueError, match="one batch"):
        make_loader(DataConfig(sources=(IMAGES,), batch_size=5))


def test_degrade_command_writes_reproducible_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["degrade", str(IMAGES), str(tmp_path / "a"), "--count", "5", "--crop", "64", "--seed", "3"]
    assert main(args) == 0
    hr, lr = sorted((tmp_path / "a" / "hr").iterdir()), sorted((tmp_path / "a" / "lr").iterdir())
    assert [p.name for p in hr] == [p.name for p in lr] and len(hr) == 5
    assert hr[0].name == "0000_101085.png" and hr[4].name == "0004_101085.png"
    assert Image.open(hr[0]).size == (64, 64) and Image.open(lr[0]).size == (16, 16)
    assert "wrote 5" in capsys.readouterr().out
    assert main(args[:2] + [str(tmp_path / "b")] + args[3:]) == 0
    assert all(np.array_equal(np.array(Image.open(p)), np.array(Image.open(tmp_path / "b" / "lr" / p.name))) for p in lr)


@pytest.mark.parametrize("problem", ["missing folder", "no images", "bad crop"])
def test_degrade_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str) -> None:
    in_dir, extra = {
        "missing folder": (tmp_path / "nowhere", []),
        "no images": (tmp_path, []),
        "bad crop": (IMAGES, ["--crop", "30"]),
    }[problem]
    assert main(["degrade", str(in_dir), str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vpdsr: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_crop_bank_is_allotted_by_area_and_reproducible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Crops per image follow image area (largest remainder), and the same seed gives the same bank."""
    from training.crop_bank import allocate

    assert allocate([100, 300, 0], 8) == [2, 6, 0]
    assert sum(allocate([5, 7, 11], 10)) == 10
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(src / "small.png")
    Image.effect_noise((192, 128), 40).convert("RGB").save(src / "large.png")
    Image.new("RGB", (20, 20)).save(src / "tiny.png")  # shorter than a crop: contributes none
    for out in ("a", "b"):
        assert main(["crops", str(src), str(tmp_path / out), "--size", "32", "--count", "7", "--seed", "3"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert [n.rsplit("_", 1)[0] for n in names].count("src_large") == 6  # 6 × area of small
    assert len(names) == 7 and not any("tiny" in n for n in names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert main(["crops", str(src), str(tmp_path / "c"), "--size", "512"]) == 2
    assert "no image has a short side of at least 512" in capsys.readouterr().err
    assert main(["crops", str(src), str(tmp_path / "j"), "--size", "32", "--count", "7", "--seed", "3", "--jpeg-quality", "95"]) == 0
    jpegs = sorted((tmp_path / "j").iterdir())
    assert [p.stem for p in jpegs] == [Path(n).stem for n in names] and {p.suffix for p in jpegs} == {".jpg"}
    first = np.asarray(Image.open(jpegs[0]), dtype=np.float64)  # the same crop, slightly lossy
    assert np.abs(first - np.asarray(Image.open(tmp_path / "a" / names[0]), dtype=np.float64)).mean() < 3
    assert main(["crops", str(src), str(tmp_path / "k"), "--jpeg-quality", "0"]) == 2
    assert "--jpeg-quality must be between 1 and 100" in capsys.readouterr().err
