"""The write path of a paired volume and the copy engine: the part to read first.

A host write to a volume in a pair goes through :class:`PairVolume` (the volume's replicator):

1. the group :class:`WriteBarrier` is entered (a consistency-group split or a status change holds new
   writes for a moment and lets the ones in flight finish);
2. the track is marked in the pair side's :class:`~vspemu.replication.bitmap.DirtyBitmap`, durably, before
   anything else (so a crash never loses the knowledge that the track may differ);
3. the data is written locally;
4. by status:
   - P-VOL in PAIR (TrueCopy): the write is sent to the S-VOL over the link and the host is answered
     only when the S side has it; if that fails the pair is suspended and the fence level decides;
   - P-VOL in COPY: the mark is enough; the copier sends the track (again) later;
   - suspended, or the S-VOL written after a split with svolAccessMode rw / SSWS: the mark is the record.

While PAIR, marks are "activity" marks: the engine clears them in bulk now and then (with the barrier
held, so no write is in flight), as DRBD's activity log does, so steady writes do not pay a bitmap sync.

The copier (:func:`copy_marked_tracks`) walks the marked tracks of a P-VOL, reads them, and sends each
run as data or, when it is all zeros, as a "zero range" (holes are never sent as bytes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from vspemu.replication.bitmap import TRACK, DirtyBitmap
from vspemu.volumes.volume import Volume

if TYPE_CHECKING:
    from vspemu.replication.engine import Replication
    from vspemu.replication.model import Pair

ZEROS = bytes(16 * TRACK)
ACTIVITY_EXTENT = 64 * TRACK  # in PAIR, writes mark whole 16 MiB extents (DRBD's activity-log extents)


class WriteBarrier:
    """Writes enter shared; a status change holds new writes and waits for those in flight (exclusive)."""

    def __init__(self) -> None:
        self._active = 0
        self._held = 0
        self._cond = asyncio.Condition()

    async def enter(self) -> None:
        if not self._held:
            self._active += 1
            return
        async with self._cond:
            await self._cond.wait_for(lambda: not self._held)
            self._active += 1

    def leave(self) -> None:
        self._active -= 1
        if self._held and self._active == 0:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def hold(self) -> None:
        async with self._cond:
            self._held += 1
            await self._cond.wait_for(lambda: self._active == 0)

    async def release(self) -> None:
        async with self._cond:
            self._held -= 1
            self._cond.notify_all()


class InFlight:
    """Overlapping writes to one volume are sent in the order they were written locally."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, asyncio.Future[None]]] = []

    async def begin(self, offset: int, end: int) -> asyncio.Future[None]:
        while True:
            clash = next((f for s, e, f in self._ranges if s < end and offset < e), None)
            if clash is None:
                break
            await asyncio.shield(clash)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ranges.append((offset, end, fut))
        return fut

    def end(self, fut: asyncio.Future[None]) -> None:
        self._ranges = [r for r in self._ranges if r[2] is not fut]
        fut.set_result(None)


class PairVolume:
    """The replicator of a volume in a pair (see the module docstring for the order of things)."""

    def __init__(self, engine: Replication, pair: Pair, bitmap: DirtyBitmap, barrier: WriteBarrier) -> None:
        self.engine = engine
        self.pair = pair
        self.bitmap = bitmap
        self.barrier = barrier
        self.inflight = InFlight()

    async def write(self, volume: Volume, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._update(volume, offset, len(data), data, fua)

    async def discard(self, volume: Volume, offset: int, length: int, zero: bool, fua: bool) -> None:
        await self._update(volume, offset, length, None, fua)

    async def flush(self, volume: Volume) -> None:
        await volume.flush_local()
        mode = self.engine.write_mode(self.pair)
        if mode == "forward":
            await self.engine.forward_flush(self.pair)
        elif mode == "journal":
            await self.engine.ur.flush(self.pair)

    async def _update(self, volume: Volume, offset: int, length: int, data: bytes | memoryview | None,
                      fua: bool) -> None:
        await self.barrier.enter()
        try:
            pair = self.pair
            mode = self.engine.write_mode(pair)
            if mode == "journal":  # UR: the journal entry is the record; the secondary pulls it
                if await self.engine.ur.journal_write(pair, volume, offset, length, data, fua):
                    return
                mode = "local"  # the mirror was suspended while the write waited for journal room
            if mode == "forward":
                start = offset - offset % ACTIVITY_EXTENT
                end = offset + length
                end += -end % ACTIVITY_EXTENT
                await self.bitmap.mark(start, end - start)
                fut = await self.inflight.begin(offset, offset + length)
                try:
                    self._write_local(volume, offset, length, data)
                    await self.engine.forward_write(pair, self, offset, length, data, fua)
                    if fua:
                        await volume.flush_local()
                finally:
                    self.inflight.end(fut)
                return
            await self.bitmap.mark(offset, length)
            self._write_local(volume, offset, length, data)
            if pair.role == "P" and pair.status == "COPY":
                await self.bitmap.mark(offset, length)  # the copier may have cleared it meanwhile
            if fua:
                await volume.flush_local()
        finally:
            self.barrier.leave()

    @staticmethod
    def _write_local(volume: Volume, offset: int, length: int, data: bytes | memoryview | None) -> None:
        if data is None:
            volume.discard_local(offset, length)
        else:
            volume.write_local(offset, data)


SendChunk = Callable[[int, bytes | None, int], Awaitable[None]]  # (offset, data or None for zeros, length)


async def copy_marked_tracks(volume: Volume, bitmap: DirtyBitmap, send: SendChunk, pace: Callable[[], int],
                             progress: Callable[[int], None], window: int = 4) -> None:
    """Copy every marked track to the other side, until none is marked.

    Runs of up to ``pace()`` adjacent marked tracks go in one request, ``window`` requests in flight. A
    bit is cleared before its track is read, so a host write that lands during the copy marks it again
    and the track is sent once more. Raises whatever ``send`` raises (the link failed).
    """
    sem = asyncio.Semaphore(window)
    failures: list[BaseException] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(offset: int, length: int, ntracks: int) -> None:
        try:
            data = volume.read(offset, length)
            if data == ZEROS[:length]:
                await send(offset, None, length)
            else:
                await send(offset, data, length)
            progress(ntracks)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            failures.append(e)
        finally:
            sem.release()

    try:
        while bitmap.count() and not failures:
            run_start = run_len = -1
            for t in bitmap.tracks():
                if failures:
                    break
                if run_len > 0 and t == run_start + run_len and run_len < max(1, pace()):
                    run_len += 1
                    continue
                if run_len > 0:
                    await _launch(volume, bitmap, run_start, run_len, sem, tasks, one)
                run_start, run_len = t, 1
            if run_len > 0 and not failures:
                await _launch(volume, bitmap, run_start, run_len, sem, tasks, one)
            if tasks:
                await asyncio.gather(*tasks)
            bitmap.sync()
    finally:
        for task in tasks:
            task.cancel()
    if failures:
        raise failures[0]


async def _launch(volume: Volume, bitmap: DirtyBitmap, first: int, n: int, sem: asyncio.Semaphore,
                  tasks: set[asyncio.Task[None]], one: Callable[[int, int, int], Awaitable[None]]) -> None:
    await sem.acquire()
    for t in range(first, first + n):
        bitmap.clear(t)
    offset = first * TRACK
    length = min(n * TRACK, volume.size - offset)
    task = asyncio.get_running_loop().create_task(one(offset, length, n))
    tasks.add(task)
    task.add_done_callback(tasks.discard)
