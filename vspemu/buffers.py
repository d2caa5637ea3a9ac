"""Reusable page-aligned buffers for large payloads: shared by the NBD server and the replication link."""

from __future__ import annotations

import mmap
import sys
from collections import deque


class BufferPool:
    """Page-aligned buffers (anonymous mmaps) for large payloads, reused; sized a power of two plus a page.

    Page alignment matters: copying between the page cache and a buffer at a page offset of 16 (where a
    bytearray's data starts) runs at a third of the speed on this CPU (4K aliasing in ``rep movsb``).

    A fresh multi-MiB ``bytes`` per request costs page faults and zero-filling, and copies between the page
    cache and a buffer at a page offset of 16 (where a bytes object's data starts) are slower. A returned
    buffer may still be referenced (a handler kept a view, the transport still holds a reply), so :meth:`put`
    takes it as it is and :meth:`get` hands out only buffers nobody references any more.

    The buffer given back last is handed out first (LIFO): its lines are likely still in the CPU's caches. Handed
    out oldest first, a stream of 1 MiB writes with 8 in flight cycled through every pooled buffer (tens of MiB,
    more than the caches hold) and each copy into or out of one missed them: TrueCopy 1 MiB writes ran 11 %
    slower, with 3-10 % more CPU per MiB in every process of the chain (docs/benchmarks.md, 2026-12-06).
    """

    def __init__(self, limit: int) -> None:
        self._free: dict[int, deque[mmap.mmap]] = {}
        self._bytes = 0
        self._limit = limit

    @staticmethod
    def size_for(length: int) -> int:
        """The size class of a buffer for ``length`` bytes: a power of two plus one page (one page at least).

        The extra page lets a payload and a little more share a class with the bare payload: the link reads a
        copy chunk of 8 MiB into one buffer and encrypts it, with its 16-byte tag, into another; with plain
        powers of two the second would be 16 MiB, or, with a class of its own, the two classes would evict
        each other from a full pool, and every chunk would cost fresh mmaps (page faults, zero-filling)."""
        if length <= mmap.PAGESIZE:
            return mmap.PAGESIZE
        return max(1 << (length - mmap.PAGESIZE - 1).bit_length(), mmap.PAGESIZE) + mmap.PAGESIZE

    def get(self, length: int) -> mmap.mmap:
        size = self.size_for(length)
        free = self._free.get(size)
        if free:
            for _ in range(min(len(free), 4)):
                buf = free.pop()  # the most recently returned: its lines are likely still in the CPU's caches
                if sys.getrefcount(buf) == 2:  # our variable and getrefcount's argument
                    self._bytes -= size
                    return buf
                free.appendleft(buf)  # still in use: look again later
        return mmap.mmap(-1, size)

    def put(self, buf: mmap.mmap) -> None:
        """Keep ``buf`` for reuse. When the pool is full, free buffers of other sizes make room, largest first:
        the sizes in demand change (8 MiB copy chunks during an initial copy, then 1 MiB host writes), and a pool
        full of the old size would make every new buffer a fresh mmap (page faults and zero-filling each time)."""
        size = len(buf)
        while self._bytes + size > self._limit:
            others = [s for s, q in self._free.items() if q and s != size]
            if not others:
                return  # full of buffers of this very size: enough of them
            victim = max(others)
            self._free[victim].popleft()  # (unmapped when the last reference goes)
            self._bytes -= victim
        self._bytes += size
        self._free.setdefault(size, deque()).append(buf)
