"""File-backed LDEVs: the bytes of one volume live in one sparse file.

Every host write passes one gate and one hook (see docs/architecture.md):

* the *gate* (:attr:`Volume.write_gate`) answers "may this volume be written now?"; it raises
  :class:`WriteRefused` (NBD answers ``NBD_EPERM``) for an S-VOL in PAIR or a fenced P-VOL;
* the *replicator* (:attr:`Volume.replicator`), when the volume is in a pair, takes over the write and
  decides who else must see it (TC: forward and wait; UR: journal; suspended: mark the bitmap). It calls
  :meth:`Volume.write_local` for the local part.

With no gate and no replicator (an unpaired volume) a write is a plain ``os.pwrite`` (in pieces of at most
:data:`WRITE_PIECE`).

Local copies (Thin Image snapshots, ShadowImage pairs) see every change of a volume's bytes *before* it is
made: :meth:`Volume.add_observer` registers a :class:`ChangeObserver`, and every path that changes the file
(host writes, writes arriving from a remote P-VOL, UR restore, the copy engine's direct writes, discard and
format) calls :meth:`Volume.before_change` first, on the event loop thread. An observer preserves what it
needs (copy-on-write of the old track, a differential mark) synchronously and must have made that durable
enough before returning; with no observer the cost is one empty-tuple test. An observer that also has
``prepare_change`` (a :class:`PreparingObserver`) is awaited by a host write (:meth:`Volume.write`) before
anything else, so it can do the slow part asynchronously (Thin Image: the shared sync of saved tracks).

Host access is revocable: a host connection (NBD) registers a drop callback with
:meth:`Volume.attach_host`; :meth:`Volume.drop_hosts` (the LDEV lost its last LU path), :meth:`Volume.close`
and :meth:`Volume.remove` call them, and :attr:`Volume.host_io_refused` (a journal volume) makes the host
I/O paths refuse. After ``close()`` or ``remove()`` every I/O path fails (:class:`VolumeIOError`): the file
is never reopened, so a stale ``Volume`` can never reach a new LDEV that reuses the id.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, cast

BLOCK = 512
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

# Host data reaches the page cache in pieces of at most this size. Since Linux 6.x, ext4 (like xfs) caches a
# file in "large folios" as big as the write that created them, and a later small write into such a folio
# costs time in proportion to the folio, not to the write. On this project's machine (bare Python loop) a
# 4 KiB pwrite took 10-19 us into pages written 1 MiB at a time, 5.9 into pages written in 256 KiB pieces,
# 4.4 in 64 KiB pieces and 1.3-2 us into pages written 4 KiB at a time. fio 4 KiB at queue depth 1 (unpaired)
# went from 125-138 to 86-107 us, and on a TrueCopy P-VOL (its S side writes the same way) the mirrored
# write from 272-294 to 190-210 us. 64 KiB pieces cost a 1 MiB write 15 more system calls: NBD server CPU
# per 1 MiB write 406 us against 366 us with whole writes (bench/nbd_bench.py). 256 KiB pieces cost 363 us.
WRITE_PIECE = 256 << 10


class WriteRefused(Exception):
    """The volume may not be written now (S-VOL of an active pair, fenced P-VOL, journal volume)."""


class VolumeIOError(Exception):
    """A write could not be made safe (e.g. a TC pair with fence DATA lost its S-VOL)."""


def pread_exact(fd: int, view: memoryview, offset: int, *, zero_fill: bool = False, name: str = "") -> None:
    """Fill ``view`` with the bytes of ``fd`` from ``offset`` (``preadv`` until it is full: one call, nearly
    always). A file shorter than that (truncated or removed under the reader) raises VolumeIOError, or with
    ``zero_fill`` reads as zeros from its end on (what a copy of a sparse tail expects)."""
    got, length = 0, len(view)
    while got < length:
        n = os.preadv(fd, [view[got:] if got else view], offset + got)
        if n == 0:
            if zero_fill:
                view[got:] = bytes(length - got)
                return
            raise VolumeIOError(f"{name or 'file'}: short read at {offset + got}")
        got += n


class Replicator(Protocol):
    def write(self, volume: Volume, offset: int, data: bytes | memoryview, fua: bool) -> Awaitable[None]: ...

    def discard(self, volume: Volume, offset: int, length: int, zero: bool, fua: bool) -> Awaitable[None]: ...

    async def flush(self, volume: Volume) -> None: ...


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range (it then reads as zeros)."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):  # filesystem cannot punch: write zeros instead
            _write_zeros(fd, offset, length)
            return
        raise OSError(err, os.strerror(err))


def _write_zeros(fd: int, offset: int, length: int) -> None:
    chunk = bytes(min(length, 1 << 20))
    while length > 0:
        n = min(length, len(chunk))
        os.pwrite(fd, chunk[:n], offset)
        offset += n
        length -= n


class ChangeObserver(Protocol):
    """Told before bytes of a volume change (see the module docstring); may raise to refuse the change
    (the write then fails as an I/O error and nothing was changed)."""

    def before_change(self, volume: Volume, offset: int, length: int) -> None: ...


class PreparingObserver(ChangeObserver, Protocol):
    """An observer that may also do the slow part of its work before a host write (:meth:`Volume.write`),
    asynchronously (a Thin Image copy-on-write's sync, shared by concurrent writers); ``before_change`` still
    follows, synchronously, and must not rely on the preparation (a change may come in between)."""

    async def prepare_change(self, volume: Volume, offset: int, length: int) -> None: ...


class PendingWrites(Protocol):
    """Host writes acknowledged but not yet in the file (:class:`vspemu.volumes.writebehind.WriteBehind`)."""

    def overlaps(self, offset: int, length: int) -> bool: ...

    def overlay(self, offset: int, view: memoryview) -> None: ...

    def must_drain(self, offset: int, length: int) -> bool: ...

    def drain_sync(self) -> None: ...

    async def drain(self) -> None: ...

    async def host_write(self, offset: int, data: bytes | memoryview, fua: bool) -> bool: ...

    async def flush(self) -> None: ...


class InjectedIOError(VolumeIOError, OSError):
    """An I/O error injected on demand (``ldev-eio``): an OSError (EIO) like a failing disk's, so every path
    treats it as one (the host gets EIO, a P-VOL write that fails suspends its pair)."""


class Volume:
    """The data of one LDEV: a sparse file of ``size`` bytes."""

    def __init__(self, ldev_id: int, path: Path, size: int) -> None:
        self.ldev_id = ldev_id
        self.path = path
        self.size = size
        self._fd: int | None = None
        self._closed = False
        # host connections holding this volume: each callback drops its connection (see drop_hosts)
        self._hosts: set[Callable[[], None]] = set()
        # why host I/O (NBD read and write) is refused, e.g. a journal volume; None: allowed
        self.host_io_refused: str | None = None
        self.write_gate: Callable[[Volume], None] | None = None
        self.io_fault: str | None = None  # an I/O error injected on demand (vspemu.system.faults); None: none
        self.replicator: Replicator | None = None
        self.observers: tuple[ChangeObserver, ...] = ()  # local copies of this volume (see before_change)
        self.preparers: tuple[PreparingObserver, ...] = ()  # those of them that prepare host writes
        # host reads come from here instead of the file (a Thin Image S-VOL shows its snapshot's image)
        self.read_redirect: Callable[[int, memoryview], None] | None = None
        # a Thin Image P-VOL's pending first writes, not yet in the file (vspemu.volumes.writebehind)
        self.behind: PendingWrites | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, ldev_id: int, path: Path, size: int) -> Volume:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
        return cls(ldev_id, path, size)

    @property
    def fd(self) -> int:
        if self.io_fault is not None:  # fault on demand (ldev-eio): every read and write of the data fails
            raise InjectedIOError(errno.EIO, f"LDEV {self.ldev_id}: {self.io_fault}")
        fd = self._fd
        if fd is None:
            if self._closed:  # never reopen: the path may belong to a new LDEV with the same id by now
                raise VolumeIOError(f"LDEV {self.ldev_id}: the volume is closed")
            fd = self._fd = os.open(self.path, os.O_RDWR)
        return fd

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Drop the host connections and close the file for good (every later I/O fails)."""
        self._closed = True
        self.drop_hosts()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- host connections ---------------------------------------------------------------------------
    def attach_host(self, drop: Callable[[], None]) -> None:
        """A host connection opened this volume; ``drop()`` ends it (called by :meth:`drop_hosts`)."""
        if self._closed:
            raise VolumeIOError(f"LDEV {self.ldev_id}: the volume is closed")
        self._hosts.add(drop)

    def detach_host(self, drop: Callable[[], None]) -> None:
        self._hosts.discard(drop)

    def drop_hosts(self) -> None:
        """End every host connection to this volume (its last LU path went, it was deleted or closed)."""
        hosts, self._hosts = self._hosts, set()
        for drop in hosts:
            drop()

    @property
    def host_connections(self) -> int:
        return len(self._hosts)

    def refuse_host_io(self, reason: str | None) -> None:
        """Refuse (``reason``) or allow again (None) host I/O; refusing drops the open host connections."""
        self.host_io_refused = reason
        if reason is not None:
            self.drop_hosts()

    def check_host_io(self) -> None:
        if self.host_io_refused is not None:
            raise WriteRefused(f"LDEV {self.ldev_id}: {self.host_io_refused}")

    def resize(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        os.fsync(self.fd)
        self.size = size

    def remove(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        _fsync_dir(self.path.parent)

    # -- change observers (local copies) -----------------------------------------------------------
    def add_observer(self, observer: ChangeObserver) -> None:
        if observer not in self.observers:
            self.observers = (*self.observers, observer)
            if hasattr(observer, "prepare_change"):
                self.preparers = (*self.preparers, cast(PreparingObserver, observer))

    def remove_observer(self, observer: ChangeObserver) -> None:
        self.observers = tuple(o for o in self.observers if o is not observer)
        self.preparers = tuple(o for o in self.preparers if o is not observer)

    def before_change(self, offset: int, length: int) -> None:
        """Tell the observers that ``length`` bytes at ``offset`` are about to change."""
        for observer in self.observers:
            observer.before_change(self, offset, length)

    # -- host I/O -----------------------------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> bool:
        return 0 <= offset and 0 <= length and offset + length <= self.size

    def read(self, offset: int, length: int) -> bytes:
        redirect = self.read_redirect
        if redirect is not None:
            buf = bytearray(length)
            redirect(offset, memoryview(buf))
            return bytes(buf)
        data = os.pread(self.fd, length, offset)
        if self.behind is not None and self.behind.overlaps(offset, length):
            buf = bytearray(data)
            self.behind.overlay(offset, memoryview(buf))
            return bytes(buf)
        return data

    def read_into(self, offset: int, view: memoryview) -> None:
        """The volume's bytes at ``offset`` as its host sees them (the file with the host writes not in it yet
        over it), zeros past the end of a file truncated under the reader: what a copy of it must send."""
        pread_exact(self.fd, view, offset, zero_fill=True)
        self.overlay(offset, view)

    def overlay(self, offset: int, view: memoryview) -> None:
        """Put host writes not yet in the file over ``view`` (read from the file at ``offset``)."""
        if self.behind is not None:
            self.behind.overlay(offset, view)

    def check_writable(self) -> None:
        if self.host_io_refused is not None:
            self.check_host_io()
        gate = self.write_gate
        if gate is not None:
            gate(self)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        """A host write: the observers' preparation, the gate, then the replicator (if paired) or the local
        write."""
        if self.host_io_refused is not None:
            self.check_host_io()
        if self.behind is not None and await self.behind.host_write(offset, data, fua):
            return
        for preparer in self.preparers:
            await preparer.prepare_change(self, offset, len(data))
        gate = self.write_gate
        if gate is not None:
            gate(self)
        rep = self.replicator
        if rep is None:
            self.write_local(offset, data)
            if fua:
                await self.flush_local()
        else:
            await rep.write(self, offset, data, fua)

    async def discard(self, offset: int, length: int, zero: bool = True, fua: bool = False) -> None:
        """TRIM or WRITE_ZEROES: the range reads as zeros afterwards (we never leave stale data)."""
        if self.host_io_refused is not None:
            self.check_host_io()
        gate = self.write_gate
        if gate is not None:
            gate(self)
        rep = self.replicator
        if rep is None:
            self.discard_local(offset, length)
            if fua:
                await self.flush_local()
        else:
            await rep.discard(self, offset, length, zero, fua)

    def write_local(self, offset: int, data: bytes | memoryview, observed: bool = False) -> None:
        """Write the bytes here (no gate, no replicator); ``observed``: the observers were already told."""
        fd = self.fd
        total = len(data)
        behind = self.behind
        if behind is not None and behind.must_drain(offset, total):
            behind.drain_sync()  # a change that is not a logged host write keeps the log's order
        if self.observers and not observed:
            self.before_change(offset, total)
        n = os.pwrite(fd, data, offset) if total <= WRITE_PIECE else 0
        if n == total:
            return
        view = memoryview(data)  # in pieces (see WRITE_PIECE); a short write goes on where it stopped
        while n < total:
            n += os.pwrite(fd, view[n:n + WRITE_PIECE], offset + n)

    def discard_local(self, offset: int, length: int) -> None:
        fd = self.fd
        if self.behind is not None and self.behind.must_drain(offset, length):
            self.behind.drain_sync()
        if self.observers:
            self.before_change(offset, length)
        punch_hole(fd, offset, length)

    def flush_sync(self) -> None:
        os.fdatasync(self.fd)

    async def flush(self) -> None:
        """A host FLUSH: this volume's data is durable (and, in a pair, the other side's too)."""
        if self.host_io_refused is not None:
            self.check_host_io()
        if self.behind is not None:
            await self.behind.flush()
        rep = self.replicator
        if rep is None:
            await self.flush_local()
        else:
            await rep.flush(self)

    async def flush_local(self) -> None:
        await asyncio.to_thread(os.fdatasync, self.fd)

    # -- what holds data ----------------------------------------------------------------------------
    def allocated_bytes(self) -> int:
        try:
            return os.stat(self.path).st_blocks * 512
        except FileNotFoundError:
            return 0

    def data_extents(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """The (offset, length) ranges that hold data, found with SEEK_DATA / SEEK_HOLE."""
        if self.behind is not None:  # pending host writes may fill holes: in the file first
            self.behind.drain_sync()
        end = self.size if end is None else min(end, self.size)
        out: list[tuple[int, int]] = []
        fd = self.fd
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            if data >= end:
                break
            hole = os.lseek(fd, data, SEEK_HOLE)
            hole = min(hole, end)
            out.append((data, hole - data))
            pos = hole
        return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
