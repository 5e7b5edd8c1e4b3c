"""``vpdsr upscale`` over many files: which files, where their results go, and the loop that
runs them with progress bars, skips finished work and survives bad files.

The loop does not know how an image is upscaled: an :class:`Upscaler` does that, in this process
(``model.cli``) or on a server (``client.remote``), so both get the same input expansion, output
names, skipping, file safety and error reporting.

Results are written as a user's files should be in a folder others may write to: into a new
temporary file that no one else can have created (``mkstemp``: ``O_CREAT | O_EXCL``, a random
name, so a planted name or symbolic link is never written through), moved into place only when
complete, and without ``--overwrite`` never over a file that exists at that moment, whenever it
appeared (a hard link fails where a rename would replace).
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from tqdm import tqdm

from .errors import VPDSRError
from .images import OutputFormat

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
    def __call__(self, source: Path, out: BinaryIO, fmt: OutputFormat, progress: Progress) -> Upscaled:
        """Upscale ``source`` and write it to the open file ``out`` as ``fmt``."""


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


@dataclass(frozen=True)
class Outcome:
    """How a run ended: results written, skipped (they existed) and failed."""

    written: int
    skipped: int
    failed: int


def run(tasks: Sequence[Task], make_upscaler: Callable[[], Upscaler], *, overwrite: bool = False) -> Outcome:
    """Upscale every task whose output does not exist yet (all with ``overwrite``). ``make_upscaler``
    is called only when there is work: a re-run over a finished batch should not spend seconds
    loading a model."""
    todo: list[Task] = []
    for task in tasks:
        if overwrite or not os.path.lexists(task.target):
            todo.append(task)
        else:
            tqdm.write(f"{task.target} exists, skipped (--overwrite replaces it)")
    done = _upscale_all(todo, make_upscaler(), overwrite) if todo else Outcome(0, 0, 0)
    outcome = dataclasses.replace(done, skipped=done.skipped + len(tasks) - len(todo))
    if len(tasks) > 1:
        summary = f"{outcome.written} written, {outcome.skipped} skipped, {outcome.failed} failed"
        tqdm.write(summary, file=sys.stderr if outcome.failed else sys.stdout)
    return outcome


def _upscale_all(todo: Sequence[Task], upscale: Upscaler, overwrite: bool) -> Outcome:
    """A bar over the tiles of the image in hand and, for several, one over the images."""
    written = skipped = failed = 0
    many = len(todo) > 1
    with tqdm(todo, unit="image", disable=not many, dynamic_ncols=True) as bar:
        for task in bar:
            try:
                with TileBar(task.source.name, nested=many) as tiles:
                    done = write(task, upscale, tiles.update, overwrite=overwrite)
            except (InputFailed, OSError) as exc:
                failed += 1
                tqdm.write(f"vpdsr: error: {task.source}: {exc}", file=sys.stderr)
                continue
            if done is None:
                skipped += 1
                tqdm.write(f"{task.target} appeared meanwhile, kept (--overwrite replaces it)")
            else:
                written += 1
                tqdm.write(f"{task.source} -> {task.target} {done.size[0]}x{done.size[1]} ({done.detail})")
    return Outcome(written, skipped, failed)


def write(task: Task, upscale: Upscaler, progress: Progress, *, overwrite: bool) -> Upscaled | None:
    """Upscale into a new hidden file beside the target and put it in place when complete: an
    interrupted run leaves no half-written result that the next run would take as done. None when,
    without ``overwrite``, the target was created by someone else meanwhile (it is kept)."""
    task.target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{task.target.name}.", suffix=".partial", dir=task.target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), _new_file_mode())
            done = upscale(task.source, out, task.format, progress)
        return done if publish(Path(partial), task.target, overwrite=overwrite) else None
    finally:  # also on Ctrl-C: no partial file stays behind
        Path(partial).unlink(missing_ok=True)


def publish(partial: Path, target: Path, *, overwrite: bool) -> bool:
    """Give the complete ``partial`` the name ``target``; False if, without ``overwrite``, that
    name exists now. A hard link never replaces an existing name (file, folder or symbolic link,
    dangling or not) and the check is the link itself, so nothing created since the run was
    planned is lost; a rename replaces the name itself, never what a symbolic link points to."""
    if overwrite:
        os.replace(partial, target)
        return True
    try:
        os.link(partial, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(exc.errno, f"this file system has no hard links, which {target} needs so that it "
                          "replaces no file made meanwhile; --overwrite writes it by renaming") from None
        raise
    return True


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask); ``mkstemp``'s own is 0o600."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class TileBar:
    """A tqdm bar over one image's tiles; ``nested`` below a bar over the images, and removed when
    the image is done. Until the first report the total is unknown and the bar only counts time (a
    server's synchronous answer, or a job that reports no progress)."""

    def __init__(self, name: str, *, nested: bool = False) -> None:
        self.bar = tqdm(desc=name, unit="tile", total=None, dynamic_ncols=True, position=int(nested),
                        leave=not nested)

    def update(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def __enter__(self) -> TileBar:
        return self

    def __exit__(self, *_: object) -> None:
        self.bar.close()
