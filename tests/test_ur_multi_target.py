"""Universal Replicator multi-target: one master journal serving two mirrors, to two secondary systems.

Three storage-system processes: a primary whose P-VOLs are each in two UR pairs (mirror unit 1 to the first
secondary, mirror unit 2 to the second), both mirrors in master journal 1. What is shown: both secondaries
get every byte; a split, a journal-full suspension (PFUS) or a deletion of one mirror leaves the other
copying; resync after PFUS copies what changed; a primary restarted with a backlog for both mirrors still
delivers everything to both.
"""

from __future__ import annotations

import os
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


@dataclass
class Mirror:
    name: str
    mu: int
    s: SystemProcess
    sc: VspClient
    svols: list[int]


@dataclass
class MultiTarget:
    p: SystemProcess
    pc: VspClient
    pvols: list[int]
    m1: Mirror
    m2: Mirror

    def gid(self, m: Mirror) -> str:
        return f"{m.s.storage_device_id},{m.name},{m.name}P_,{m.name}S_"

    def create(self, m: Mirror) -> None:
        for i, (pv, sv) in enumerate(zip(self.pvols, m.svols, strict=True)):
            body = {"copyGroupName": m.name, "copyPairName": f"p{i}", "replicationType": "UR",
                    "remoteStorageDeviceId": m.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                    "isNewGroupCreation": i == 0, "fenceLevel": "ASYNC", "doInitialCopy": True,
                    "isDataReductionForceCopy": True}
            if i == 0:
                body.update(muNumber=m.mu, pvolJournalId=1, svolJournalId=1)
            self.pc.invoke("POST", "remote-mirror-copypairs", body, remote=m.sc)

    def statuses(self, m: Mirror) -> set[tuple[str, str]]:
        g = self.pc.get(f"remote-mirror-copygroups/{self.gid(m)}", remote=m.sc)
        return {(x["pvolStatus"], x["svolStatus"]) for x in g["copyPairs"]}

    def local_statuses(self, m: Mirror) -> set[str]:
        g = self.pc.get(f"remote-mirror-copygroups/NotSpecified,{m.name},{m.name}P_,NotSpecified")
        return {x["pvolStatus"] for x in g["copyPairs"]}

    def wait(self, m: Mirror, want: set[tuple[str, str]], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.statuses(m)) != want:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)

    def action(self, m: Mirror, name: str) -> None:
        self.pc.invoke("PUT", f"remote-mirror-copygroups/{self.gid(m)}/actions/{name}/invoke",
                       {"parameters": {"replicationType": "UR"}}, remote=m.sc)

    def mirror_units(self) -> dict[int, dict]:
        """The primary's journal 1, one basic entry per mirror unit in use."""
        return {x["muNumber"]: x for x in self.pc.get("journals", journalInfo="basic")["data"] if x["journalId"] == 1}

    def wait_drained(self, m: Mirror, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.mirror_units()[m.mu]["qCount"] != 0:  # per mirror: entries its secondary has to restore
            assert time.monotonic() < deadline, self.mirror_units()
            time.sleep(0.05)

    def write(self, pv: int, offset: int, data: bytes) -> None:
        with NbdClient("127.0.0.1", self.p.nbd_port, str(pv)) as c:
            c.write(offset, data)

    def assert_same(self, m: Mirror) -> None:
        for pv, sv in zip(self.pvols, m.svols, strict=True):
            assert volume_digest(self.p.nbd_port, pv, SIZE) == volume_digest(m.s.nbd_port, sv, SIZE), (m.name, pv)


@pytest.fixture
def mt(make_system: MakeSystem) -> Iterator[MultiTarget]:
    (p, s1, s2), (pc, c1, c2), (pvols, v1, v2) = primary_and_two_secondaries(make_system, journals=(0, 1, 2))
    lab = MultiTarget(p, pc, pvols, Mirror("mt1", 1, s1, c1, v1), Mirror("mt2", 2, s2, c2, v2))
    yield lab
    for c in (pc, c1, c2):
        c.close()


def test_one_journal_feeds_two_mirrors(mt: MultiTarget) -> None:
    m1, m2 = mt.m1, mt.m2
    mt.create(m1)
    mt.create(m2)
    for m in (m1, m2):
        assert mt.statuses(m) == {("PAIR", "PAIR")}
    units = mt.mirror_units()
    assert set(units) == {1, 2} and {u["journalStatus"] for u in units.values()} <= {"PJNN", "PJNF"}
    listed = mt.pc.get("remote-copypairs", replicationType="UR")["data"]
    assert sorted((x["ldevId"], x["muNumber"]) for x in listed) == sorted((pv, mu) for pv in mt.pvols for mu in (1, 2))
    # a third P-VOL in mirror 1 only: its entries reach mirror 2's secondary as counts, not data
    solo_p, solo_s = mt.pc.create_ldev("32M"), m1.sc.create_ldev("32M")
    mt.pc.add_lun(solo_p)
    m1.sc.add_lun(solo_s)
    mt.pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": m1.name, "copyPairName": "solo", "replicationType": "UR",
        "remoteStorageDeviceId": m1.s.storage_device_id, "pvolLdevId": solo_p, "svolLdevId": solo_s,
        "isNewGroupCreation": False, "fenceLevel": "ASYNC", "doInitialCopy": True}, remote=m1.sc)
    # journaled writes reach both secondaries
    for k in range(40):
        mt.write(solo_p, k * 300 * 1024, os.urandom(64 * 1024))
    for i, pv in enumerate(mt.pvols):
        for k in range(30):
            mt.write(pv, (k * 2053 + i * 7) * 4096 % (SIZE - MiB), os.urandom(4096 * (1 + k % 4)))
        mt.write(pv, 12 * MiB, os.urandom(MiB))
        with NbdClient("127.0.0.1", mt.p.nbd_port, str(pv)) as c:
            c.zero(20 * MiB, 2 * MiB)
    for m in (m1, m2):
        mt.wait_drained(m)
        mt.assert_same(m)
    assert volume_digest(mt.p.nbd_port, solo_p, SIZE) == volume_digest(m1.s.nbd_port, solo_s, SIZE)
    for m in (m1, m2):
        assert [x["journalStatus"] for x in m.sc.get("journals", journalInfo="basic")["data"]] == ["SJNN"]

    # a split of one mirror (flush mode) leaves the other copying
    mt.write(mt.pvols[0], 0, b"before the split of mt1".ljust(4096))
    mt.action(m1, "split")
    assert mt.statuses(m1) == {("PSUS", "SSUS")} and mt.statuses(m2) == {("PAIR", "PAIR")}
    assert mt.mirror_units()[1]["journalStatus"] == "PJSN"
    with NbdClient("127.0.0.1", m1.s.nbd_port, str(m1.svols[0])) as c:
        assert c.read(0, 23) == b"before the split of mt1"
    mt.write(mt.pvols[0], 0, b"after the split of mt1".ljust(4096))
    mt.wait_drained(m2)
    with NbdClient("127.0.0.1", m2.s.nbd_port, str(m2.svols[0])) as c:
        assert c.read(0, 22) == b"after the split of mt1"
    mt.action(m1, "resync")
    mt.wait(m1, {("PAIR", "PAIR")})
    mt.wait_drained(m1)
    mt.assert_same(m1)

    # a takeover on one secondary works; reversing that mirror (its P-VOLs feed another one) is refused
    sgid = f"{mt.p.storage_device_id},{m1.name},{m1.name}S_,{m1.name}P_"
    m1.sc.invoke("PUT", f"remote-mirror-copygroups/{sgid}/actions/split/invoke",
                 {"parameters": {"replicationType": "UR", "svolOperationMode": "SSWS"}}, remote=mt.pc)
    assert mt.statuses(m1) == {("PSUS", "SSWS")}
    with pytest.raises(ApiError) as e:
        m1.sc.invoke("PUT", f"remote-mirror-copygroups/{sgid}/actions/resync/invoke",
                     {"parameters": {"replicationType": "UR", "doSwapSvol": True}}, remote=mt.pc)
    assert e.value.message_id == "KART40062-E" and "multi-target" in e.value.message  # the job fails
    assert mt.statuses(m1) == {("PSUS", "SSWS")} and mt.statuses(m2) == {("PAIR", "PAIR")}
    # horctakeover (auto) on the other secondary: a swap-takeover is not possible, so an SVOL-takeover
    ns = f"NotSpecified,{m2.name},{m2.name}S_,NotSpecified"
    m2.sc.invoke("POST", f"remote-mirror-copygroups/{ns}/actions/takeover/invoke", {"parameters": {}})
    assert mt.statuses(m2) == {("PSUS", "SSWS")}


def test_journal_full_suspends_only_the_mirror_that_holds_it(mt: MultiTarget) -> None:
    m1, m2 = mt.m1, mt.m2
    mt.create(m1)
    mt.create(m2)
    mt.pc.invoke("PATCH", "journals/1", {"dataOverflowWatchInSeconds": 2})
    pv = mt.pvols[0]
    m2.s.pause()  # the second secondary stops pulling: only mirror 2 keeps entries, and the 16 MiB journal fills
    try:
        t0 = time.monotonic()
        for k in range(48):  # 48 MiB over 24 MiB of the volume: later writes overwrite earlier ones
            mt.write(pv, (k % 24) * MiB, os.urandom(MiB))
        waited = time.monotonic() - t0
        assert mt.local_statuses(m2) == {"PFUS"}
        assert mt.local_statuses(m1) <= {"PAIR", "PFUL"}
    finally:
        m2.s.resume()
    assert waited >= 1.5  # the writes waited dataOverflowWatchInSeconds for room before mirror 2 was suspended
    units = mt.mirror_units()
    assert units[2]["journalStatus"] == "PJSF" and units[1]["journalStatus"] in ("PJNN", "PJNF")
    mt.wait(m2, {("PFUS", "PFUS")}, timeout=30)
    mt.wait_drained(m1)
    # the secondary's PFUL -> PAIR (its journal usage as the primary reports it) reaches the primary with the
    # next status poll
    mt.wait(m1, {("PAIR", "PAIR")}, timeout=30)
    mt.assert_same(m1)
    # the suspended mirror's journal entries became bitmap marks: the resync copies them, and no entry
    # journaled before the suspension reaches its secondary afterwards (that would put older data back)
    mt.action(m2, "resync")
    mt.wait(m2, {("PAIR", "PAIR")})
    mt.write(mt.pvols[1], 3 * MiB, os.urandom(MiB))
    for m in (m1, m2):
        mt.wait_drained(m)
        mt.assert_same(m)

    # deleting one mirror leaves the other one, and its journal, working
    mt.pc.invoke("DELETE", f"remote-mirror-copygroups/{mt.gid(m1)}", remote=m1.sc)
    assert set(mt.mirror_units()) == {2}
    mt.write(pv, 5 * MiB, os.urandom(2 * MiB))
    mt.wait_drained(m2)
    mt.assert_same(m2)
    assert mt.pc.get("journals", journalInfo="basic")["data"][0]["qCount"] == 0
    mt.pc.invoke("DELETE", f"remote-mirror-copygroups/{mt.gid(m2)}", remote=m2.sc)
    assert mt.mirror_units()[0]["journalStatus"] == "SMPL"
    assert mt.pc.get("remote-copypairs")["data"] == []


def test_primary_restart_with_a_backlog_for_both_mirrors(mt: MultiTarget) -> None:
    m1, m2 = mt.m1, mt.m2
    mt.create(m1)
    mt.create(m2)
    m1.s.pause()
    m2.s.pause()
    try:
        for pv in mt.pvols:
            mt.write(pv, MiB, os.urandom(3 * MiB))
        m2.s.resume()  # mirror 2 catches up, mirror 1 still holds every entry
        mt.wait_drained(m2)
        for pv in mt.pvols:
            with NbdClient("127.0.0.1", mt.p.nbd_port, str(pv)) as c:
                c.write(6 * MiB, os.urandom(MiB), fua=True)
        mt.p.kill()
    finally:
        m1.s.resume()
        m2.s.resume()
    mt.p.start()
    mt.pc = mt.p.client()
    for m in (m1, m2):
        mt.pc.wait_path_status(f"{m.s.serial},R9,0", "NML_01", 30)
    for m in (m1, m2):
        mt.wait_drained(m)
        assert mt.statuses(m) == {("PAIR", "PAIR")}
        mt.assert_same(m)


def test_a_recreated_mirror_never_receives_older_entries(mt: MultiTarget) -> None:
    """Entries journaled for mirror 2 before it was deleted stay in the journal while mirror 1 lags; a new
    mirror 2 must not restore them over its initial copy (the journal header keeps each mirror's floor)."""
    m1, m2 = mt.m1, mt.m2
    mt.create(m1)
    mt.create(m2)
    pv, sv = mt.pvols[0], m2.svols[0]
    m1.s.pause()  # mirror 1 holds every entry from here on
    try:
        mt.write(pv, 0, b"O" * MiB)  # for both mirrors
        mt.wait_drained(m2)
        mt.pc.invoke("DELETE", f"remote-mirror-copygroups/{mt.gid(m2)}", remote=m2.sc)
        mt.write(pv, 0, b"N" * MiB)  # for mirror 1 only
        mt.create(m2)  # the initial copy sends "N"
        assert mt.statuses(m2) == {("PAIR", "PAIR")}
        mt.write(mt.pvols[1], 0, b"after" * 100)  # restored once mirror 2 went through the older entries
        mt.wait_drained(m2)
        with NbdClient("127.0.0.1", m2.s.nbd_port, str(sv)) as c:
            assert c.read(0, 4096) == b"N" * 4096
        mt.assert_same(m2)
    finally:
        m1.s.resume()
    mt.wait_drained(m1)
    mt.assert_same(m1)


def test_a_write_waiting_for_room_is_journaled_once_another_mirror_gave_it_up(mt: MultiTarget) -> None:
    """Volume X is only in mirror 1, volume Y only in mirror 2, both mirrors in journal 1. Mirror 2's
    secondary stops; Y's writes fill the journal; a write to X waits for room until mirror 2 is suspended
    (PFUS), and must then be journaled for mirror 1, not just marked in a bitmap that PAIR never copies."""
    m1, m2 = mt.m1, mt.m2
    x, y = mt.pvols
    mt.pvols = [x]  # the helpers' volume lists: mirror 1 has X only, mirror 2 has Y only
    m1.svols, m2.svols = m1.svols[:1], m2.svols[1:]
    mt.create(m1)
    mt.pvols = [y]
    mt.create(m2)
    mt.pc.invoke("PATCH", "journals/1", {"dataOverflowWatchInSeconds": 2})
    m2.s.pause()
    try:
        for k in range(15):  # 15 entries of 1 MiB + 64 bytes: the 16 MiB journal has no room for a 16th
            mt.write(y, k * MiB, os.urandom(MiB))
        t0 = time.monotonic()
        mt.write(x, 4 * MiB, b"X" * MiB)  # waits for room; then mirror 2 goes PFUS
        assert time.monotonic() - t0 >= 1.5
        assert mt.local_statuses(m2) == {"PFUS"} and mt.local_statuses(m1) <= {"PAIR", "PFUL"}
    finally:
        m2.s.resume()
    mt.pvols = [x]
    mt.wait_drained(m1)
    with NbdClient("127.0.0.1", m1.s.nbd_port, str(m1.svols[0])) as c:
        assert c.read(4 * MiB, MiB) == b"X" * MiB
    mt.assert_same(m1)
