"""Work that stops when its client goes away: the decode and the tiles of a request whose client
disconnected are cancelled (the decode's process is killed, the tiles are dropped from the batcher)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from ..errors import ClientClosedRequest

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away (its queued tiles are then dropped)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        gone.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task.cancelled():
        raise ClientClosedRequest("client disconnected before the result was ready")
    return task.result()


async def client_gone(request: Request) -> None:
    """Returns when the ASGI server reports that the client disconnected (the body is read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
