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
- Interactive tiles run in arrival order (each request was admitted on the wait ahead of it);
  background tiles are taken round-robin, one per job in turn, so a job of thousands of tiles
  never makes the others wait for its whole image.
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


class TileQueue(Generic[R]):
    """Waiting tiles (request, tile index) of one priority and key, taken in arrival order."""

    def __init__(self) -> None:
        self._tiles: deque[tuple[R, int]] = deque()

    def __len__(self) -> int:
        return len(self._tiles)

    def add(self, request: R, tiles: range) -> None:
        self._tiles.extend((request, i) for i in tiles)

    def take(self) -> tuple[R, int]:
        return self._tiles.popleft()

    def oldest(self) -> R:
        """The longest-waiting request (the queue is not empty)."""
        return self._tiles[0][0]

    def discard(self, request: R) -> int:
        kept = [entry for entry in self._tiles if entry[0] is not request]
        dropped = len(self._tiles) - len(kept)
        self._tiles = deque(kept)
        return dropped


class RoundRobin(TileQueue[R]):
    """Waiting tiles taken one request at a time, in turn."""

    def __init__(self) -> None:
        self._by_request: dict[R, deque[tuple[R, int]]] = {}  # insertion order: whose turn is next

    def __len__(self) -> int:
        return sum(len(tiles) for tiles in self._by_request.values())

    def add(self, request: R, tiles: range) -> None:
        self._by_request.setdefault(request, deque()).extend((request, i) for i in tiles)

    def take(self) -> tuple[R, int]:
        request, tiles = next(iter(self._by_request.items()))
        del self._by_request[request]
        entry = tiles.popleft()
        if tiles:
            self._by_request[request] = tiles  # to the back of the line
        return entry

    def oldest(self) -> R:
        return min(self._by_request, key=lambda request: request.enqueued_at)

    def discard(self, request: R) -> int:
        return len(self._by_request.pop(request, ()))


class Batcher(Generic[R]):
    def __init__(self, batch_sizes: Sequence[int], max_delay: float) -> None:
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.max_delay = max_delay
        # One queue per key and priority (interactive in arrival order, background round-robin).
        self._queues: dict[BatchKey, tuple[TileQueue[R], ...]] = {}
        self.waiting = [0 for _ in Priority]  # tiles waiting, per priority

    @property
    def depth(self) -> int:
        """Tiles waiting, all priorities."""
        return sum(self.waiting)

    def add(self, request: R, tiles: range) -> None:
        """Queue the tiles of ``request`` with these indices (a large job enters in chunks)."""
        queues = self._queues.setdefault(request.key, (TileQueue(), RoundRobin()))  # by Priority
        queues[request.priority].add(request, tiles)
        self.waiting[request.priority] += len(tiles)

    def discard(self, request: R) -> int:
        """Drop the request's tiles that are still waiting (cancelled, timed out); how many."""
        queues = self._queues.get(request.key, ())
        dropped = sum(queue.discard(request) for queue in queues)
        self.waiting[request.priority] -= dropped
        self._prune(request.key)
        return dropped

    def pop(self, now: float) -> Batch[R] | None:
        """The next batch to run, or None if no key is ready yet."""
        best: tuple[Priority, float, BatchKey] | None = None
        for key, queues in self._queues.items():
            heads = [queue.oldest() for queue in queues if queue]
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
                entries.append(queue.take())
                self.waiting[priority] -= 1
        self._prune(key)
        return Batch(key, entries)

    def wait_time(self, now: float) -> float | None:
        """Seconds until some key becomes ready by age (None when nothing waits)."""
        oldest = [queue.oldest().enqueued_at for queues in self._queues.values() for queue in queues if queue]
        return max(0.0, min(oldest) + self.max_delay - now) if oldest else None

    def _prune(self, key: BatchKey) -> None:
        if key in self._queues and not any(len(queue) for queue in self._queues[key]):
            del self._queues[key]
