"""Running a coroutine inline: the NBD server and the link step a handler in the receive callback and
make a task of it only if it suspends (most writes to an unpaired volume never do)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any


@types.coroutine
def resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Go on awaiting ``coro``, which was stepped by hand and yielded ``yielded``."""
    step: Callable[[Any], Any]  # coro.throw or coro.send
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # a cancellation: hand it to the coroutine
            step, arg = coro.throw, exc
        else:
            step, arg = coro.send, sent
        try:
            yielded = step(arg)
        except StopIteration as stop:
            return stop.value


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """``event.wait()`` bounded by ``timeout``; True if the event was set. Unlike ``asyncio.wait_for`` (which
    in Python 3.12 needs ``asyncio.current_task()``), it works in a coroutine stepped by hand, as the NBD
    server and the link do with host writes."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout)  # (asyncio.wait needs no current task)
    finally:
        waiter.cancel()
    return event.is_set()
