"""What a tile costs on the model: the estimate that admission (413 / 429) decides by.

Each (tile size, steps) key has a seconds-per-tile value, timed at warm-up and then an
exponentially weighted mean of every batch. Only admitted work measures, so an estimate taken
under contention (a busy machine at warm-up, a burst of batches) could otherwise refuse every
later request for being too slow, and nothing would ever measure it again: 64² images got 413
"about 68 s" for 25 minutes. So an estimate that nothing re-measured decays: it halves every
``half_life_s``, until a request gets through and its batches measure the real cost again.
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

    def warmed(self, warm: Mapping[int, float], steps: int) -> None:
        """The warm-up's seconds per tile of each tile size, at the model's default ``steps``."""
        now = self.clock()
        self._measured = {(tile, steps): (seconds, now) for tile, seconds in warm.items()}

    def measured(self, key: BatchKey, seconds_per_tile: float, default_steps: int) -> None:
        """A batch of ``key`` ran at ``seconds_per_tile``: fold it into the estimate."""
        estimate = self.seconds(key, default_steps)
        self._measured[key] = (estimate + EWMA * (seconds_per_tile - estimate), self.clock())

    def seconds(self, key: BatchKey, default_steps: int) -> float:
        """The estimate for ``key``: its own measurement, else the default steps' of its tile size
        scaled by the steps (else the dearest tile size's), decayed by the measurement's age."""
        tile, steps = key
        if key in self._measured:
            seconds, when = self._measured[key]
        else:
            fallback = self._measured.get((tile, default_steps))
            if fallback is None:
                fallback = max(self._measured.values(), default=(1.0, self.clock()))
            seconds, when = fallback[0] * steps / default_steps, fallback[1]
        return seconds * 0.5 ** (max(0.0, self.clock() - when) / self.half_life_s)
