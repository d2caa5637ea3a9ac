"""Differential bitmaps: one bit per 256 KiB track, persisted crash-safe (mark before write).

A pair side keeps one :class:`DirtyBitmap` for its volume. The rules are those of md's write-intent
bitmap and DRBD's activity log:

* :meth:`DirtyBitmap.mark` sets the bits of a write's tracks and, when a bit turns from 0 to 1, writes
  that part of the bitmap file and fdatasyncs it **before** the caller acknowledges the host write. So a
  crash can never lose the knowledge that a track differs.
* Bits are cleared (:meth:`clear`) only after the copier has written the track on the other side; the
  clearing is persisted lazily (:meth:`sync`), so after a crash a clean track may still be marked: copying
  it again is harmless.

Memory: ``ceil(size / 256 KiB / 8)`` bytes, i.e. 512 KiB per TiB of volume, and nothing else that grows
with the volume.

The file is the 16-byte header (magic, number of tracks) and the bits. A file that cannot be trusted (another
magic, shorter or longer than its header says, unreadable) loads as **all marked**: copying every track again is
harmless, taking an unknown state for "nothing differs" is not. Files are rewritten by writing a temporary file
(created 0600), fsyncing it, renaming it into place and fsyncing the directory, so the new content survives a
power loss once :meth:`DirtyBitmap._rewrite` returns.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TRACK = 256 * 1024  # one OPEN-V track = 512 blocks
PAGE = 4096  # the unit in which the bitmap file is rewritten
_POP = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint32)
_MAGIC = b"VSPBMAP1"
_HEADER = 16  # magic + number of tracks (u64 little endian)

log = logging.getLogger(__name__)


def tracks_for(size: int) -> int:
    return -(-size // TRACK)


class DirtyBitmap:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.ntracks = tracks_for(size)
        self._raw = bytearray(-(-self.ntracks // 8))  # the bits; ``bits`` is a numpy view of the same memory
        self.bits = np.frombuffer(self._raw, dtype=np.uint8)
        self._fd: int | None = None
        self._dirty_pages: set[int] = set()  # pages whose clears are not yet on disk
        self._lock = asyncio.Lock()
        self._marking = 0  # mark() calls between setting bits and having them on disk

    # -- persistence ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, size: int) -> DirtyBitmap:
        """Load the bitmap file if it exists (a resized volume keeps its marks), else create it clean.

        A file that is not a valid bitmap loads as all marked (see the module docstring)."""
        bm = cls(path, size)
        if path.exists():
            old = _load_bits(path)
            if old is None:
                log.warning("bitmap %s is not a valid bitmap file: every track is marked", path)
                bm._fill()
            else:
                n = min(len(old), len(bm.bits))
                bm.bits[:n] = old[:n]
        bm._rewrite()
        return bm

    @classmethod
    def create(cls, path: Path, size: int, marked: bool = False) -> DirtyBitmap:
        """A new bitmap, clean or all marked, durable on return (whatever a file at ``path`` held)."""
        bm = cls(path, size)
        if marked:
            bm._fill()
        bm._rewrite()
        return bm

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(_MAGIC + self.ntracks.to_bytes(8, "little") + self.bits.tobytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)  # the rename itself is durable before anyone relies on the new content
        self.close()
        self._fd = os.open(self.path, os.O_RDWR)
        self._dirty_pages.clear()

    def _write_pages(self, pages: set[int]) -> None:
        fd = self._fd
        if fd is None:
            return
        raw = self.bits
        for p in sorted(pages):
            start = p * PAGE
            os.pwrite(fd, raw[start:start + PAGE].tobytes(), _HEADER + start)
        os.fdatasync(fd)

    def sync(self) -> None:
        """Persist cleared bits (lazy part of the protocol)."""
        if self._dirty_pages:
            pages, self._dirty_pages = self._dirty_pages, set()
            self._write_pages(pages)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    # -- marking ----------------------------------------------------------------------------------------
    def track_range(self, offset: int, length: int) -> tuple[int, int]:
        first = offset // TRACK
        last = (offset + max(length, 1) - 1) // TRACK
        return first, min(last, self.ntracks - 1)

    def _set(self, first: int, last: int) -> set[int]:
        """Set bits first..last; return the file pages in which a bit turned on."""
        raw = self._raw
        changed: set[int] = set()
        b0, b1 = first >> 3, last >> 3
        if b1 - b0 > 1:  # whole bytes in the middle, at C speed
            inner = raw[b0 + 1:b1]
            if inner.count(0xFF) != len(inner):
                for i in np.flatnonzero(self.bits[b0 + 1:b1] != 0xFF):
                    changed.add((b0 + 1 + int(i)) // PAGE)
                raw[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
            edges = [*range(first, min(last, (b0 << 3) + 7) + 1), *range(max(first, b1 << 3), last + 1)]
        else:
            edges = range(first, last + 1)  # type: ignore[assignment]
        for t in edges:
            byte, mask = t >> 3, 1 << (t & 7)
            if not raw[byte] & mask:
                raw[byte] |= mask
                changed.add(byte // PAGE)
        return changed

    def all_set(self, offset: int, length: int) -> bool:
        """True if every track of the range is marked already (a mark would change nothing)."""
        first, last = self.track_range(offset, length)
        raw = self._raw
        if first & 7 == 0 and last & 7 == 7:
            seg = raw[first >> 3:(last >> 3) + 1]
            return seg.count(0xFF) == len(seg)
        return all(raw[t >> 3] & (1 << (t & 7)) for t in range(first, last + 1))

    def mark_sync(self, offset: int, length: int) -> None:
        changed = self._set(*self.track_range(offset, length))
        if changed:
            self._write_pages(changed)

    def is_marked(self, offset: int, length: int) -> bool:
        """True if the range's marks are set and on disk already (:meth:`mark` would do nothing)."""
        return not self._marking and self.all_set(offset, length)

    async def mark(self, offset: int, length: int) -> None:
        """Mark a write's tracks; returns once the marks are durable (before the write is acknowledged)."""
        changed = set() if self.all_set(offset, length) else self._set(*self.track_range(offset, length))
        if changed or self._marking:
            # a bit this write relies on may have been set by a write whose sync is still under way: queue
            # behind it (the lock is FIFO), so no write proceeds before its marks are on disk
            self._marking += 1
            try:
                async with self._lock:
                    if changed:
                        await asyncio.to_thread(self._write_pages, changed)
            finally:
                self._marking -= 1

    def set_ranges(self, ranges: list[tuple[int, int]]) -> None:
        """Mark every track that a list of (offset, length) ranges touches, and persist."""
        for offset, length in ranges:
            if length > 0:
                self._set(*self.track_range(offset, length))
        self._rewrite()

    def _fill(self) -> None:
        self.bits[:] = 0xFF
        spare = len(self.bits) * 8 - self.ntracks
        if spare:
            self.bits[-1] = 0xFF >> spare

    def mark_all_sync(self) -> None:
        self._fill()
        self._rewrite()

    def merge(self, other: bytes | bytearray | memoryview | np.ndarray) -> None:
        """OR another bitmap of the same volume into this one (resync: S-VOL marks into the P-VOL's)."""
        o = other if isinstance(other, np.ndarray) else np.frombuffer(other, dtype=np.uint8)
        n = min(len(o), len(self.bits))
        if not self._marking and not (o[:n] & ~self.bits[:n]).any():
            return  # nothing new, and every mark here is on disk already (no mark() is under way)
        self.bits[:n] |= o[:n]
        self._rewrite()

    def clear(self, track: int) -> None:
        byte, mask = track >> 3, 1 << (track & 7)
        raw = self._raw
        if raw[byte] & mask:
            raw[byte] &= ~mask & 0xFF
            self._dirty_pages.add(byte // PAGE)

    def clear_range(self, offset: int, length: int) -> None:
        """Clear the tracks of a range (lazily persisted, like :meth:`clear`)."""
        first, last = self.track_range(offset, length)
        for t in range(first, last + 1):
            self.clear(t)

    def clear_all(self) -> None:
        if not self.bits.any():
            self.sync()  # (clears not persisted yet: the file is all clear when this returns, as after a rewrite)
            return
        self.bits[:] = 0
        self._rewrite()

    # -- reading ----------------------------------------------------------------------------------------
    def is_set(self, track: int) -> bool:
        return bool(self._raw[track >> 3] & (1 << (track & 7)))

    def count(self) -> int:
        return int(_POP[self.bits].sum())

    def tracks(self) -> Iterator[int]:
        """The marked tracks, ascending."""
        raw = self._raw
        for byte in np.flatnonzero(self.bits).tolist():
            v = raw[byte]
            base = int(byte) * 8
            while v:
                low = v & -v
                yield base + low.bit_length() - 1
                v ^= low

    def to_bytes(self) -> bytes:
        return self.bits.tobytes()


def _load_bits(path: Path) -> np.ndarray | None:
    """The bits of a bitmap file, or None if the file is not a complete, valid bitmap."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) < _HEADER or raw[:8] != _MAGIC:
        return None
    ntracks = int.from_bytes(raw[8:_HEADER], "little")
    if len(raw) != _HEADER + -(-ntracks // 8):
        return None  # truncated, or longer than its header says
    return np.frombuffer(raw[_HEADER:], dtype=np.uint8)


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (a file renamed or created in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
