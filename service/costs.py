"""What a tile costs on the model: the estimate that admission (413 / 429) decides by, and the
synchronous limit that follows from it.

Each (tile size, steps) key has a seconds-per-tile value, timed at warm-up and then an
exponentially weighted mean of every batch. A synchronous request may take ``request_timeout_s``
of compute, so the largest image it accepts is whatever this machine computes in that time
(:func:`largest_fitting`): a few hundred pixels a side on a 2-core CPU with small tiles, megapixels
on a GPU or with a model whose tiles are cheaper per pixel. No tile count is fixed in advance.

Only admitted work measures, so an estimate taken under contention (a busy machine at warm-up, a
burst of batches) could otherwise refuse every later request for being too slow, and nothing would
ever measure it again: 64² images got 413 "about 68 s" for 25 minutes. So an estimate that nothing
re-measured decays: it halves every ``half_life_s``, until a request gets through and its batches
measure the real cost again. It decays towards the fastest cost a batch of real requests has
measured for its key (the floor; zero before any batch), never below: the machine has shown it
cannot do better, so an image that would not fit at that speed gets its 413 at once even after an
idle hour, instead of being admitted and timing out. The warm-up sets no floor, since it may have
run under contention and nothing else would correct it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from .batcher import BatchKey

EWMA = 0.2  # weight of the newest batch
HALF_LIFE_S = 60.0


class TileCosts:
    """Seconds per tile of each batch key, measured and decaying while unmeasured."""

    def __init__(self, half_life_s: float = HALF_LIFE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.half_life_s = half_life_s
        self.clock = clock
        self._measured: dict[BatchKey, tuple[float, float]] = {}  # key -> (seconds per tile, when)
        self._floor: dict[BatchKey, float] = {}  # key -> fastest seconds per tile a batch measured

    def warmed(self, warm: Mapping[int, float], steps: int) -> None:
        """The warm-up's seconds per tile of each tile size, at the model's default ``steps``."""
        now = self.clock()
        self._measured = {(tile, steps): (seconds, now) for tile, seconds in warm.items()}

    def measured(self, key: BatchKey, seconds_per_tile: float, default_steps: int) -> None:
        """A batch of ``key`` ran at ``seconds_per_tile``: fold it into the estimate."""
        estimate = self.seconds(key, default_steps)
        self._measured[key] = (estimate + EWMA * (seconds_per_tile - estimate), self.clock())
        self._floor[key] = min(seconds_per_tile, self._floor.get(key, seconds_per_tile))

    def seconds(self, key: BatchKey, default_steps: int) -> float:
        """The estimate for ``key``: its own measurement, else the default steps' of its tile size
        scaled by the steps (else the dearest tile size's), decayed by the measurement's age towards
        the fastest a batch of ``key`` ran."""
        tile, steps = key
        if key in self._measured:
            seconds, when = self._measured[key]
        else:
            fallback = self._measured.get((tile, default_steps))
            if fallback is None:
                fallback = max(self._measured.values(), default=(1.0, self.clock()))
            seconds, when = fallback[0] * steps / default_steps, fallback[1]
        floor = min(seconds, self._floor.get(key, 0.0))
        kept = 0.5 ** (max(0.0, self.clock() - when) / self.half_life_s)
        return seconds * kept + floor * (1 - kept)


def largest_fitting(fits: Callable[[int, int], bool], width: int, height: int) -> tuple[int, int]:
    """The largest image of the shape of ``width``×``height`` that ``fits`` (e.g. whose estimated
    seconds are within the synchronous limit): what a 413 says would have been accepted. (0, 0)
    when not even the smallest image of that shape fits."""
    low, high = 0.0, 1.0  # scale factors: ``low`` fits (or is nothing), ``high`` does not
    for _ in range(20):
        mid = (low + high) / 2
        if fits(max(1, round(width * mid)), max(1, round(height * mid))):
            low = mid
        else:
            high = mid
    if low == 0.0:
        return 0, 0
    return max(1, round(width * low)), max(1, round(height * low))
