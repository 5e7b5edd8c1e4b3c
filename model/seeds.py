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


def check_seed(seed: int | None) -> int | None:
    """``seed`` if it is None or in range, else :class:`InvalidRequest`: what a request's options are
    checked against before any image is planned (a job's at submission), without drawing a seed."""
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise InvalidRequest(f"seed must be between 0 and {SEED_LIMIT - 1} (2**53 - 1), got {seed}")
    return seed


def resolve_seed(seed: int | None) -> int:
    """``seed`` if it is in range (else :class:`InvalidRequest`), a random seed when it is None."""
    seed = check_seed(seed)
    return random.randrange(SEED_LIMIT) if seed is None else seed
