"""Issue 14 (authorization): registration secrets, Remote-Authorization with NotSpecified ids, TLS pinning,
and the checks of what a peer sends."""

from __future__ import annotations

import pytest

from vspemu.client import ApiError, VspClient
from vspemu.lab import SystemProcess

CG = "azg"


def _pair_lab(pc: VspClient, sc: VspClient, s: SystemProcess) -> tuple[int, int]:
    pv = pc.create_ldev("16M")
    pc.add_lun(pv)
    sv = sc.create_ldev("16M")
    sc.add_lun(sv)
    body = {"copyGroupName": CG, "copyPairName": "p1", "replicationType": "TC",
            "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}
    pc.invoke("POST", "remote-mirror-copypairs", body, remote=sc)
    return pv, sv


def _statuses(pc: VspClient) -> tuple[str, str]:
    info = pc.get(f"remote-mirror-copypairs/NotSpecified,{CG},{CG}P_,NotSpecified,p1")
    return info["pvolStatus"], info["svolStatus"]


# -- item 2: NotSpecified ids skip Remote-Authorization only where the array allows it ----------------------
def test_not_specified_refused_where_the_remote_side_changes(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, pc, sc = linked
    _pair_lab(pc, sc, s)
    ns_pair = f"remote-mirror-copypairs/NotSpecified,{CG},{CG}P_,NotSpecified,p1"
    ns_group = f"remote-mirror-copygroups/NotSpecified,{CG},{CG}P_,NotSpecified"
    tc = {"parameters": {"replicationType": "TC"}}
    for method, path, body in (("PUT", f"{ns_pair}/actions/split/invoke", tc),
                               ("PUT", f"{ns_group}/actions/split/invoke", tc),
                               ("DELETE", ns_pair, None), ("DELETE", ns_group, None)):
        with pytest.raises(ApiError) as e:
            pc.invoke(method, path, body)
        assert (e.value.status, e.value.message_id) == (400, "KART40060-E"), (method, path)
        assert _statuses(pc) == ("PAIR", "PAIR")
    # a real split with Remote-Authorization, then a NotSpecified resync is refused too
    pid = f"{s.storage_device_id},{CG},{CG}P_,{CG}S_,p1"
    pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/split/invoke", tc, remote=sc)
    assert _statuses(pc) == ("PSUS", "SSUS")
    for path in (ns_pair, ns_group):
        with pytest.raises(ApiError) as e:
            pc.invoke("PUT", f"{path}/actions/resync/invoke", tc)
        assert (e.value.status, e.value.message_id) == (400, "KART40060-E")
    # a swap resync needs the S side: from the P side the NotSpecified form stays refused
    with pytest.raises(ApiError) as e:
        pc.invoke("PUT", f"{ns_pair}/actions/resync/invoke", {"parameters": {"replicationType": "TC",
                                                                             "doSwapSvol": True}})
    assert e.value.message_id == "KART40060-E"
    assert _statuses(pc) == ("PSUS", "SSUS")
    assert sc.get(f"remote-mirror-copypairs/NotSpecified,{CG},{CG}S_,NotSpecified,p1")["svolStatus"] == "SSUS"
    # the forms the array allows: local GETs (above), swap split on the S side, takeover on the S side
    pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/resync/invoke", tc, remote=sc)
    assert _statuses(pc) == ("PAIR", "PAIR")
    s_ns = f"remote-mirror-copypairs/NotSpecified,{CG},{CG}S_,NotSpecified,p1"
    sc.invoke("PUT", f"{s_ns}/actions/split/invoke", {"parameters": {"replicationType": "TC",
                                                                     "svolOperationMode": "SSWS"}})
    assert sc.get(s_ns)["svolStatus"] == "SSWS"
    sc.invoke("POST", f"{s_ns}/actions/takeover/invoke", {"parameters": {"mode": "forceSplit"}})
    assert sc.get(s_ns)["svolStatus"] == "SSWS"
