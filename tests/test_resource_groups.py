"""Resource groups, virtual storage machines and virtual LDEV ids (issue 18: the configuration GAD needs)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import MakeSystem
from vspemu.client import ApiError, JobFailed, VspClient
from vspemu.lab import SystemProcess


def refused(call: Any, status: int, message_id: str | None = None) -> dict[str, Any]:
    """The call is refused with the array's error body (not a failed job: nothing was started)."""
    with pytest.raises(ApiError) as e:
        call()
    assert not isinstance(e.value, JobFailed)
    assert e.value.status == status, e.value.body
    body = e.value.body
    assert body is not None and {"messageId", "message", "solution"} <= set(body)
    if message_id:
        assert body["messageId"] == message_id, body
    return body


def snapshot(api: VspClient) -> Any:
    return (api.get("resource-groups"), api.get("virtual-storages"),
            [api.get(f"ldevs/{i}") for i in range(4)])


def test_meta_resource_always_exists(api: VspClient) -> None:
    groups = api.get("resource-groups")["data"]
    assert [g["resourceGroupId"] for g in groups] == [0]
    meta = api.get("resource-groups/0")
    assert meta["resourceGroupName"] == "meta_resource" and meta["virtualStorageId"] == 0
    assert meta["lockStatus"] == "Unlocked"
    assert "CL1-A" in meta["portIds"] and "CL1-A,0" in meta["hostGroupIds"]
    vsms = api.get("virtual-storages")["data"]
    assert len(vsms) == 1
    assert vsms[0]["virtualSerialNumber"] == str(api.get("storages")["data"][0]["serialNumber"])
    assert vsms[0]["resourceGroupIds"] == [0]
    refused(lambda: api.invoke("DELETE", "resource-groups/0"), 412)


def test_group_with_ldevs_ports_host_groups(system: SystemProcess, api: VspClient) -> None:
    ldev = api.create_ldev("16M")
    other = api.create_ldev("16M")
    hg = api.resource_id(api.invoke("POST", "host-groups", {"portId": "CL1-B", "hostGroupName": "gad-hg"}))
    job = api.invoke("POST", "resource-groups", {"resourceGroupName": "rg-a"})
    rg = int(api.resource_id(job))
    api.invoke("POST", f"resource-groups/{rg}/actions/add-resource/invoke",
               {"parameters": {"ldevIds": [ldev, 300], "portIds": ["CL2-B"], "hostGroupIds": [hg]}})
    view = api.get(f"resource-groups/{rg}")
    assert view["ldevIds"] == [ldev, 300] and view["portIds"] == ["CL2-B"] and view["hostGroupIds"] == [hg]
    assert api.get(f"ldevs/{ldev}")["resourceGroupId"] == rg
    assert api.get(f"ldevs/{other}")["resourceGroupId"] == 0
    assert api.get(f"host-groups/{hg}")["resourceGroupId"] == rg  # hv_gad picks the S-VOL's group by it
    assert api.get("host-groups/CL1-A,0")["resourceGroupId"] == 0
    meta = api.get("resource-groups/0")
    assert ldev not in meta["ldevIds"] and other in meta["ldevIds"] and "CL2-B" not in meta["portIds"]
    assert [x["ldevId"] for x in api.get("ldevs", resourceGroupId=rg)["data"]] == [ldev]

    # refusals: in another group, unknown port / host group, group 0 as a target; nothing changes
    before = snapshot(api)
    rg2 = int(api.resource_id(api.invoke("POST", "resource-groups", {"resourceGroupName": "rg-b"})))
    before = snapshot(api)
    refused(lambda: api.invoke("POST", f"resource-groups/{rg2}/actions/add-resource/invoke",
                               {"parameters": {"ldevIds": [other, ldev]}}), 412, "KART40063-E")
    refused(lambda: api.invoke("POST", f"resource-groups/{rg2}/actions/add-resource/invoke",
                               {"parameters": {"portIds": ["CL9-Z"]}}), 404, "KART30013-E")
    refused(lambda: api.invoke("POST", f"resource-groups/{rg2}/actions/add-resource/invoke",
                               {"parameters": {"hostGroupIds": ["CL1-A,77"]}}), 404, "KART30013-E")
    refused(lambda: api.invoke("POST", f"resource-groups/{rg2}/actions/add-resource/invoke",
                               {"parameters": {"parityGroupIds": ["1-1"]}}), 400, "KART40033-E")
    refused(lambda: api.invoke("POST", "resource-groups/0/actions/add-resource/invoke",
                               {"parameters": {"ldevIds": [other]}}), 412)
    refused(lambda: api.invoke("POST", "resource-groups", {"resourceGroupName": "rg-a"}), 409, "KART40045-E")
    refused(lambda: api.invoke("POST", "resource-groups", {"resourceGroupName": "meta_resource"}), 409)
    refused(lambda: api.invoke("DELETE", f"resource-groups/{rg}"), 412, "KART40063-E")
    refused(lambda: api.invoke("DELETE", "resource-groups/999"), 404)
    assert snapshot(api) == before

    # persisted: the groups survive a restart
    system.restart()
    with system.client() as c:
        assert c.get(f"resource-groups/{rg}")["ldevIds"] == [ldev, 300]
        assert c.get(f"ldevs/{ldev}")["resourceGroupId"] == rg
        c.invoke("POST", f"resource-groups/{rg}/actions/remove-resource/invoke",
                 {"parameters": {"ldevIds": [ldev, 300], "portIds": ["CL2-B"], "hostGroupIds": [hg]}})
        assert c.get(f"ldevs/{ldev}")["resourceGroupId"] == 0
        c.invoke("DELETE", f"resource-groups/{rg}")
        assert [g["resourceGroupId"] for g in c.get("resource-groups")["data"]] == [0, rg2]


def test_virtual_storage_and_virtual_ldev_ids(make_system: MakeSystem) -> None:
    """The GAD S-VOL set-up: a VSM with the P side's identity, the S-VOL in it with the P-VOL's id as its
    virtual LDEV id: both volumes answer with the same virtual identity."""
    p, s = make_system(), make_system()
    with p.client() as pc, s.client() as sc:
        pvol = pc.create_ldev("16M", ldev_id=10)
        svol = sc.create_ldev("16M", ldev_id=20)
        model = "VSP 5100H, 5500H"
        job = sc.invoke("POST", "virtual-storages", {"resourceGroupName": "gad-vsm", "virtualSerialNumber":
                                                     str(p.serial), "virtualModel": model})
        vsms = sc.get("virtual-storages")["data"]
        assert len(vsms) == 2
        vsm = vsms[1]
        assert vsm["virtualSerialNumber"] == str(p.serial) and vsm["virtualModel"] == model
        assert vsm["virtualStorageDeviceId"] == pc.storage_device_id
        assert vsm["virtualStorageTypeId"] == "R9"
        rg = next(g for g in sc.get("resource-groups")["data"] if g["resourceGroupName"] == "gad-vsm")
        assert vsm["resourceGroupIds"] == [rg["resourceGroupId"]] and rg["virtualStorageId"] == 1
        assert sc.get("virtual-storages/1") == vsm == sc.get(f"virtual-storages/{pc.storage_device_id}")
        assert job["affectedResources"]
        # a second group in the same VSM, by virtualStorageDeviceId as the collection sends it
        rg2 = int(sc.resource_id(sc.invoke("POST", "resource-groups", {
            "resourceGroupName": "gad-vsm-2", "virtualStorageDeviceId": vsm["virtualStorageDeviceId"]})))
        assert sc.get(f"resource-groups/{rg2}")["virtualStorageId"] == 1
        sc.invoke("DELETE", f"resource-groups/{rg2}")

        # the S-VOL: unassign its own id, move it into the VSM, reserve for GAD, then give it the P-VOL's id
        assert "virtualLdevId" not in sc.get(f"ldevs/{svol}")
        before = snapshot(sc)
        refused(lambda: sc.invoke("POST", f"ldevs/{svol}/actions/assign-virtual-ldevid/invoke",
                                  {"parameters": {"virtualLdevId": pvol}}), 412, "KART40062-E")
        refused(lambda: sc.invoke("POST", f"ldevs/{svol}/actions/unassign-virtual-ldevid/invoke",
                                  {"parameters": {"virtualLdevId": 21}}), 400, "KART40039-E")
        refused(lambda: sc.invoke("POST", f"resource-groups/{rg['resourceGroupId']}/actions/add-resource/invoke",
                                  {"parameters": {"ldevIds": [svol]}}), 412, "KART40062-E")
        assert snapshot(sc) == before
        sc.invoke("POST", f"ldevs/{svol}/actions/unassign-virtual-ldevid/invoke",
                  {"parameters": {"virtualLdevId": svol}})
        assert sc.get(f"ldevs/{svol}")["virtualLdevId"] == 65534
        sc.invoke("POST", f"resource-groups/{rg['resourceGroupId']}/actions/add-resource/invoke",
                  {"parameters": {"ldevIds": [svol]}})
        sc.invoke("POST", f"ldevs/{svol}/actions/assign-virtual-ldevid/invoke",
                  {"parameters": {"virtualLdevId": 65535}})
        assert sc.get(f"ldevs/{svol}")["virtualLdevId"] == 65535
        sc.invoke("POST", f"ldevs/{svol}/actions/unassign-virtual-ldevid/invoke",
                  {"parameters": {"virtualLdevId": 65535}})
        sc.invoke("POST", f"ldevs/{svol}/actions/assign-virtual-ldevid/invoke",
                  {"parameters": {"virtualLdevId": pvol}})
        sv = sc.get(f"ldevs/{svol}")
        assert sv["virtualLdevId"] == pvol and sv["resourceGroupId"] == rg["resourceGroupId"]
        assert sv["virtualSerialNumber"] == str(p.serial) and sv["virtualModel"] == model
        assert sv["virtualStorageDeviceId"] == pc.storage_device_id
        # the same virtual identity as the P-VOL: (serial, LDEV id) of the P side
        pv = pc.get(f"ldevs/{pvol}")
        assert (sv["virtualSerialNumber"], sv["virtualLdevId"]) == (str(p.serial), pv["ldevId"])

        # a second LDEV of the VSM cannot take the same virtual id
        other = sc.create_ldev("16M", ldev_id=21)
        sc.invoke("POST", f"ldevs/{other}/actions/unassign-virtual-ldevid/invoke",
                  {"parameters": {"virtualLdevId": other}})
        sc.invoke("POST", f"resource-groups/{rg['resourceGroupId']}/actions/add-resource/invoke",
                  {"parameters": {"ldevIds": [other]}})
        refused(lambda: sc.invoke("POST", f"ldevs/{other}/actions/assign-virtual-ldevid/invoke",
                                  {"parameters": {"virtualLdevId": pvol}}), 409, "KART40045-E")
        refused(lambda: sc.invoke("POST", "virtual-storages", {
            "resourceGroupName": "x", "virtualSerialNumber": str(p.serial), "virtualModel": model}), 409)
        refused(lambda: sc.invoke("POST", "virtual-storages", {
            "resourceGroupName": "y", "virtualSerialNumber": "123", "virtualModel": "VSP 9999"}), 400)

        # persisted with the LDEV and the groups
        s.restart()
    with s.client() as sc:
        sv = sc.get(f"ldevs/{svol}")
        assert sv["virtualLdevId"] == pvol and sv["virtualSerialNumber"] == str(p.serial)
        assert len(sc.get("virtual-storages")["data"]) == 2


def test_gad_create_body_is_understood(api: VspClient) -> None:
    """The body hv_gad sends (vsp_gad_pair_gateway.create_gad_pair) is understood (no unknown parameter or
    invalid replicationType): like any pair create it needs Remote-Authorization (GAD pairs: tests/test_gad.py)."""
    pvol = api.create_ldev("16M")
    body = {"copyGroupName": "gadg", "copyPairName": "gadp", "replicationType": "GAD",
            "remoteStorageDeviceId": "900000499999", "pvolLdevId": pvol, "svolLdevId": pvol,
            "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 3, "doInitialCopy": True,
            "isDataReductionForceCopy": True, "quorumDiskId": 0, "muNumber": 0}
    refused(lambda: api.invoke("POST", "remote-mirror-copypairs", body), 400, "KART40060-E")
    assert api.get("remote-copypairs")["data"] == [] and api.get("remote-mirror-copygroups")["data"] == []
    # a quorum disk id on a TC pair is refused too
    tc = {**body, "replicationType": "TC"}
    refused(lambda: api.invoke("POST", "remote-mirror-copypairs", tc), 400, "KART40039-E")


@pytest.mark.timeout(180)
def test_a_group_of_every_ldev_id(api: VspClient) -> None:
    """A group may reserve the whole LDEV id range; adding, listing and removing it stays linear (an index,
    sets), not quadratic in the number of ids."""
    ldev = api.create_ldev("16M")
    rg = int(api.resource_id(api.invoke("POST", "resource-groups", {"resourceGroupName": "all-ids"})))
    api.invoke("POST", f"resource-groups/{rg}/actions/add-resource/invoke",
               {"parameters": {"startLdevId": 0, "endLdevId": 65279}})
    assert len(api.get(f"resource-groups/{rg}")["ldevIds"]) == 65280
    assert api.get(f"ldevs/{ldev}")["resourceGroupId"] == rg
    assert len(api.get("ldevs", count=16384)["data"]) == 16384
    api.invoke("POST", f"resource-groups/{rg}/actions/remove-resource/invoke",
               {"parameters": {"ldevIds": list(range(65280))}})
    assert api.get(f"resource-groups/{rg}")["ldevIds"] == [] and api.get("resource-groups/0")["ldevIds"] == [ldev]
