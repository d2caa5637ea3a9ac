"""TrueCopy pairs end to end: two real storage-system processes, real bytes over NBD and the link."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

import pytest

from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient, NbdError
from vspemu.lab import SystemProcess, set_link_ports, volume_digest

MiB = 1 << 20
CG = "tcg"


@dataclass
class Lab:
    p: SystemProcess
    s: SystemProcess
    pc: VspClient
    sc: VspClient

    def nbd(self, side: str, ldev: int) -> NbdClient:
        sysp = self.p if side == "p" else self.s
        return NbdClient("127.0.0.1", sysp.nbd_port, str(ldev))

    def volumes(self, size: str = "64M", count: int = 1) -> list[tuple[int, int]]:
        out = []
        for _ in range(count):
            pv = self.pc.create_ldev(size)
            self.pc.add_lun(pv)
            sv = self.sc.create_ldev(size)
            self.sc.add_lun(sv)
            out.append((pv, sv))
        return out

    def create(self, pvol: int, svol: int, name: str = "p1", group: str = CG, new: bool = True,
               nowait: bool = False, **extra: object) -> dict:
        body = {"copyGroupName": group, "copyPairName": name, "replicationType": "TC",
                "remoteStorageDeviceId": self.s.storage_device_id, "pvolLdevId": pvol, "svolLdevId": svol,
                "isNewGroupCreation": new, "fenceLevel": "NEVER", "copyPace": 15, **extra}
        return self.pc.invoke("POST", "remote-mirror-copypairs", body, remote=self.sc, nowait=nowait)

    def pair_id(self, name: str = "p1", group: str = CG, view: str = "p") -> str:
        if view == "p":
            return f"{self.s.storage_device_id},{group},{group}P_,{group}S_,{name}"
        return f"{self.p.storage_device_id},{group},{group}S_,{group}P_,{name}"

    def pair(self, name: str = "p1", group: str = CG, local: bool = False) -> dict:
        if local:  # the primary's own view: no Remote-Authorization (works while the secondary is down)
            return self.pc.get(f"remote-mirror-copypairs/NotSpecified,{group},{group}P_,NotSpecified,{name}")
        return self.pc.get(f"remote-mirror-copypairs/{self.pair_id(name, group)}", remote=self.sc)

    def wait_status(self, pst: str, sst: str, name: str = "p1", timeout: float = 60.0, local: bool = False) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.pair(name, local=local)
            if info["pvolStatus"] == pst and info["svolStatus"] == sst:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"pair {name}: {info['pvolStatus']}/{info['svolStatus']}, not {pst}/{sst}")
            time.sleep(0.1)

    def digest(self, side: str, ldev: int, size: int) -> str:
        return volume_digest((self.p if side == "p" else self.s).nbd_port, ldev, size)


@pytest.fixture
def lab(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> Lab:
    return Lab(*linked)


def fill_random(c: NbdClient, size: int, step: int = 4 * MiB) -> None:
    for off in range(0, size, step):
        c.write(off, os.urandom(min(step, size - off)))
    c.flush()


def test_create_copies_every_byte_and_mirrors_writes(lab: Lab) -> None:
    (pv, sv), = lab.volumes("64M")
    with lab.nbd("p", pv) as c:
        fill_random(c, 40 * MiB)  # the last 24 MiB stay holes
    with lab.nbd("s", sv) as c:
        c.write(60 * MiB, b"\xee" * 4096)  # stale data on the S-VOL must be zeroed by the copy
    job = lab.create(pv, sv)
    pid = lab.pair_id()
    assert job["affectedResources"][0].endswith(f"/remote-mirror-copypairs/{pid}")
    info = lab.pair()
    assert (info["pvolStatus"], info["svolStatus"]) == ("PAIR", "PAIR")  # the job waited for the copy
    assert set(info) <= {"copyGroupName", "copyPairName", "remoteMirrorCopyPairId", "pvolLdevId", "svolLdevId",
                         "pvolStatus", "svolStatus", "pvolStorageDeviceId", "svolStorageDeviceId",
                         "consistencyGroupId", "svolDifferenceDataManagement", "svolProcessingStatus",
                         "quorumDiskId", "pvolIOMode", "svolIOMode", "replicationType", "fenceLevel",
                         "pvolDifferenceDataManagement", "pvolProcessingStatus", "pvolJournalId",
                         "svolJournalId", "isAluaEnabled", "copyProgressRate"}
    assert info["remoteMirrorCopyPairId"] == pid and info["pvolLdevId"] == pv and info["svolLdevId"] == sv
    assert info["replicationType"] == "TC" and info["fenceLevel"] == "NEVER"
    assert lab.digest("p", pv, 64 * MiB) == lab.digest("s", sv, 64 * MiB)
    assert "HORC" in lab.pc.get(f"ldevs/{pv}")["attributes"]
    assert "HORC" in lab.sc.get(f"ldevs/{sv}")["attributes"]
    # PAIR: host writes are mirrored before they are acknowledged
    with lab.nbd("p", pv) as c:
        c.write(12345 * 512, b"\xab" * 70000)
        c.write(63 * MiB, b"\x01" * MiB)
        c.zero(1 * MiB, 3 * MiB)
    with lab.nbd("s", sv) as c:
        assert c.read(12345 * 512, 70000) == b"\xab" * 70000
        assert c.read(1 * MiB, 3 * MiB) == bytes(3 * MiB)
        with pytest.raises(NbdError) as e:  # the S-VOL refuses host writes
            c.write(0, b"x" * 512)
        assert e.value.errno == 1  # NBD_EPERM
    assert lab.digest("p", pv, 64 * MiB) == lab.digest("s", sv, 64 * MiB)
    # the secondary's view: ids swapped
    sview = lab.sc.get(f"remote-mirror-copypairs/{lab.pair_id(view='s')}", remote=lab.pc)
    assert sview["remoteMirrorCopyPairId"] == lab.pair_id(view="s")
    assert (sview["pvolStatus"], sview["svolStatus"], sview["pvolLdevId"]) == ("PAIR", "PAIR", pv)
    # local views and group views
    local = lab.pc.get("remote-copypairs", replicationType="TC")["data"]
    assert [(x["ldevId"], x["primaryOrSecondary"], x["status"], x["remoteLdevId"]) for x in local] == [
        (pv, "P-VOL", "PAIR", sv)]
    assert lab.sc.get("remote-copypairs", replicationType="TC")["data"][0]["primaryOrSecondary"] == "S-VOL"
    groups = lab.pc.get("remote-mirror-copygroups", remote=lab.sc,
                        remoteStorageDeviceId=lab.s.storage_device_id)["data"]
    assert [g["remoteMirrorCopyGroupId"] for g in groups] == [f"{lab.s.storage_device_id},{CG},{CG}P_,{CG}S_"]
    g = lab.pc.get(f"remote-mirror-copygroups/{groups[0]['remoteMirrorCopyGroupId']}", remote=lab.sc)
    assert [p["copyPairName"] for p in g["copyPairs"]] == ["p1"]
    ns = lab.pc.get(f"remote-mirror-copypairs/NotSpecified,{CG},{CG}P_,NotSpecified,p1")
    assert ns["pvolStatus"] == "PAIR"
    enc = lab.pc.get(f"remote-mirror-copypairs/{pid.replace(',', '%2C')}", remote=lab.sc)
    assert enc["copyPairName"] == "p1"


def test_split_rw_resync_copies_only_changed_tracks(lab: Lab) -> None:
    (pv, sv), = lab.volumes("64M")
    with lab.nbd("p", pv) as c:
        fill_random(c, 64 * MiB)
    lab.create(pv, sv)
    pid = lab.pair_id()
    lab.pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/split/invoke",
                  {"parameters": {"replicationType": "TC", "svolAccessMode": "rw"}}, remote=lab.sc, nowait=True)
    info = lab.pair()
    assert (info["pvolStatus"], info["svolStatus"]) == ("PSUS", "SSUS")
    # split again: accepted, no change
    lab.pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/split/invoke",
                  {"parameters": {"replicationType": "TC"}}, remote=lab.sc)
    with lab.nbd("p", pv) as c:
        c.write(0, b"P" * 4096)  # track 0
        c.write(10 * MiB, b"P" * 4096)  # track 40
    with lab.nbd("s", sv) as c:
        c.write(20 * MiB + 7, b"S" * 100)  # track 80: the S-side change is overwritten by the resync
    lab.pc.invoke("POST", f"remote-mirror-copypairs/{pid}/actions/resync/invoke",
                  {"parameters": {"replicationType": "TC"}}, remote=lab.sc)
    lab.wait_status("PAIR", "PAIR")
    assert lab.digest("p", pv, 64 * MiB) == lab.digest("s", sv, 64 * MiB)
    # resync of a PAIR pair: accepted, no change
    lab.pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/resync/invoke",
                  {"parameters": {"replicationType": "TC"}}, remote=lab.sc)
    stats = lab.pc.raw("GET", "vspemu/v1/replication/stats", headers=lab.pc.headers()).json()
    assert stats["pairs"][f"{CG}/p1"]["tracksSentLastCopy"] == 3


def test_swap_split_write_swap_resync(lab: Lab) -> None:
    (pv, sv), = lab.volumes("32M")
    with lab.nbd("p", pv) as c:
        fill_random(c, 32 * MiB)
    lab.create(pv, sv)
    sid = lab.pair_id(view="s")
    # swap split on the secondary: the S-VOL takes over
    lab.sc.invoke("PUT", f"remote-mirror-copypairs/{sid}/actions/split/invoke",
                  {"parameters": {"replicationType": "TC", "svolOperationMode": "SSWS"}}, remote=lab.pc)
    info = lab.pair()
    assert (info["pvolStatus"], info["svolStatus"]) == ("PSUS", "SSWS")
    with lab.nbd("s", sv) as c:
        c.write(5 * MiB, b"new-primary" * 1000)
    # a normal resync is refused after a takeover
    with pytest.raises(ApiError) as e:
        lab.pc.invoke("PUT", f"remote-mirror-copypairs/{lab.pair_id()}/actions/resync/invoke",
                      {"parameters": {"replicationType": "TC"}}, remote=lab.sc)
    assert e.value.status == 412 and e.value.message_id == "KART40062-E"
    assert "doSwapSvol" in e.value.message
    with pytest.raises(ApiError) as e:  # a swap split belongs to the secondary
        lab.pc.invoke("PUT", f"remote-mirror-copypairs/{lab.pair_id()}/actions/split/invoke",
                      {"parameters": {"replicationType": "TC", "svolOperationMode": "SSWS"}}, remote=lab.sc)
    assert e.value.status == 412
    # swap resync from the secondary: it becomes the primary and copies the differences
    lab.sc.invoke("PUT", f"remote-mirror-copypairs/{sid}/actions/resync/invoke",
                  {"parameters": {"replicationType": "TC", "doSwapSvol": True}}, remote=lab.pc)
    new = lab.sc.get(f"remote-mirror-copypairs/{sid}", remote=lab.pc)
    assert (new["pvolStatus"], new["svolStatus"]) == ("PAIR", "PAIR")
    assert new["pvolLdevId"] == sv and new["svolLdevId"] == pv
    assert new["pvolStorageDeviceId"] == lab.s.storage_device_id
    with lab.nbd("p", pv) as c:
        assert c.read(5 * MiB, 11000) == b"new-primary" * 1000
        with pytest.raises(NbdError):
            c.write(0, b"x" * 512)  # the old P-VOL is now an S-VOL
    with lab.nbd("s", sv) as c:
        c.write(0, b"written on the new primary".ljust(512))
    with lab.nbd("p", pv) as c:
        assert c.read(0, 26) == b"written on the new primary"
    assert lab.digest("p", pv, 32 * MiB) == lab.digest("s", sv, 32 * MiB)


def test_takeover_and_delete(lab: Lab) -> None:
    (pv, sv), = lab.volumes("16M")
    lab.create(pv, sv)
    ns = f"NotSpecified,{CG},{CG}S_,NotSpecified,p1"
    lab.sc.invoke("POST", f"remote-mirror-copypairs/{ns}/actions/takeover/invoke",
                  {"parameters": {"mode": "forceSplit"}})
    assert lab.sc.get(f"remote-mirror-copypairs/{ns}")["svolStatus"] == "SSWS"
    with lab.nbd("s", sv) as c:
        c.write(0, b"x" * 512)  # writable after takeover
    lab.pc.invoke("DELETE", f"remote-mirror-copypairs/{lab.pair_id()}", remote=lab.sc)
    for c, ldev in ((lab.pc, pv), (lab.sc, sv)):
        assert "HORC" not in c.get(f"ldevs/{ldev}")["attributes"]
        assert c.get("remote-copypairs")["data"] == []
    with pytest.raises(ApiError) as e:
        lab.pc.get(f"remote-mirror-copygroups/{lab.s.storage_device_id},{CG},{CG}P_,{CG}S_", remote=lab.sc)
    assert e.value.status == 404 and e.value.message_id in ("KART40041-E", "KART30013-E")
    with lab.nbd("p", pv) as c:
        c.write(0, b"y" * 512)


def test_create_refusals(lab: Lab) -> None:
    (pv, sv), = lab.volumes("16M")
    other = lab.sc.create_ldev("32M")
    cases = [
        ({"svolLdevId": other}, "KART40062-E"),  # sizes differ
        ({"pvolLdevId": 999}, "KART30013-E"),  # P-VOL missing
        ({"svolLdevId": 998}, "KART30013-E"),  # S-VOL missing
        ({"isNewGroupCreation": False}, "KART40041-E"),  # the group does not exist
        ({"pathGroupId": 7}, "KART30013-E"),  # no such path group
    ]
    for extra, message_id in cases:
        body = {"pvolLdevId": pv, "svolLdevId": sv, "isNewGroupCreation": True, **extra}
        with pytest.raises(ApiError) as e:
            lab.create(body.pop("pvolLdevId"), body.pop("svolLdevId"), new=body.pop("isNewGroupCreation"), **body)
        assert e.value.message_id == message_id, (extra, e.value)
    with pytest.raises(ApiError) as e:
        lab.create(pv, sv, name="x" * 32)
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:  # no Remote-Authorization
        lab.pc.invoke("POST", "remote-mirror-copypairs", {
            "copyGroupName": CG, "copyPairName": "p1", "replicationType": "TC",
            "remoteStorageDeviceId": lab.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True})
    assert e.value.status == 400
    assert lab.pc.get("remote-copypairs")["data"] == [] and lab.sc.get("remote-copypairs")["data"] == []
    lab.create(pv, sv)
    with pytest.raises(ApiError) as e:  # the group exists now
        lab.create(pv, sv, name="p2")
    assert e.value.message_id == "KART40045-E"
    pv2, sv2 = lab.volumes("16M")[0]
    with pytest.raises(ApiError) as e:  # a paired S-VOL
        lab.create(pv2, sv, name="p2", new=False)
    assert e.value.message_id == "KART40063-E"
    lab.create(pv2, sv2, name="p2", new=False)
    g = lab.pc.get(f"remote-mirror-copygroups/{lab.s.storage_device_id},{CG},{CG}P_,{CG}S_", remote=lab.sc)
    assert [p["copyPairName"] for p in g["copyPairs"]] == ["p1", "p2"]


def test_nowait_create_reports_copy_progress(lab: Lab) -> None:
    (pv, sv), = lab.volumes("256M")
    with lab.nbd("p", pv) as c:
        fill_random(c, 256 * MiB, 16 * MiB)
    job = lab.create(pv, sv, nowait=True, copyPace=1)
    assert job["state"] == "Succeeded"
    seen = []
    while True:
        info = lab.pair()
        seen.append((info["pvolStatus"], info["copyProgressRate"]))
        if info["pvolStatus"] == "PAIR":
            break
        time.sleep(0.05)
    rates = [r for st, r in seen if st == "COPY"]
    assert rates == sorted(rates) and all(0 <= r < 100 for r in rates)
    assert seen[-1] == ("PAIR", -1)
    assert lab.digest("p", pv, 256 * MiB) == lab.digest("s", sv, 256 * MiB)


@pytest.mark.parametrize("fence", ["NEVER", "DATA", "STATUS"])
def test_link_failure_by_fence_level(lab: Lab, fence: str) -> None:
    (pv, sv), = lab.volumes("16M")
    with lab.nbd("p", pv) as c:
        fill_random(c, 16 * MiB)
    lab.create(pv, sv, fenceLevel=fence)
    assert lab.pair()["fenceLevel"] == fence
    set_link_ports(lab.sc, False)  # cut the link: the secondary's replication ports go offline
    with lab.nbd("p", pv) as c:
        if fence == "NEVER":
            c.write(MiB, b"n" * 4096)  # accepted and tracked
            c.write(2 * MiB, b"n" * 4096)
        else:
            with pytest.raises(NbdError) as e:
                c.write(MiB, b"d" * 4096)  # the failing write is reported to the host
            assert e.value.errno in (1, 5)
            with pytest.raises(NbdError) as e:
                c.write(2 * MiB, b"d" * 4096)  # and the P-VOL is fenced
            assert e.value.errno == 1
    info = lab.pc.get(f"remote-mirror-copypairs/NotSpecified,{CG},{CG}P_,NotSpecified,p1")
    assert info["pvolStatus"] == "PSUE"
    set_link_ports(lab.sc, True)
    gid = f"{lab.s.serial},R9,0"
    lab.pc.wait_path_status(gid, "NML_01", 30)
    lab.pc.invoke("PUT", f"remote-mirror-copypairs/{lab.pair_id()}/actions/resync/invoke",
                  {"parameters": {"replicationType": "TC"}}, remote=lab.sc)
    lab.wait_status("PAIR", "PAIR")
    with lab.nbd("p", pv) as c:
        c.write(3 * MiB, b"after" * 100)  # writable again after the resync
    assert lab.digest("p", pv, 16 * MiB) == lab.digest("s", sv, 16 * MiB)


@pytest.mark.skipif(shutil.which("chattr") is None or os.geteuid() != 0, reason="needs chattr as root")
def test_a_failed_pvol_write_suspends_the_pair_and_a_resync_repairs_it(lab: Lab) -> None:
    """The P-VOL is written while the S side writes its copy: if the local write fails after the data was
    sent (here: the LDEV file made immutable, EPERM), the host gets the error, the pair goes PSUE, and the
    resync copies the P-VOL's content over the S-VOL's (which got the write the P-VOL did not)."""
    (pv, sv), = lab.volumes("16M")
    with lab.nbd("p", pv) as c:
        fill_random(c, 16 * MiB)
    lab.create(pv, sv)
    lab.wait_status("PAIR", "PAIR")
    ldev_file = lab.p.data_dir / "ldevs" / f"{pv:05d}.img"
    subprocess.run(["chattr", "+i", str(ldev_file)], check=True)
    try:
        with lab.nbd("p", pv) as c, pytest.raises(NbdError) as e:
            c.write(5 * MiB, b"lost" * 1024)
        assert e.value.errno == 5  # EIO
        assert lab.pair(local=True)["pvolStatus"] == "PSUE"
    finally:
        subprocess.run(["chattr", "-i", str(ldev_file)], check=True)
    assert lab.digest("p", pv, 16 * MiB) != lab.digest("s", sv, 16 * MiB)  # the S-VOL has the lost write
    lab.pc.invoke("PUT", f"remote-mirror-copypairs/{lab.pair_id()}/actions/resync/invoke",
                  {"parameters": {"replicationType": "TC"}}, remote=lab.sc)
    lab.wait_status("PAIR", "PAIR")
    assert lab.digest("p", pv, 16 * MiB) == lab.digest("s", sv, 16 * MiB)


def test_group_operations_and_twenty_concurrent_jobs(lab: Lab) -> None:
    vols = lab.volumes("8M", count=10)
    for i, (pv, _) in enumerate(vols):
        with lab.nbd("p", pv) as c:
            c.write(0, bytes([i + 1]) * MiB)
    jobs = []
    for i, (pv, sv) in enumerate(vols):
        body = {"copyGroupName": "many", "copyPairName": f"m{i}", "replicationType": "TC",
                "remoteStorageDeviceId": lab.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                "isNewGroupCreation": i == 0, "copyPace": 15}
        if i == 0:
            lab.pc.invoke("POST", "remote-mirror-copypairs", body, remote=lab.sc, nowait=True)
        else:
            jobs.append(lab.pc.request("POST", "remote-mirror-copypairs", json=body, remote=lab.sc,
                                       nowait=i % 2 == 0))
    for j in jobs:
        lab.pc.wait_job(j, timeout=120)
    gid = f"{lab.s.storage_device_id},many,manyP_,manyS_"
    deadline = time.monotonic() + 60
    while True:
        g = lab.pc.get(f"remote-mirror-copygroups/{gid}", remote=lab.sc)
        if all(p["pvolStatus"] == "PAIR" and p["svolStatus"] == "PAIR" for p in g["copyPairs"]):
            break
        assert time.monotonic() < deadline, g
        time.sleep(0.1)
    assert len(g["copyPairs"]) == 10
    lab.pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/split/invoke",
                  {"parameters": {"replicationType": "TC", "svolAccessMode": "rw"}}, remote=lab.sc)
    g = lab.pc.get(f"remote-mirror-copygroups/{gid}", remote=lab.sc)
    assert {(p["pvolStatus"], p["svolStatus"]) for p in g["copyPairs"]} == {("PSUS", "SSUS")}
    # ten resyncs at once, pair by pair, half of them NoWait; then the group resync is a no-op
    jobs = [lab.pc.request("PUT", f"remote-mirror-copypairs/{gid},m{i}/actions/resync/invoke",
                           json={"parameters": {"replicationType": "TC"}}, remote=lab.sc, nowait=i % 2 == 0)
            for i in range(10)]
    for j in jobs:
        lab.pc.wait_job(j, timeout=120)
    lab.pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/resync/invoke",
                  {"parameters": {"replicationType": "TC", "isConsistencyGroup": True, "consistencyGroupId": 3}},
                  remote=lab.sc)
    with pytest.raises(ApiError) as e:  # CTG registration only in units of copy groups
        lab.pc.invoke("PUT", f"remote-mirror-copypairs/{gid},m0/actions/resync/invoke",
                      {"parameters": {"replicationType": "TC", "isConsistencyGroup": True,
                                      "consistencyGroupId": 3}}, remote=lab.sc)
    assert e.value.status == 412
    deadline = time.monotonic() + 60
    while True:
        g = lab.pc.get(f"remote-mirror-copygroups/{gid}", remote=lab.sc)
        if all(p["pvolStatus"] == "PAIR" for p in g["copyPairs"]):
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert {p["consistencyGroupId"] for p in g["copyPairs"]} == {3}
    for i, (pv, sv) in enumerate(vols):
        assert lab.digest("p", pv, 8 * MiB) == lab.digest("s", sv, 8 * MiB), i
    lab.pc.invoke("DELETE", f"remote-mirror-copygroups/{gid}", remote=lab.sc)
    assert lab.pc.get("remote-copypairs")["data"] == [] and lab.sc.get("remote-copypairs")["data"] == []


def test_crash_of_either_side(lab: Lab) -> None:
    (pv, sv), = lab.volumes("32M")
    with lab.nbd("p", pv) as c:
        fill_random(c, 32 * MiB)
    lab.create(pv, sv)
    with lab.nbd("p", pv) as c:
        for i in range(50):
            c.write(i * 600 * 1024, os.urandom(8192))
        c.flush()
    lab.p.kill()  # the primary crashes in PAIR
    lab.p.start()
    lab.pc = lab.p.client()
    lab.pc.wait_path_status(f"{lab.s.serial},R9,0", "NML_01", 30)
    lab.wait_status("PAIR", "PAIR")
    assert lab.digest("p", pv, 32 * MiB) == lab.digest("s", sv, 32 * MiB)
    lab.s.kill()  # now the secondary crashes: the primary suspends (fence NEVER) and tracks writes
    with lab.nbd("p", pv) as c:
        c.write(7 * MiB, b"while the secondary is down".ljust(4096))
    lab.wait_status("PSUE", "PAIR", local=True)  # the primary still knows the S-VOL as it last saw it
    lab.s.start()
    lab.sc = lab.s.client()
    lab.pc.wait_path_status(f"{lab.s.serial},R9,0", "NML_01", 30)
    lab.pc.invoke("PUT", f"remote-mirror-copypairs/{lab.pair_id()}/actions/resync/invoke",
                  {"parameters": {"replicationType": "TC"}}, remote=lab.sc)
    lab.wait_status("PAIR", "PAIR")
    assert lab.digest("p", pv, 32 * MiB) == lab.digest("s", sv, 32 * MiB)


def test_consistency_group_split_is_one_point(lab: Lab) -> None:
    """Dependent writes (B only after A is acknowledged, on another volume) while the group is split:
    the S-VOLs never hold B without A."""
    import threading

    (pa, sa), (pb, sb) = lab.volumes("8M", count=2)
    lab.create(pa, sa, name="a", isConsistencyGroup=True, consistencyGroupId=7)
    lab.create(pb, sb, name="b", new=False)
    gid = f"{lab.s.storage_device_id},{CG},{CG}P_,{CG}S_"
    stop = threading.Event()
    count = [0]

    def writer() -> None:
        with lab.nbd("p", pa) as a, lab.nbd("p", pb) as b:
            n = 0
            while not stop.is_set():
                n += 1
                block = n.to_bytes(8, "big") * 64
                try:
                    a.write((n % 512) * 512, block)
                    b.write((n % 512) * 512, block)
                except NbdError:
                    return
                count[0] = n

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3):
            time.sleep(0.5)
            lab.pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/split/invoke",
                          {"parameters": {"replicationType": "TC"}}, remote=lab.sc)
            with lab.nbd("s", sa) as a, lab.nbd("s", sb) as b:
                ia, ib = a.read(0, 256 * 1024), b.read(0, 256 * 1024)
            for slot in range(512):
                va = int.from_bytes(ia[slot * 512:slot * 512 + 8], "big")
                vb = int.from_bytes(ib[slot * 512:slot * 512 + 8], "big")
                assert vb <= va, (slot, va, vb)
            lab.pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/resync/invoke",
                          {"parameters": {"replicationType": "TC"}}, remote=lab.sc)
    finally:
        stop.set()
        t.join()
    assert count[0] > 50
    assert lab.pair("a")["consistencyGroupId"] == 7
