"""The S side's writes of copy data (initial copy, resync): large aligned chunks go straight to disk with
O_DIRECT in worker threads, as a DRBD secondary writes resync data to its backing device, so the ``data.flush``
that ends a copy has little left to write back. Called by the peer's ``data.write`` / ``data.writev`` handlers
(:mod:`vspemu.replication.peer`); the write path of host writes is :mod:`vspemu.replication.datapath`."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
from concurrent.futures import ThreadPoolExecutor

from vspemu.replication.bitmap import TRACK
from vspemu.volumes.volume import Volume

DIRECT_MIN = 1 << 20  # copy chunks at least this large are written with O_DIRECT on the S side
DIRECT_ALIGN = 4096
_direct_refused: set[str] = set()  # files whose filesystem refused O_DIRECT (e.g. tmpfs)
_direct_pool: ThreadPoolExecutor | None = None


def _direct_ok(data: bytes | memoryview, offset: int, minimum: int = DIRECT_MIN) -> bool:
    view = memoryview(data)
    if view.nbytes < minimum or offset % DIRECT_ALIGN or view.nbytes % DIRECT_ALIGN or view.readonly or \
            not view.c_contiguous:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0


def _pwrite_direct(volume: Volume, offset: int, data: bytes | memoryview) -> None:
    path = str(volume.path)
    if path not in _direct_refused:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            _direct_refused.add(path)
        else:
            try:
                view = memoryview(data)
                done = 0
                while done < view.nbytes:  # short writes end on a block boundary, so the rest stays aligned
                    done += os.pwrite(fd, view[done:] if done else view, offset + done)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                _direct_refused.add(path)
            finally:
                os.close(fd)
    volume.write_local(offset, data, observed=True)


async def write_copy_chunk(volume: Volume, offset: int, data: bytes | memoryview) -> None:
    """Write a large copy chunk on the S side with O_DIRECT, in a worker thread (a DRBD secondary writes
    resync data straight to its backing device too): no copy into the page cache, and the ``data.flush``
    that ends the copy has little left to write. The kernel keeps the page cache coherent (cached pages of
    the range are written back and invalidated). Small or unaligned chunks, and filesystems without
    O_DIRECT, are written through the page cache as before."""
    global _direct_pool
    if not _direct_ok(data, offset) or str(volume.path) in _direct_refused or volume.observers:
        volume.write_local(offset, data)  # observed (a local copy): told and written in one go, on the loop
        return
    if _direct_pool is None:
        _direct_pool = ThreadPoolExecutor(4, thread_name_prefix="vspemu-direct-io")
    await asyncio.get_running_loop().run_in_executor(_direct_pool, _pwrite_direct, volume, offset, data)


async def write_copy_runs(volume: Volume, runs: list[tuple[int, int]], data: memoryview) -> None:
    """The runs of a ``data.writev`` (``data`` holds them one after the other) on the S side: aligned runs of
    a track or more with O_DIRECT in the worker threads, all at once (see :func:`write_copy_chunk`: the
    ``data.flush`` that ends the copy then has little left to write back), the others as usual."""
    global _direct_pool
    direct = str(volume.path) not in _direct_refused and not volume.observers
    pieces: list[tuple[int, memoryview]] = []
    at = 0
    for offset, length in runs:
        piece, at = data[at:at + length], at + length
        if direct and _direct_ok(piece, offset, TRACK):
            pieces.append((offset, piece))
        else:
            volume.write_local(offset, piece)
    if _direct_pool is None:
        _direct_pool = ThreadPoolExecutor(4, thread_name_prefix="vspemu-direct-io")
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(_direct_pool, _pwrite_direct, volume, offset, piece)
                           for offset, piece in pieces))
