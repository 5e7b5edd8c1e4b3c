"""Decoding untrusted images where it can be stopped: worker processes, a time budget, cancellation.

A hostile file can cost far more CPU to decode than its size suggests: a progressive JPEG with
thousands of refinement scans took 51 CPU-s for 294 KB, and a thread cannot be stopped, so the
decode went on long after its client had gone. Here every decode runs in a child process of a
small pool (pebble's ``ProcessPool``): when the decode runs past ``decode_timeout_s``, or the
request awaiting it is cancelled (the client went away), the child is killed and replaced, and
the CPU it would have burnt is not spent. What the bytes' header already tells (JPEG scans, TIFF
pages) is refused before any pixel is decoded, by :func:`service.imageio.decode_image` itself.

The children are started with ``spawn``: they import Pillow and the image policy, never PyTorch,
and forking a process that holds PyTorch's threads is unsafe.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from pebble import ProcessPool

from .errors import BadRequest, PayloadTooLarge, ServiceError
from .imageio import DecodedImage, ImageLimits, decode_image
from .settings import Settings

T = TypeVar("T")

# Decodes before a child is replaced anyway: whatever memory Pillow's decoders keep is returned.
TASKS_PER_CHILD = 200


class Decoder:
    """A process pool for :func:`service.imageio.decode_image`, started on first use."""

    def __init__(self, processes: int, timeout_s: float) -> None:
        self.processes = processes
        self.timeout_s = timeout_s
        self._pool: ProcessPool | None = None
        self._lock = threading.Lock()

    def start(self) -> ProcessPool:
        """The pool, its processes started (they take a second or more to import Pillow)."""
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPool(max_workers=self.processes, max_tasks=TASKS_PER_CHILD,
                                         context=multiprocessing.get_context("spawn"))
                self._pool.schedule(int)  # pebble starts its processes with the first task
            return self._pool

    async def decode(self, data: bytes, limits: ImageLimits) -> DecodedImage:
        """``decode_image(data, limits)`` in a child: its errors as they are raised there, a 413
        past the time budget, and the child killed if the awaiting task is cancelled."""
        try:
            return await self.run(decode_image, data, limits)
        except FutureTimeout:
            raise PayloadTooLarge(
                f"the image took more than {self.timeout_s:g} s to decode, the most this server spends on one: "
                "send it as a baseline JPEG or a PNG"
            ) from None
        except ServiceError:
            raise
        except Exception:  # pebble's ProcessExpired: the child died on this input (a decoder crash, memory)
            raise BadRequest("the image could not be decoded: its decoder stopped on it") from None

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` in a child (a module-level function: it is pickled by name), within
        the time budget counted from when a child takes it (``TimeoutError`` past it); cancelling
        the awaiting task kills the child that runs it (pebble replaces it)."""
        future = self.start().schedule(function, args=args, timeout=self.timeout_s)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Stop the children (at shutdown); a later decode starts a new pool."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            pool.join()


_decoders: dict[tuple[int, float], Decoder] = {}
_decoders_lock = threading.Lock()


def decoder_for(settings: Settings) -> Decoder:
    """The process's decoder for these settings: one pool per process, as there is one thread pool
    (apps of the same settings in one process, as in the tests, share it), stopped at exit."""
    key = (settings.decode_processes, settings.decode_timeout_s)
    with _decoders_lock:
        if key not in _decoders:
            _decoders[key] = Decoder(*key)
        return _decoders[key]


async def decode(data: bytes, settings: Settings) -> DecodedImage:
    """Untrusted bytes → an upright sRGB image under the settings' limits and time budget."""
    return await decoder_for(settings).decode(data, ImageLimits.of(settings))


@atexit.register
def close_decoders() -> None:
    with _decoders_lock:
        decoders = list(_decoders.values())
        _decoders.clear()
    for decoder in decoders:
        decoder.close()
