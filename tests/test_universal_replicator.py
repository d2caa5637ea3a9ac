"""Universal Replicator end to end: journals, ordered asynchronous copy, mirrors, journal full, link cuts."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import pytest

from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, set_link_ports, volume_digest

MiB = 1 << 20
CG = "urg"


@dataclass
class UrLab:
    p: SystemProcess
    s: SystemProcess
    pc: VspClient
    sc: VspClient

    def nbd(self, side: str, ldev: int) -> NbdClient:
        return NbdClient("127.0.0.1", (self.p if side == "p" else self.s).nbd_port, str(ldev))

    def journals(self, size: str = "256M", jid: int = 1) -> None:
        for c in (self.pc, self.sc):
            jv = c.create_ldev(size)
            c.create_journal(jid, [jv])

    def volumes(self, count: int, size: str = "32M") -> list[tuple[int, int]]:
        out = []
        for _ in range(count):
            pv, sv = self.pc.create_ldev(size), self.sc.create_ldev(size)
            self.pc.add_lun(pv)
            self.sc.add_lun(sv)
            out.append((pv, sv))
        return out

    def create(self, vols: list[tuple[int, int]], group: str = CG, jid: int = 1, mu: int = 1) -> None:
        for i, (pv, sv) in enumerate(vols):
            body = {"copyGroupName": group, "copyPairName": f"u{i}", "replicationType": "UR",
                    "remoteStorageDeviceId": self.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                    "isNewGroupCreation": i == 0, "fenceLevel": "ASYNC", "doInitialCopy": True,
                    "isDataReductionForceCopy": True}
            if i == 0:
                body.update(muNumber=mu, pvolJournalId=jid, svolJournalId=jid)
            self.pc.invoke("POST", "remote-mirror-copypairs", body, remote=self.sc)

    @property
    def gid(self) -> str:
        return f"{self.s.storage_device_id},{CG},{CG}P_,{CG}S_"

    @property
    def sgid(self) -> str:
        return f"{self.p.storage_device_id},{CG},{CG}S_,{CG}P_"

    def group(self, local: bool = False) -> dict:
        if local:
            return self.pc.get(f"remote-mirror-copygroups/NotSpecified,{CG},{CG}P_,NotSpecified")
        return self.pc.get(f"remote-mirror-copygroups/{self.gid}", remote=self.sc)

    def statuses(self, local: bool = False) -> set[tuple[str, str]]:
        return {(p["pvolStatus"], p["svolStatus"]) for p in self.group(local)["copyPairs"]}

    def wait(self, want: set[tuple[str, str]], timeout: float = 60, local: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.statuses(local)) != want:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)

    def journal(self, c: VspClient, jid: int = 1) -> dict:
        return c.get(f"journals/{jid}")

    def wait_drained(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.pc.get("journals", journalInfo="basic")["data"][0]["qCount"] != 0:  # qCount: entries not restored
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def restart_primary(self) -> None:
        """Start the (killed) primary again and wait until its paths are up and its journal drained."""
        self.p.start()
        self.pc = self.p.client()
        self.pc.wait_path_status(f"{self.s.serial},R9,0", "NML_01", 30)
        self.wait_drained()

    def digest(self, side: str, ldev: int, size: int) -> str:
        return volume_digest((self.p if side == "p" else self.s).nbd_port, ldev, size)

    def action(self, name: str, params: dict, side: str = "p") -> None:
        c, r, gid = (self.pc, self.sc, self.gid) if side == "p" else (self.sc, self.pc, self.sgid)
        c.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/{name}/invoke",
                 {"parameters": {"replicationType": "UR", **params}}, remote=r)


@pytest.fixture
def ur(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> UrLab:
    return UrLab(*linked)


def test_mirror_of_three_pairs_copies_every_byte(ur: UrLab) -> None:
    ur.journals()
    vols = ur.volumes(3)
    for pv, _ in vols:
        with ur.nbd("p", pv) as c:
            c.write(0, os.urandom(8 * MiB))
    ur.create(vols)
    assert ur.statuses() == {("PAIR", "PAIR")}
    g = ur.group()
    assert g["muNumber"] == 1
    pair = g["copyPairs"][0]
    assert pair["fenceLevel"] == "ASYNC" and pair["pvolJournalId"] == 1 and pair["svolJournalId"] == 1
    assert pair["replicationType"] == "UR"
    # journaled writes to all P-VOLs
    for i, (pv, _) in enumerate(vols):
        with ur.nbd("p", pv) as c:
            for k in range(20):
                c.write((k * 1531 + i) * 4096 % (30 * MiB), os.urandom(4096 * (1 + k % 5)))
            c.zero(20 * MiB, MiB)
    basic = ur.pc.get("journals", journalInfo="basic")["data"][0]
    assert basic["journalStatus"] in ("PJNN", "PJNF") and basic["muNumber"] == 1
    ur.wait_drained()
    for pv, sv in vols:
        assert ur.digest("p", pv, 32 * MiB) == ur.digest("s", sv, 32 * MiB)
    sbasic = ur.sc.get("journals", journalInfo="basic")["data"][0]
    assert sbasic["journalStatus"] == "SJNN"
    detail = ur.pc.get("journals", journalInfo="detail")["data"][0]
    assert detail["mirrorUnits"][1]["journalStatus"] in ("PJNN", "PJNF")
    stats = ur.pc.raw("GET", "vspemu/v1/replication/stats", headers=ur.pc.headers()).json()
    assert stats["mirrors"][CG]["qCount"] == 0 and stats["mirrors"][CG]["lagSeconds"] == 0.0
    # a pair-level split acts on the whole mirror; split waits until the S-VOLs hold everything
    with ur.nbd("p", vols[0][0]) as c:
        c.write(0, b"last write before the split".ljust(4096))
    ur.pc.invoke("PUT", f"remote-mirror-copypairs/{ur.gid},u1/actions/split/invoke",
                 {"parameters": {"replicationType": "UR"}}, remote=ur.sc)
    assert ur.statuses() == {("PSUS", "SSUS")}
    assert ur.pc.get("journals", journalInfo="basic")["data"][0]["journalStatus"] == "PJSN"
    with ur.nbd("s", vols[0][1]) as c:
        assert c.read(0, 27) == b"last write before the split"
    with ur.nbd("p", vols[1][0]) as c:
        c.write(MiB, b"x" * 4096)
    ur.action("resync", {})
    ur.wait({("PAIR", "PAIR")})
    ur.wait_drained()
    for pv, sv in vols:
        assert ur.digest("p", pv, 32 * MiB) == ur.digest("s", sv, 32 * MiB)
    # delete the mirror: both sides SMPL, the journals are free again
    ur.pc.invoke("DELETE", f"remote-mirror-copygroups/{ur.gid}", remote=ur.sc)
    assert ur.pc.get("remote-copypairs")["data"] == [] and ur.sc.get("remote-copypairs")["data"] == []
    assert ur.pc.get("journals", journalInfo="basic")["data"][0]["journalStatus"] == "SMPL"


def test_create_refusals(ur: UrLab) -> None:
    vols = ur.volumes(2)
    with pytest.raises(ApiError) as e:  # no journal yet
        ur.create(vols[:1])
    assert e.value.message_id == "KART30013-E"
    ur.journals()
    ur.journals(jid=2)
    ur.create(vols[:1])
    before = ur.pc.get("remote-copypairs")["data"]
    with pytest.raises(ApiError) as e:  # mirror 1 of the journal serves another copy group
        ur.create(vols[1:], group="other", mu=1)
    assert e.value.message_id == "KART40063-E" and "mirror 1 of journal 1" in e.value.message
    with pytest.raises(ApiError) as e:  # a P-VOL in two mirrors must keep its journal (a data volume has one)
        ur.create([(vols[0][0], vols[1][1])], group="other", jid=2, mu=2)
    assert e.value.message_id == "KART40063-E" and "belongs to one journal" in e.value.message
    with pytest.raises(ApiError) as e:  # ...and be in one pair per mirror unit
        ur.create([(vols[0][0], vols[1][1])], group="other", jid=1, mu=1)
    assert e.value.message_id == "KART40063-E"
    with pytest.raises(ApiError) as e:  # an S-VOL is in one pair only
        ur.create([(vols[1][0], vols[0][1])], group="other", jid=1, mu=2)
    assert e.value.message_id == "KART40063-E" and "S-VOL" in e.value.message
    assert ur.pc.get("remote-copypairs")["data"] == before and len(before) == 1  # nothing changed
    with pytest.raises(ApiError) as e:  # a journal in use cannot be deleted
        ur.pc.invoke("DELETE", "journals/1")
    assert e.value.message_id.startswith("KART") and "copy group" in e.value.message


def test_dependent_writes_keep_their_order(ur: UrLab) -> None:
    """Write B only after write A is acknowledged, A and B on different volumes: B is never on the S side
    without A, at any split."""
    ur.journals()
    vols = ur.volumes(2, "16M")
    ur.create(vols)
    (pa, sa), (pb, sb) = vols
    stop = threading.Event()
    counter = [0]

    def writer() -> None:
        with ur.nbd("p", pa) as a, ur.nbd("p", pb) as b:
            n = 0
            while not stop.is_set():
                n += 1
                block = n.to_bytes(8, "big") * 64
                a.write((n % 1024) * 512, block)  # A: the record
                b.write((n % 1024) * 512, block)  # B: depends on A
                counter[0] = n

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(4):
            time.sleep(0.7)
            ur.action("split", {})
            assert ur.statuses() == {("PSUS", "SSUS")}
            with ur.nbd("s", sa) as a, ur.nbd("s", sb) as b:
                ia, ib = a.read(0, 512 * 1024), b.read(0, 512 * 1024)
            for slot in range(1024):
                va = int.from_bytes(ia[slot * 512:slot * 512 + 8], "big")
                vb = int.from_bytes(ib[slot * 512:slot * 512 + 8], "big")
                assert vb <= va, (slot, va, vb)  # B's value never ahead of A's
            ur.action("resync", {})
            ur.wait({("PAIR", "PAIR")})
    finally:
        stop.set()
        t.join()
    assert counter[0] > 100


def test_journal_full_goes_pfus_then_resync(ur: UrLab) -> None:
    ur.journals("8M")
    vols = ur.volumes(1, "64M")
    ur.create(vols)
    for c in (ur.pc, ur.sc):
        c.invoke("PATCH", "journals/1", {"dataOverflowWatchInSeconds": 2})
    pv, sv = vols[0]
    ur.s.pause()  # the secondary stops pulling; the journal fills
    try:
        with ur.nbd("p", pv) as c:
            for k in range(7):
                c.write(k * MiB, os.urandom(MiB))
            seen = ur.statuses(local=True)
            t0 = time.monotonic()
            for k in range(7, 40):
                c.write(k * MiB, os.urandom(MiB))
        waited = time.monotonic() - t0
        seen |= ur.statuses(local=True)
    finally:
        ur.s.resume()
    assert ("PFUL", "PAIR") in seen, seen  # over 80 %: PFUL while still copying (the S side did not hear yet)
    assert waited >= 1.5  # writes waited for room for dataOverflowWatchInSeconds, then the mirror suspended
    now = ur.statuses(local=True)  # one snapshot: the secondary may hear of the suspension at any moment
    assert now in ({("PFUS", "PFUS")}, {("PFUS", "PAIR")}), now
    ur.wait({("PFUS", "PFUS")}, timeout=30)
    assert ur.pc.get("journals", journalInfo="basic")["data"][0]["journalStatus"] == "PJSF"
    ur.action("resync", {})
    ur.wait({("PAIR", "PAIR")})
    ur.wait_drained()
    assert ur.digest("p", pv, 64 * MiB) == ur.digest("s", sv, 64 * MiB)


def test_swap_split_and_swap_resync(ur: UrLab) -> None:
    ur.journals()
    vols = ur.volumes(2, "16M")
    ur.create(vols)
    for pv, _ in vols:
        with ur.nbd("p", pv) as c:
            c.write(0, os.urandom(MiB))
    ur.wait_drained()
    ur.action("split", {"svolOperationMode": "SSWS"}, side="s")
    assert ur.statuses() == {("PSUS", "SSWS")}
    for _, sv in vols:
        with ur.nbd("s", sv) as c:
            c.write(2 * MiB, b"on the new primary".ljust(4096))
    ur.action("resync", {"doSwapSvol": True}, side="s")
    sgroup = ur.sc.get(f"remote-mirror-copygroups/{ur.sgid}", remote=ur.pc)
    assert {(p["pvolStatus"], p["svolStatus"]) for p in sgroup["copyPairs"]} == {("PAIR", "PAIR")}
    assert sgroup["copyPairs"][0]["pvolStorageDeviceId"] == ur.s.storage_device_id
    # the journals changed roles: the secondary's journal is now the master journal
    for _, sv in vols:
        with ur.nbd("s", sv) as c:
            c.write(3 * MiB, b"journaled on the new primary".ljust(4096))
    deadline = time.monotonic() + 30
    while ur.sc.get("journals", journalInfo="basic")["data"][0]["qCount"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ur.sc.get("journals", journalInfo="basic")["data"][0]["journalStatus"] in ("PJNN", "PJNF")
    assert ur.pc.get("journals", journalInfo="basic")["data"][0]["journalStatus"] == "SJNN"
    for pv, sv in vols:
        assert ur.digest("p", pv, 16 * MiB) == ur.digest("s", sv, 16 * MiB)
    # Cinder's failback: split from the (original) primary, swap resync there: the direction is restored
    ur.action("split", {}, side="p")
    ur.action("resync", {"doSwapSvol": True}, side="p")
    ur.wait({("PAIR", "PAIR")})
    assert ur.group()["copyPairs"][0]["pvolStorageDeviceId"] == ur.p.storage_device_id
    ur.pc.invoke("DELETE", f"remote-mirror-copygroups/{ur.gid}", remote=ur.sc)


@pytest.mark.e2e
def test_link_cut_shorter_and_longer_than_the_path_watch(ur: UrLab) -> None:
    ur.journals("64M")
    vols = ur.volumes(2, "16M")
    ur.create(vols)
    for c in (ur.pc, ur.sc):
        c.invoke("PATCH", "journals/1", {"mirrorUnit": {"muNumber": 1, "pathBlockadeWatchInMinutes": 1}})
    # a short cut: the journal absorbs the writes, the pairs stay PAIR, and catch up afterwards
    set_link_ports(ur.pc, False)  # the primary's ports go offline: the secondary cannot pull
    for pv, _ in vols:
        with ur.nbd("p", pv) as c:
            c.write(0, os.urandom(2 * MiB))
    time.sleep(5)
    assert ur.statuses(local=True) == {("PAIR", "PAIR")}
    assert ur.pc.get("journals", journalInfo="basic")["data"][0]["qCount"] > 0
    set_link_ports(ur.pc, True)
    ur.wait_drained()
    for pv, sv in vols:
        assert ur.digest("p", pv, 16 * MiB) == ur.digest("s", sv, 16 * MiB)
    # a long cut: after the path watch time the mirror is suspended by error
    set_link_ports(ur.pc, False)
    for pv, _ in vols:
        with ur.nbd("p", pv) as c:
            c.write(4 * MiB, os.urandom(MiB))
    deadline = time.monotonic() + 90
    while ur.statuses(local=True) != {("PSUE", "PAIR")} and ur.statuses(local=True) != {("PSUE", "PSUE")}:
        assert time.monotonic() < deadline, ur.statuses(local=True)
        time.sleep(1)
    assert ur.pc.get("journals", journalInfo="basic")["data"][0]["journalStatus"] == "PJSE"
    set_link_ports(ur.pc, True)
    ur.wait({("PSUE", "PSUE")}, timeout=30)
    ur.pc.wait_path_status(f"{ur.s.serial},R9,0", "NML_01", 30)  # as an operator would, before a resync
    ur.action("resync", {})
    ur.wait({("PAIR", "PAIR")})
    stats = ur.pc.raw("GET", "vspemu/v1/replication/stats", headers=ur.pc.headers()).json()["pairs"]
    assert {v["tracksSentLastCopy"] for v in stats.values()} == {4}  # only the tracks written during the cut
    ur.wait_drained()
    for pv, sv in vols:
        assert ur.digest("p", pv, 16 * MiB) == ur.digest("s", sv, 16 * MiB)


def test_primary_crash_with_a_backlog(ur: UrLab) -> None:
    ur.journals("128M")
    vols = ur.volumes(2, "16M")
    ur.create(vols)
    ur.s.pause()
    try:
        for pv, _ in vols:
            with ur.nbd("p", pv) as c:
                c.write(MiB, os.urandom(3 * MiB), fua=True)
        ur.p.kill()
    finally:
        ur.s.resume()
    ur.restart_primary()
    for pv, sv in vols:
        assert ur.digest("p", pv, 16 * MiB) == ur.digest("s", sv, 16 * MiB)


def test_overwrites_of_entries_not_pulled_yet_and_a_primary_crash(ur: UrLab) -> None:
    """Entries by reference: rewriting a range whose entries the (paused) secondary has not pulled copies their
    data into the journal first, so the secondary still restores every write in order; after a kill -9 of
    the primary only the last entry is replayed (an older one would undo a newer write)."""
    ur.journals("128M")
    vols = ur.volumes(1, "16M")
    ur.create(vols)
    pv, sv = vols[0]
    ur.s.pause()
    try:
        with ur.nbd("p", pv) as c:
            for k in range(8):  # each pass rewrites half of the previous one
                c.write(MiB + k * 256 * 1024, os.urandom(2 * MiB))
            c.zero(MiB, 4096)
            c.write(MiB, b"the last write".ljust(4096), fua=True)
        stats = ur.pc.raw("GET", "vspemu/v1/replication/stats", headers=ur.pc.headers()).json()
        assert stats["mirrors"][CG]["protectedBytes"] >= 7 * MiB  # the entries' data went into the journal
        expected = ur.digest("p", pv, 16 * MiB)
        ur.p.kill()
    finally:
        ur.s.resume()
    ur.restart_primary()
    assert ur.digest("p", pv, 16 * MiB) == expected == ur.digest("s", sv, 16 * MiB)
