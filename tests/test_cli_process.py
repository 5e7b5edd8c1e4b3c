"""The `vpdsr` command as a user meets it: `--help` without loading PyTorch, the shipped model
found from any folder (and "not found" naming the folders searched), Ctrl-C that ends a batch
cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from model.cli import main
from model.registry import shipped_registry_root
from tests.conftest import FIXTURES

VPDSR = str(Path(sys.executable).with_name("vpdsr"))


def test_building_the_parser_imports_nothing_heavy() -> None:
    """`vpdsr --help` builds the parser of every package's commands: none may import PyTorch and
    co. at module level (they made it take 7 s)."""
    code = ("import sys; from model.cli import build_parser; build_parser(); "
            "print(sorted({'torch', 'torchvision', 'numpy', 'safetensors', 'fastapi', 'redis'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout
    help_run = subprocess.run([VPDSR, "--help"], capture_output=True, text=True, check=True)
    assert "upscale" in help_run.stdout and "serve" in help_run.stdout


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's folder outside the clone, without $VPDSR_REGISTRY."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VPDSR_REGISTRY", raising=False)
    return tmp_path


def test_the_shipped_model_is_found_from_any_folder(elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shipped = shipped_registry_root()
    assert shipped is not None and (shipped.parent / "model" / "cli.py").is_file()
    assert main(["registry", "list"]) == 0
    assert "vpdsr-small:" in capsys.readouterr().out

    photo = elsewhere / "photo.jpg"
    shutil.copy(FIXTURES / "service" / "bears.jpg", photo)
    assert main(["upscale", str(photo), "photo_x4.png", "--device", "cpu"]) == 0
    with Image.open(photo) as before, Image.open(elsewhere / "photo_x4.png") as after:
        assert after.size == (4 * before.width, 4 * before.height)
    assert "vpdsr-small:" in capsys.readouterr().out


def test_not_found_names_the_folders_searched(elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(FIXTURES / "service" / "bears.jpg", elsewhere / "photo.jpg")
    assert main(["upscale", "photo.jpg", "out.png", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and err.endswith(f"(looked in registry, {shipped_registry_root()})\n"), err
    assert main(["upscale", "photo.jpg", "out.png", "--model", "vpdsr-small@nope"]) == 2
    err = capsys.readouterr().err
    assert "has no alias 'nope'" in err and err.endswith(f"(looked in {shipped_registry_root()})\n"), err


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[str]) -> None:
    """Poll ``condition`` until true; fail at once if ``proc`` ends first (no fixed time to tune)."""
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the command ended (status {proc.returncode}) before {what}: {err}")
        time.sleep(0.05)


def test_ctrl_c_ends_a_batch_with_one_line_and_no_partial_file(tmp_path: Path, tiny_registry: Path) -> None:
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    with Image.open(FIXTURES / "images" / "3096.png") as image:
        small = image.resize((64, 48))
    for i in range(40):
        small.save(photos / f"{i:02d}.png")
    proc = subprocess.Popen(
        [VPDSR, "upscale", str(photos), str(out), "--model", "tiny@production", "--registry", str(tiny_registry),
         "--device", "cpu", "--tile", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal, even under nohup
    )
    try:
        wait_for(lambda: any(out.glob("*.png")), "its first result", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.endswith("vpdsr: interrupted (finished results are kept: run the same command again for the rest)\n")
    assert err.count("vpdsr:") == 1 and "Traceback" not in err, err
    assert not list(out.glob(".*")), "a partial file was left behind"
    written = sorted(out.iterdir())
    assert 0 < len(written) < 40
    for result in written:
        with Image.open(result) as image:
            assert image.size == (256, 192)
