"""Host groups, WWNs, iSCSI targets / initiators and CHAP users against a real ``vspemu serve`` process."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess


def hg_create(api: VspClient, **body: object) -> str:
    return api.resource_id(api.invoke("POST", "host-groups", body))


def config_rows(system: SystemProcess) -> list[tuple[str, str, str]]:
    with sqlite3.connect(system.data_dir / "config.sqlite3") as db:
        return sorted(db.execute("SELECT kind, id, doc FROM objects WHERE kind != 'sessions'").fetchall())


def test_ports_fc_and_iscsi(api: VspClient) -> None:
    ports = {p["portId"]: p for p in api.get("ports")["data"]}
    assert ports["CL1-A"]["portType"] == "FIBRE" and ports["CL1-A"]["wwn"]
    iscsi = [p for p in ports.values() if p["portType"] == "ISCSI"]
    assert {p["portId"] for p in iscsi} == {"CL5-A", "CL6-A", "CL5-B", "CL6-B"}
    one = api.get("ports/CL5-A")
    assert one["tcpPort"] == "3260" and one["ipv4Address"] and one["portAttributes"] == ["TAR"]
    g0 = api.get("host-groups/CL5-A,0")
    assert g0["iscsiName"].startswith("iqn.1994-04.jp.co.hitachi:")
    assert g0["authenticationMode"] in {"CHAP", "NONE", "BOTH"}
    assert "iscsiName" not in api.get("host-groups/CL1-A,0")


def test_host_group_lifecycle_with_wwns_and_luns(api: VspClient) -> None:
    free = api.get("host-groups", portId="CL1-A", isUndefined="true", detailInfoType="resourceGroup")["data"]
    assert free[0] == {"hostGroupId": "CL1-A,1", "portId": "CL1-A", "hostGroupNumber": 1, "resourceGroupId": 0,
                       "isDefined": False}
    assert len(free) == 254
    hid = hg_create(api, portId="CL1-A", hostGroupName="srv1", hostMode="VMWARE_EX", hostModeOptions=[63, 54])
    assert hid == "CL1-A,1"
    hg = api.get("host-groups/CL1-A,1")
    assert (hg["hostGroupName"], hg["hostMode"], hg["hostModeOptions"]) == ("srv1", "VMWARE_EX", [54, 63])
    assert hg_create(api, portId="CL1-A", hostGroupName="srv2", hostGroupNumber=7) == "CL1-A,7"
    assert [h["hostGroupNumber"] for h in api.get("host-groups", portId="CL1-A")["data"]] == [0, 1, 7]
    assert 1 not in {h["hostGroupNumber"] for h in
                     api.get("host-groups", portId="CL1-A", isUndefined="true")["data"]}

    # WWNs: add, nickname, list (by number and by name), one per port
    job = api.invoke("POST", "host-wwns", {"portId": "CL1-A", "hostGroupNumber": 1, "hostWwn": "21000024FF8F0A01"})
    assert api.resource_id(job) == "CL1-A,1,21000024ff8f0a01"
    api.invoke("PATCH", "host-wwns/CL1-A,1,21000024ff8f0a01", {"wwnNickname": "esx1-hba0"})
    w = api.get("host-wwns/CL1-A,1,21000024ff8f0a01")
    assert (w["hostWwn"], w["wwnNickname"], w["hostGroupName"]) == ("21000024ff8f0a01", "esx1-hba0", "srv1")
    assert [x["hostWwn"] for x in api.get("host-wwns", portId="CL1-A", hostGroupNumber=1)["data"]] == [
        "21000024ff8f0a01"]
    assert len(api.get("host-wwns", portId="CL1-A", hostGroupName="srv1")["data"]) == 1
    assert api.get("host-wwns", portId="CL1-A", hostGroupName="no-such-group")["data"] == []  # as Cinder expects
    with pytest.raises(ApiError) as e:  # the same WWN in another host group of the same port
        api.invoke("POST", "host-wwns", {"portId": "CL1-A", "hostGroupNumber": 7, "hostWwn": "21000024ff8f0a01"})
    assert e.value.status == 409
    api.invoke("POST", "host-wwns", {"portId": "CL2-A", "hostGroupNumber": 0, "hostWwn": "21000024ff8f0a01"})

    # each host group has its own LUN numbering
    ldev = api.create_ldev("16M")
    assert api.add_lun(ldev, "CL1-A", 1) == "CL1-A,1,0"
    assert api.add_lun(ldev, "CL1-A", 7) == "CL1-A,7,0"
    assert api.get("luns/CL1-A,1,0")["hostModeOptions"] == [54, 63]

    # modify: host mode, options, then [-1] clears them
    api.invoke("PATCH", "host-groups/CL1-A,1", {"hostMode": "LINUX/IRIX", "hostModeOptions": [2, 22]})
    assert api.get("host-groups/CL1-A,1")["hostModeOptions"] == [2, 22]
    api.invoke("PATCH", "host-groups/CL1-A,1", {"hostModeOptions": [-1]})
    assert api.get("host-groups/CL1-A,1")["hostModeOptions"] == []
    api.invoke("PUT", "host-groups/CL1-A,7", {"hostMode": "WIN", "hostModeOptions": [73]})  # Cinder's form
    assert (api.get("host-groups/CL1-A,7")["hostMode"], api.get("host-groups/CL1-A,7")["hostModeOptions"]) == (
        "WIN", [73])

    # delete: its LU paths and WWNs go; the other group's path stays
    api.invoke("DELETE", "host-groups/CL1-A,1")
    with pytest.raises(ApiError) as e:
        api.get("host-groups/CL1-A,1")
    assert e.value.status == 404
    assert [x["lunId"] for x in api.get("luns", ldevId=ldev)["data"]] == ["CL1-A,7,0"]
    assert api.get("host-wwns", portId="CL1-A")["data"] == []
    # host group 0 is initialized, not deleted
    api.invoke("PATCH", "host-groups/CL2-A,0", {"hostGroupName": "renamed"})
    api.invoke("DELETE", "host-groups/CL2-A,0")
    g0 = api.get("host-groups/CL2-A,0")
    assert g0["hostGroupName"] == "2A-G00" and api.get("host-wwns", portId="CL2-A")["data"] == []


def test_supported_host_modes(api: VspClient) -> None:
    info = api.get("supported-host-modes/instance")
    names = {m["hostModeName"] for m in info["hostModes"]}
    assert {"LINUX/IRIX", "VMWARE_EX", "WIN_EX", "AIX"} <= names
    assert {o["hostModeOptionId"] for o in info["hostModeOptions"]} >= {2, 22, 54, 63, 91}


@pytest.mark.parametrize("method,path,body", [
    ("POST", "host-groups", {"portId": "CL1-A", "hostGroupName": "x", "hostMode": "NOPE"}),
    ("POST", "host-groups", {"portId": "CL1-A", "hostGroupName": "x", "hostModeOptions": [999]}),
    ("POST", "host-groups", {"portId": "CL1-A", "hostGroupName": "x", "hostModeOptions": [82]}),  # iSCSI only
    ("POST", "host-groups", {"portId": "CL1-A", "hostGroupName": "1A-G00"}),  # the name is taken
    ("POST", "host-groups", {"portId": "CL1-A", "hostGroupName": "x", "hostGroupNumber": 0}),
    ("POST", "host-groups", {"portId": "CL1-A", "hostGroupName": "x", "iscsiName": "iqn.2000-01.com.x:y"}),
    ("POST", "host-groups", {"portId": "CL3-A", "hostGroupName": "x"}),  # a replication port
    ("POST", "host-groups", {"portId": "CL9-Z", "hostGroupName": "x"}),
    ("POST", "host-groups", {"portId": "CL1-A", "hostGroupName": "a,b"}),
    ("PATCH", "host-groups/CL1-A,0", {"hostModeOptions": [-1, 2]}),
    ("PATCH", "host-groups/CL1-A,0", {"authenticationMode": "CHAP"}),
    ("PATCH", "host-groups/CL1-A,0", {"hostMode": "WINDOWS"}),
    ("POST", "host-wwns", {"portId": "CL1-A", "hostGroupNumber": 0, "hostWwn": "xyz"}),
    ("POST", "host-wwns", {"portId": "CL1-A", "hostGroupNumber": 9, "hostWwn": "21000024ff8f0a01"}),
    ("POST", "host-wwns", {"portId": "CL5-A", "hostGroupNumber": 0, "hostWwn": "21000024ff8f0a01"}),
    ("POST", "host-iscsis", {"portId": "CL1-A", "hostGroupNumber": 0, "iscsiName": "iqn.1991-05.com.x:h"}),
    ("POST", "host-iscsis", {"portId": "CL5-A", "hostGroupNumber": 0, "iscsiName": "not-an-iqn"}),
    ("POST", "host-iscsis", {"portId": "CL5-A", "hostGroupNumber": 0, "iscsiName": "iqn.1994-05.com.x:a,b"}),
    ("POST", "chap-users", {"portId": "CL5-A", "hostGroupNumber": 0, "chapUserName": "u", "wayOfChapUser": "X"}),
    ("POST", "chap-users", {"portId": "CL5-A", "hostGroupNumber": 0, "chapUserName": "u", "wayOfChapUser": "TAR",
                            "chapPassword": "short"}),
    ("DELETE", "host-groups/CL1-A,9", None),
    ("DELETE", "host-wwns/CL1-A,0,21000024ff8f0a01", None),
])
def test_refused_requests_change_nothing(system: SystemProcess, api: VspClient, method: str, path: str,
                                         body: object) -> None:
    before = config_rows(system)
    with pytest.raises(ApiError) as e:
        api.invoke(method, path, body)
    assert 400 <= e.value.status < 500
    assert config_rows(system) == before


def test_iscsi_target_initiators_and_chap(system: SystemProcess, api: VspClient) -> None:
    hid = hg_create(api, portId="CL5-A", hostGroupName="tgt1", hostMode="LINUX/IRIX")
    tgt = api.get(f"host-groups/{hid}")
    assert tgt["iscsiName"].startswith("iqn.") and tgt["hostGroupNumber"] == 1
    hid2 = hg_create(api, portId="CL5-A", hostGroupName="tgt2", iscsiName="iqn.2000-01.com.example:tgt2")
    assert api.get(f"host-groups/{hid2}")["iscsiName"] == "iqn.2000-01.com.example:tgt2"

    iqn = "iqn.1994-05.com.redhat:client1"
    job = api.invoke("POST", "host-iscsis", {"portId": "CL5-A", "hostGroupNumber": 1, "iscsiName": iqn})
    assert api.resource_id(job) == f"CL5-A,1,{iqn}"
    api.invoke("PATCH", f"host-iscsis/CL5-A,1,{iqn}", {"iscsiNickname": "client1"})
    got = api.get("host-iscsis", portId="CL5-A", hostGroupNumber=1)["data"]
    assert [(x["iscsiName"], x["iscsiNickname"]) for x in got] == [(iqn, "client1")]

    secret = "s3cret-chap-0123"
    job = api.invoke("POST", "chap-users", {"portId": "CL5-A", "hostGroupNumber": 1, "chapUserName": "client1",
                                            "wayOfChapUser": "TAR"})
    cid = api.resource_id(job)
    assert cid == "CL5-A,1,TAR,client1"
    api.invoke("PATCH", f"chap-users/{cid}", {"chapPassword": secret})
    users = api.get("chap-users", portId="CL5-A", hostGroupNumber=1)["data"]
    assert [u["chapUserName"] for u in users] == ["client1"]
    assert secret not in str(users) and secret not in str(api.get(f"chap-users/{cid}"))
    assert all("chapPassword" not in u for u in users)
    cfg = system.data_dir / "config.sqlite3"
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o600
    api.invoke("PATCH", f"host-groups/{hid}", {"authenticationMode": "CHAP", "iscsiTargetDirection": "D"})
    assert api.get(f"host-groups/{hid}")["authenticationMode"] == "CHAP"

    # a LUN through the iSCSI target; deleting the target takes the path, initiators and CHAP users with it
    ldev = api.create_ldev("16M")
    api.add_lun(ldev, "CL5-A", 1)
    api.invoke("DELETE", f"host-groups/{hid}")
    assert api.get("luns", ldevId=ldev)["data"] == []
    assert api.get("host-iscsis", portId="CL5-A")["data"] == []
    assert api.get("chap-users", portId="CL5-A")["data"] == []
    api.invoke("DELETE", f"host-groups/{hid2}")


def test_deleting_a_host_group_drops_host_io(system: SystemProcess, api: VspClient) -> None:
    hid = hg_create(api, portId="CL1-B", hostGroupName="nbdhost")
    ldev = api.create_ldev("16M")
    api.add_lun(ldev, "CL1-B", int(hid.split(",")[1]))
    nbd = NbdClient("127.0.0.1", system.nbd_port, str(ldev), timeout=20)
    nbd.write(0, b"x" * 4096)
    api.invoke("DELETE", f"host-groups/{hid}")
    with pytest.raises(OSError):  # the server dropped the connection
        nbd.write(0, b"x" * 4096)
        nbd.read(0, 4096)
    nbd.sock.close()


def test_host_groups_persist_across_restart(make_system: object) -> None:
    sys_ = make_system()  # type: ignore[operator]
    api = sys_.client()
    hg_create(api, portId="CL2-B", hostGroupName="keep", hostMode="WIN_EX", hostModeOptions=[73])
    api.invoke("POST", "host-wwns", {"portId": "CL2-B", "hostGroupNumber": 1, "hostWwn": "10000000c9a1b2c3"})
    api.invoke("POST", "host-iscsis", {"portId": "CL6-A", "hostGroupNumber": 0, "iscsiName": "iqn.2001-04.com.x:h"})
    sys_.restart()
    api = sys_.client()
    hg = api.get("host-groups/CL2-B,1")
    assert (hg["hostGroupName"], hg["hostMode"], hg["hostModeOptions"]) == ("keep", "WIN_EX", [73])
    assert api.get("host-wwns", portId="CL2-B", hostGroupNumber=1)["data"][0]["hostWwn"] == "10000000c9a1b2c3"
    assert len(api.get("host-iscsis", portId="CL6-A")["data"]) == 1
