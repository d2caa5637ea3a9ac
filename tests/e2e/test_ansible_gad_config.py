"""The real collection's hv_resource_group and hv_quorum_disk modules make the configuration GAD needs, on
three vspemu systems: p and s (the systems of GAD pairs) and q, whose LDEV is the quorum volume that p and s
reach over NBD (issue 18). The pairs themselves with hv_gad: tests/e2e/test_ansible_gad_pair.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.e2e.test_ansible import PASSWORD, USER, AnsibleLab, ansible_venv
from vspemu.lab import SystemProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

EXT = 600  # the external volume's local LDEV id on p and s


@pytest.fixture(scope="module")
def glab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AnsibleLab, SystemProcess]]:
    venv = ansible_venv()
    base = tmp_path_factory.mktemp("ansible-gad")
    procs = [SystemProcess(base / name, serial).start()
             for name, serial in (("primary", 410101), ("secondary", 410102), ("quorum", 410103))]
    p, s, q = procs
    pc, sc = p.client(), s.client()
    try:
        pc.register_remote(sc)
        yield AnsibleLab(p, s, pc, sc, venv, base / "scratch"), q
    finally:
        pc.close()
        sc.close()
        for proc in procs:
            proc.stop()


def test_gad_configuration_with_the_collection(glab: tuple[AnsibleLab, SystemProcess]) -> None:
    lab, q = glab
    assert (USER, PASSWORD) == (lab.pc.user, lab.pc.password)
    with q.client() as qc:
        qldev = qc.create_ldev("16M")
        qc.add_lun(qldev)
    for c in (lab.pc, lab.sc):
        c.private("POST", "external-volumes", {"ldevId": EXT, "externalSerialNumber": q.serial,
                                               "externalLdevId": qldev, "nbdHost": "127.0.0.1",
                                               "nbdPort": q.nbd_port})
    lab.pc.create_ldev("32M")  # ids differ on the two sides: a virtual id is not the LDEV id by chance
    pvol = lab.pc.create_ldev("32M")
    svol = lab.sc.create_ldev("32M")
    lab.sc.invoke("POST", "host-groups", {"portId": "CL1-A", "hostGroupName": "gad_svol_hg"})

    lab.play("gad_config.yml", phase="create", svol=svol, ext_ldev=EXT)
    sv = lab.sc.get(f"ldevs/{svol}")
    rg = next(g for g in lab.sc.get("resource-groups")["data"] if g["resourceGroupName"] == "gad_vsm_rg")
    assert sv["resourceGroupId"] == rg["resourceGroupId"] and sv["virtualLdevId"] == 65534
    assert sv["virtualSerialNumber"] == str(lab.p.serial)
    assert rg["hostGroupIds"] and rg["hostGroupIds"][0].startswith("CL1-A,")
    # what hv_gad will do next: reserve, then the P-VOL's id as the S-VOL's virtual id (same identity)
    lab.sc.invoke("POST", f"ldevs/{svol}/actions/assign-virtual-ldevid/invoke", {"parameters": {"virtualLdevId": pvol}})
    sv = lab.sc.get(f"ldevs/{svol}")
    assert (sv["virtualSerialNumber"], sv["virtualLdevId"]) == (str(lab.p.serial), pvol)
    for c in (lab.pc, lab.sc):
        assert [(d["quorumDiskId"], d["ldevId"], d["status"]) for d in c.get("quorum-disks")["data"]] == \
            [(0, EXT, "NORMAL")]
    assert quorum_facts(lab) == [(0, EXT, "NORMAL", str(lab.s.serial))]
    q.stop()
    assert lab.pc.get("quorum-disks/0")["status"] == "BLOCKED"
    assert quorum_facts(lab) == [(0, EXT, "BLOCKED", str(lab.s.serial))]  # hv_quorum_disk_facts sees it too
    q.start()
    assert lab.pc.get("quorum-disks/0")["status"] == "NORMAL"

    lab.sc.invoke("POST", f"ldevs/{svol}/actions/unassign-virtual-ldevid/invoke",
                  {"parameters": {"virtualLdevId": pvol}})
    lab.play("gad_config.yml", phase="delete", svol=svol, ext_ldev=EXT)
    assert lab.pc.get("quorum-disks")["data"] == [] and lab.sc.get("quorum-disks")["data"] == []
    assert [g["resourceGroupId"] for g in lab.sc.get("resource-groups")["data"]] == [0]
    assert [v["virtualSerialNumber"] for v in lab.sc.get("virtual-storages")["data"]] == [str(lab.s.serial)]


def quorum_facts(lab: AnsibleLab) -> list[tuple[int, int, str, str]]:
    """hv_quorum_disk_facts without a spec (every quorum disk of p): id, LDEV, status, remote serial."""
    out = lab.scratch / "qfacts.json"
    out.unlink(missing_ok=True)
    lab.play("gad_config.yml", phase="qfacts", svol=0, ext_ldev=EXT, out=str(out))
    disks = json.loads(out.read_text())["ansible_facts"]["quorum_disk"]
    return [(d["quorum_disk_id"], d["ldev_id"], d["status"], d["remote_serial_number"]) for d in disks]
