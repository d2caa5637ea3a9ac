"""The saved tracks of one Thin Image snapshot: one append-only file in the pool.

A snapshot's *area* is a log of records, each a 32-byte header and (for data records) one track of bytes:

* ``COW``: the P-VOL's old bytes of a track, saved before the P-VOL changed it for the first time after the
  split (shared by the older snapshots, see :mod:`vspemu.localcopy.snapshot`);
* ``OWN``: bytes a host wrote through the snapshot's S-VOL, kept after the S-VOL was unassigned;
* ``WRITTEN``: no data; the track of the assigned S-VOL (assignment ``epoch``) holds host-written bytes in
  the S-VOL's own file.

The header carries a CRC-32 of header and data. Records are only appended and made durable (``fdatasync``)
before the change they protect is made, so the durable records are a prefix of the file and after a crash only
records appended after the last sync can be torn (their changes were never made): loading stops at the first
record that does not check and cuts the file there.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

MAGIC = b"VTIS"
COW, OWN, WRITTEN = 1, 2, 3
_HDR = struct.Struct(">4sB3xQIII")  # magic, kind, track, epoch, length, crc
HEADER = 32
_PAD = bytes(HEADER - _HDR.size)


class Area:
    """An open snapshot area: where each saved track's bytes are in the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cow: dict[int, int] = {}  # track -> file offset of its bytes
        self.own: dict[int, int] = {}
        self.written: dict[int, set[int]] = {}  # epoch -> tracks held by that assignment's S-VOL
        self.end = 0
        self.synced = 0  # records before this offset are durable
        self._syncing: asyncio.Future[None] | None = None  # the fdatasync under way (see sync_async)
        self._rollbacks = 0  # (a sync that started before a rollback says nothing of what was appended after)
        # appends (and a rollback, and closing) hold it: the event loop's and a drainer thread's
        # (:func:`save_ahead`) records go one after the other at the end, with no hole between them
        self.lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._load()

    def _load(self) -> None:
        size = os.fstat(self.fd).st_size
        pos = 0
        while pos + HEADER <= size:
            head = os.pread(self.fd, HEADER, pos)
            magic, kind, track, epoch, length, crc = _HDR.unpack_from(head)
            if magic != MAGIC or kind not in (COW, OWN, WRITTEN) or pos + HEADER + length > size:
                break
            body = os.pread(self.fd, length, pos + HEADER) if length else b""
            if zlib.crc32(body, zlib.crc32(head[:_HDR.size - 4])) != crc:
                break
            self._index(kind, track, epoch, pos + HEADER)
            pos += HEADER + length
        if pos != size:  # a torn last record (its change never reached the P-VOL): cut it off
            os.ftruncate(self.fd, pos)
            os.fsync(self.fd)
        self.end = self.synced = pos

    def _index(self, kind: int, track: int, epoch: int, at: int) -> None:
        if kind == COW:
            self.cow[track] = at
        elif kind == OWN:
            self.own[track] = at
        else:
            self.written.setdefault(epoch, set()).add(track)

    def append(self, kind: int, track: int, data: bytes | memoryview = b"", epoch: int = 0) -> None:
        """Append a record (not yet durable: call :meth:`sync`); a failed write leaves the area as it was."""
        record = _record_head(kind, track, epoch, data)
        with self.lock:
            at = self.end
            try:
                os.pwrite(self.fd, record, at)
                n = 0
                view = memoryview(data)
                while n < len(view):
                    n += os.pwrite(self.fd, view[n:], at + HEADER + n)
            except BaseException:
                self.rollback(at)
                raise
            self.end = at + HEADER + len(data)
            self._index(kind, track, epoch, at + HEADER)

    def rollback(self, end: int) -> None:
        """Forget the records from ``end`` on (they were never made durable)."""
        with self.lock:
            self._rollback(end)

    def _rollback(self, end: int) -> None:
        for table in (self.cow, self.own):
            for t in [t for t, at in table.items() if at >= end]:
                del table[t]
        try:
            os.ftruncate(self.fd, end)
        except OSError:
            pass
        self.end = end
        self.synced = min(self.synced, end)
        self._rollbacks += 1

    @property
    def dirty(self) -> bool:
        return self.synced < self.end

    def durable(self, at: int) -> bool:
        """Is the record whose data starts at ``at`` durable?"""
        return at < self.synced

    def unsaved(self, tracks: range) -> bool:
        """Does any of the tracks lack a durable saved copy here?"""
        return any(not self.durable(self.cow.get(t, self.end)) for t in tracks)

    def sync(self) -> None:
        if self.synced < self.end:
            end = self.end
            os.fdatasync(self.fd)
            self.synced = max(self.synced, end)

    async def sync_async(self) -> None:
        """Make every record appended so far durable without blocking the event loop; the writers waiting at
        the same time share one ``fdatasync`` (group commit). Raises the ``OSError`` of a failed sync."""
        want = self.end
        while self.synced < want and self.fd >= 0:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._sync_once())
            await asyncio.shield(self._syncing)

    async def _sync_once(self) -> None:
        end, rollbacks = self.end, self._rollbacks
        try:
            await asyncio.to_thread(os.fdatasync, self.fd)
            if rollbacks == self._rollbacks:
                self.synced = max(self.synced, end)
        except OSError:
            if self.fd >= 0:  # (closed meanwhile: the snapshot is gone, nothing to make durable)
                raise
        finally:
            self._syncing = None

    def read(self, at: int, length: int) -> bytes:
        return os.pread(self.fd, length, at)

    def read_into(self, at: int, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], at + got)
            if n == 0:
                raise OSError(f"{self.path}: short read")
            got += n

    def allocated_bytes(self) -> int:
        try:
            return os.fstat(self.fd).st_blocks * 512
        except OSError:
            return 0

    def close(self) -> None:
        with self.lock:  # (not while a drainer thread writes: the number could name another file by then)
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _record_head(kind: int, track: int, epoch: int, data: bytes | memoryview) -> bytes:
    """A record's header (padded to :data:`HEADER`) with the CRC-32 of header and data."""
    head = _HDR.pack(MAGIC, kind, track, epoch, len(data), 0)[:_HDR.size - 4]
    return head + struct.pack(">I", zlib.crc32(data, zlib.crc32(head))) + _PAD


def build_cow(fd: int, size: int, track: int, track_size: int) -> tuple[bytes, bytes]:
    """The COW record of a track of the file ``fd``: (header with its CRC, the track's bytes)."""
    data = os.pread(fd, min(track_size, size - track * track_size), track * track_size)
    return _record_head(COW, track, 0, data), data


def _save_in_thread(area: Area, still_newest: Callable[[], bool], fd: int, size: int, track_size: int,
                    todo: list[int]) -> tuple[list[tuple[int, int]], int]:
    """The worker-thread part of :func:`save_ahead`: read, checksum and append each track, then one
    ``fdatasync``; returns the (track, data offset) of the records appended and the end they made durable."""
    done: list[tuple[int, int]] = []
    for t in todo:
        head, data = build_cow(fd, size, t, track_size)
        if len(data) != min(track_size, size - t * track_size):
            continue
        with area.lock:
            # Read before this check, so the bytes are the track's old ones: a P-VOL track changes only after
            # the newest area has indexed a saved copy of it (under this lock), and a split makes another area
            # the newest before any change it protects.
            if area.fd < 0 or t in area.cow or not still_newest():
                continue
            at = area.end
            try:
                if os.pwritev(area.fd, [head, data], at) != HEADER + len(data):
                    raise OSError(f"{area.path}: short write")
            except BaseException:
                try:  # (nothing was indexed from ``at`` on: the end stays where it was)
                    os.ftruncate(area.fd, at)
                except OSError:
                    pass
                raise
            area.end = at + HEADER + len(data)
            done.append((t, at + HEADER))
    with area.lock:
        if area.fd < 0:
            return [], 0
        end, fd2 = area.end, os.dup(area.fd)  # (synced on a copy: close() need not wait for the flush)
    try:
        os.fdatasync(fd2)
    finally:
        os.close(fd2)
    return done, end


async def save_ahead(newest: Callable[[], Area | None], fd: int, size: int, track_size: int,
                     tracks: list[int]) -> None:
    """Save the old bytes of ``tracks`` of the P-VOL file ``fd`` in the area ``newest()`` names, durably: read,
    checksummed, appended and synced in a worker thread (the event loop serves hosts meanwhile; the area's lock
    keeps its appends in order, with the event loop's own), then indexed here. A track saved meanwhile, or
    another newest area by then (a split, a resync), is left to the observer's ``before_change``."""
    area = newest()
    todo = [t for t in tracks if area is not None and t not in area.cow]
    if area is None or not todo:
        return
    rollbacks = area._rollbacks
    done, end = await asyncio.to_thread(_save_in_thread, area, lambda: newest() is area, fd, size, track_size,
                                        todo)
    if area._rollbacks != rollbacks or area.fd < 0:
        return  # (a rollback may have cut them off: before_change saves them again)
    for t, at in done:
        if t not in area.cow:
            area._index(COW, t, 0, at)
    area.synced = max(area.synced, end)
