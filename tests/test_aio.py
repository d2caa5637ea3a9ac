"""vspemu.aio: coroutines stepped by hand, as the NBD server and the link step host writes."""

from __future__ import annotations

import asyncio

from vspemu.aio import resume, wait_event


def test_wait_event_works_in_a_coroutine_stepped_outside_any_task() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        result: asyncio.Future[tuple[bool, bool]] = loop.create_future()

        async def writer() -> tuple[bool, bool]:
            first = await wait_event(event, 0.05)  # times out
            loop.call_later(0.01, event.set)
            return first, await wait_event(event, 5)

        async def finish(awaitable: object) -> None:
            result.set_result(await awaitable)  # type: ignore[misc]

        def step() -> None:  # a plain callback, like nbd._Connection._run in its receive callback
            assert asyncio.current_task() is None
            coro = writer()
            yielded = coro.send(None)  # the first wait_event starts here, with no task
            loop.create_task(finish(resume(coro, yielded)))

        loop.call_soon(step)
        assert await asyncio.wait_for(result, 10) == (False, True)

    asyncio.run(body())
