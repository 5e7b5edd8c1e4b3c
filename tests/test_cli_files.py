"""`vpdsr upscale` in a folder others can write to: results go through a temporary file that no
one else can have made, a planted `.NAME.partial` symbolic link is never written through, nothing
that exists at the moment of the rename is replaced without --overwrite, and the service's size
limits hold locally too (red-team repros of issue 30)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest
from PIL import Image

from model import batch
from model.cli import main
from tests.conftest import FIXTURES
from tests.test_service_inputs import png_header


def local(registry: Path) -> list[str]:
    return ["--model", "tiny@production", "--registry", str(registry), "--device", "cpu"]


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    with Image.open(FIXTURES / "service" / "butterfly.png") as image:
        image.save(folder / "a.png")
    return folder / "a.png"


def test_a_planted_partial_symlink_is_not_written_through(
    photo: Path, tmp_path: Path, tiny_registry: Path
) -> None:
    """Repro: `ln -s ../outside/victim.txt out2/.a.png.partial; vpdsr upscale in2 out2` turned the
    victim into a PNG and left the output a symbolic link to it."""
    victim, out = tmp_path / "outside" / "victim.txt", tmp_path / "out"
    victim.parent.mkdir()
    out.mkdir()
    victim.write_text("precious")
    (out / ".a.png.partial").symlink_to(Path("..") / "outside" / "victim.txt")

    assert main(["upscale", str(photo.parent), str(out), *local(tiny_registry)]) == 0
    assert victim.read_text() == "precious"
    result = out / "a.png"
    assert not result.is_symlink() and stat.S_ISREG(result.lstat().st_mode)
    with Image.open(result) as image:
        assert image.size == (4 * 32, 4 * 32)
    assert sorted(p.name for p in out.iterdir()) == [".a.png.partial", "a.png"]  # ours gone, theirs untouched


def test_overwrite_replaces_a_symlink_itself_not_its_target(
    photo: Path, tmp_path: Path, tiny_registry: Path
) -> None:
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("precious")
    out.mkdir()
    (out / "a.png").symlink_to(victim)
    assert main(["upscale", str(photo.parent), str(out), *local(tiny_registry)]) == 0
    assert (out / "a.png").is_symlink(), "without --overwrite an existing name (even a link) is skipped"

    assert main(["upscale", str(photo.parent), str(out), "--overwrite", *local(tiny_registry)]) == 0
    assert victim.read_text() == "precious"
    assert not (out / "a.png").is_symlink()
    mode = stat.S_IMODE((out / "a.png").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask, oct(mode)  # a result's mode, not the temporary file's 0600


class ThirdParty:
    """An upscaler during whose work someone else creates the output: the check that matters is
    the one at the rename, not the one when the batch was planned."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __call__(self, source: Path, out: BinaryIO, fmt: batch.OutputFormat, progress: batch.Progress) -> batch.Upscaled:
        self.target.write_text("made by someone else meanwhile")
        out.write(b"our result")
        return batch.Upscaled((1, 1), "test")


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_created_during_the_run_is_kept_without_overwrite(
    photo: Path, tmp_path: Path, overwrite: bool
) -> None:
    """Repro: an output created after the run started was replaced ("30 written, 0 skipped")."""
    target = tmp_path / "out" / "a.png"
    tasks = batch.plan([str(photo), str(photo.parent / "*.png")], target.parent)
    outcome = batch.run(tasks, lambda: ThirdParty(target), overwrite=overwrite)
    if overwrite:
        assert outcome == batch.Outcome(written=1, skipped=0, failed=0)
        assert target.read_bytes() == b"our result"
    else:
        assert outcome == batch.Outcome(written=0, skipped=1, failed=0)
        assert target.read_text() == "made by someone else meanwhile"
    assert [p.name for p in target.parent.iterdir()] == ["a.png"], "no temporary file left"


def test_the_services_size_limits_hold_locally_and_an_option_raises_them(
    photo: Path, tmp_path: Path, tiny_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Repro: a 531 KB 13000² PNG took 6.9 GB of memory within 60 s (293,764 tiles planned)."""
    bomb = photo.parent / "bomb.png"
    bomb.write_bytes(png_header(13000, 13000))
    out = tmp_path / "out"
    assert main(["upscale", str(photo.parent), str(out), *local(tiny_registry)]) == 2
    err = capsys.readouterr().err
    assert (f"{bomb}: image of 13000×13000 = 169000000 pixels exceeds the limit of 16777216 pixels "
            "(--max-pixels raises it)") in err, err
    assert "1 written, 0 skipped, 1 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]

    (out / "a.png").unlink()
    assert main(["upscale", str(photo), str(out / "a.png"), "--max-pixels", "1000", *local(tiny_registry)]) == 2
    assert "1024 pixels exceeds the limit of 1000 pixels (--max-pixels raises it)" in capsys.readouterr().err
    assert main(["upscale", str(photo), str(out / "a.png"), "--max-side", "31", *local(tiny_registry)]) == 2
    assert "a side exceeds the limit of 31 pixels (--max-side raises it)" in capsys.readouterr().err
    assert main(["upscale", str(photo), str(out / "a.png"), "--max-pixels", "1024", *local(tiny_registry)]) == 0
