"""GAD pairs (issue 18): create with a quorum disk on a third system, initial copy, PAIR, split, resync, delete.

Three server processes as in tests/test_quorum.py: ``q`` holds the quorum volume, ``p`` and ``s`` are the two
systems of the pair, linked both ways. The S-VOL is in a virtual storage machine with p's identity and holds
the GAD reserve before the create, as hv_gad prepares it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import MakeSystem
from tests.test_resource_groups import refused
from vspemu.client import JobFailed, VspClient
from vspemu.client.nbd import NbdClient, NbdError, NbdOptionError
from vspemu.lab import SystemProcess, link_systems, volume_digest

MiB = 1 << 20
EXT = 500  # the external volume (quorum) LDEV id on p and s
CG = "gadg"


@dataclass
class GadLab:
    q: SystemProcess
    p: SystemProcess
    s: SystemProcess
    qc: VspClient
    pc: VspClient
    sc: VspClient
    rg: int  # the resource group of the VSM on s

    def nbd(self, side: str, ldev: int) -> NbdClient:
        return NbdClient("127.0.0.1", (self.p if side == "p" else self.s).nbd_port, str(ldev))

    def volumes(self, size: str = "32M") -> tuple[int, int]:
        pv = self.pc.create_ldev(size)
        self.pc.add_lun(pv)
        sv = self.sc.create_ldev(size)
        self.sc.add_lun(sv)
        self.sc.invoke("POST", f"ldevs/{sv}/actions/unassign-virtual-ldevid/invoke",
                       {"parameters": {"virtualLdevId": sv}})
        self.sc.invoke("POST", f"resource-groups/{self.rg}/actions/add-resource/invoke",
                       {"parameters": {"ldevIds": [sv]}})
        self.sc.invoke("POST", f"ldevs/{sv}/actions/assign-virtual-ldevid/invoke",
                       {"parameters": {"virtualLdevId": 65535}})
        return pv, sv

    def create(self, pvol: int, svol: int, name: str = "p1", nowait: bool = False, **extra: Any) -> dict[str, Any]:
        # the body hv_gad sends (vsp_gad_pair_gateway.create_gad_pair)
        body = {"copyGroupName": CG, "copyPairName": name, "replicationType": "GAD",
                "remoteStorageDeviceId": self.s.storage_device_id, "pvolLdevId": pvol, "svolLdevId": svol,
                "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15, "doInitialCopy": True,
                "isDataReductionForceCopy": True, "quorumDiskId": 0, "muNumber": 0, **extra}
        return self.pc.invoke("POST", "remote-mirror-copypairs", body, remote=self.sc, nowait=nowait)

    def pair_id(self, name: str = "p1", view: str = "p") -> str:
        if view == "p":
            return f"{self.s.storage_device_id},{CG},{CG}P_,{CG}S_,{name}"
        return f"{self.p.storage_device_id},{CG},{CG}S_,{CG}P_,{name}"

    def pair(self, name: str = "p1", view: str = "p", local: bool = False) -> dict[str, Any]:
        c = self.pc if view == "p" else self.sc
        if local:
            dg = f"{CG}P_" if view == "p" else f"{CG}S_"
            return c.get(f"remote-mirror-copypairs/NotSpecified,{CG},{dg},NotSpecified,{name}")  # type: ignore[no-any-return]
        return c.get(f"remote-mirror-copypairs/{self.pair_id(name, view)}",  # type: ignore[no-any-return]
                     remote=self.sc if view == "p" else self.pc)

    def wait(self, pst: str, sst: str, name: str = "p1", view: str = "p", local: bool = False,
             timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.pair(name, view, local)
            if (info["pvolStatus"], info["svolStatus"]) == (pst, sst):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"pair {name} ({view} view): {info['pvolStatus']}/{info['svolStatus']}, "
                                     f"not {pst}/{sst}")
            time.sleep(0.1)

    def action(self, what: str, name: str | None = "p1", view: str = "p", **params: Any) -> dict[str, Any]:
        c, other = (self.pc, self.sc) if view == "p" else (self.sc, self.pc)
        pid = self.pair_id(name or "p1", view)
        return c.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/{what}/invoke",
                        {"parameters": {"replicationType": "GAD", **params}}, remote=other)

    def delete(self, name: str = "p1") -> dict[str, Any]:
        return self.pc.invoke("DELETE", f"remote-mirror-copypairs/{self.pair_id(name)}", remote=self.sc)

    def wait_paths(self) -> None:
        """Every remote path of both systems works (after a restart or a repaired link)."""
        for c in (self.pc, self.sc):
            for g in c.get("remotepath-groups")["data"]:
                c.wait_path_status(g["remotepathGroupId"], timeout=60)

    def digest(self, side: str, ldev: int, size: int) -> str:
        return volume_digest((self.p if side == "p" else self.s).nbd_port, ldev, size)

    def close(self) -> None:
        for c in (self.qc, self.pc, self.sc):
            c.close()


def make_gad_lab(make_system: MakeSystem, quorum_less: bool = False) -> GadLab:
    """q (the quorum volume), p and s linked both ways, quorum disk 0 on both (on q's LDEV, or quorum-less),
    and on s a VSM with p's identity (serial, model)."""
    q, p, s = make_system(), make_system(), make_system()
    qc, pc, sc = q.client(), p.client(), s.client()
    link_systems(pc, sc)
    if quorum_less:
        pc.create_quorum_disk(0, sc, None)
        sc.create_quorum_disk(0, pc, None)
    else:
        qldev = qc.create_ldev("16M")
        qc.add_lun(qldev)
        for c in (pc, sc):
            c.add_external_volume(EXT, qc, qldev, "127.0.0.1", q.nbd_port)
        pc.create_quorum_disk(0, sc, EXT)
        sc.create_quorum_disk(0, pc, EXT)
    sc.invoke("POST", "virtual-storages", {"resourceGroupName": "gad_vsm", "virtualSerialNumber": str(p.serial),
                                           "virtualModel": "VSP 5100H, 5500H"})  # p is a VSP 5500H
    rg = next(g for g in sc.get("resource-groups")["data"] if g["resourceGroupName"] == "gad_vsm")
    return GadLab(q, p, s, qc, pc, sc, int(rg["resourceGroupId"]))


@pytest.fixture
def glab(make_system: MakeSystem) -> Any:
    lab = make_gad_lab(make_system)
    yield lab
    lab.close()


def failed(call: Any, message_id: str) -> dict[str, Any]:
    """The create's job fails with the array's error (the checks that need both systems run in the job)."""
    with pytest.raises(JobFailed) as e:
        call()
    assert e.value.message_id == message_id, e.value.body
    return e.value.body


def assert_blocked(lab: GadLab, side: str, ldev: int) -> None:
    """I/O mode Block: no host reads (the export is refused, or an open connection's I/O fails)."""
    with pytest.raises((NbdError, NbdOptionError, ConnectionError, OSError)), lab.nbd(side, ldev) as c:
        c.read(0, 4096)


def fill_random(c: NbdClient, size: int, step: int = 4 * MiB) -> None:
    for off in range(0, size, step):
        c.write(off, os.urandom(min(step, size - off)))


def test_create_copy_split_resync_delete(glab: GadLab) -> None:
    lab = glab
    pvol, svol = lab.volumes()
    with lab.nbd("p", pvol) as c:
        fill_random(c, 8 * MiB)
        c.flush()
    lab.create(pvol, svol, isAluaEnabled=True)  # hv_gad's set_alua_mode
    info = lab.wait("PAIR", "PAIR")
    assert info["replicationType"] == "GAD" and info["quorumDiskId"] == 0 and info["fenceLevel"] == "NEVER"
    assert info["isAluaEnabled"] is True and lab.pair(view="s")["isAluaEnabled"] is True
    assert lab.pc.get(f"ldevs/{pvol}")["isAluaEnabled"] is True and lab.sc.get(f"ldevs/{svol}")["isAluaEnabled"]
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    assert (info["pvolLdevId"], info["svolLdevId"]) == (pvol, svol)
    sview = lab.pair(view="s")
    assert (sview["pvolIOMode"], sview["svolIOMode"], sview["quorumDiskId"]) == ("Mirror", "Mirror", 0)
    group = lab.pc.get(f"remote-mirror-copygroups/{lab.s.storage_device_id},{CG},{CG}P_,{CG}S_", remote=lab.sc)
    assert group["copyPairs"][0]["pvolIOMode"] == "Mirror"
    assert lab.digest("p", pvol, 32 * MiB) == lab.digest("s", svol, 32 * MiB)  # the initial copy: real data
    # both volumes answer with one identity: the S-VOL has the P-VOL's id in the VSM of p's serial
    sv, pv = lab.sc.get(f"ldevs/{svol}"), lab.pc.get(f"ldevs/{pvol}")
    assert (sv["virtualLdevId"], sv["virtualSerialNumber"]) == (pvol, str(lab.p.serial))
    assert "GAD" in sv["attributes"] and "GAD" in pv["attributes"]
    assert [x["replicationType"] for x in lab.sc.get("remote-copypairs")["data"]] == ["GAD"]
    # the quorum disk is in use
    refused(lambda: lab.pc.invoke("DELETE", "quorum-disks/0"), 412, "KART40063-E")

    # split from the P side: the P-VOL serves alone (Local), the S-VOL is Block (no host reads)
    lab.action("split")
    info = lab.wait("PSUS", "SSUS")
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Local", "Block")
    assert_blocked(lab, "s", svol)
    with lab.nbd("p", pvol) as c:
        c.write(12 * MiB, os.urandom(MiB))
        c.flush()
    lab.action("resync")
    info = lab.wait("PAIR", "PAIR")
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    stats = lab.pc.private("GET", "replication/stats")["pairs"][f"{CG}/p1"]
    assert stats["tracksSentLastCopy"] <= 8  # the differences only (1 MiB, an activity extent at most)
    assert lab.digest("p", pvol, 32 * MiB) == lab.digest("s", svol, 32 * MiB)

    # delete: GAD leaves the attributes, the S-VOL gives the P identity back (65534) and is a plain volume
    lab.delete()
    assert lab.pc.get("remote-copypairs")["data"] == [] and lab.sc.get("remote-copypairs")["data"] == []
    sv, pv = lab.sc.get(f"ldevs/{svol}"), lab.pc.get(f"ldevs/{pvol}")
    assert "GAD" not in sv["attributes"] and "GAD" not in pv["attributes"]
    assert sv["virtualLdevId"] == 65534
    with lab.nbd("s", svol) as c:
        c.write(0, b"x" * 4096)
    lab.pc.invoke("DELETE", "quorum-disks/0")  # no longer in use


def test_create_refusals_change_nothing(glab: GadLab) -> None:
    lab = glab
    pvol, svol = lab.volumes()
    plain = lab.sc.create_ldev("32M")  # not in the VSM, no GAD reserve

    def nothing_changed() -> None:
        assert lab.pc.get("remote-copypairs")["data"] == [] and lab.sc.get("remote-copypairs")["data"] == []
        assert lab.pc.get("remote-mirror-copygroups")["data"] == []
        assert lab.sc.get(f"ldevs/{svol}")["virtualLdevId"] == 65535

    refused(lambda: lab.create(pvol, svol, quorumDiskId=None), 400, "KART40037-E")  # no quorum disk
    refused(lambda: lab.create(pvol, svol, fenceLevel="DATA"), 400, "KART40039-E")
    refused(lambda: lab.create(pvol, svol, replicationType="TC", quorumDiskId=None, isAluaEnabled=True),
            400, "KART40039-E")  # ALUA is for GAD pairs
    failed(lambda: lab.create(pvol, svol, quorumDiskId=3), "KART30013-E")  # unknown quorum disk
    err = failed(lambda: lab.create(pvol, plain), "KART40062-E")  # the S-VOL is not in the VSM
    assert "virtual storage machine" in err["message"]
    lab.sc.invoke("POST", f"ldevs/{svol}/actions/unassign-virtual-ldevid/invoke",
                  {"parameters": {"virtualLdevId": 65535}})
    err = failed(lambda: lab.create(pvol, svol), "KART40062-E")  # no GAD reserve
    assert "65535" in err["message"]
    lab.sc.invoke("POST", f"ldevs/{svol}/actions/assign-virtual-ldevid/invoke",
                  {"parameters": {"virtualLdevId": 65535}})
    nothing_changed()
    # the quorum system stopped: the quorum disk is BLOCKED, a create is refused
    lab.q.stop()
    try:
        err = failed(lambda: lab.create(pvol, svol), "KART40065-E")
        assert "BLOCKED" in err["message"]
        nothing_changed()
    finally:
        lab.q.start()
    lab.create(pvol, svol)
    lab.wait("PAIR", "PAIR")


def test_takeover_swap_resync_and_restart(glab: GadLab) -> None:
    """svolOperationMode SSWS on the S side: the S-VOL serves alone (Local), the P-VOL is Block; a swap resync
    makes the S side the primary (Mirror again, identical volumes); a restarted system keeps its I/O modes."""
    lab = glab
    pvol, svol = lab.volumes("16M")
    with lab.nbd("p", pvol) as c:
        fill_random(c, 4 * MiB)
    lab.create(pvol, svol)
    lab.wait("PAIR", "PAIR")
    lab.action("split", view="s", svolOperationMode="SSWS")
    info = lab.wait("PSUS", "SSWS")
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Block", "Local")
    assert_blocked(lab, "p", pvol)
    with lab.nbd("s", svol) as c:
        c.write(MiB, os.urandom(MiB))
        c.flush()
    refused(lambda: lab.action("resync"), 412, "KART40062-E")  # taken over: only a swap resync goes back
    lab.action("resync", view="s", doSwapSvol=True)
    info = lab.wait("PAIR", "PAIR", view="s")
    assert info["pvolLdevId"] == svol and (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    assert lab.digest("p", pvol, 16 * MiB) == lab.digest("s", svol, 16 * MiB)
    # both volumes are written in PAIR whichever side holds the P-VOL now
    with lab.nbd("p", pvol) as c:
        c.write(2 * MiB, os.urandom(65536))
    assert lab.digest("p", pvol, 16 * MiB) == lab.digest("s", svol, 16 * MiB)

    # a split from the new P side (s): s Local, p Block; then p restarted keeps Block, s keeps serving
    lab.action("split", view="s")
    info = lab.wait("PSUS", "SSUS", view="s")
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Local", "Block")
    lab.p.restart()
    lab.pc.close()
    lab.pc = lab.p.client()
    assert_blocked(lab, "p", pvol)
    with lab.nbd("s", svol) as c:
        c.write(3 * MiB, os.urandom(65536))
    lab.wait_paths()
    lab.action("resync", view="s")
    lab.wait("PAIR", "PAIR", view="s")
    assert lab.digest("p", pvol, 16 * MiB) == lab.digest("s", svol, 16 * MiB)


def test_consistency_group_id_and_swap_split_again(glab: GadLab) -> None:
    """A GAD pair in no consistency group answers without consistencyGroupId (the collection's hv_gad
    swap_split refuses a pair whose answer has one, -1 included); a pair created in one shows its id. A
    second swap split (svolOperationMode SSWS on an S-VOL in SSWS) is accepted and changes nothing."""
    lab = glab
    pvol, svol = lab.volumes("8M")
    lab.create(pvol, svol)
    lab.wait("PAIR", "PAIR")
    group = lab.pc.get(f"remote-mirror-copygroups/{lab.s.storage_device_id},{CG},{CG}P_,{CG}S_", remote=lab.sc)
    for view in (lab.pair(), lab.pair(view="s"), group["copyPairs"][0]):
        assert "consistencyGroupId" not in view, view
    pv2, sv2 = lab.volumes("8M")
    lab.pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": "gadctg", "copyPairName": "c1", "replicationType": "GAD",
        "remoteStorageDeviceId": lab.s.storage_device_id, "pvolLdevId": pv2, "svolLdevId": sv2,
        "isNewGroupCreation": True, "fenceLevel": "NEVER", "quorumDiskId": 0, "muNumber": 0,
        "isConsistencyGroup": True, "consistencyGroupId": 3}, remote=lab.sc)
    ctg = lab.pc.get(f"remote-mirror-copypairs/{lab.s.storage_device_id},gadctg,gadctgP_,gadctgS_,c1",
                     remote=lab.sc)
    assert ctg["consistencyGroupId"] == 3

    lab.action("split", view="s", svolOperationMode="SSWS")
    info = lab.wait("PSUS", "SSWS")
    lab.action("split", view="s", svolOperationMode="SSWS")  # again: accepted, nothing changes
    again = lab.pair()
    assert (again["pvolStatus"], again["svolStatus"], again["pvolIOMode"], again["svolIOMode"]) == \
        (info["pvolStatus"], info["svolStatus"], "Block", "Local")
    with lab.nbd("s", svol) as c:
        c.write(0, os.urandom(65536))
        c.flush()
