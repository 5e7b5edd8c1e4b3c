"""The tile cost estimate recovers from a bad measurement (issue 30: a stale estimate gave false
413s for 25 minutes, because only admitted requests measure)."""

from __future__ import annotations

import pytest

from service.costs import HALF_LIFE_S, TileCosts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_unmeasured_estimate_halves_every_half_life_and_a_batch_refreshes_it() -> None:
    clock = Clock()
    costs = TileCosts(clock=clock)
    costs.warmed({32: 2.0, 64: 8.0}, steps=1)  # measured under contention
    assert costs.seconds((32, 1), 1) == 2.0
    clock.now += HALF_LIFE_S
    assert costs.seconds((32, 1), 1) == 1.0
    clock.now += HALF_LIFE_S
    assert costs.seconds((32, 1), 1) == 0.5, "nothing measured: the estimate keeps falling"
    costs.measured((32, 1), 0.1, 1)  # an admitted request's batch
    assert costs.seconds((32, 1), 1) == 0.5 + 0.2 * (0.1 - 0.5)
    clock.now += 1
    assert 0.41 < costs.seconds((32, 1), 1) < 0.42


def test_other_steps_scale_from_the_default_and_unknown_tiles_from_the_dearest() -> None:
    costs = TileCosts(clock=Clock())
    costs.warmed({32: 2.0, 64: 8.0}, steps=1)
    assert costs.seconds((64, 3), 1) == 24.0
    assert costs.seconds((128, 1), 1) == 8.0


def test_an_idle_estimate_decays_no_lower_than_the_fastest_batch() -> None:
    """Warm-up alone may have run under contention, so it decays towards zero (a request gets
    through and measures); once real batches have run, it decays no lower than the fastest of them,
    so an idle hour does not admit an image the machine has shown it cannot finish in time."""
    clock = Clock()
    costs = TileCosts(clock=clock)
    costs.warmed({64: 2.0}, steps=1)
    clock.now += 3600
    assert costs.seconds((64, 1), 1) < 1e-6
    costs.warmed({64: 2.0}, steps=1)
    costs.measured((64, 1), 1.0, 1)
    costs.measured((64, 1), 1.5, 1)
    clock.now += 3600
    assert costs.seconds((64, 1), 1) == pytest.approx(1.0)
