"""Dynamic batching of tiles: which waiting tiles the model runs next, together.

A pure data structure — no threads, no I/O, the clock is passed in — so its policy can be tested
on its own. :class:`service.engine.InferenceEngine` drives it from the event loop.

Policy:

- Tiles can share a batch only if they have the same :data:`BatchKey` (tile size, sampler steps):
  one stacked tensor, one model call. Tiles of different requests mix freely.
- A key's tiles are *ready* when there are at least ``max(batch_sizes)`` of them, or when the
  oldest has waited ``max_delay`` seconds (the latency a request may pay for better batching).
- Among ready keys, the one holding the most urgent tile wins: interactive before background,
  then oldest first. Within a batch, interactive tiles go first and background tiles fill the
  rest — a free ride that costs interactive requests nothing.
- Batches only come in the sizes in ``batch_sizes`` (the shapes the model was warmed with): with
  fewer tiles than the largest size, the largest size that fits is taken and the rest wait for
  the next round, where newcomers may join them. No padding, so no compute is wasted.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Generic, Protocol, TypeVar


class Priority(IntEnum):
    """Lower value = more urgent."""

    INTERACTIVE = 0  # synchronous HTTP requests: a client is waiting
    BACKGROUND = 1  # asynchronous jobs


BatchKey = tuple[int, int]  # (tile size in LR pixels, sampler steps)


class Queued(Protocol):
    """What the batcher needs to know about a request whose tiles it holds."""

    @property
    def key(self) -> BatchKey: ...
    @property
    def priority(self) -> Priority: ...
    @property
    def enqueued_at(self) -> float: ...


R = TypeVar("R", bound=Queued)


@dataclass(frozen=True)
class Batch(Generic[R]):
    key: BatchKey
    entries: list[tuple[R, int]]  # (request, index of the tile within the request)


def warm_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself: 1, 2, 4, 8, …"""
    sizes = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
    return sorted(sizes | {max_batch_size})


class Batcher(Generic[R]):
    def __init__(self, batch_sizes: Sequence[int], max_delay: float) -> None:
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.max_delay = max_delay
        # One FIFO per priority and key: (request, tile index).
        self._queues: dict[BatchKey, tuple[deque[tuple[R, int]], ...]] = {}
        self.waiting = [0 for _ in Priority]  # tiles waiting, per priority

    @property
    def depth(self) -> int:
        """Tiles waiting, all priorities."""
        return sum(self.waiting)

    def add(self, request: R, tiles: range) -> None:
        """Queue the tiles of ``request`` with these indices (a large job enters in chunks)."""
        queues = self._queues.setdefault(request.key, tuple(deque() for _ in Priority))
        queues[request.priority].extend((request, i) for i in tiles)
        self.waiting[request.priority] += len(tiles)

    def discard(self, request: R) -> int:
        """Drop the request's tiles that are still waiting (cancelled, timed out); how many."""
        queues = self._queues.get(request.key, ())
        dropped = 0
        for queue in queues:
            kept = [entry for entry in queue if entry[0] is not request]
            dropped += len(queue) - len(kept)
            queue.clear()
            queue.extend(kept)
        self.waiting[request.priority] -= dropped
        self._prune(request.key)
        return dropped

    def pop(self, now: float) -> Batch[R] | None:
        """The next batch to run, or None if no key is ready yet."""
        best: tuple[Priority, float, BatchKey] | None = None
        for key, queues in self._queues.items():
            heads = [queue[0][0] for queue in queues if queue]
            count = sum(len(queue) for queue in queues)
            if count >= self.max_batch or now - min(r.enqueued_at for r in heads) >= self.max_delay:
                urgent = min(heads, key=lambda r: (r.priority, r.enqueued_at))
                candidate = (urgent.priority, urgent.enqueued_at, key)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None
        key = best[2]
        queues = self._queues[key]
        available = min(sum(len(queue) for queue in queues), self.max_batch)
        size = self.batch_sizes[bisect.bisect_right(self.batch_sizes, available) - 1]
        entries: list[tuple[R, int]] = []
        for priority, queue in zip(Priority, queues):  # in priority order
            while queue and len(entries) < size:
                entries.append(queue.popleft())
                self.waiting[priority] -= 1
        self._prune(key)
        return Batch(key, entries)

    def wait_time(self, now: float) -> float | None:
        """Seconds until some key becomes ready by age (None when nothing waits)."""
        oldest = [queue[0][0].enqueued_at for queues in self._queues.values() for queue in queues if queue]
        return max(0.0, min(oldest) + self.max_delay - now) if oldest else None

    def _prune(self, key: BatchKey) -> None:
        if key in self._queues and not any(self._queues[key]):
            del self._queues[key]
