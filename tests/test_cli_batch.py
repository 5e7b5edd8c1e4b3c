"""`vpdsr upscale` over many files: folders and globs, skipping finished outputs, bad files that
do not stop the batch, and `--server` against a real server (synchronous, and through a job with
its progress)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
from PIL import Image

from model.cli import main
from service.settings import Settings
from tests.conftest import FIXTURES, RedisServer, free_port
from tests.live import live_server


def local(registry: Path) -> list[str]:
    return ["--model", "tiny@production", "--registry", str(registry), "--device", "cpu"]


def small_copy(source: Path, target: Path, width: int = 40) -> Path:
    """A real photo, downscaled so that the tiny model takes a few tiles of it."""
    with Image.open(source) as img:
        img.resize((width, round(width * img.height / img.width)), Image.Resampling.LANCZOS).save(target)
    return target


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Two photos, a corrupt JPEG, and a text file that is no input at all."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("108005.jpg", "3096.png"):
        small_copy(FIXTURES / "images" / name, folder / name)
    (folder / "corrupt.jpg").write_bytes((folder / "108005.jpg").read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image")
    return folder


def assert_upscaled(source: Path, result: Path) -> None:
    with Image.open(source) as before, Image.open(result) as after:
        assert after.size == (4 * before.width, 4 * before.height), result


def test_folder_with_a_corrupt_file_writes_the_others_and_fails(
    photos: Path, tmp_path: Path, tiny_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["upscale", str(photos), str(out), *local(tiny_registry)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["108005.jpg", "3096.png"]  # JPEG stays JPEG, the rest PNG
    for name in ("108005.jpg", "3096.png"):
        assert_upscaled(photos / name, out / name)
    err = capsys.readouterr().err
    assert f"{photos / 'corrupt.jpg'}: cannot read it as an image" in err, err
    assert "2 written, 0 skipped, 1 failed" in err and "Traceback" not in err


def test_existing_outputs_are_skipped_unless_overwrite(
    photos: Path, tmp_path: Path, tiny_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    inputs = [str(photos / "108005.jpg"), str(photos / "*.png")]  # a file and a glob
    assert main(["upscale", *inputs, str(out), "--format", "webp", *local(tiny_registry)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["108005.webp", "3096.webp"]
    (out / "3096.webp").write_bytes(b"an older result")
    capsys.readouterr()

    assert main(["upscale", *inputs, str(out), "--format", "webp", *local(tiny_registry)]) == 0
    assert (out / "3096.webp").read_bytes() == b"an older result"
    assert "0 written, 2 skipped, 0 failed" in capsys.readouterr().out

    assert main(["upscale", *inputs, str(out), "--format", "webp", "--overwrite", *local(tiny_registry)]) == 0
    assert_upscaled(photos / "3096.png", out / "3096.webp")
    assert not list(out.glob(".*")), "no partial files left behind"


def test_one_image_shows_progress_over_its_tiles(
    photos: Path, tmp_path: Path, tiny_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "single.png"
    assert main(["upscale", str(photos / "108005.jpg"), str(out), *local(tiny_registry)]) == 0
    assert_upscaled(photos / "108005.jpg", out)
    err = capsys.readouterr().err
    assert "108005.jpg: 100%" in err and "tile" in err, err


def test_a_batch_shows_the_tiles_of_each_image_under_the_images(
    photos: Path, tmp_path: Path, tiny_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch of large photos showed `0/5` for 30 minutes: the image in hand has its own tile bar."""
    inputs = [str(photos / "108005.jpg"), str(photos / "3096.png")]
    assert main(["upscale", *inputs, str(tmp_path / "out"), *local(tiny_registry), "--tile", "16"]) == 0
    err = capsys.readouterr().err
    for name in ("108005.jpg", "3096.png"):
        tiles = [(int(done), int(total)) for done, total in re.findall(rf"{name}: +\d+%\|[^|]*\| (\d+)/(\d+) ", err)]
        assert tiles and tiles[-1][0] == tiles[-1][1] > 1, err
    assert "2/2 [" in err, err  # the bar over the images


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"a/x.jpg": "108005.jpg", "b/x.jpg": "108005.jpg"}, "would both be written to"),
        ({"a/x.png": "3096.png"}, "would replace it"),  # output folder = input folder
        ({}, "input image not found"),
    ],
)
def test_plans_that_would_lose_work_are_refused(
    layout: dict[str, str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, photo in layout.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        small_copy(FIXTURES / "images" / photo, tmp_path / name)
    inputs = [str(tmp_path / name) for name in layout] or [str(tmp_path / "*.jpg")]
    target = tmp_path / "a" if "a/x.png" in layout else tmp_path / "out"
    assert main(["upscale", *inputs, str(target), "--registry", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def serve(registry: Path, **overrides: object) -> Settings:
    return Settings(registry=registry, model="tiny@production", device="cpu", port=free_port(), max_batch_size=2,
                    **overrides)


def test_server_does_the_work(
    photos: Path, tmp_path: Path, tiny_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with live_server(serve(tiny_registry, api_keys="the-key"), torch_threads=1) as url:
        # A wrong key is the same for every image: the command stops at the first.
        assert main(["upscale", str(photos), str(out), "--server", url, "--api-key", "wrong"]) == 2
        assert "unauthorized" in capsys.readouterr().err and not list(out.rglob("*"))

        assert main(["upscale", str(photos), str(out), "--server", url, "--api-key", "the-key"]) == 2
    for name in ("108005.jpg", "3096.png"):
        assert_upscaled(photos / name, out / name)
    err = capsys.readouterr().err
    assert f"{photos / 'corrupt.jpg'}: server answered 400 bad_request" in err, err
    assert "2 written, 0 skipped, 1 failed" in err


def test_server_sends_a_large_image_through_a_job(
    tmp_path: Path, tiny_registry: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """max_queue 2: more tiles than a synchronous request may queue → 413 too_large_for_sync →
    /v1/jobs; the job's ``progress`` moves the tile bar while it runs."""
    monkeypatch.setattr("client.remote.POLL_S", 0.02)
    settings = serve(tiny_registry, redis_url=redis_server.url, max_queue=2)
    large, out = small_copy(FIXTURES / "images" / "3096.png", tmp_path / "large.png", width=128), tmp_path / "out.png"
    with live_server(settings, torch_threads=1) as url:
        assert main(["upscale", str(large), str(out), "--server", url]) == 0
    assert_upscaled(large, out)
    assert redis.Redis.from_url(redis_server.url).keys("vpdsr:job:*"), "no job was submitted"
    err = capsys.readouterr().err
    shown = [(int(done), int(total)) for done, total in re.findall(r"(\d+)/(\d+) \[", err)]
    total = shown[-1][1]
    assert total > 10 and shown[-1] == (total, total), err
    assert any(0 < done < total for done, _ in shown), err


def test_cli_and_server_apply_the_same_option_rules_and_report_the_seed(
    photos: Path, tmp_path: Path, tiny_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One rule per option: a tile or seed the server refuses, the local command refuses with the
    same message. Without --seed each image gets a random one, printed, that reproduces it."""
    image = str(photos / "3096.png")
    tile_error = "tile must be one of the model's tile sizes [16, 32], got 24"
    seed_error = f"seed must be between 0 and {2**53 - 1}"
    for option, message in ((["--tile", "24"], tile_error), (["--seed", str(2**53)], seed_error)):
        assert main(["upscale", image, str(tmp_path / "x.png"), *local(tiny_registry), *option]) == 2
        assert message in capsys.readouterr().err
    with live_server(serve(tiny_registry), torch_threads=1) as url:
        for option, message in ((["--tile", "24"], tile_error), (["--seed", str(2**53)], seed_error)):
            assert main(["upscale", image, str(tmp_path / "x.png"), "--server", url, *option]) == 2
            assert f"server answered 422 invalid_parameter: {message}" in capsys.readouterr().err
        assert main(["upscale", image, str(tmp_path / "remote.png"), "--server", url, "--tile", "16"]) == 0
        assert re.search(r", seed \d+, http://", capsys.readouterr().out)

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert main(["upscale", image, str(first), *local(tiny_registry)]) == 0
    seed = re.search(r", seed (\d+), cpu\)", capsys.readouterr().out)
    assert seed is not None
    assert main(["upscale", image, str(again), *local(tiny_registry), "--seed", seed.group(1)]) == 0
    assert first.read_bytes() == again.read_bytes()
