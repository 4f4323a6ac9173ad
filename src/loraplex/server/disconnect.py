"""Stop work for a client that has gone away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from loraplex.server.errors import HTTPError

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499   # nginx's status for it; nobody is left to read it


class ClientDisconnected(HTTPError):
    """The client closed the connection before the response was ready."""

    def __init__(self, message: str) -> None:
        super().__init__(CLIENT_CLOSED_REQUEST, message)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await `work`; if the client disconnects first, cancel it (which aborts its
    engine requests, see generation.run_prompt) and raise ClientDisconnected."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnected(f"client disconnected from {request.url.path}")
    return work_task.result()
