"""``unless_disconnected``: work stops with its request, however the request ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from service.api.disconnect import unless_disconnected


def silent_request() -> Request:
    """A request whose client never disconnects."""

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


def test_cancelling_the_request_cancels_its_work() -> None:
    asyncio.run(cancel_while_working())


async def cancel_while_working() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    waiting = asyncio.ensure_future(unless_disconnected(silent_request(), work()))
    await started.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.wait_for(cancelled.wait(), 5)
    assert cancelled.is_set()
