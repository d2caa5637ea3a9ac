"""The real collection's hv_gad module creates, splits, resyncs, swap-splits, swap-resyncs and deletes a GAD
pair on vspemu, and hv_gad_facts lists it (issue 18): three systems (p, s, and q holding the quorum volume),
the S-VOL prepared as hv_resource_group leaves it (tests/e2e/test_ansible_gad_config.py), hosts writing both
volumes in PAIR, the S-VOL alone after the swap split."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from tests.e2e.test_ansible import AnsibleLab, ansible_venv
from vspemu.client.nbd import NbdClient, NbdError, NbdOptionError
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


def pair(lab: AnsibleLab, view: str = "p") -> dict:
    """The pair as one system answers it (its own device group first)."""
    if view == "p":
        return lab.pc.get(f"remote-mirror-copypairs/{lab.s.storage_device_id},{CG},{CG}P_,{CG}S_,{CP}",
                          remote=lab.sc)
    return lab.sc.get(f"remote-mirror-copypairs/{lab.p.storage_device_id},{CG},{CG}S_,{CG}P_,{CP}",
                      remote=lab.pc)


def wait(lab: AnsibleLab, pst: str, sst: str, timeout: float = 120.0, view: str = "p") -> dict:
    deadline = time.monotonic() + timeout
    while (info := pair(lab, view))["pvolStatus"] != pst or info["svolStatus"] != sst:
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    return info


def play(lab: AnsibleLab, phase: str, pvol: int, svol: int, **extra: object) -> dict:
    """Run one phase of gad_pair.yml; the registered answers of its tasks."""
    out = lab.scratch / f"gad_pair.{phase}.json"
    out.unlink(missing_ok=True)
    lab.play("gad_pair.yml", phase=phase, pvol=pvol, svol=svol, cg=CG, cp=CP, out=str(out), **extra)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def check_facts(lab: AnsibleLab, pvol: int, svol: int) -> None:
    """hv_gad_facts lists the pair with the fields it prints, by copy group and pair name and in the list of
    every GAD pair. (Not by `primary_volume_id`: the collection compares the pair's int LDEV id with the
    option's string and finds nothing, whatever the array answers.)"""
    answers = play(lab, "facts", pvol, svol)
    for key in ("one", "every"):
        assert not answers[key].get("failed") and not answers[key]["changed"], answers[key]
    pairs = answers["one"]["ansible_facts"]["gad_pair"]
    assert len(pairs) == 1, pairs
    f = pairs[0]
    want = {"copy_group_name": CG, "copy_pair_name": CP, "primary_volume_id": pvol, "secondary_volume_id": svol,
            "primary_volume_status": "PAIR", "secondary_volume_status": "PAIR", "quorum_disk_id": 0,
            "fence_level": "NEVER", "local_device_group_name": f"{CG}P_",
            "remote_device_group_name": f"{CG}S_",
            "primary_volume_storage_serial_number": str(lab.p.serial),
            "secondary_volume_storage_serial_number": str(lab.s.serial),
            # both volumes answer with the P side's identity (the S-VOL from the VSM on s)
            "primary_virtual_serial_number": str(lab.p.serial),
            "secondary_virtual_serial_number": str(lab.p.serial),
            "primary_vsm_resource_group_name": "meta_resource", "secondary_vsm_resource_group_name": "gad_vsm_rg",
            "primary_volume_id_hex": f"00:00:{pvol:02X}", "secondary_volume_id_hex": f"00:00:{svol:02X}",
            "remote_mirror_copy_pair_id": f"{lab.s.storage_device_id},{CG},{CG}P_,{CG}S_,{CP}",
            "primary_volume_size": "32.00MB", "secondary_volume_size": "32.00MB",
            # -1 whatever the array answers: the collection's pair model (DirectCopyPairInfo) keeps no
            # pvolVirtualLdevId / svolVirtualLdevId / muNumber, and its extractor writes those over the
            # virtual ids it looked up from the LDEVs
            "primary_virtual_volume_id": -1, "secondary_virtual_volume_id": -1, "mirror_unit_number": -1}
    assert {k: f.get(k) for k in want} == want, f
    every = answers["every"]["ansible_facts"]["gad_pair"]
    assert [(g["copy_pair_name"], g["primary_volume_id"], g["secondary_volume_id"]) for g in every] == \
        [(CP, pvol, svol)], every


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
    check_facts(lab, pvol, svol)

    lab.play("gad_pair.yml", phase="split", pvol=pvol, svol=svol, cg=CG, cp=CP)
    info = wait(lab, "PSUS", "SSUS")
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Local", "Block")
    with NbdClient("127.0.0.1", lab.p.nbd_port, str(pvol)) as c:
        c.write(12 * MiB, os.urandom(MiB))
    lab.play("gad_pair.yml", phase="resync", pvol=pvol, svol=svol, cg=CG, cp=CP)
    wait(lab, "PAIR", "PAIR")
    assert volume_digest(lab.p.nbd_port, pvol, 32 * MiB) == volume_digest(lab.s.nbd_port, svol, 32 * MiB)

    # swap split, sent to the S side: the S-VOL serves alone (SSWS, Local), the P-VOL is PSUS and Block
    answer = play(lab, "swap_split", pvol, svol)["swap_split"]
    assert answer["changed"], answer
    d = answer["data"]
    assert (d["primary_volume_id"], d["primary_volume_status"], d["secondary_volume_id"],
            d["secondary_volume_status"]) == (pvol, "PSUS", svol, "SSWS"), d
    info = wait(lab, "PSUS", "SSWS")
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Block", "Local")
    assert_blocked_p(lab, pvol)
    with NbdClient("127.0.0.1", lab.s.nbd_port, str(svol)) as c:
        c.write(14 * MiB, os.urandom(MiB))
        c.write(3 * MiB, os.urandom(4096))
        c.flush()
    # again: the pair is already swap-split; the array accepts it and nothing changes (the collection
    # reports changed: it never looks first)
    again = play(lab, "swap_split", pvol, svol)["swap_split"]
    assert not again.get("failed") and again["data"]["secondary_volume_status"] == "SSWS", again
    info = wait(lab, "PSUS", "SSWS", timeout=1)
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Block", "Local")

    # swap resync, sent to the S side: the roles swap (the S system holds the P-VOL), PAIR, identical
    answer = play(lab, "swap_resync", pvol, svol)["swap_resync"]
    assert answer["changed"], answer
    d = answer["data"]  # the module answers with the swapped pair: its P-VOL on s now
    assert (d["primary_volume_id"], d["primary_volume_storage_serial_number"], d["secondary_volume_id"]) == \
        (svol, str(lab.s.serial), pvol), d
    assert d["primary_volume_status"] in ("COPY", "PAIR"), d
    info = wait(lab, "PAIR", "PAIR", view="s")
    assert (info["pvolLdevId"], info["svolLdevId"]) == (svol, pvol), info
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    assert volume_digest(lab.p.nbd_port, pvol, 32 * MiB) == volume_digest(lab.s.nbd_port, svol, 32 * MiB)
    with NbdClient("127.0.0.1", lab.p.nbd_port, str(pvol)) as c:  # the old P-VOL is writable again
        c.write(20 * MiB, os.urandom(MiB))
        c.flush()
    assert volume_digest(lab.p.nbd_port, pvol, 32 * MiB) == volume_digest(lab.s.nbd_port, svol, 32 * MiB)

    # delete from the new P side (s holds the P-VOL now)
    swapped = {"p_addr": f"127.0.0.1:{lab.s.rest_port}", "s_addr": f"127.0.0.1:{lab.p.rest_port}"}
    lab.play("gad_pair.yml", phase="delete", pvol=svol, svol=pvol, cg=CG, cp=CP, **swapped)
    assert lab.pc.get("remote-copypairs")["data"] == []
    assert "GAD" not in lab.sc.get(f"ldevs/{svol}")["attributes"]


def assert_blocked_p(lab: AnsibleLab, pvol: int) -> None:
    """The P-VOL's host I/O is refused (Block), as the array's blocked LU."""
    with pytest.raises((NbdError, NbdOptionError, ConnectionError, OSError)), \
            NbdClient("127.0.0.1", lab.p.nbd_port, str(pvol)) as c:
        c.read(0, 4096)
