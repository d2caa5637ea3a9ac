"""3DC multi-target: one P-VOL in a TrueCopy pair (to a near site) and a UR mirror (to a far site).

Three storage-system processes: a primary whose P-VOLs are each in a TrueCopy pair to the second system and a
UR pair (mirror unit 1 of master journal 1) to the third. What is shown: the TrueCopy S-VOL has every write
when the host is answered, the UR S-VOL gets it through the journal; concurrent overlapping writes end the
same on all three; a split, resync, takeover or deletion of one leaves the other copying; the creation rules
(TrueCopy has mirror unit 0, one TrueCopy pair per volume) refuse without changing anything.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import MakeSystem, primary_and_two_secondaries
from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, volume_digest

MiB = 1 << 20
SIZE = 32 * MiB
TC, UR = "near3", "far3"


@dataclass
class Site:
    s: SystemProcess
    c: VspClient
    svols: list[int]


@dataclass
class ThreeSites:
    p: SystemProcess
    pc: VspClient
    pvols: list[int]
    near: Site  # TrueCopy
    far: Site  # UR

    def gid(self, site: Site, group: str) -> str:
        return f"{site.s.storage_device_id},{group},{group}P_,{group}S_"

    def create_tc(self, pvols: list[int] | None = None, svols: list[int] | None = None, group: str = TC,
                  **extra: object) -> None:
        for i, (pv, sv) in enumerate(zip(pvols or self.pvols, svols or self.near.svols, strict=True)):
            self.pc.invoke("POST", "remote-mirror-copypairs", {
                "copyGroupName": group, "copyPairName": f"t{i}", "replicationType": "TC",
                "remoteStorageDeviceId": self.near.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                "isNewGroupCreation": i == 0, "fenceLevel": "NEVER", "copyPace": 15, **extra}, remote=self.near.c)

    def create_ur(self, mu: int = 1, group: str = UR) -> None:
        for i, (pv, sv) in enumerate(zip(self.pvols, self.far.svols, strict=True)):
            body = {"copyGroupName": group, "copyPairName": f"u{i}", "replicationType": "UR",
                    "remoteStorageDeviceId": self.far.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                    "isNewGroupCreation": i == 0, "fenceLevel": "ASYNC", "doInitialCopy": True}
            if i == 0:
                body.update(muNumber=mu, pvolJournalId=1, svolJournalId=1)
            self.pc.invoke("POST", "remote-mirror-copypairs", body, remote=self.far.c)

    def statuses(self, site: Site, group: str) -> set[tuple[str, str]]:
        g = self.pc.get(f"remote-mirror-copygroups/{self.gid(site, group)}", remote=site.c)
        return {(x["pvolStatus"], x["svolStatus"]) for x in g["copyPairs"]}

    def wait(self, site: Site, group: str, want: set[tuple[str, str]], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.statuses(site, group)) != want:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)

    def action(self, site: Site, group: str, name: str, rtype: str) -> None:
        self.pc.invoke("PUT", f"remote-mirror-copygroups/{self.gid(site, group)}/actions/{name}/invoke",
                       {"parameters": {"replicationType": rtype}}, remote=site.c)

    def wait_drained(self, mu: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (units := {x["muNumber"]: x["qCount"] for x in self.pc.get("journals", journalInfo="basic")["data"]
                         if x["journalId"] == 1}).get(mu) != 0:
            assert time.monotonic() < deadline, units
            time.sleep(0.05)

    def write(self, pv: int, offset: int, data: bytes) -> None:
        with NbdClient("127.0.0.1", self.p.nbd_port, str(pv)) as c:
            c.write(offset, data)

    def read(self, site: Site, sv: int, offset: int, length: int) -> bytes:
        with NbdClient("127.0.0.1", site.s.nbd_port, str(sv)) as c:
            return c.read(offset, length)

    def same(self, site: Site) -> bool:
        return all(volume_digest(self.p.nbd_port, pv, SIZE) == volume_digest(site.s.nbd_port, sv, SIZE)
                   for pv, sv in zip(self.pvols, site.svols, strict=True))


@pytest.fixture
def three(make_system: MakeSystem) -> Iterator[ThreeSites]:
    (p, near, far), (pc, nc, fc), (pvols, nv, fv) = primary_and_two_secondaries(make_system, journals=(0, 2))
    lab = ThreeSites(p, pc, pvols, Site(near, nc, nv), Site(far, fc, fv))
    yield lab
    for c in (pc, nc, fc):
        c.close()


def test_truecopy_and_ur_from_one_pvol(three: ThreeSites) -> None:
    near, far, pv0 = three.near, three.far, three.pvols[0]
    three.create_tc()
    assert three.statuses(near, TC) == {("PAIR", "PAIR")}
    # TrueCopy has mirror unit 0: the UR mirror of the same P-VOLs must use 1-3; nothing is created otherwise
    with pytest.raises(ApiError) as e:
        three.create_ur(mu=0)
    assert e.value.message_id == "KART40063-E" and "mirror units 1-3" in e.value.message
    assert three.pc.get("remote-copypairs", replicationType="UR")["data"] == []
    assert far.c.get("remote-copypairs")["data"] == []
    three.create_ur(mu=1)
    assert three.statuses(far, UR) == {("PAIR", "PAIR")} and three.statuses(near, TC) == {("PAIR", "PAIR")}
    # one TrueCopy pair per volume
    spare = near.c.create_ldev("32M")
    with pytest.raises(ApiError) as e:
        three.create_tc([pv0], [spare], group="near3b")
    assert e.value.message_id == "KART40063-E" and "one TrueCopy pair" in e.value.message
    assert len(three.pc.get("remote-copypairs", replicationType="TC")["data"]) == 2

    # every write is on the TrueCopy S-VOL when the host is answered, and reaches the UR S-VOL via the journal
    for k in range(20):
        tag = f"write {k} to both sites".encode().ljust(4096, b".")
        offset = (k * 2053 * 4096) % (SIZE - MiB)
        three.write(pv0, offset, tag)
        assert three.read(near, near.svols[0], offset, 4096) == tag
    for i, pv in enumerate(three.pvols):
        three.write(pv, 12 * MiB + i * 4096, os.urandom(MiB))
        with NbdClient("127.0.0.1", three.p.nbd_port, str(pv)) as c:
            c.zero(20 * MiB, 2 * MiB)
    three.wait_drained()
    assert three.same(near) and three.same(far)

    # concurrent overlapping writes from several connections end the same on all three sites
    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        with NbdClient("127.0.0.1", three.p.nbd_port, str(pv0)) as c:
            for _ in range(60):
                c.write(rnd.randrange(0, 4 * MiB // 4096) * 4096, os.urandom(4096 * rnd.randint(1, 32)))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    three.wait_drained()
    assert three.same(near) and three.same(far)
    # the burst filled the 16 MiB journal over 80 %: the UR S-VOL side shows PFUL until a pull after the drain
    # reports the usage down again (the primary frees entries once the secondary has made them durable)
    three.wait(far, UR, {("PAIR", "PAIR")})

    # a split of the TrueCopy pair leaves UR copying; its resync copies what changed meanwhile
    three.action(near, TC, "split", "TC")
    assert three.statuses(near, TC) == {("PSUS", "SSUS")} and three.statuses(far, UR) == {("PAIR", "PAIR")}
    three.write(pv0, 0, b"while TrueCopy is split".ljust(8192))
    three.wait_drained()
    assert three.read(far, far.svols[0], 0, 23) == b"while TrueCopy is split"
    assert three.read(near, near.svols[0], 0, 23) != b"while TrueCopy is split"
    three.action(near, TC, "resync", "TC")
    three.wait(near, TC, {("PAIR", "PAIR")})
    assert three.same(near)
    # a split of the UR mirror leaves TrueCopy in sync
    three.action(far, UR, "split", "UR")
    assert three.statuses(far, UR) == {("PSUS", "SSUS")} and three.statuses(near, TC) == {("PAIR", "PAIR")}
    three.write(pv0, MiB, b"while UR is split".ljust(4096))
    assert three.read(near, near.svols[0], MiB, 17) == b"while UR is split"
    assert three.read(far, far.svols[0], MiB, 17) != b"while UR is split"
    three.action(far, UR, "resync", "UR")
    three.wait(far, UR, {("PAIR", "PAIR")})
    three.wait_drained()
    assert three.same(far) and three.same(near)

    # the near site takes over (SSWS); reversing TrueCopy is refused (its P-VOLs feed the UR mirror too)
    sgid = f"{three.p.storage_device_id},{TC},{TC}S_,{TC}P_"
    near.c.invoke("PUT", f"remote-mirror-copygroups/{sgid}/actions/split/invoke",
                  {"parameters": {"replicationType": "TC", "svolOperationMode": "SSWS"}}, remote=three.pc)
    assert three.statuses(near, TC) == {("PSUS", "SSWS")}
    with pytest.raises(ApiError) as e:
        near.c.invoke("PUT", f"remote-mirror-copygroups/{sgid}/actions/resync/invoke",
                      {"parameters": {"replicationType": "TC", "doSwapSvol": True}}, remote=three.pc)
    assert e.value.message_id == "KART40062-E" and "multi-target" in e.value.message
    assert three.statuses(near, TC) == {("PSUS", "SSWS")} and three.statuses(far, UR) == {("PAIR", "PAIR")}
    # horctakeover (auto) at the far site: no swap possible, so an SVOL-takeover
    ns = f"NotSpecified,{UR},{UR}S_,NotSpecified"
    far.c.invoke("POST", f"remote-mirror-copygroups/{ns}/actions/takeover/invoke", {"parameters": {}})
    assert three.statuses(far, UR) == {("PSUS", "SSWS")}

    # deleting the TrueCopy pairs leaves each P-VOL in its UR mirror alone, which copies on after a resync
    three.pc.invoke("DELETE", f"remote-mirror-copygroups/{three.gid(near, TC)}", remote=near.c)
    assert three.pc.get("remote-copypairs", replicationType="TC")["data"] == []
    ugid = f"{three.p.storage_device_id},{UR},{UR}S_,{UR}P_"
    far.c.invoke("PUT", f"remote-mirror-copygroups/{ugid}/actions/resync/invoke",
                 {"parameters": {"replicationType": "UR", "doSwapSvol": True}}, remote=three.pc)
    sgroup = far.c.get(f"remote-mirror-copygroups/{ugid}", remote=three.pc)
    assert {(x["pvolStatus"], x["svolStatus"]) for x in sgroup["copyPairs"]} == {("PAIR", "PAIR")}
    assert sgroup["copyPairs"][0]["pvolStorageDeviceId"] == far.s.storage_device_id  # the far site leads now
    with NbdClient("127.0.0.1", far.s.nbd_port, str(far.svols[1])) as c:
        c.write(5 * MiB, b"journaled at the far site".ljust(4096))
    deadline = time.monotonic() + 30
    while far.c.get("journals", journalInfo="basic")["data"][0]["qCount"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert three.same(far)


def test_a_pvol_in_a_ur_mirror_joins_a_truecopy_pair(three: ThreeSites) -> None:
    """The other order: UR first, TrueCopy added while writes go on; the new pair's initial copy and the
    journal see the same writes."""
    near, far, pv0 = three.near, three.far, three.pvols[0]
    three.create_ur(mu=2)
    with pytest.raises(ApiError) as e:  # a TrueCopy group given the UR mirror's unit (bitmaps are named by it)
        three.create_tc(muNumber=2)
    assert e.value.message_id == "KART40063-E" and "other than 2" in e.value.message
    assert three.pc.get("remote-copypairs", replicationType="TC")["data"] == []
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        rnd = random.Random(7)
        try:
            with NbdClient("127.0.0.1", three.p.nbd_port, str(pv0)) as c:
                while not stop.is_set():
                    c.write(rnd.randrange(0, SIZE // 65536) * 65536, os.urandom(65536))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.3)
        three.create_tc()
        three.wait(near, TC, {("PAIR", "PAIR")})
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    assert not errors
    three.wait_drained(mu=2)
    assert three.same(near) and three.same(far)


def test_primary_restart_with_truecopy_and_a_ur_backlog(three: ThreeSites) -> None:
    """The primary is killed while its UR mirror holds a backlog; after the restart TrueCopy copies its marked
    extents again (COPY, then PAIR) and the far site restores the rest: all three hold the same bytes."""
    near, far = three.near, three.far
    three.create_tc()
    three.create_ur()
    far.s.pause()
    try:
        for pv in three.pvols:
            three.write(pv, MiB, os.urandom(3 * MiB))
            with NbdClient("127.0.0.1", three.p.nbd_port, str(pv)) as c:
                c.write(9 * MiB, os.urandom(MiB), fua=True)
        assert three.same(near)
        three.p.kill()
    finally:
        far.s.resume()
    three.p.start()
    three.pc = three.p.client()
    for site in (near, far):
        three.pc.wait_path_status(f"{site.s.serial},R9,0", "NML_01", 30)
    three.wait(near, TC, {("PAIR", "PAIR")})
    three.wait_drained()
    assert three.statuses(far, UR) == {("PAIR", "PAIR")}
    assert three.same(near) and three.same(far)
