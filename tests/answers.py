"""An engine call's failure as the HTTP API answers it (:func:`service.errors.http_answer`): tests
that call the engine directly check the status, message and ``Retry-After`` a client would get."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from service.errors import ErrorAnswer, http_answer
from service.failures import Failure


@dataclass
class Answered:
    value: ErrorAnswer = field(init=False)  # set when the block has raised


@contextmanager
def answered(kind: type[Failure]) -> Iterator[Answered]:
    """``pytest.raises(kind)``, whose ``value`` is the failure's HTTP answer."""
    caught = Answered()
    with pytest.raises(kind) as raised:
        yield caught
    caught.value = http_answer(raised.value)
