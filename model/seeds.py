"""The noise seed of an upscale: one range and one default for the pipeline, the service, its API
schema and the command line.

A seed is an integer with ``0 <= seed < SEED_LIMIT`` (2**53): every such integer is exact as a
JSON / JavaScript number, so a seed read back from an ``X-Seed`` header, a job record or the web
page reproduces its result. Left out, a seed is drawn at random for each image, and the one used
is reported (``X-Seed``, the job's ``result.seed``, the CLI's output line).
"""

from __future__ import annotations

import random

from .errors import InvalidRequest

SEED_LIMIT = 2**53


def resolve_seed(seed: int | None) -> int:
    """``seed`` if it is in range (else :class:`InvalidRequest`), a random seed when it is None."""
    if seed is None:
        return random.randrange(SEED_LIMIT)
    if not 0 <= seed < SEED_LIMIT:
        raise InvalidRequest(f"seed must be between 0 and {SEED_LIMIT - 1} (2**53 - 1), got {seed}")
    return seed
