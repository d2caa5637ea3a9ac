"""The copy machinery of a ShadowImage pair: its runtime (bitmaps, in-flight tracks), the change observers of
its two volumes (copy-on-write into the S-VOL for tracks still pending after a split, refusals of S-VOL writes
while the pair is not split) and the background copier (initial copy, resync, the pending tracks of a split,
and the restore that writes the P-VOL through :meth:`Volume.write`).

:class:`SiCopier` is a base of :class:`vspemu.localcopy.shadowimage.ShadowImages`, the pairs' registry and
operations; the design and the durability rules are described there.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Iterable

from vspemu.localcopy.shadowimage_model import COPY, PAIR, PSUE, PSUS, RCPY, SiPair
from vspemu.replication.bitmap import TRACK, DirtyBitmap
from vspemu.volumes.volume import Volume, WriteRefused

log = logging.getLogger(__name__)

BATCH = 16  # tracks (4 MiB) copied per step of the copier (without yielding to host I/O)
SETTLE_TRACKS = 256  # the S-VOL is made durable, and the copied tracks' bits cleared, every 64 MiB
_ZERO_TRACK = bytes(TRACK)
_RESTORING: contextvars.ContextVar[SiRuntime | None] = contextvars.ContextVar("si_restoring", default=None)


def _is_zero(data: bytes) -> bool:
    return data == _ZERO_TRACK if len(data) == TRACK else data.count(0) == len(data)


class SiRuntime:
    """A pair's bitmaps, copier and observers (one per volume)."""

    def __init__(self, pair: SiPair, pvol: Volume, svol: Volume, p: DirtyBitmap,
                 s: DirtyBitmap, pend: DirtyBitmap | None) -> None:
        self.pair = pair
        self.pvol = pvol
        self.svol = svol
        self.p = p
        self.s = s
        self.pend = pend
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.own = False  # the copier is changing the S-VOL now (its own observer lets it through)
        self.inflight: set[int] = set()  # tracks copied whose S-VOL data is not durable yet
        self.redirty: set[int] = set()  # of those, tracks the P-VOL changed meanwhile
        self.pend_unsynced = False  # pending bits cleared in memory, not yet on disk
        self.drained = asyncio.Event()  # set when no pending tracks are left
        self.settled = asyncio.Event()  # set when no copy (COPY, RCPY) is under way
        if pair.status not in (COPY, RCPY):
            self.settled.set()
        self.deleted = False
        self.cow_tracks = 0  # pending tracks copied before a change to them (copy-on-write), since the start
        self.tracks_copied = 0  # tracks the copier copied since the last create / split / resync / restore
        self.p_obs = _PSide(self)
        self.s_obs = _SSide(self)

    def poke(self) -> None:
        self.wake.set()

    # -- pending tracks ----------------------------------------------------------------------------------
    def pending_in(self, offset: int, length: int) -> list[int]:
        pend = self.pend
        if pend is None:
            return []
        first, last = pend.track_range(offset, length)
        return [t for t in range(first, last + 1) if pend.is_set(t)]

    def fetch_pending(self, tracks: list[int]) -> None:
        """Copy pending tracks P-VOL -> S-VOL now and make that (and the clears) durable."""
        pend = self.pend
        assert pend is not None
        for t in tracks:
            self.copy_track(self.pvol, self.svol, t)
            pend.clear(t)
        self.tracks_copied += len(tracks)
        self.cow_tracks += len(tracks)
        self.sync_pending()

    def sync_pending(self) -> None:
        if self.pend is None:
            return
        self.svol.flush_sync()
        self.pend.sync()
        self.pend_unsynced = False

    def copy_track(self, src: Volume, dst: Volume, t: int) -> None:
        """One track src -> dst (synchronous; holes and zeros become holes on the target)."""
        off = t * TRACK
        n = min(TRACK, src.size - off)
        if n <= 0:
            return
        self.own = True
        try:
            if not src.data_extents(off, off + n):
                dst.discard_local(off, n)
                return
            data = src.read(off, n)
            if _is_zero(data):
                dst.discard_local(off, n)
            else:
                dst.write_local(off, data)
        finally:
            self.own = False


class _PSide:
    def __init__(self, rt: SiRuntime) -> None:
        self.rt = rt

    def before_change(self, volume: Volume, offset: int, length: int) -> None:
        rt = self.rt
        status = rt.pair.status
        if status == RCPY:
            if _RESTORING.get() is rt:
                return
            raise WriteRefused(f"P-VOL {volume.ldev_id}: a ShadowImage restore is under way")
        if rt.inflight:
            first, last = rt.p.track_range(offset, length)
            rt.redirty.update(t for t in range(first, last + 1) if t in rt.inflight)
        if rt.pend is not None:
            if rt.pend_unsynced:
                rt.sync_pending()
            tracks = rt.pending_in(offset, length)
            if tracks:  # copy-on-write into the S-VOL: it keeps the split instant's bytes
                rt.fetch_pending(tracks)
        rt.p.mark_sync(offset, length)
        if status in (COPY, PAIR):
            rt.poke()


class _SSide:
    def __init__(self, rt: SiRuntime) -> None:
        self.rt = rt

    def before_change(self, volume: Volume, offset: int, length: int) -> None:
        rt = self.rt
        if rt.own:
            return
        if rt.pair.status not in (PSUS, PSUE):
            raise WriteRefused(f"S-VOL {volume.ldev_id} of a ShadowImage pair in {rt.pair.status} is not writable")
        if rt.pend is not None:
            if rt.pend_unsynced:
                rt.sync_pending()
            tracks = rt.pending_in(offset, length)
            if tracks:  # the track must hold the split image before part of it is overwritten
                rt.fetch_pending(tracks)
        if rt.inflight:  # a resync merges this mark into p: the copier must not clear those bits
            first, last = rt.s.track_range(offset, length)
            rt.redirty.update(t for t in range(first, last + 1) if t in rt.inflight)
        rt.s.mark_sync(offset, length)


class SiCopier:
    """The background copier of each pair (a base of ShadowImages)."""

    def _save(self, pairs: Iterable[SiPair]) -> None:
        raise NotImplementedError

    def split(self, pairs: list[SiPair]) -> None:
        raise NotImplementedError

    def _drop_pending(self, rt: SiRuntime) -> None:
        if rt.pend is not None:
            rt.pend.remove()
            rt.pend = None
        rt.drained.set()


    # -- the copier -----------------------------------------------------------------------------------
    async def _copier(self, rt: SiRuntime) -> None:
        while not rt.deleted:
            rt.wake.clear()
            try:
                did = await self._step(rt)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the copy failed (an I/O error): the pair is suspended by an error
                log.warning("ShadowImage pair %s: copy failed: %s", rt.pair.pair_id, e)
                if rt.deleted:
                    return
                rt.inflight.clear()
                rt.redirty.clear()
                self._drop_pending(rt)
                rt.pair.status = PSUE
                self._save([rt.pair])
                rt.settled.set()
                did = False
            if did:
                pace = rt.pair.copy_pace  # 15: as fast as it goes; lower: a pause after every 4 MiB
                await asyncio.sleep(0 if pace >= 15 else (15 - pace) * 0.002)
            else:
                await rt.wake.wait()

    async def _step(self, rt: SiRuntime) -> bool:
        """One batch of the pair's copy; False when there was nothing to do."""
        pair = rt.pair
        if rt.inflight and pair.status not in (COPY, PAIR, PSUS):
            await self._settle(rt)
        if pair.status in (COPY, PAIR):
            inflight = rt.inflight
            batch = _first((t for t in rt.p.tracks() if t not in inflight), BATCH)
            if not batch:
                if inflight:
                    await self._settle(rt)
                    return True
                if pair.status == COPY:
                    pair.status = PAIR
                    self._save([pair])
                    rt.settled.set()
                    if pair.auto_split:
                        self.split([pair])
                        return True
                return False
            await self._copy_batch(rt, batch, clear_pending=False)
            return True
        if pair.status == PSUS and rt.pend is not None:
            batch = _first(rt.pend.tracks(), BATCH)
            if not batch:
                if rt.inflight or rt.pend_unsynced:
                    await self._settle(rt)
                    return True
                self._drop_pending(rt)
                self._save([pair])
                return False
            await self._copy_batch(rt, batch, clear_pending=True)
            return True
        if rt.inflight:
            await self._settle(rt)
        if pair.status == RCPY:
            batch = _first(rt.p.tracks(), BATCH)
            if not batch:
                pair.status = PAIR
                self._save([pair])
                rt.settled.set()
                return False
            token = _RESTORING.set(rt)
            try:
                for t in batch:
                    off = t * TRACK
                    n = min(TRACK, rt.svol.size - off)
                    data = rt.svol.read(off, n) if rt.svol.data_extents(off, off + n) else b""
                    if not data or _is_zero(data):
                        await rt.pvol.discard(off, n)
                    else:
                        await rt.pvol.write(off, data)
                await rt.pvol.flush()
            finally:
                _RESTORING.reset(token)
            if rt.deleted:
                return False
            for t in batch:
                rt.p.clear(t)
            rt.p.sync()
            rt.tracks_copied += len(batch)
            return True
        return False

    async def _copy_batch(self, rt: SiRuntime, batch: list[int], clear_pending: bool) -> None:
        """Copy tracks P-VOL -> S-VOL (synchronously: no host write falls in between). Their bits are cleared
        later, by :meth:`_settle`, once the S-VOL is durable (every :data:`SETTLE_TRACKS` tracks)."""
        for t in batch:
            rt.copy_track(rt.pvol, rt.svol, t)
        rt.tracks_copied += len(batch)
        if clear_pending and rt.pend is not None:
            for t in batch:
                rt.pend.clear(t)
            rt.pend_unsynced = True  # a change to these tracks syncs first (see _PSide / _SSide)
        rt.inflight.update(batch)
        if len(rt.inflight) >= SETTLE_TRACKS:
            await self._settle(rt)

    async def _settle(self, rt: SiRuntime) -> None:
        """Make the S-VOL durable, then clear the bits of the copied tracks that neither volume changed since
        their copy (and persist the pending tracks' clears)."""
        try:
            await asyncio.to_thread(os.fdatasync, rt.svol.fd)
        finally:
            inflight, redirty = rt.inflight, rt.redirty
            rt.inflight, rt.redirty = set(), set()
        if rt.deleted:
            return
        if rt.pend is not None and rt.pend_unsynced:
            rt.pend.sync()
            rt.pend_unsynced = False
        for t in inflight - redirty:
            rt.p.clear(t)
        rt.p.sync()


def _first(tracks: Iterable[int], n: int) -> list[int]:
    out: list[int] = []
    for t in tracks:
        out.append(t)
        if len(out) >= n:
            break
    return out
