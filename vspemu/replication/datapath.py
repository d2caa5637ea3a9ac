"""The write path of a paired volume and the copy engine: the part to read first.

A host write to a volume in a pair goes through :class:`PairVolume` (the volume's replicator):

1. the group :class:`WriteBarrier` is entered (a consistency-group split or a status change holds new
   writes for a moment and lets the ones in flight finish);
2. the track is marked in the pair side's :class:`~vspemu.replication.bitmap.DirtyBitmap`, durably, before
   anything else (so a crash never loses the knowledge that the track may differ);
3. the data is written locally (for a TrueCopy P-VOL in PAIR: while the S side writes it, see 4.);
4. by status:
   - P-VOL in PAIR (TrueCopy): the write is sent to the S-VOL over the link, written locally while the S side
     works on it, and the host is answered only when the S side has it; if that fails the pair is suspended
     and the fence level decides;
   - P-VOL in COPY: the mark is enough; the copier sends the track (again) later;
   - suspended, or the S-VOL written after a split with svolAccessMode rw / SSWS: the mark is the record.

While PAIR, marks are "activity" marks on whole 16 MiB extents, kept as a bounded hot set as DRBD's activity
log does: an extent that is marked already costs a write nothing (no bitmap sync). The engine clears, with the
group barrier held (so no write is in flight and every earlier one reached the S-VOL), the extents not
written for :data:`ACTIVITY_MAX_AGE` seconds and, when more than :data:`ACTIVITY_MAX_EXTENTS` are marked, the
least recently written ones. After a crash the marked extents are copied again (at most the hot set).

The copier (:func:`copy_marked_tracks`) walks the marked tracks of a P-VOL, reads them, and sends each
run as data or, when it is all zeros, as a "zero range" (holes are never sent as bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np

from vspemu.replication.bitmap import TRACK, DirtyBitmap
from vspemu.replication.receiver import BUFFERS
from vspemu.volumes.volume import SEEK_DATA, Volume

if TYPE_CHECKING:
    from vspemu.replication.kinds import WritePathHost
    from vspemu.replication.model import Pair

ACTIVITY_EXTENT = 64 * TRACK  # in PAIR, writes mark whole 16 MiB extents (DRBD's activity-log extents)
ACTIVITY_MAX_EXTENTS = 256  # per P-VOL: a hot set of up to 4 GiB stays marked (DRBD: al-extents)...
ACTIVITY_LOW_EXTENTS = 192  # ...when it grows beyond, the least recently written are cleared down to this
ACTIVITY_MAX_AGE = 60.0  # seconds: an extent not written for this long is cleared at the next check
ACTIVITY_AHEAD = 7  # a write that marks its extent marks up to this many following extents with it


class WriteBarrier:
    """Writes enter shared; a status change holds new writes and waits for those in flight (exclusive)."""

    def __init__(self) -> None:
        self._active = 0
        self._held = 0
        self._cond = asyncio.Condition()

    def try_enter(self) -> bool:
        """Enter without waiting if nothing holds the barrier (the host write path's usual case)."""
        if self._held:
            return False
        self._active += 1
        return True

    async def enter(self) -> None:
        if self.try_enter():
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


class _Range:
    """A write in flight: its byte range, and a future made only when another write has to wait for it."""

    __slots__ = ("start", "end", "done")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.done: asyncio.Future[None] | None = None


class InFlight:
    """Overlapping writes to one volume are sent in the order they were written locally."""

    def __init__(self) -> None:
        self._ranges: list[_Range] = []

    def _clash(self, offset: int, end: int) -> _Range | None:
        for r in self._ranges:
            if r.start < end and offset < r.end:
                return r
        return None

    def try_begin(self, offset: int, end: int) -> _Range | None:
        """Register a write if no write in flight overlaps it (no waiting, no future: the usual case)."""
        if self._clash(offset, end) is not None:
            return None
        r = _Range(offset, end)
        self._ranges.append(r)
        return r

    async def begin(self, offset: int, end: int) -> _Range:
        while True:
            r = self.try_begin(offset, end)
            if r is not None:
                return r
            clash = self._clash(offset, end)
            assert clash is not None
            if clash.done is None:
                clash.done = asyncio.get_running_loop().create_future()
            await asyncio.shield(clash.done)

    def end(self, r: _Range) -> None:
        self._ranges.remove(r)  # (by identity: _Range does not define equality)
        if r.done is not None:
            r.done.set_result(None)


Target = tuple["Pair", DirtyBitmap, WriteBarrier]


class PairVolume:
    """The replicator of a volume in a pair (see the module docstring for the order of things).

    A P-VOL may be in several pairs (multi-target): up to four UR mirrors of its journal, and at most one
    TrueCopy pair beside them (3DC multi-target). Then ``targets`` has one entry per pair (in group order, the
    order barriers are entered), and a write goes through :meth:`_update_all`: one journal entry for the UR
    pairs in PAIR/PFUL, the TrueCopy S-VOL sent the write as in the single-pair path, marks for the others.
    Otherwise there is one target, and the write path below is the single pair's. ``pair``/``bitmap``/
    ``barrier`` are the TrueCopy pair's if there is one (its activity extents are kept here), else the first.
    """

    def __init__(self, engine: WritePathHost, targets: list[Target]) -> None:
        self.engine = engine
        self.targets = targets
        self.pair, self.bitmap, self.barrier = targets[0]
        self.multi = len(targets) > 1
        self.tc_pair: Pair | None = None  # (multi-target only: the single path does not need to know)
        for target in targets if self.multi else ():
            if engine.groups[target[0].group].replication_type == "TC":
                self.pair, self.bitmap, self.barrier = target
                self.tc_pair = target[0]
        self.inflight = InFlight()
        self.activity: dict[int, float] = {}  # marked activity extent -> last write (monotonic), oldest first

    def activity_victims(self, now: float, max_extents: int = ACTIVITY_MAX_EXTENTS,
                         low_extents: int = ACTIVITY_LOW_EXTENTS, max_age: float = ACTIVITY_MAX_AGE) -> list[int]:
        """The activity extents to clear now: the idle ones, and the least recently written over the limit."""
        act = self.activity
        excess = len(act) - low_extents if len(act) > max_extents else 0
        out: list[int] = []
        for ext, last in act.items():  # oldest first
            if len(out) < excess or now - last >= max_age:
                out.append(ext)
            else:
                break
        return out

    def activity_due(self) -> bool:
        """True if some activity marks should be cleared now (or marks exist that the write path did not make)."""
        return not self.activity or bool(self.activity_victims(time.monotonic()))

    def clear_activity(self) -> None:
        """Clear the due activity extents in the bitmap (only with the barrier held, in PAIR; then sync)."""
        if not self.activity:
            self.bitmap.clear_range(0, self.bitmap.ntracks * TRACK)
            return
        for ext in self.activity_victims(time.monotonic()):
            del self.activity[ext]
            self.bitmap.clear_range(ext * ACTIVITY_EXTENT, ACTIVITY_EXTENT)

    def write(self, volume: Volume, offset: int, data: bytes | memoryview, fua: bool) -> Coroutine[Any, Any, None]:
        if self.multi:
            return self._update_all(volume, offset, len(data), data, fua)
        return self._update(volume, offset, len(data), data, fua)  # (no coroutine of its own: one frame less)

    def discard(self, volume: Volume, offset: int, length: int, zero: bool, fua: bool) -> Coroutine[Any, Any, None]:
        if self.multi:
            return self._update_all(volume, offset, length, None, fua)
        return self._update(volume, offset, length, None, fua)

    async def flush(self, volume: Volume) -> None:
        await volume.flush_local()
        journaled = None
        for pair, _, _ in self.targets:
            mode = self.engine.write_mode(pair)
            if mode == "forward":
                await self.engine.forward_flush(pair)
            elif mode == "active":
                await self.engine.active_flush(pair)
            elif mode == "journal":
                journaled = pair
        if journaled is not None:
            await self.engine.ur.flush(journaled)  # (one journal for all the mirrors of the volume)

    async def _update_all(self, volume: Volume, offset: int, length: int, data: bytes | memoryview | None,
                          fua: bool) -> None:
        """A write to a P-VOL in several pairs: the pairs' barriers are entered (in group order), the pairs
        that neither journal nor forward it are marked, then one journal entry serves the UR pairs in PAIR/PFUL
        (it writes the volume) and, for a TrueCopy pair in PAIR, the write is sent to its S-VOL and the host is
        answered once the S side has it. If a UR pair leaves PAIR/PFUL while the write waits for journal room,
        it is planned again."""
        entered: list[WriteBarrier] = []
        flight: _Range | None = None
        try:
            for _, _, barrier in self.targets:
                if barrier not in entered:
                    if not barrier.try_enter():
                        await barrier.enter()
                    entered.append(barrier)
            if volume.replicator is not self:
                return await self._again(volume, offset, length, data, fua, entered)
            if self.tc_pair is not None:  # overlapping writes reach the TrueCopy S-VOL in the order written here
                flight = self.inflight.try_begin(offset, offset + length) or \
                    await self.inflight.begin(offset, offset + length)
            written = False  # the volume holds the write (journal_write writes it, and flushes it for FUA)
            while True:
                modes = [(pair, bitmap, self.engine.write_mode(pair)) for pair, bitmap, _ in self.targets]
                for _pair, bitmap, mode in modes:
                    if mode == "local":
                        await bitmap.mark(offset, length)
                    elif mode == "forward" and (extents := self._touch_activity(offset, length)) is not None:
                        await bitmap.mark(*extents)
                journaled = [pair for pair, _, mode in modes if mode == "journal"]
                if not journaled:
                    break
                if await self.engine.ur.journal_write(journaled, volume, offset, length, data, fua):
                    written = True
                    break
            tc = self.tc_pair
            if tc is not None and self.engine.write_mode(tc) == "forward":
                def local() -> None:
                    if not written:
                        self._write_local(volume, offset, length, data)

                await self.engine.forward_write(tc, self, offset, length, data, fua, local)
                if fua and not written:
                    await volume.flush_local()
            elif not written:
                self._write_local(volume, offset, length, data)
                if fua:
                    await volume.flush_local()
            for pair, bitmap, _ in self.targets:
                if pair.role == "P" and pair.status == "COPY":
                    await bitmap.mark(offset, length)  # the copier may have cleared it meanwhile
        finally:
            if flight is not None:
                self.inflight.end(flight)
            for barrier in entered:
                barrier.leave()

    def _touch_activity(self, offset: int, length: int) -> tuple[int, int] | None:
        """A TrueCopy write in PAIR: the activity extents it touches become the most recently written; returns
        the range the bitmap must mark (durably, before the write) if it is not marked yet. That range also
        covers the :data:`ACTIVITY_AHEAD` next extents not in the hot set (they join it as written now): a
        sync holds every write of the volume (``DirtyBitmap.mark``), so a stream syncs once per 128 MiB."""
        first = offset // ACTIVITY_EXTENT
        last = (offset + max(length, 1) - 1) // ACTIVITY_EXTENT
        now = time.monotonic()
        act = self.activity
        for ext in range(first, last + 1):
            act.pop(ext, None)
            act[ext] = now  # most recently written last
        marked = first * ACTIVITY_EXTENT, (last + 1 - first) * ACTIVITY_EXTENT
        if self.bitmap.is_marked(*marked):
            return None
        end = last + 1
        limit = -(-self.bitmap.ntracks * TRACK // ACTIVITY_EXTENT)  # extents of the volume
        while end < limit and end <= last + ACTIVITY_AHEAD and end not in act:
            act[end] = now
            end += 1
        return first * ACTIVITY_EXTENT, (end - first) * ACTIVITY_EXTENT

    async def _again(self, volume: Volume, offset: int, length: int, data: bytes | memoryview | None, fua: bool,
                     entered: list[WriteBarrier]) -> None:
        """The volume's pairs changed while this write waited at a barrier (a pair was deleted, or the P-VOL
        joined another mirror): leave, and write through the volume's write path as it is now."""
        for barrier in entered:
            barrier.leave()
        entered.clear()
        if data is None:
            await volume.discard(offset, length, True, fua)
        else:
            await volume.write(offset, data, fua)

    async def _update(self, volume: Volume, offset: int, length: int, data: bytes | memoryview | None,
                      fua: bool) -> None:
        if not self.barrier.try_enter():
            await self.barrier.enter()
            if volume.replicator is not self:
                return await self._again(volume, offset, length, data, fua, [self.barrier])
        try:
            pair = self.pair
            mode = self.engine.write_mode(pair)
            while mode == "journal":  # UR: the journal entry is the record; the secondary pulls it
                if await self.engine.ur.journal_write([pair], volume, offset, length, data, fua):
                    return
                # the write waited for journal room, and a mirror was suspended to make some: if it was this
                # one, the write is now "local" (a mark); if another one sharing the journal, journal it now
                mode = self.engine.write_mode(pair)
            if mode == "active":  # GAD in PAIR (see gad_io): the kind orders, marks and mirrors the write
                await self.engine.active_write(pair, self, volume, offset, length, data, fua)
                return
            if mode == "forward":
                extents = self._touch_activity(offset, length)
                if extents is not None:
                    await self.bitmap.mark(*extents)
                flight = self.inflight.try_begin(offset, offset + length) or \
                    await self.inflight.begin(offset, offset + length)
                try:
                    await self.engine.forward_write(pair, self, offset, length, data, fua,
                                                    lambda: self._write_local(volume, offset, length, data))
                    if fua:
                        await volume.flush_local()
                finally:
                    self.inflight.end(flight)
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


SendChunk = Callable[[int, "bytes | memoryview | None", int], Awaitable[None]]  # (offset, data / None, length)
SendRuns = Callable[[list[tuple[int, int]], memoryview], Awaitable[None]]  # ([(offset, length)], their data)

MAX_RUN_TRACKS = 32  # at copyPace 15: 8 MiB per request
MAX_WINDOW = 16
COPY_MEMORY = 64 << 20  # process-wide: bytes of track data read for copying and not yet acknowledged


def run_tracks(pace: int) -> int:
    """Tracks per copy request for a copyPace (1..15): 4 at pace 1 up to 32 at pace 15."""
    return max(1, min(MAX_RUN_TRACKS, 2 * pace + 2))


def copy_window(pace: int) -> int:
    """Copy requests in flight for a copyPace: 2 at pace 1 up to 8 at pace 15."""
    return max(2, min(MAX_WINDOW, pace // 2 + 1))


class ByteBudget:
    """A counting limit in bytes shared by every copier of the process (bounded memory, whatever the pairs)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        while self.used + n > self.limit:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)


COPY_BUDGET = ByteBudget(COPY_MEMORY)


def _all_zero(view: memoryview) -> bool:
    if view[0] or view[-1]:  # data (almost always decided here)
        return False
    arr = np.frombuffer(view, dtype=np.uint64 if len(view) % 8 == 0 else np.uint8)
    return not arr.any()


def _is_hole(volume: Volume, offset: int, length: int) -> bool:
    """True if the range holds no data at all (SEEK_DATA finds none): it is sent as zeros without reading."""
    if volume.behind is not None and volume.behind.overlaps(offset, length):
        return False  # host writes not yet in the file (read with the overlay)
    try:
        return os.lseek(volume.fd, offset, SEEK_DATA) >= offset + length
    except OSError as e:
        return e.errno == errno.ENXIO  # no data after offset


@contextlib.asynccontextmanager
async def _copy_buffer(n: int) -> AsyncIterator[memoryview]:
    """``n`` bytes of the copy budget and a pooled buffer for them, both given back however the copy ends."""
    budget = await COPY_BUDGET.acquire(n)
    buf = None
    try:
        buf = BUFFERS.get(n)
        yield memoryview(buf)[:n]
    finally:
        if buf is not None:
            BUFFERS.put(buf)
        if budget:
            COPY_BUDGET.release(budget)


async def copy_marked_tracks(volume: Volume, bitmap: DirtyBitmap, send: SendChunk, pace: Callable[[], int],
                             progress: Callable[[int], None], window: int | None = None,
                             send_runs: SendRuns | None = None) -> None:
    """Copy every marked track to the other side, until none is marked.

    Runs of up to :func:`run_tracks` ``(pace())`` adjacent marked tracks go in one request, up to
    :func:`copy_window` ``(pace())`` (or ``window``) requests in flight, and all copiers of the process hold
    at most :data:`COPY_MEMORY` bytes of track data. A run without data (SEEK_DATA) is sent as a zero range
    without reading it; otherwise it is read with ``preadv`` into a pooled page-aligned buffer and sent as
    data, or as a zero range when it reads as zeros. A bit is cleared before its track is read, so a host
    write that lands during the copy marks it again and the track is sent once more. Raises whatever
    ``send`` raises (the link failed).

    With ``send_runs``, runs that are not adjacent (a resync's scattered tracks) go together, up to
    :func:`run_tracks` tracks per request, with their ``(offset, length)`` list: a few round trips, not one
    per track (a request costs both sides far more than its 256 KiB).
    """
    failures: list[BaseException] = []
    tasks: set[asyncio.Task[None]] = set()
    slots_free = asyncio.Event()
    slots_free.set()

    def current_window() -> int:
        return max(1, window) if window is not None else copy_window(pace())

    async def one(offset: int, length: int, ntracks: int) -> None:
        try:
            if _is_hole(volume, offset, length):
                await send(offset, None, length)
            else:
                async with _copy_buffer(length) as view:
                    volume.read_into(offset, view)
                    await send(offset, None if _all_zero(view) else view, length)
            progress(ntracks)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            failures.append(e)

    async def several(runs: list[tuple[int, int]], ntracks: int) -> None:  # (holes go as zero ranges)
        assert send_runs is not None
        try:
            data_runs: list[tuple[int, int]] = []
            for offset, length in runs:
                if _is_hole(volume, offset, length):
                    await send(offset, None, length)
                else:
                    data_runs.append((offset, length))
            total = sum(length for _, length in data_runs)
            if total:
                async with _copy_buffer(total) as view:
                    at = 0
                    for offset, length in data_runs:
                        volume.read_into(offset, view[at:at + length])
                        at += length
                    await send_runs(data_runs, view)
            progress(ntracks)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            failures.append(e)

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if len(tasks) < current_window():
            slots_free.set()

    async def launch(batch: list[tuple[int, int]]) -> None:  # one request: runs (first track, tracks)
        while len(tasks) >= current_window():
            slots_free.clear()
            await slots_free.wait()
        runs: list[tuple[int, int]] = []
        ntracks = 0
        for first, n in batch:
            for t in range(first, first + n):
                bitmap.clear(t)
            offset = first * TRACK
            runs.append((offset, min(n * TRACK, volume.size - offset)))
            ntracks += n
        batch.clear()
        coro = one(runs[0][0], runs[0][1], ntracks) if len(runs) == 1 else several(runs, ntracks)
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(done)

    batch: list[tuple[int, int]] = []  # runs gathered for one request (send_runs): (first track, tracks)
    batched = 0

    async def add(first: int, n: int, limit: int) -> None:
        nonlocal batched
        if batch and (send_runs is None or batched + n > limit):
            await launch(batch)
            batched = 0
        batch.append((first, n))
        batched += n

    try:
        while bitmap.count() and not failures:
            run_start = run_len = -1
            limit = run_tracks(pace())
            for t in bitmap.tracks():
                if failures:
                    break
                if run_len > 0 and t == run_start + run_len and run_len < limit:
                    run_len += 1
                    continue
                if run_len > 0:
                    await add(run_start, run_len, limit)
                    limit = run_tracks(pace())
                run_start, run_len = t, 1
            if run_len > 0 and not failures:
                await add(run_start, run_len, limit)
            if batch and not failures:
                await launch(batch)
            batch.clear()
            batched = 0
            if tasks:
                await asyncio.gather(*tasks)
            bitmap.sync()
    finally:
        for task in tasks:
            task.cancel()
    if failures:
        raise failures[0]
