"""File-backed volumes: host writes reach the file whole, in pieces, and after short writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vspemu.volumes import volume as V
from vspemu.volumes.volume import WRITE_PIECE, Volume


def test_writes_of_every_size_land_whole_and_alone(tmp_path: Path) -> None:
    vol = Volume.create(1, tmp_path / "v.img", 8 << 20)
    expect = bytearray(8 << 20)
    for offset, n in ((0, 512), (4096, 4096), (12345, WRITE_PIECE), (WRITE_PIECE - 1, WRITE_PIECE + 2),
                      (1 << 20, 1 << 20), (3 * WRITE_PIECE + 7, 5 * WRITE_PIECE + 13)):
        data = os.urandom(n)
        vol.write_local(offset, data if n % 2 else memoryview(data))
        expect[offset:offset + n] = data
    assert vol.read(0, len(expect)) == expect
    vol.close()


def test_short_writes_go_on_where_they_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    calls: list[int] = []

    def short(fd: int, data: bytes | memoryview, offset: int) -> int:  # a file system that takes 10000 at most
        calls.append(len(data))
        return real(fd, memoryview(data)[:10000], offset)

    monkeypatch.setattr(V.os, "pwrite", short)
    vol = Volume.create(1, tmp_path / "v.img", 1 << 20)
    small, big = os.urandom(30000), os.urandom(3 * WRITE_PIECE + 1)
    vol.write_local(100, small)
    vol.write_local(200000, big)
    monkeypatch.setattr(V.os, "pwrite", real)
    assert vol.read(100, len(small)) == small and vol.read(200000, len(big)) == big
    assert max(calls) <= WRITE_PIECE and len(calls) > 4
    vol.close()


def test_a_write_waiting_at_a_pair_barrier_takes_the_volumes_new_path(tmp_path: Path) -> None:
    """A pair is deleted (or its P-VOL joins another mirror) while a host write waits at the pair's barrier:
    the write then goes through the volume's write path as it is now, not through the old pair's."""
    import asyncio
    from types import SimpleNamespace

    from vspemu.replication.bitmap import DirtyBitmap
    from vspemu.replication.datapath import PairVolume, WriteBarrier
    from vspemu.replication.model import Pair

    async def scenario() -> None:
        vol = Volume.create(1, tmp_path / "v.img", 8 << 20)
        bm = DirtyBitmap.open(tmp_path / "v.bmp", vol.size)
        barrier = WriteBarrier()
        pair = Pair(group="g", name="p", role="P", local_ldev=1, remote_ldev=2, status="PSUS", peer_status="SSUS")
        engine = SimpleNamespace(write_mode=lambda p: "local")
        vol.replicator = PairVolume(engine, [(pair, bm, barrier)])  # type: ignore[arg-type]
        await barrier.hold()  # a status change or a deletion in progress
        write = asyncio.ensure_future(vol.write(4096, b"w" * 4096))
        await asyncio.sleep(0.01)
        assert not write.done()
        vol.replicator = None  # the pair is gone
        await barrier.release()
        await write
        assert vol.read(4096, 4096) == b"w" * 4096
        assert bm.count() == 0  # the old pair's bitmap was not touched
        await vol.write(0, b"u" * 512)  # and a later write goes the same way at once
        assert bm.count() == 0
        vol.close()

    asyncio.run(scenario())
