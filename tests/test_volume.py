"""File-backed volumes: host writes reach the file whole, in pieces, and after short writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vspemu.volumes import volume as V
from vspemu.volumes.volume import WRITE_PIECE, Volume, VolumeIOError, pread_exact


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


@pytest.mark.parametrize("end", ["close", "remove"])
def test_a_closed_or_removed_volume_never_reopens_its_file(tmp_path: Path, end: str) -> None:
    """After close() / remove() every I/O path fails, even when a new LDEV with the same id (same file
    name) exists by then: the old object must not reach it (issue 14)."""
    import asyncio

    from vspemu.volumes.volume import VolumeIOError

    path = tmp_path / "00005.img"
    vol = Volume.create(5, path, 1 << 20)
    vol.write_local(0, b"old")
    drops: list[int] = []
    vol.attach_host(lambda: drops.append(1))
    getattr(vol, end)()
    assert drops == [1]  # its host connections were dropped
    Volume.create(5, path, 1 << 20).close()  # the new LDEV 5
    for io in (lambda: vol.fd, lambda: vol.read(0, 3), lambda: vol.write_local(0, b"new"),
               lambda: vol.discard_local(0, 4096), vol.flush_sync, lambda: asyncio.run(vol.write(0, b"new")),
               lambda: asyncio.run(vol.flush()), lambda: vol.attach_host(lambda: None)):
        with pytest.raises(VolumeIOError):
            io()
    assert path.read_bytes() == bytes(1 << 20)


def test_refused_host_io(tmp_path: Path) -> None:
    """A journal volume: host writes, discards and flushes are refused; its own (local) I/O is not."""
    import asyncio

    from vspemu.volumes.volume import WriteRefused

    vol = Volume.create(6, tmp_path / "v.img", 1 << 20)
    drops: list[int] = []
    vol.attach_host(lambda: drops.append(1))
    vol.refuse_host_io("a journal volume accepts no host I/O")
    assert drops == [1] and vol.host_connections == 0
    for io in (vol.write(0, b"x"), vol.discard(0, 4096), vol.flush()):
        with pytest.raises(WriteRefused):
            asyncio.run(io)
    vol.write_local(0, b"journal")
    assert vol.read(0, 7) == b"journal"
    vol.refuse_host_io(None)
    asyncio.run(vol.write(0, b"host"))
    assert vol.read(0, 7) == b"hostnal"
    vol.close()


def test_change_observers_see_every_change_first_and_can_refuse_it(tmp_path: Path) -> None:
    """The hook local copies (snapshots, ShadowImage) build on: told before the bytes change, on every path."""
    import asyncio

    from vspemu.replication.direct_write import write_copy_chunk

    vol = Volume.create(1, tmp_path / "v.img", 4 << 20)
    seen: list[tuple[int, int, bytes]] = []

    class Recorder:
        refuse = False

        def before_change(self, volume: Volume, offset: int, length: int) -> None:
            seen.append((offset, length, volume.read(offset, 4)))  # the old bytes are still there
            if self.refuse:
                raise V.VolumeIOError("refused")

    rec = Recorder()
    vol.add_observer(rec)
    vol.add_observer(rec)  # once only
    vol.write_local(0, b"AAAA")
    asyncio.run(vol.write(4096, b"BBBB"))
    vol.discard_local(0, 4096)
    asyncio.run(write_copy_chunk(vol, 1 << 20, bytes(1 << 20)))  # the copy engine's direct write
    assert seen == [(0, 4, b"\0" * 4), (4096, 4, b"\0" * 4), (0, 4096, b"AAAA"), (1 << 20, 1 << 20, b"\0" * 4)]
    rec.refuse = True
    with pytest.raises(V.VolumeIOError):
        vol.write_local(4096, b"CCCC")
    assert vol.read(4096, 4) == b"BBBB"
    vol.remove_observer(rec)
    vol.write_local(4096, b"DDDD")
    assert len(seen) == 5 and vol.read(4096, 4) == b"DDDD"
    vol.close()


def test_pread_exact_fills_the_view_or_says_the_file_is_short(tmp_path: Path) -> None:
    """The one read loop of the data path: a whole range, or VolumeIOError (or zeros, if asked) past the end."""
    f = tmp_path / "v.img"
    f.write_bytes(b"a" * 5000)
    fd = os.open(f, os.O_RDONLY)
    try:
        view = memoryview(bytearray(4096))
        pread_exact(fd, view, 100)
        assert bytes(view) == b"a" * 4096
        with pytest.raises(VolumeIOError, match="LDEV 7: short read at 5000"):
            pread_exact(fd, view, 2000, name="LDEV 7")
        pread_exact(fd, view, 2000, zero_fill=True)
        assert bytes(view) == b"a" * 3000 + bytes(1096)
    finally:
        os.close(fd)
