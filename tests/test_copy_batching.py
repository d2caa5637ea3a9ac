"""The copy engine gathers scattered marked tracks into one request (issue 20: a resync of 1 % of the tracks).

A resync of scattered tracks used to cost one link request per track, each costing both systems far more than
its 256 KiB of data; ``copy_marked_tracks`` with ``send_runs`` now sends up to ``run_tracks(pace)`` tracks of
several runs in one request (``data.writev`` on the link). The end-to-end behaviour (the S-VOL equals the P-VOL
after a resync of scattered tracks) is tests/test_truecopy.py::test_split_rw_resync_copies_only_changed_tracks.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from vspemu.replication.bitmap import TRACK, DirtyBitmap
from vspemu.replication.datapath import copy_marked_tracks, run_tracks
from vspemu.volumes.volume import Volume

MiB = 1 << 20


def _copy(tmp_path: Path, tracks: list[int], batched: bool) -> tuple[list[tuple[int, int | None]],
                                                                       list[list[tuple[int, int]]], dict[int, bytes],
                                                                       Volume, int]:
    vol = Volume.create(1, tmp_path / "v.img", 64 * MiB)
    for t in tracks:
        if t % 5:  # every fifth marked track stays a hole (never written): it goes as a zero range
            vol.write_local(t * TRACK, os.urandom(TRACK))
    bm = DirtyBitmap.open(tmp_path / "v.bmp", vol.size)
    bm.set_ranges([(t * TRACK, TRACK) for t in tracks])
    singles: list[tuple[int, int | None]] = []  # (offset, length of data or None for a zero range)
    vectors: list[list[tuple[int, int]]] = []
    received: dict[int, bytes] = {}
    done: list[int] = []

    async def send(offset: int, data: bytes | memoryview | None, length: int) -> None:
        singles.append((offset, None if data is None else length))
        if data is not None:
            received[offset] = bytes(data)

    async def send_runs(runs: list[tuple[int, int]], data: memoryview) -> None:
        vectors.append(list(runs))
        at = 0
        for offset, length in runs:
            received[offset] = bytes(data[at:at + length])
            at += length
        assert at == len(data)

    asyncio.run(copy_marked_tracks(vol, bm, send, lambda: 15, done.append,
                                   send_runs=send_runs if batched else None))
    assert bm.count() == 0 and sum(done) == len(tracks)
    return singles, vectors, received, vol, len(tracks)


def test_scattered_tracks_go_in_a_few_requests_with_their_data(tmp_path: Path) -> None:
    tracks = sorted({(i * 37) % 256 for i in range(1, 80)})  # scattered, a few adjacent
    singles, vectors, received, vol, n = _copy(tmp_path, tracks, batched=True)
    limit = run_tracks(15)
    assert vectors and all(sum(length for _, length in v) <= limit * TRACK for v in vectors)
    data_requests = len(vectors) + sum(1 for _, length in singles if length)
    assert data_requests <= 4 < n  # against one request per run of data before
    sent = sorted(off for v in vectors for off, _ in v) + sorted(off for off, length in singles if length)
    holes = sorted(off for off, length in singles if length is None)
    assert holes == [t * TRACK for t in tracks if t % 5 == 0]  # holes are never sent as bytes
    assert sorted(sent) == [t * TRACK for t in tracks if t % 5]
    for offset, data in received.items():  # every run carries its own track's data
        assert data == vol.read(offset, len(data))
    vol.close()


def test_without_send_runs_every_run_is_a_request_as_before(tmp_path: Path) -> None:
    tracks = [3, 4, 10, 40, 41, 42, 100]
    singles, vectors, received, vol, _ = _copy(tmp_path, tracks, batched=False)
    assert not vectors
    assert sorted(off for off, _ in singles) == [3 * TRACK, 10 * TRACK, 40 * TRACK, 100 * TRACK]
    for offset, data in received.items():
        assert data == vol.read(offset, len(data))
    vol.close()


def test_a_write_that_marks_its_activity_extent_marks_the_next_ones_too(tmp_path: Path) -> None:
    """Issue 20: a TrueCopy write in PAIR that has to mark its 16 MiB activity extent (one bitmap sync, which
    holds every write of the volume) marks the following extents with it, so a sequential stream syncs the
    bitmap once per ACTIVITY_AHEAD + 1 extents instead of once per extent; never beyond the volume."""
    from types import SimpleNamespace

    from vspemu.replication.datapath import ACTIVITY_AHEAD, ACTIVITY_EXTENT, PairVolume, WriteBarrier
    from vspemu.replication.model import Pair

    size = 20 * ACTIVITY_EXTENT
    bm = DirtyBitmap.open(tmp_path / "v.bmp", size)
    pair = Pair(group="g", name="p", role="P", local_ldev=1, remote_ldev=2, status="PAIR", peer_status="PAIR")
    rep = PairVolume(SimpleNamespace(), [(pair, bm, WriteBarrier())])  # type: ignore[arg-type]
    syncs = 0
    for offset in range(0, size, MiB):  # a sequential stream of 1 MiB writes over the whole volume
        marked = rep._touch_activity(offset, MiB)
        if marked is not None:
            assert marked[0] == offset and marked[0] + marked[1] <= size
            bm.mark_sync(*marked)
            syncs += 1
    assert syncs == -(-20 // (ACTIVITY_AHEAD + 1)) < 20
    assert bm.count() == bm.ntracks and sorted(rep.activity) == list(range(20))
    # an extent marked ahead and never written is cleared when idle, like any other
    assert rep.activity_victims(time.monotonic() + 3600) == list(rep.activity)


def test_the_runs_of_a_writev_land_where_they_belong(tmp_path: Path) -> None:
    """The S side of ``data.writev``: aligned runs of a track go with O_DIRECT (worker threads), a short or
    unaligned one through the page cache; every run lands at its own offset, nothing else changes."""
    import mmap

    from vspemu.replication.direct_write import write_copy_runs

    vol = Volume.create(2, tmp_path / "s.img", 16 * MiB)
    vol.write_local(0, b"\x01" * (16 * MiB))
    runs = [(TRACK, TRACK), (5 * TRACK, 2 * TRACK), (9 * TRACK + 512, 4096)]
    total = sum(n for _, n in runs)
    buf = mmap.mmap(-1, total)  # page-aligned, as the link's receive buffers are
    payload = os.urandom(total)
    buf[:] = payload
    asyncio.run(write_copy_runs(vol, runs, memoryview(buf)))
    expect = bytearray(b"\x01" * (16 * MiB))
    at = 0
    for offset, n in runs:
        expect[offset:offset + n] = payload[at:at + n]
        at += n
    assert vol.read(0, 16 * MiB) == bytes(expect)
    vol.close()
