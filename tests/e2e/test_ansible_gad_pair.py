"""The real collection's hv_gad module creates, splits, resyncs and deletes a GAD pair on vspemu (issue 18):
three systems (p, s, and q holding the quorum volume), the S-VOL prepared as hv_resource_group leaves it
(tests/e2e/test_ansible_gad_config.py), hosts writing both volumes in PAIR."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.e2e.test_ansible import AnsibleLab, ansible_venv
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, link_systems, volume_digest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

EXT = 600
MiB = 1 << 20
CG, CP = "gadcg", "gadcp"


@pytest.fixture(scope="module")
def glab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnsibleLab]:
    venv = ansible_venv()
    base = tmp_path_factory.mktemp("ansible-gad-pair")
    procs = [SystemProcess(base / name, serial).start()
             for name, serial in (("primary", 410111), ("secondary", 410112), ("quorum", 410113))]
    p, s, q = procs
    pc, sc, qc = p.client(), s.client(), q.client()
    try:
        link_systems(pc, sc)
        qldev = qc.create_ldev("16M")
        qc.add_lun(qldev)
        for c in (pc, sc):  # (quorum disk 0 on it: gad_config.yml, with hv_quorum_disk)
            c.add_external_volume(EXT, qc, qldev, "127.0.0.1", q.nbd_port)
        yield AnsibleLab(p, s, pc, sc, venv, base / "scratch")
    finally:
        for c in (pc, sc, qc):
            c.close()
        for proc in procs:
            proc.stop()


def pair(lab: AnsibleLab) -> dict:
    return lab.pc.get(f"remote-mirror-copypairs/{lab.s.storage_device_id},{CG},{CG}P_,{CG}S_,{CP}",
                      remote=lab.sc)


def wait(lab: AnsibleLab, pst: str, sst: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while (info := pair(lab))["pvolStatus"] != pst or info["svolStatus"] != sst:
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    return info


def test_gad_pair_with_hv_gad(glab: AnsibleLab) -> None:
    lab = glab
    lab.pc.create_ldev("32M")  # (LDEV 0 is falsy to the collection: "no provisioned S-VOL"; ids differ too)
    lab.sc.create_ldev("32M")
    lab.sc.create_ldev("32M")
    pvol = lab.pc.create_ldev("32M")
    lab.pc.add_lun(pvol)
    with NbdClient("127.0.0.1", lab.p.nbd_port, str(pvol)) as c:
        for off in range(0, 8 * MiB, 4 * MiB):
            c.write(off, os.urandom(4 * MiB))
        c.flush()
    svol = lab.sc.create_ldev("32M")
    # the configuration (the collection's own modules for it: test_ansible_gad_config.py): on s a VSM with p's
    # identity and the S-VOL's host group in its resource group; quorum disk 0 on both. The S-VOL itself is
    # left in meta_resource with its own virtual id: hv_gad unassigns it, moves it into the host group's
    # resource group and reserves it for GAD
    lab.sc.invoke("POST", "virtual-storages", {"resourceGroupName": "gad_vsm_rg", "virtualSerialNumber":
                                               str(lab.p.serial), "virtualModel": "VSP 5100H, 5500H"})
    rg = next(g for g in lab.sc.get("resource-groups")["data"] if g["resourceGroupName"] == "gad_vsm_rg")
    hg = lab.sc.invoke("POST", "host-groups", {"portId": "CL1-A", "hostGroupName": "gad_svol_hg"})
    lab.sc.invoke("POST", f"resource-groups/{rg['resourceGroupId']}/actions/add-resource/invoke",
                  {"parameters": {"hostGroupIds": [lab.sc.resource_id(hg)]}})
    lab.pc.create_quorum_disk(0, lab.sc, EXT)
    lab.sc.create_quorum_disk(0, lab.pc, EXT)
    lab.play("gad_pair.yml", phase="create", pvol=pvol, svol=svol, cg=CG, cp=CP)
    info = wait(lab, "PAIR", "PAIR")
    assert (info["replicationType"], info["quorumDiskId"], info["svolLdevId"]) == ("GAD", 0, svol)
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    sv = lab.sc.get(f"ldevs/{svol}")
    assert (sv["virtualLdevId"], sv["virtualSerialNumber"]) == (pvol, str(lab.p.serial))
    # hosts write both volumes
    for port, ldev in ((lab.s.nbd_port, svol), (lab.p.nbd_port, pvol)):
        with NbdClient("127.0.0.1", port, str(ldev)) as c:
            c.write(10 * MiB, os.urandom(MiB))
            c.flush()
    assert volume_digest(lab.p.nbd_port, pvol, 32 * MiB) == volume_digest(lab.s.nbd_port, svol, 32 * MiB)

    lab.play("gad_pair.yml", phase="split", pvol=pvol, svol=svol, cg=CG, cp=CP)
    info = wait(lab, "PSUS", "SSUS")
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Local", "Block")
    with NbdClient("127.0.0.1", lab.p.nbd_port, str(pvol)) as c:
        c.write(12 * MiB, os.urandom(MiB))
    lab.play("gad_pair.yml", phase="resync", pvol=pvol, svol=svol, cg=CG, cp=CP)
    wait(lab, "PAIR", "PAIR")
    assert volume_digest(lab.p.nbd_port, pvol, 32 * MiB) == volume_digest(lab.s.nbd_port, svol, 32 * MiB)
    lab.play("gad_pair.yml", phase="delete", pvol=pvol, svol=svol, cg=CG, cp=CP)
    assert lab.pc.get("remote-copypairs")["data"] == []
    assert "GAD" not in lab.sc.get(f"ldevs/{svol}")["attributes"]
