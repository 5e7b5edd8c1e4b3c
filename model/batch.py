"""``vpdsr upscale`` over many files: which files, where their results go, and the loop that
runs them with a progress bar, skips finished work and survives bad files.

The loop does not know how an image is upscaled: an :class:`Upscaler` does that, in this process
(``model.cli``) or on a server (``model.remote``), so both get the same input expansion, output
names, skipping and error reporting.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from tqdm import tqdm

from .errors import VPDSRError

OutputFormat = Literal["png", "jpeg", "webp"]
Progress = Callable[[int, int], None]  # (tiles done, tiles in total)

# What a folder or a glob contributes: the formats the model and the service read.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
FORMAT_OF_SUFFIX: dict[str, OutputFormat] = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
SUFFIX_OF_FORMAT: dict[OutputFormat, str] = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


class InputFailed(VPDSRError):
    """This one input could not be upscaled (unreadable, refused by the server): it is reported
    and skipped, and the batch goes on. Any other :class:`VPDSRError` stops the command."""


@dataclass(frozen=True)
class Upscaled:
    size: tuple[int, int]
    detail: str  # model, steps, where it ran


class Upscaler(Protocol):
    def __call__(self, source: Path, target: Path, fmt: OutputFormat, progress: Progress) -> Upscaled:
        """Upscale ``source`` and write it to ``target`` as ``fmt``."""


@dataclass(frozen=True)
class Task:
    source: Path
    target: Path
    format: OutputFormat


def find_inputs(patterns: Sequence[str]) -> list[Path]:
    """Named files as they are; the images of folders (not recursive) and of glob patterns; in
    the order given, each file once."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            hits = (Path(p) for p in glob.glob(pattern, recursive=True))
            matches = sorted(p for p in hits if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not matches:
            what = "no images in folder" if path.is_dir() else "input image not found:"
            raise VPDSRError(f"{what} {pattern}")
        found.update(dict.fromkeys(matches))
    return list(found)


def plan(patterns: Sequence[str], output: Path, fmt: OutputFormat | None = None) -> list[Task]:
    """Each input with its output. One input file and an ``output`` with a suffix (not a folder)
    is ``vpdsr upscale in.jpg out.png``: the suffix gives the format. Otherwise ``output`` is a
    folder and each result is named after its input, as ``fmt`` or by default JPEG for JPEG
    inputs and PNG for the rest (what the service does)."""
    sources = find_inputs(patterns)
    if len(patterns) == 1 and sources == [Path(patterns[0])] and output.suffix and not output.is_dir():
        suffix_format = FORMAT_OF_SUFFIX.get(output.suffix.lower())
        if suffix_format is None:
            raise VPDSRError(f"cannot write {output}: name it .png, .jpg or .webp, or give an output folder")
        if fmt not in (None, suffix_format):
            raise VPDSRError(f"--format {fmt} contradicts the output's suffix {output.suffix}")
        tasks = [Task(sources[0], output, suffix_format)]
    else:
        tasks = []
        for source in sources:
            out_format = fmt or ("jpeg" if source.suffix.lower() in (".jpg", ".jpeg") else "png")
            tasks.append(Task(source, output / (source.stem + SUFFIX_OF_FORMAT[out_format]), out_format))
    _check_targets(tasks)
    return tasks


def _check_targets(tasks: Sequence[Task]) -> None:
    """Refuse, before any work, a plan that would overwrite an input or write one file twice."""
    writers: dict[Path, Path] = {}
    for task in tasks:
        if task.target.resolve() == task.source.resolve():
            raise VPDSRError(f"the result of {task.source} would replace it: choose another output folder")
        first = writers.setdefault(task.target.resolve(), task.source)
        if first != task.source:
            raise VPDSRError(f"{first} and {task.source} would both be written to {task.target}")


def run(tasks: Sequence[Task], make_upscaler: Callable[[], Upscaler], *, overwrite: bool = False) -> int:
    """Upscale every task whose output does not exist yet (all with ``overwrite``); returns how
    many failed. ``make_upscaler`` is called only when there is work: a re-run over a finished
    batch should not spend seconds loading a model."""
    todo: list[Task] = []
    for task in tasks:
        if overwrite or not task.target.exists():
            todo.append(task)
        else:
            tqdm.write(f"{task.target} exists, skipped (--overwrite replaces it)")
    failed = _upscale_all(todo, make_upscaler()) if todo else 0
    if len(tasks) > 1:
        summary = f"{len(todo) - failed} written, {len(tasks) - len(todo)} skipped, {failed} failed"
        tqdm.write(summary, file=sys.stderr if failed else sys.stdout)
    return failed


def _upscale_all(todo: Sequence[Task], upscale: Upscaler) -> int:
    """One image: a bar over its tiles. Several: a bar over the images. Returns the failures."""
    failed = 0
    with tqdm(todo, unit="image", disable=len(todo) == 1, dynamic_ncols=True) as images:
        for task in images:
            try:
                if len(todo) == 1:
                    with TileBar(task.source.name) as bar:
                        done = write(task, upscale, bar.update)
                else:
                    done = write(task, upscale, lambda _done, _total: None)
            except (InputFailed, OSError) as exc:
                failed += 1
                tqdm.write(f"vpdsr: error: {task.source}: {exc}", file=sys.stderr)
            else:
                tqdm.write(f"{task.source} -> {task.target} {done.size[0]}x{done.size[1]} ({done.detail})")
    return failed


def write(task: Task, upscale: Upscaler, progress: Progress) -> Upscaled:
    """Upscale into a hidden file beside the target, renamed when complete: an interrupted run
    leaves no half-written result that the next run would take as done and skip."""
    task.target.parent.mkdir(parents=True, exist_ok=True)
    partial = task.target.with_name(f".{task.target.name}.partial")
    try:
        done = upscale(task.source, partial, task.format, progress)
        partial.replace(task.target)
    finally:
        partial.unlink(missing_ok=True)
    return done


class TileBar:
    """A tqdm bar over one image's tiles. Until the first report the total is unknown and the bar
    only counts time (a server's synchronous answer, or a job that reports no progress)."""

    def __init__(self, name: str) -> None:
        self.bar = tqdm(desc=name, unit="tile", total=None, dynamic_ncols=True)

    def update(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def __enter__(self) -> TileBar:
        return self

    def __exit__(self, *_: object) -> None:
        self.bar.close()
