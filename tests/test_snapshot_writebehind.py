"""Thin Image first writes go through a pending log (vspemu.volumes.writebehind): the host does not wait for
the pool's sync. Real storage-system processes, real bytes over NBD. The system runs with the drainer held
back (``VSPEMU_WRITEBEHIND_HOLD_MS``, a test hook) so the writes are still pending when the test looks."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MakeSystem
from tests.test_snapshots import TRACK, MiB, nbd, volume as new_volume
from vspemu.client import VspClient
from vspemu.lab import SystemProcess, link_systems

SIZE = 8 * MiB


def volume(c: VspClient) -> int:
    return new_volume(c, "8M")


def snap(c: VspClient, pvol: int, group: str, **extra: object) -> int:
    body = {"pvolLdevId": pvol, "snapshotPoolId": 0, "snapshotGroupName": group, **extra}
    return int(c.resource_id(c.invoke("POST", "snapshots", body)).split(",")[1])


def fill(system: SystemProcess, ldev: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(SIZE)
    with nbd(system, ldev) as n:
        n.write(0, data)
        n.flush()
    return data


def h(data: bytes | bytearray) -> str:
    """What the assertions compare (a digest: a failure does not print megabytes)."""
    return hashlib.sha256(data).hexdigest()


def ldev_file(system: SystemProcess, ldev: int) -> Path:
    return system.data_dir / "ldevs" / f"{ldev:05d}.img"


def pending_log(system: SystemProcess, ldev: int) -> Path:
    return system.data_dir / "snapshots" / f"{ldev:05d}.wal"


def first_writes(system: SystemProcess, pvol: int, image: bytearray, seed: int, count: int) -> dict[int, bytes]:
    """4 KiB non-FUA writes, each to a different track (all first writes after the split); no flush."""
    rnd = random.Random(seed)
    tracks = rnd.sample(range(SIZE // TRACK), count)
    written: dict[int, bytes] = {}
    with nbd(system, pvol) as n:
        for t in tracks:
            off = t * TRACK + rnd.randrange(TRACK // 4096) * 4096
            data = rnd.randbytes(4096)
            n.write(off, data)
            written[off] = data
            image[off:off + 4096] = data
    return written


@pytest.fixture
def held(make_system: MakeSystem, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SystemProcess, VspClient]]:
    monkeypatch.setenv("VSPEMU_WRITEBEHIND_HOLD_MS", "3000")
    system = make_system()
    with system.client() as c:
        yield system, c


def test_pending_first_writes_are_read_back_and_the_snapshot_keeps_the_old_bytes(
        held: tuple[SystemProcess, VspClient]) -> None:
    system, c = held
    pvol, sv = volume(c), volume(c)
    base = fill(system, pvol, 1)
    snap(c, pvol, "wb", svolLdevId=sv, autoSplit=True)
    image = bytearray(base)
    written = first_writes(system, pvol, image, 2, 12)
    # still pending: the P-VOL's file has the old bytes, every read of the P-VOL sees the new ones
    raw = ldev_file(system, pvol).read_bytes()
    assert all(raw[off:off + 4096] == base[off:off + 4096] for off in written), "written to the file at once"
    assert pending_log(system, pvol).stat().st_size > len(written) * 4096
    with nbd(system, pvol) as n:
        assert h(n.read(0, SIZE)) == h(image)
        for off, data in written.items():  # small reads inside and across the pending bytes
            assert n.read(off, 4096) == data
            assert n.read(off - 512, 1024) == base[off - 512:off] + data[:512]
    with nbd(system, sv) as n:  # the snapshot: the P-VOL at the split (the file under the pending bytes)
        assert h(n.read(0, SIZE)) == h(base)
    with nbd(system, pvol) as n:
        n.flush()  # waits for the drain
    assert h(ldev_file(system, pvol).read_bytes()) == h(image)
    with nbd(system, sv) as n:
        assert h(n.read(0, SIZE)) == h(base)


def test_kill_9_with_pending_first_writes_loses_none(held: tuple[SystemProcess, VspClient]) -> None:
    system, c = held
    pvol, sv = volume(c), volume(c)
    base = fill(system, pvol, 3)
    mu = snap(c, pvol, "wb", svolLdevId=sv, autoSplit=True)
    image = bytearray(base)
    first_writes(system, pvol, image, 4, 20)  # acknowledged, not flushed, still in the pending log
    with nbd(system, pvol) as n:  # a second write over pending bytes keeps the order
        off = 5 * TRACK
        n.write(off, b"\x01" * 8192)
        n.write(off + 4096, b"\x02" * 4096)
        image[off:off + 4096] = b"\x01" * 4096
        image[off + 4096:off + 8192] = b"\x02" * 4096
    assert pending_log(system, pvol).stat().st_size > 20 * 4096
    system.kill()
    system.start()
    c = system.client()
    assert c.get(f"snapshots/{pvol},{mu}")["status"] == "PSUS"
    with nbd(system, sv) as n:
        assert h(n.read(0, SIZE)) == h(base)
    with nbd(system, pvol) as n:
        assert h(n.read(0, SIZE)) == h(image), "an acknowledged write was lost"
    assert h(ldev_file(system, pvol).read_bytes()) == h(image)  # replayed into the file before any I/O
    # and a split now shows it
    sv2 = volume(c)
    snap(c, pvol, "wb2", svolLdevId=sv2, autoSplit=True)
    with nbd(system, sv2) as n:
        assert h(n.read(0, SIZE)) == h(image)
    c.close()


def test_split_and_truecopy_pair_made_while_writes_are_pending(
        make_system: MakeSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split sees every earlier acknowledged write; a TrueCopy pair created while first writes are pending
    copies them (the copy engine reads through the overlay), and the S-VOL equals the P-VOL after more writes
    (FUA, flush and plain) on the paired P-VOL with its snapshot."""
    monkeypatch.setenv("VSPEMU_WRITEBEHIND_HOLD_MS", "3000")
    p, s = make_system(), make_system()
    with p.client() as pc, s.client() as sc:
        link_systems(pc, sc)
        pv, sv, snap1, snap2 = volume(pc), volume(sc), volume(pc), volume(pc)
        base = fill(p, pv, 5)
        snap(pc, pv, "a", svolLdevId=snap1, autoSplit=True)
        image = bytearray(base)
        first_writes(p, pv, image, 6, 10)
        snap(pc, pv, "b", svolLdevId=snap2, autoSplit=True)  # the split drains first
        with nbd(p, snap2) as n:
            assert h(n.read(0, SIZE)) == h(image)
        first_writes(p, pv, image, 7, 10)  # pending again (first writes for the second snapshot)
        assert h(ldev_file(p, pv).read_bytes()) != h(image)
        pc.invoke("POST", "remote-mirror-copypairs", {
            "copyGroupName": "tcw", "copyPairName": "p1", "replicationType": "TC",
            "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=sc)
        rnd = random.Random(8)
        with nbd(p, pv) as n:
            for i in range(30):
                off = rnd.randrange(SIZE // 4096) * 4096
                data = rnd.randbytes(4096)
                n.write(off, data, fua=(i % 3 == 0))
                image[off:off + 4096] = data
            n.flush()
        with nbd(p, pv) as n:
            assert h(n.read(0, SIZE)) == h(image)
        with nbd(s, sv) as n:
            assert h(n.read(0, SIZE)) == h(image), "the TrueCopy S-VOL differs from the P-VOL"
        with nbd(p, snap1) as n:
            assert h(n.read(0, SIZE)) == h(base)


def test_pending_log_file_is_removed_with_the_last_snapshot(held: tuple[SystemProcess, VspClient]) -> None:
    system, c = held
    pvol = volume(c)
    base = fill(system, pvol, 9)
    mu = snap(c, pvol, "wb", autoSplit=True)
    image = bytearray(base)
    first_writes(system, pvol, image, 10, 5)
    c.invoke("DELETE", f"snapshots/{pvol},{mu}")  # applies what is pending, then the log goes
    assert not pending_log(system, pvol).exists()
    with nbd(system, pvol) as n:
        assert h(n.read(0, SIZE)) == h(image)
    assert h(ldev_file(system, pvol).read_bytes()) == h(image)
    assert not os.path.exists(pending_log(system, pvol))


def test_replay_skips_the_older_records_a_reused_log_still_holds(held: tuple[SystemProcess, VspClient]) -> None:
    """The log is reused from its start once drained (not truncated): after a kill -9 the replay applies the
    new records and skips the older ones behind them, which would undo the newer writes."""
    system, c = held
    pvol = volume(c)
    base = fill(system, pvol, 11)
    snap(c, pvol, "r1", autoSplit=True)
    offs = [t * TRACK for t in range(20)]
    image = bytearray(base)
    with nbd(system, pvol) as n:
        for off in offs:  # round 1: 20 first writes, drained by the flush
            n.write(off, b"\x11" * 4096)
            image[off:off + 4096] = b"\x11" * 4096
        n.flush()
    snap(c, pvol, "r2", autoSplit=True)  # the tracks are first-written again for this one: logged
    with nbd(system, pvol) as n:
        for off in (offs[19], offs[18]):  # round 2: two records over the first two of round 1
            n.write(off, b"\x22" * 4096)
            image[off:off + 4096] = b"\x22" * 4096
    system.kill()
    system.start()
    with nbd(system, pvol) as n:
        assert h(n.read(0, SIZE)) == h(image), "a replayed older record undid a newer write"


def test_save_ahead_appends_and_syncs_in_the_thread_and_skips_what_it_must(tmp_path: Path) -> None:
    """cow.save_ahead: the records it appends in its worker thread are indexed, durable and reload after a
    restart; a track the event loop saved meanwhile is not saved twice; an area that is no longer the newest
    (a split meanwhile) gets nothing."""
    import asyncio

    from vspemu.localcopy.cow import Area, save_ahead

    track = 64 << 10
    pvol = tmp_path / "pvol"
    old = os.urandom(4 * track)
    pvol.write_bytes(old)
    fd = os.open(pvol, os.O_RDONLY)
    try:
        area = Area(tmp_path / "a.tis")
        area.append(1, 2, old[2 * track:3 * track])  # saved by the event loop (not yet durable)
        asyncio.run(save_ahead(lambda: area, fd, len(old), track, [0, 2, 3]))
        assert sorted(area.cow) == [0, 2, 3]
        assert all(area.durable(area.cow[t]) for t in (0, 2, 3))
        assert area.end == 3 * (32 + track) and not area.dirty
        other = Area(tmp_path / "b.tis")
        calls = iter([area])  # the first look names this area; by the time the thread writes, another is newest
        asyncio.run(save_ahead(lambda: next(calls, other), fd, len(old), track, [1]))
        assert area.cow.keys() == {0, 2, 3} and area.end == 3 * (32 + track)
        assert not other.cow  # (left to before_change)
        area.close()
        again = Area(tmp_path / "a.tis")
        assert sorted(again.cow) == [0, 2, 3]
        assert all(again.read(again.cow[t], track) == old[t * track:(t + 1) * track] for t in (0, 2, 3))
        again.close()
        other.close()
    finally:
        os.close(fd)
