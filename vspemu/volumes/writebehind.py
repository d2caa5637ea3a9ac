"""Write-behind of a Thin Image P-VOL's first writes: the host does not wait for the pool's sync.

A host write to a track whose old bytes a snapshot still has to save (or to bytes already waiting here) is
not written to the P-VOL file at once: it is appended to a *pending log* (one file per P-VOL next to the
snapshot areas, ``pwrite`` into the page cache, which survives a kill -9; a CRC-32 per record), kept in memory
(the *overlay*), and acknowledged. One drainer task per volume then saves the old tracks of every pending
write (read, appended to the snapshot area and synced in a worker thread: ``save_ahead``; the observers'
``prepare_change`` for what that missed), and writes the pending bytes into the P-VOL in log order
(``before_change`` first, which checks the saved copies are durable; :data:`APPLY_PIECE` at a time, the
host's requests served in between), and drops them. So the P-VOL file keeps the old bytes until their saved
copy is durable, as before.

* Reads of the P-VOL (:meth:`Volume.read`, NBD, the TC/UR copy engine) see the overlay
  (:meth:`WriteBehind.overlay`); a snapshot's reads of tracks it has not saved read the file under it (the
  old bytes: every pending write came after the newest split).
* Only an unpaired volume's non-FUA host writes of at most :data:`MAX_RECORD` bytes whose only observer is
  the snapshots take this way; any other write (FUA, a TC/UR/GAD volume, a gated volume) first waits for the
  log to drain. A host FLUSH drains and syncs the log file. Any other change of the file that overlaps
  pending bytes (remote writes, UR restore, copy engine, discard) drains synchronously first
  (:meth:`WriteBehind.drain_sync`), and so does a split (the snapshot must contain every earlier write).
* The log is bounded (:data:`LIMIT` bytes); when full, a write waits for the drain and goes the old way.
* After a crash the log is replayed before any I/O (:meth:`WriteBehind.recover`): records past the header's
  *applied* sequence that check, in order, each saving its old tracks first; a record already applied is
  applied again harmlessly (nothing else wrote the file between its application and the header's update).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from vspemu.volumes.volume import Volume, pread_exact

log = logging.getLogger(__name__)

LIMIT = 64 << 20  # pending bytes at most; beyond, host writes wait for the drain
MAX_RECORD = 1 << 20  # larger host writes go the old way (after a drain)
REGION = 256 << 10  # the overlay's index granularity
APPLY_PIECE = 32  # the drainer applies this many pending writes, then lets the event loop serve hosts
# Tests only: the drainer waits this long before each round, so a test sees writes pending (and a kill -9 finds
# them in the log); 0 in normal use.
HOLD = float(os.environ.get("VSPEMU_WRITEBEHIND_HOLD_MS", "0")) / 1000
_FILE = struct.Struct(">4s4xQ")  # magic, applied sequence
_REC = struct.Struct(">4sIQQ")  # magic, length, sequence, offset; then crc (4) and padding to HEADER
HEADER = 32
FILE_MAGIC, REC_MAGIC = b"VWBL", b"VWBR"


class _Record:
    __slots__ = ("seq", "offset", "data")

    def __init__(self, seq: int, offset: int, data: bytes) -> None:
        self.seq, self.offset, self.data = seq, offset, data


class WriteBehind:
    """The pending log and overlay of one volume (see the module docstring)."""

    def __init__(self, volume: Volume, path: Path, unsaved: Callable[[int, int], bool],
                 save_ahead: Callable[[list[tuple[int, int]]], Awaitable[None]] | None = None) -> None:
        self.volume = volume
        self.path = path
        self.unsaved = unsaved  # (offset, length) -> must an old track be saved before these bytes change?
        self.save_ahead = save_ahead  # saves the old tracks of these ranges, the heavy part off the event loop
        self.records: deque[_Record] = deque()
        self.regions: dict[int, int] = {}  # region -> how many pending records touch it
        self.bytes = 0
        self.applying = False
        self.dirty = False  # the log file was written since its last sync
        self._task: asyncio.Task[None] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.seq = self.applied = 0
        self.end = HEADER

    # -- the log file ----------------------------------------------------------------------------------
    def _put_header(self) -> None:
        os.pwrite(self.fd, _FILE.pack(FILE_MAGIC, self.applied).ljust(HEADER, b"\0"), 0)
        self.dirty = True

    def recover(self) -> int:
        """Apply what a crash left in the log (before any I/O); returns how many records were applied."""
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, HEADER, 0)
        applied, pos, done = 0, HEADER, 0
        if len(head) == HEADER and head[:4] == FILE_MAGIC:
            applied = _FILE.unpack_from(head)[1]
            self.applying = True
            try:
                while pos + HEADER <= size:
                    raw = os.pread(self.fd, HEADER, pos)
                    magic, length, seq, offset = _REC.unpack_from(raw)
                    if magic != REC_MAGIC or pos + HEADER + length > size:
                        break
                    data = os.pread(self.fd, length, pos + HEADER)
                    if zlib.crc32(data, zlib.crc32(raw[:_REC.size])) != struct.unpack_from(">I", raw, _REC.size)[0]:
                        break  # torn (only a power loss tears a record; it was never acknowledged durable)
                    if seq > applied:  # (older records left behind newer ones are skipped)
                        self.volume.before_change(offset, length)
                        self.volume.write_local(offset, data, observed=True)
                        applied, done = seq, done + 1
                    pos += HEADER + length
            finally:
                self.applying = False
            if done:
                self.volume.flush_sync()
        self.seq = self.applied = applied
        os.ftruncate(self.fd, HEADER)
        self._put_header()
        os.fsync(self.fd)
        self.dirty = False
        return done

    def close(self, remove: bool = False) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if remove:
            self.path.unlink(missing_ok=True)

    # -- the overlay -------------------------------------------------------------------------------------
    def overlaps(self, offset: int, length: int) -> bool:
        if not self.records or length <= 0:
            return False
        regions = self.regions
        return any(r in regions for r in range(offset // REGION, (offset + length - 1) // REGION + 1))

    def must_drain(self, offset: int, length: int) -> bool:
        """Must a change of these bytes (not one of the log's own) wait for the pending writes first?"""
        return not self.applying and self.overlaps(offset, length)

    def overlay(self, offset: int, view: memoryview) -> None:
        """Put the pending bytes over ``view`` (the file's bytes from ``offset``), in log order."""
        end = offset + len(view)
        if not self.overlaps(offset, len(view)):
            return
        for rec in self.records:
            lo, hi = max(offset, rec.offset), min(end, rec.offset + len(rec.data))
            if lo < hi:
                view[lo - offset:hi - offset] = rec.data[lo - rec.offset:hi - rec.offset]

    # -- host writes -------------------------------------------------------------------------------------
    async def host_write(self, offset: int, data: bytes | memoryview, fua: bool) -> bool:
        """Take a host write into the log (True), or drain what is pending and leave it to the caller."""
        v = self.volume
        length = len(data)
        if (fua or length > MAX_RECORD or v.replicator is not None or v.write_gate is not None
                or len(v.observers) != 1 or self.fd < 0):
            if self.records:
                await self.drain()
            return False
        if not self.overlaps(offset, length) and not self.unsaved(offset, length):
            return False  # the tracks are saved and nothing is pending there: write the file at once
        if self.bytes + length > LIMIT:
            await self.drain()
            return False
        self._append(offset, bytes(data))  # (a copy: the caller's buffer is reused)
        return True

    def _append(self, offset: int, data: bytes) -> None:
        self.seq += 1
        raw = _REC.pack(REC_MAGIC, len(data), self.seq, offset)
        crc = zlib.crc32(data, zlib.crc32(raw))
        os.pwritev(self.fd, [raw, struct.pack(">I", crc), bytes(HEADER - _REC.size - 4), data], self.end)
        self.end += HEADER + len(data)
        self.dirty = True
        self.records.append(_Record(self.seq, offset, data))
        for r in range(offset // REGION, (offset + len(data) - 1) // REGION + 1):
            self.regions[r] = self.regions.get(r, 0) + 1
        self.bytes += len(data)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain_loop())

    # -- draining ----------------------------------------------------------------------------------------
    async def _drain_loop(self) -> None:
        v = self.volume
        while self.records and self.fd >= 0:
            if HOLD:
                await asyncio.sleep(HOLD)
            batch = list(self.records)
            ranges = {(r.offset, len(r.data)) for r in batch}
            if self.save_ahead is not None:
                try:
                    await self.save_ahead(sorted(ranges))
                except Exception as e:  # noqa: BLE001 - only a head start: prepare_change saves what is missing
                    log.warning("LDEV %s: saving old tracks ahead failed: %s", v.ldev_id, e)
            # what the head start missed (a split meanwhile, a failure): appended, one shared sync; only those
            # ranges (a coroutine per pending write was most of the event loop's drain work at queue depth 8)
            missed = [(o, n) for o, n in ranges if self.unsaved(o, n)]
            for preparer in v.preparers:
                await asyncio.gather(*(preparer.prepare_change(v, o, n) for o, n in missed))
            upto = batch[-1].seq
            while self.records and self.records[0].seq <= upto and self.fd >= 0:
                self._apply(upto, APPLY_PIECE)
                if self.records and self.records[0].seq <= upto:
                    await asyncio.sleep(0)  # the host's requests waiting meanwhile go first

    def _apply(self, upto: int | None, most: int | None = None) -> None:
        """Write the pending records (up to sequence ``upto``, None: all; at most ``most`` of them) into the
        file, in order."""
        v = self.volume
        self.applying = True
        n_left = -1 if most is None else most
        try:
            while self.records and (upto is None or self.records[0].seq <= upto) and n_left != 0:
                n_left -= 1
                rec = self.records[0]
                v.before_change(rec.offset, len(rec.data))  # saved copies durable (syncs itself if not)
                v.write_local(rec.offset, rec.data, observed=True)
                self.records.popleft()
                for r in range(rec.offset // REGION, (rec.offset + len(rec.data) - 1) // REGION + 1):
                    n = self.regions[r] - 1
                    if n:
                        self.regions[r] = n
                    else:
                        del self.regions[r]
                self.bytes -= len(rec.data)
                self.applied = rec.seq
        finally:
            self.applying = False
        if self.fd < 0:
            return
        self._put_header()
        if not self.records:  # the next records overwrite the file from the start; it is not truncated (a
            self.end = HEADER  # truncate waits for pages under writeback): the older records left behind the
            # new ones have sequences at most the header's, so a replay skips them (or stops at a torn one)

    def drain_sync(self) -> None:
        """Apply every pending write now, on this thread (a split, a non-host change of pending bytes)."""
        if self.records:
            self._apply(None)

    async def drain(self) -> None:
        """Wait until every pending write is in the file (raises what the drainer raised)."""
        while self.records and self.fd >= 0:
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._drain_loop())
            await asyncio.shield(self._task)

    async def flush(self) -> None:
        """A host FLUSH: drained, and the log's header durable (a replay must not redo older records)."""
        await self.drain()
        if self.dirty and self.fd >= 0:
            self.dirty = False
            await asyncio.to_thread(os.fdatasync, self.fd)


def attach(volume: Volume, path: Path, unsaved: Callable[[int, int], bool],
           save_ahead: Callable[[list[tuple[int, int]]], Awaitable[None]] | None = None) -> None:
    """Give the volume its pending log (first replaying what a crash left in it)."""
    if volume.behind is None:
        wb = WriteBehind(volume, path, unsaved, save_ahead)
        if wb.recover():
            log.info("LDEV %s: pending host writes replayed from %s", volume.ldev_id, path)
        volume.behind = wb


def detach(volume: Volume) -> None:
    """The volume no longer needs its pending log: apply what is in it and remove it."""
    wb = volume.behind
    if isinstance(wb, WriteBehind):
        wb.drain_sync()
        wb.close(remove=True)
        volume.behind = None


def read_under(vol: Volume, offset: int, view: memoryview) -> None:
    """A P-VOL's bytes in its file, without the pending writes (what a snapshot shows of an unsaved track);
    its image when it is itself a snapshot's S-VOL (a clone of that S-VOL)."""
    if vol.read_redirect is not None:
        vol.read_redirect(offset, view)
    else:
        pread_exact(vol.fd, view, offset, name=f"LDEV {vol.ldev_id}")
