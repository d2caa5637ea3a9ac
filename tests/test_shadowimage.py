"""ShadowImage pairs end to end: real storage-system processes, real bytes over NBD."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from vspemu.client import ApiError, JobFailed, VspClient
from vspemu.client.nbd import NbdClient, NbdError
from vspemu.lab import SystemProcess, volume_digest

MiB = 1 << 20
TRACK = 256 << 10
CG = "sig"


@dataclass
class Si:
    sysp: SystemProcess
    c: VspClient

    def nbd(self, ldev: int) -> NbdClient:
        return NbdClient("127.0.0.1", self.sysp.nbd_port, str(ldev))

    def volume(self, size: str = "64M") -> int:
        v = self.c.create_ldev(size)
        self.c.add_lun(v)
        return v

    def pair_id(self, name: str = "p1", group: str = CG) -> str:
        return f"{group},{group}P_,{group}S_,{name}"

    def create(self, pvol: int, svol: int, name: str = "p1", group: str = CG, new: bool = True,
               nowait: bool = False, **extra: Any) -> dict[str, Any]:
        body = {"copyGroupName": group, "copyPairName": name, "replicationType": "SI", "pvolLdevId": pvol,
                "svolLdevId": svol, "isNewGroupCreation": new, "copyPace": 15, **extra}
        return self.c.invoke("POST", "local-clone-copypairs", body, nowait=nowait)

    def act(self, op: str, name: str = "p1", group: str = CG, **params: Any) -> dict[str, Any]:
        return self.c.invoke("POST", f"local-clone-copypairs/{self.pair_id(name, group)}/actions/{op}/invoke",
                             {"parameters": {"copyPace": 15, **params}})

    def group_act(self, op: str, group: str = CG) -> dict[str, Any]:
        return self.c.invoke("POST", f"local-clone-copygroups/{group},{group}P_,{group}S_/actions/{op}/invoke",
                             {"parameters": {"copyPace": 15}})

    def pair(self, name: str = "p1", group: str = CG) -> dict[str, Any]:
        return self.c.get(f"local-clone-copypairs/{self.pair_id(name, group)}")  # type: ignore[no-any-return]

    def wait(self, status: str, name: str = "p1", group: str = CG, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.pair(name, group)
            if info["pvolStatus"] == status:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"pair {name}: {info['pvolStatus']}, not {status}")
            time.sleep(0.05)

    def stats(self, name: str = "p1", group: str = CG) -> dict[str, int]:
        r = self.c.raw("GET", "vspemu/v1/local-clone/stats", headers=self.c.headers())
        return r.json()["pairs"][self.pair_id(name, group)]  # type: ignore[no-any-return]

    def digest(self, ldev: int, size: int) -> str:
        return volume_digest(self.sysp.nbd_port, ldev, size)


@pytest.fixture
def si(system: SystemProcess, api: VspClient) -> Si:
    return Si(system, api)


def fill_random(c: NbdClient, size: int, start: int = 0, step: int = 4 * MiB) -> None:
    for off in range(start, start + size, step):
        c.write(off, os.urandom(min(step, start + size - off)))
    c.flush()


BLOCK = 64 << 10


def block_bytes(block: int, version: int) -> bytes:
    return struct.pack("<QQ", block, version) * (BLOCK // 16)


@dataclass
class Writer:
    """Writes versioned 64 KiB blocks to a P-VOL as fast as it can, remembering for every block the version
    acknowledged last and the version sent last."""

    si: Si
    ldev: int
    blocks: int
    acked: dict[int, int] = field(default_factory=dict)
    sent: dict[int, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    error: list[BaseException] = field(default_factory=list)
    count: int = 0
    killed: bool = False  # the server is killed under the writer: losing the connection is expected

    def run(self) -> None:
        try:
            with self.si.nbd(self.ldev) as c:
                rnd = 1
                while not self.stop.is_set():
                    rnd = (rnd * 1103515245 + 12345) & 0x7FFFFFFF
                    b = rnd % self.blocks
                    v = self.sent.get(b, 0) + 1
                    self.sent[b] = v
                    c.write(b * BLOCK, block_bytes(b, v))
                    self.acked[b] = v
                    self.count += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error.append(e)

    def __enter__(self) -> Writer:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        while self.count < 50 and not self.error:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.killed:
            assert all(isinstance(e, (ConnectionError, OSError)) for e in self.error), self.error
        else:
            assert not self.error, self.error

    def check_image(self, image: NbdClient, before: dict[int, int], after: dict[int, int]) -> None:
        """Every block of the image holds a version acknowledged no earlier than ``before`` and sent no later
        than ``after`` (snapshots taken just before the split request and just after its answer)."""
        for b in range(self.blocks):
            got = image.read(b * BLOCK, BLOCK)
            if got == bytes(BLOCK):
                v = 0
            else:
                blk, v = struct.unpack_from("<QQ", got)
                assert blk == b and got == block_bytes(b, v), f"block {b} is torn"
            assert before.get(b, 0) <= v <= after.get(b, 0), (b, before.get(b), v, after.get(b))


def test_create_pair_split_resync_restore(si: Si) -> None:
    pv, sv = si.volume(), si.volume()
    with si.nbd(pv) as c:
        fill_random(c, 40 * MiB)  # the last 24 MiB stay holes
    with si.nbd(sv) as c:
        c.write(60 * MiB, b"\xee" * 4096)  # stale data on the S-VOL is zeroed by the initial copy
    job = si.create(pv, sv)
    assert job["affectedResources"][0].endswith(f"/local-clone-copypairs/{si.pair_id()}")
    info = si.wait("PAIR")
    assert info["localCloneCopypairId"] == si.pair_id() and info["replicationType"] == "SI"
    assert (info["pvolLdevId"], info["svolLdevId"], info["pvolMuNumber"], info["copyProgressRate"]) == (pv, sv, 0, 100)
    assert si.stats()["tracksCopiedLastCopy"] == 161  # 40 MiB of data + the S-VOL's stale track, no holes
    assert si.digest(pv, 64 * MiB) == si.digest(sv, 64 * MiB)
    # PAIR: P-VOL writes reach the S-VOL; the S-VOL refuses host writes
    with si.nbd(pv) as c:
        c.write(50 * MiB + 3, b"\x77" * 100000)
        c.zero(1 * MiB, 2 * MiB)
    with si.nbd(sv) as c, pytest.raises(NbdError) as e:
        c.write(0, b"x" * 512)
    assert e.value.errno == 1  # NBD_EPERM
    groups = si.c.get("local-clone-copygroups")["data"]
    assert [g["localCloneCopygroupId"] for g in groups] == [f"{CG},{CG}P_,{CG}S_"]
    listed = si.c.get("local-clone-copypairs", localCloneCopyGroupId=groups[0]["localCloneCopygroupId"])["data"]
    assert [p["copyPairName"] for p in listed] == ["p1"]
    # split: the S-VOL is the P-VOL's image and usable by hosts
    p_image = si.digest(pv, 64 * MiB)
    si.act("split")
    assert si.pair()["pvolStatus"] == "PSUS"
    assert si.digest(sv, 64 * MiB) == p_image
    with si.nbd(pv) as c:
        c.write(0, b"P" * 4096)  # track 0
        c.write(10 * MiB, b"P" * 4096)  # track 40
    with si.nbd(sv) as c:
        c.write(20 * MiB + 7, b"S" * 100)  # track 80: overwritten again by the resync
        assert c.read(0, 4096) != b"P" * 4096
    assert si.stats()["pvolMarkedTracks"] == 2 and si.stats()["svolMarkedTracks"] == 1
    # resync: only the three changed tracks are copied
    si.act("resync")
    si.wait("PAIR")
    assert si.stats()["tracksCopiedLastCopy"] == 3
    assert si.digest(pv, 64 * MiB) == si.digest(sv, 64 * MiB)
    # split, change the S-VOL, restore: the P-VOL becomes the S-VOL
    si.act("split")
    with si.nbd(sv) as c:
        c.write(30 * MiB, os.urandom(3 * MiB))
        c.trim(0, 4 * MiB)
    with si.nbd(pv) as c:
        c.write(45 * MiB, b"Q" * 8192)  # undone by the restore
    s_image = si.digest(sv, 64 * MiB)
    si.act("restore")
    si.wait("PAIR")
    assert si.stats()["tracksCopiedLastCopy"] == 12 + 16 + 1
    assert si.digest(pv, 64 * MiB) == s_image == si.digest(sv, 64 * MiB)
    # delete: SMPL, both volumes free again
    si.c.invoke("DELETE", f"local-clone-copypairs/{si.pair_id()}")
    with pytest.raises(ApiError) as err:
        si.pair()
    assert err.value.status == 404
    assert si.c.get("local-clone-copygroups")["data"] == []
    with si.nbd(sv) as c:
        c.write(0, b"free" * 128)


def test_split_while_the_pvol_is_written(si: Si) -> None:
    """The S-VOL is the P-VOL of the split instant although the copy is still under way and a writer keeps
    writing (copy-on-write into the S-VOL for the tracks not yet copied)."""
    pv, sv = si.volume("128M"), si.volume("128M")
    with si.nbd(pv) as c:
        fill_random(c, 96 * MiB, start=32 * MiB)
    blocks = 32 * MiB // BLOCK
    with Writer(si, pv, blocks) as w:
        si.create(pv, sv, copyPace=1, nowait=True)
        time.sleep(0.05)
        before = dict(w.acked)
        si.act("split")  # answered when the S-VOL holds the whole image
        after = dict(w.sent)
        # the writer is still writing: the image must not follow it
        count = w.count
        while w.count < count + 200 and not w.error:
            time.sleep(0.01)
    assert si.pair()["pvolStatus"] == "PSUS"
    with si.nbd(sv) as img:
        w.check_image(img, before, after)
    stats = si.stats()
    assert stats["pendingTracks"] == 0
    # the rest of the volume (not written during the test) was copied whole
    with si.nbd(pv) as a, si.nbd(sv) as b:
        for off in range(32 * MiB, 128 * MiB, 8 * MiB):
            assert a.read(off, 8 * MiB) == b.read(off, 8 * MiB)


def test_group_split_is_one_point_in_time(si: Si) -> None:
    """Two pairs of one group split by one request: a writer that writes the same version to both P-VOLs
    one after the other finds, on the S-VOLs, versions at most one apart, and never the second ahead."""
    pvs = [si.volume("32M") for _ in range(2)]
    svs = [si.volume("32M") for _ in range(2)]
    si.create(pvs[0], svs[0], "a")
    si.create(pvs[1], svs[1], "b", new=False)
    si.wait("PAIR", "a")
    si.wait("PAIR", "b")
    stop = threading.Event()
    errors: list[BaseException] = []
    last = [0]

    def writer() -> None:
        try:
            with si.nbd(pvs[0]) as a, si.nbd(pvs[1]) as b:
                v = 0
                while not stop.is_set():
                    v += 1
                    a.write(0, struct.pack("<Q", v) * 512)
                    b.write(0, struct.pack("<Q", v) * 512)
                    last[0] = v
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    while last[0] < 100 and not errors:
        time.sleep(0.01)
    si.group_act("split")
    stop.set()
    t.join(30)
    assert not errors
    assert si.pair("a")["pvolStatus"] == si.pair("b")["pvolStatus"] == "PSUS"
    with si.nbd(svs[0]) as a, si.nbd(svs[1]) as b:
        va = struct.unpack("<Q", a.read(0, 8))[0]
        vb = struct.unpack("<Q", b.read(0, 8))[0]
    assert va > 0 and va - vb in (0, 1), (va, vb)
    # group resync and group delete
    si.group_act("resync")
    si.wait("PAIR", "a")
    si.wait("PAIR", "b")
    si.c.invoke("DELETE", f"local-clone-copygroups/{CG},{CG}P_,{CG}S_")
    assert si.c.get("local-clone-copypairs")["data"] == []


def test_refusals_change_nothing(si: Si) -> None:
    pv, sv, small, third = si.volume("32M"), si.volume("32M"), si.volume("16M"), si.volume("32M")

    def refused(fn: Any, status: int, message_id: str | None = None) -> None:
        with pytest.raises((ApiError, JobFailed)) as e:
            fn()
        if isinstance(e.value, JobFailed):  # refused by the job (an LDEV delete)
            assert message_id is not None and message_id in str(e.value)
            return
        assert e.value.status == status, e.value.body
        if message_id:
            assert e.value.body["messageId"] == message_id

    refused(lambda: si.create(pv, small), 412, "KART40062-E")  # sizes differ
    refused(lambda: si.create(pv, pv), 400)
    refused(lambda: si.create(pv, sv, new=False), 404)  # no such group
    refused(lambda: si.create(pv, sv, copyPace=16), 400)
    refused(lambda: si.create(pv, sv, bogus=1), 400)
    assert si.c.get("local-clone-copypairs")["data"] == []
    si.create(pv, sv)
    si.wait("PAIR")
    refused(lambda: si.create(third, sv, "p2", new=False), 412, "KART40063-E")  # S-VOL already in a pair
    refused(lambda: si.create(pv, third, "p1", new=False), 409)  # the name is taken
    refused(lambda: si.act("resync"), 412)  # PAIR already
    refused(lambda: si.act("restore"), 412)  # not split
    refused(lambda: si.c.delete_ldev(pv), 412, "KART40063-E")
    refused(lambda: si.c.delete_ldev(sv), 412, "KART40063-E")
    refused(lambda: si.c.get("local-clone-copypairs/a,b"), 400)
    refused(lambda: si.c.get(f"local-clone-copypairs/{si.pair_id('nope')}"), 404)
    si.act("split")
    refused(lambda: si.act("split"), 412)
    assert si.pair()["pvolStatus"] == "PSUS"


def test_restart_keeps_pairs_and_split_images(si: Si) -> None:
    pv, sv = si.volume("32M"), si.volume("32M")
    with si.nbd(pv) as c:
        fill_random(c, 32 * MiB)
    si.create(pv, sv)
    si.wait("PAIR")
    si.act("split")
    image = si.digest(sv, 32 * MiB)
    with si.nbd(pv) as c:
        c.write(0, b"after" * 1000)
        c.flush()
    si.sysp.kill()
    si.sysp.restart()
    with si.sysp.client() as c2:
        s2 = Si(si.sysp, c2)
        assert s2.pair()["pvolStatus"] == "PSUS"
        assert s2.digest(sv, 32 * MiB) == image
        assert s2.stats()["pvolMarkedTracks"] == 1
        s2.act("resync")
        s2.wait("PAIR")
        assert s2.stats()["tracksCopiedLastCopy"] == 1
        assert s2.digest(pv, 32 * MiB) == s2.digest(sv, 32 * MiB)


@pytest.mark.e2e
def test_kill_during_copy_and_during_split_catch_up(si: Si) -> None:
    """kill -9 while the initial copy runs, then while a split is filling its image under a writer: after
    each restart the copy goes on, no acknowledged P-VOL write is lost and the split image is exact."""
    pv, sv = si.volume("128M"), si.volume("128M")
    with si.nbd(pv) as c:
        fill_random(c, 128 * MiB)
    si.create(pv, sv, copyPace=1, nowait=True)
    si.sysp.kill()
    si.sysp.restart()
    c2 = si.sysp.client()
    s2 = Si(si.sysp, c2)
    s2.wait("PAIR")
    assert s2.digest(pv, 128 * MiB) == s2.digest(sv, 128 * MiB)
    with s2.nbd(pv) as c:
        c.zero(0, 32 * MiB)  # the writer's area: unwritten blocks read as zeros
        fill_random(c, 64 * MiB, start=64 * MiB)  # 256 tracks to copy
    blocks = 32 * MiB // BLOCK
    w = Writer(s2, pv, blocks, killed=True)
    with w:
        before = dict(w.acked)
        s2.c.invoke("POST", f"local-clone-copypairs/{s2.pair_id()}/actions/split/invoke",
                    {"parameters": {"copyPace": 1}}, nowait=True)
        after = dict(w.sent)
        si.sysp.kill()
    acked = dict(w.acked)
    si.sysp.restart()
    c3 = si.sysp.client()
    s3 = Si(si.sysp, c3)
    info = s3.wait("PSUS")
    assert info["pvolStatus"] == "PSUS"
    with s3.nbd(pv) as c:  # no acknowledged write to the P-VOL was lost
        for b, v in acked.items():
            got = struct.unpack_from("<QQ", c.read(b * BLOCK, 16))
            assert got[0] == b and got[1] >= v
    with s3.nbd(sv) as img:
        w.check_image(img, before, after)
    c2.close()
    c3.close()


@pytest.fixture
def tc_lab(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> Iterator[tuple[Si, Si]]:
    p, s, pc, sc = linked
    yield Si(p, pc), Si(s, sc)


def test_shadowimage_of_truecopy_pvol_and_svol(tc_lab: tuple[Si, Si]) -> None:
    """ShadowImage on both sides of a TrueCopy pair in PAIR: each S-VOL is the split image; a restore onto
    the TC S-VOL is refused while the TC pair is in PAIR; a restore onto the TC P-VOL is mirrored to the
    remote S-VOL (written through the host write path)."""
    p, s = tc_lab
    tpv, tsv = p.volume("32M"), s.volume("32M")
    with p.nbd(tpv) as c:
        fill_random(c, 32 * MiB)
    body = {"copyGroupName": "tc", "copyPairName": "t1", "replicationType": "TC",
            "remoteStorageDeviceId": s.sysp.storage_device_id, "pvolLdevId": tpv, "svolLdevId": tsv,
            "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}
    p.c.invoke("POST", "remote-mirror-copypairs", body, remote=s.c)
    tc_id = f"{s.sysp.storage_device_id},tc,tcP_,tcS_,t1"
    deadline = time.monotonic() + 60
    while p.c.get(f"remote-mirror-copypairs/{tc_id}", remote=s.c)["pvolStatus"] != "PAIR":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    psi, ssi = p.volume("32M"), s.volume("32M")
    p.create(tpv, psi)
    s.create(tsv, ssi)
    p.wait("PAIR")
    s.wait("PAIR")
    with p.nbd(tpv) as c:  # mirrored to the TC S-VOL, marked on both ShadowImage pairs
        c.write(5 * MiB, b"T" * 65536)
        c.flush()
    p.act("split")
    s.act("split")
    image = p.digest(tpv, 32 * MiB)
    assert p.digest(psi, 32 * MiB) == image == s.digest(ssi, 32 * MiB) == s.digest(tsv, 32 * MiB)
    with p.nbd(tpv) as c:
        c.write(6 * MiB, b"U" * 65536)
    with s.nbd(ssi) as c:
        c.write(7 * MiB, b"V" * 65536)
    assert s.digest(ssi, 32 * MiB) != image
    with pytest.raises(ApiError) as e:  # the TC S-VOL cannot be written while its pair is in PAIR
        s.act("restore")
    assert e.value.status == 412
    assert s.pair()["pvolStatus"] == "PSUS"
    # restore onto the TC P-VOL: the remote S-VOL mirrors it
    with p.nbd(psi) as c:
        c.write(8 * MiB, b"W" * 65536)
    p_image = p.digest(psi, 32 * MiB)
    p.act("restore")
    p.wait("PAIR")
    assert p.digest(tpv, 32 * MiB) == p_image == s.digest(tsv, 32 * MiB)
    with pytest.raises((JobFailed, ApiError)):
        s.c.invoke("DELETE", f"ldevs/{ssi}")


def test_a_failed_copy_suspends_the_pair_and_a_resync_copies_everything(si: Si) -> None:
    pv, sv = si.volume("32M"), si.volume("32M")
    with si.nbd(pv) as c:
        fill_random(c, 8 * MiB)
    si.create(pv, sv)
    si.wait("PAIR")
    fault = si.c.add_fault("ldev-eio", ldevId=sv)
    with si.nbd(pv) as c:  # the host write succeeds; copying it to the S-VOL fails
        c.write(20 * MiB, b"E" * 4096)
        c.flush()
    si.wait("PSUE")
    si.c.clear_fault(fault["faultId"])
    with si.nbd(sv) as c:  # PSUE: the S-VOL is usable
        c.write(30 * MiB, b"s" * 4096)
    si.act("resync")
    si.wait("PAIR")
    assert si.stats()["tracksCopiedLastCopy"] == 128  # after PSUE, the whole volume
    assert si.digest(pv, 32 * MiB) == si.digest(sv, 32 * MiB)


def test_shadowimage_of_a_universal_replicator_svol(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    """ShadowImage on a UR S-VOL: the journal's restores and the initial copy are marked like host writes;
    after a (flushing) UR split the ShadowImage split gives the P-VOL's image, and it stays so while the UR
    pair is resynced and the P-VOL keeps changing."""
    from test_universal_replicator import UrLab

    ur = UrLab(*linked)
    s = Si(ur.s, ur.sc)
    ur.journals()
    (pv, sv), = ur.volumes(1)
    ssi = s.volume("32M")
    s.create(sv, ssi)  # before the UR pair: the UR initial copy reaches the ShadowImage S-VOL too
    s.wait("PAIR")
    with ur.nbd("p", pv) as c:
        fill_random(c, 16 * MiB)
    ur.create([(pv, sv)])
    ur.wait({("PAIR", "PAIR")})
    with ur.nbd("p", pv) as c:
        c.write(20 * MiB, os.urandom(MiB))
        c.flush()
    ur.action("split", {})
    ur.wait({("PSUS", "SSUS")})
    s.act("split")
    image = ur.digest("p", pv, 32 * MiB)
    assert ur.digest("s", sv, 32 * MiB) == image, "UR"
    assert s.digest(ssi, 32 * MiB) == image, s.stats()
    ur.action("resync", {})
    ur.wait({("PAIR", "PAIR")})
    with ur.nbd("p", pv) as c:
        c.write(0, os.urandom(MiB))
        c.flush()
    ur.wait_drained()
    assert ur.digest("s", sv, 32 * MiB) == ur.digest("p", pv, 32 * MiB) != image
    assert s.digest(ssi, 32 * MiB) == image  # the split image does not follow
    s.act("resync")
    s.wait("PAIR")
    assert s.stats()["tracksCopiedLastCopy"] == 4  # the 1 MiB written since the split, no more
    assert s.digest(ssi, 32 * MiB) == ur.digest("s", sv, 32 * MiB)
