"""Local copies (Thin Image, ShadowImage) sharing volumes with TrueCopy / Universal Replicator pairs: what the
array refuses (nothing changes), and ShadowImage of a UR P-VOL with real data over NBD."""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any

import pytest
from test_shadowimage import Si, fill_random
from test_universal_replicator import UrLab

from vspemu.client import ApiError, VspClient
from vspemu.lab import SystemProcess

MiB = 1 << 20
Linked = tuple[SystemProcess, SystemProcess, VspClient, VspClient]


def snap(c: VspClient, pvol: int, group: str, **extra: Any) -> int:
    body = {"pvolLdevId": pvol, "snapshotPoolId": 0, "snapshotGroupName": group, **extra}
    return int(c.resource_id(c.invoke("POST", "snapshots", body)).split(",")[1])


def volume(c: VspClient, size: str = "8M") -> int:
    v = c.create_ldev(size)
    c.add_lun(v)
    return v


def tc_create(pc: VspClient, sc: VspClient, s: SystemProcess, pv: int, sv: int, group: str = "tcx") -> None:
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": group, "copyPairName": "p1", "replicationType": "TC",
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=sc)


def ur_create(pc: VspClient, sc: VspClient, s: SystemProcess, pv: int, sv: int, group: str = "urx") -> None:
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": group, "copyPairName": "u1", "replicationType": "UR",
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "ASYNC", "muNumber": 1, "pvolJournalId": 1,
        "svolJournalId": 1}, remote=sc)


def refused(fn: Any, message_id: str, words: str) -> None:
    with pytest.raises(ApiError) as e:
        fn()
    assert e.value.message_id == message_id, e.value.body
    assert words in (e.value.message or ""), e.value.body


def state(c: VspClient) -> Any:
    """What a refusal must not change: pairs, snapshots, local clone pairs, the attributes of every LDEV."""
    ldevs = {d["ldevId"]: sorted(d.get("attributes", [])) for d in c.get("ldevs", count=100)["data"]}
    return (c.get("remote-copypairs")["data"], c.get("snapshots")["data"],
            [(p["copyPairName"], p["pvolStatus"]) for p in c.get("local-clone-copypairs")["data"]], ldevs)


def test_remote_pairs_on_local_copy_svols_are_refused_and_change_nothing(linked: Linked) -> None:
    p, s, pc, sc = linked
    for c in (pc, sc):
        c.create_journal(1, [c.create_ldev("128M")])
    # the primary: a split snapshot with an S-VOL, a split ShadowImage pair; the same on the secondary
    ps_p, ps_s, pp_si, ps_si, plain_p = (volume(pc) for _ in range(5))
    ss_p, ss_s, sp_si, ss_si, plain_s = (volume(sc) for _ in range(5))
    pmu = snap(pc, ps_p, "gp", svolLdevId=ps_s, autoSplit=True)
    smu = snap(sc, ss_p, "gs", svolLdevId=ss_s, autoSplit=True)
    psi, ssi = Si(p, pc), Si(s, sc)
    for si, pv, sv in ((psi, pp_si, ps_si), (ssi, sp_si, ss_si)):
        si.create(pv, sv)
        si.wait("PAIR")
        si.act("split")
        si.wait("PSUS")
    before = state(pc), state(sc)
    # a Thin Image S-VOL or a ShadowImage S-VOL as the P-VOL (checked here) or the S-VOL (checked there)
    for make in (tc_create, ur_create):
        refused(partial(make, pc, sc, s, ps_s, plain_s), "KART40063-E", f"S-VOL of Thin Image snapshot {ps_p},")
        refused(partial(make, pc, sc, s, ps_si, plain_s), "KART40063-E", "S-VOL of ShadowImage pair")
        refused(partial(make, pc, sc, s, plain_p, ss_s), "KART40063-E", f"S-VOL of Thin Image snapshot {ss_p},")
        refused(partial(make, pc, sc, s, plain_p, ss_si), "KART40063-E", "S-VOL of ShadowImage pair")
    assert (state(pc), state(sc)) == before
    # the P-VOLs of local copies may be TC / UR pair volumes: the DR test
    tc_create(pc, sc, s, ps_p, ss_p)
    ur_create(pc, sc, s, pp_si, sp_si)
    deadline = time.monotonic() + 60
    while {x["status"] for x in pc.get("remote-copypairs")["data"] + sc.get("remote-copypairs")["data"]} != {"PAIR"}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # restoring onto a TC / UR S-VOL is refused (the array: in every status; restore on the primary instead)
    before = state(sc)
    refused(lambda: sc.invoke("POST", f"snapshots/{ss_p},{smu}/actions/restore/invoke"), "KART40062-E",
            "TrueCopy / Universal Replicator S-VOL")
    with pytest.raises(ApiError) as e:
        ssi.act("restore")  # ShadowImage reverse resync onto the UR S-VOL in PAIR
    assert e.value.message_id == "KART40062-E", e.value.body
    assert state(sc) == before
    # split the TC pair: the snapshot restore onto its S-VOL stays refused
    pc.invoke("PUT", f"remote-mirror-copygroups/{s.storage_device_id},tcx,tcxP_,tcxS_/actions/split/invoke",
              {"parameters": {"replicationType": "TC", "svolAccessMode": "rw"}}, remote=sc)
    refused(lambda: sc.invoke("POST", f"snapshots/{ss_p},{smu}/actions/restore/invoke"), "KART40062-E",
            "TrueCopy / Universal Replicator S-VOL")
    assert sc.get(f"snapshots/{ss_p},{smu}")["status"] == "PSUS"
    assert pc.get(f"snapshots/{ps_p},{pmu}")["status"] == "PSUS"


def test_shadowimage_of_a_ur_pvol_is_the_image_at_the_split(linked: Linked) -> None:
    """ShadowImage on a UR P-VOL in PAIR with real data over NBD: after the split the S-VOL equals the P-VOL at
    the split while the host keeps writing (and UR keeps mirroring); a resync catches up."""
    ur = UrLab(*linked)
    si = Si(ur.p, ur.pc)
    ur.journals()
    (pv, sv), = ur.volumes(1)
    size = 32 * MiB
    with ur.nbd("p", pv) as c:
        fill_random(c, 16 * MiB)
    ur.create([(pv, sv)])
    ur.wait({("PAIR", "PAIR")})
    psi = si.volume("32M")
    si.create(pv, psi)  # on the UR P-VOL in PAIR
    si.wait("PAIR")
    with ur.nbd("p", pv) as c:
        c.write(20 * MiB, os.urandom(MiB))
        c.flush()
        image = ur.digest("p", pv, size)
        si.act("split")
        c.write(0, os.urandom(2 * MiB))  # the host goes on writing: copy-on-write into the S-VOL if pending
        c.write(20 * MiB + 4096, os.urandom(8192))
        c.flush()
    si.wait("PSUS")
    assert si.digest(psi, size) == image
    ur.wait_drained()
    now = ur.digest("p", pv, size)
    assert now != image and ur.digest("s", sv, size) == now  # UR mirrored every write, the split image stayed
    si.act("resync")
    si.wait("PAIR")
    assert si.stats()["tracksCopiedLastCopy"] == 9  # 2 MiB + the one track written since the split
    assert si.digest(psi, size) == now
