"""Running a coroutine inline: the NBD server and the link step a handler in the receive callback and
make a task of it only if it suspends (most writes to an unpaired volume never do)."""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from typing import Any


@types.coroutine
def resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Go on awaiting ``coro``, which was stepped by hand and yielded ``yielded``."""
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
