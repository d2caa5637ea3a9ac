"""The pool of page-aligned payload buffers shared by the NBD server and the replication link."""

from __future__ import annotations

import mmap

from vspemu.buffers import BufferPool

MiB = 1 << 20


def test_buffers_are_reused_only_when_nobody_holds_them() -> None:
    pool = BufferPool(16 * MiB)
    buf = pool.get(MiB - 100)
    assert len(buf) == MiB + mmap.PAGESIZE  # a power of two plus a page
    ident, view = id(buf), memoryview(buf)
    pool.put(buf)
    del buf
    assert id(pool.get(MiB)) != ident  # a view still refers to it
    view.release()
    assert id(pool.get(MiB)) == ident


def test_a_pool_full_of_old_sizes_makes_room_for_the_size_now_in_demand() -> None:
    pool = BufferPool(64 * MiB)
    for _ in range(8):
        pool.put(mmap.mmap(-1, 8 * MiB))
    assert pool._bytes == 64 * MiB  # full of 8 MiB buffers, as after an initial copy
    write = pool.get(MiB)
    ident = id(write)
    pool.put(write)  # host writes of 1 MiB follow: their buffer is kept (an 8 MiB one goes)...
    del write
    assert id(pool.get(MiB)) == ident  # ...and reused instead of a fresh mmap per write
    assert pool._bytes == 56 * MiB
    for _ in range(80):
        pool.put(mmap.mmap(-1, MiB))
    assert pool._bytes <= 64 * MiB  # never above the limit


def test_the_most_recently_returned_buffer_is_handed_out_first() -> None:
    """LIFO: the buffer given back last is likely still in the CPU's caches; handing out the oldest one instead
    cycles a payload through every pooled buffer (tens of MiB, more than the caches hold)."""
    pool = BufferPool(64 * MiB)
    older, newer = pool.get(MiB), pool.get(MiB)
    older_id, newer_id = id(older), id(newer)
    pool.put(older)
    pool.put(newer)
    del older, newer
    first = pool.get(MiB)
    assert id(first) == newer_id
    assert id(pool.get(MiB)) == older_id
    del first


def test_a_buffer_still_in_use_does_not_block_the_others() -> None:
    pool = BufferPool(64 * MiB)
    free, held = pool.get(MiB), pool.get(MiB)
    free_id = id(free)
    pool.put(free)
    pool.put(held)  # given back while a view still refers to it (the transport holds a reply)
    view = memoryview(held)
    del free, held
    assert id(pool.get(MiB)) == free_id
    view.release()
