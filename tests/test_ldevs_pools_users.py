"""LDEVs, pools, users and storage facts as the Ansible collection and Cinder send them (issue 16).

Every test talks HTTPS to a real ``vspemu serve`` process.
"""

from __future__ import annotations

import os
import sqlite3

import pytest

from vspemu.client import ApiError, JobFailed, VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess

MiB = 1 << 20


def config_rows(system: SystemProcess) -> list[tuple[object, ...]]:
    with sqlite3.connect(system.data_dir / "config.sqlite3") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return sorted((t, *row) for t in tables for row in db.execute(f"SELECT * FROM {t}"))  # noqa: S608


def refused(exc: pytest.ExceptionInfo[ApiError], status: int, text: str = "") -> dict[str, object]:
    body = exc.value.body
    assert body is not None and body["messageId"].startswith("KART"), exc.value
    if isinstance(exc.value, JobFailed):
        assert text in str(body), body
        return body
    assert exc.value.status == status, exc.value
    assert text in str(body), body
    return body


# -- LDEV create as the collection sends it ----------------------------------------------------------
def test_create_with_whole_number_float_block_capacity(api: VspClient) -> None:
    job = api.invoke("POST", "ldevs", {"poolId": 0, "blockCapacity": 3145728.0, "ldevId": 7})
    assert api.resource_id(job) == "7"
    ldev = api.get("ldevs/7")
    assert ldev["blockCapacity"] == 3145728 and ldev["byteFormatCapacity"] == "1.50 G"


def test_create_refuses_a_fractional_block_capacity(api: VspClient, system: SystemProcess) -> None:
    before = config_rows(system)
    for bad in (2097152.5, -1.0, 0.0, True):
        with pytest.raises(ApiError) as e:
            api.invoke("POST", "ldevs", {"poolId": 0, "blockCapacity": bad})
        refused(e, 400)
    r = api.raw("POST", "v1/objects/ldevs", content=b'{"poolId": 0, "blockCapacity": 2097152.5}',
                headers=api.headers())
    assert r.status_code == 400 and "blockCapacity" in r.json()["message"]
    assert config_rows(system) == before
    assert api.get("ldevs", ldevOption="defined")["data"] == []


def test_expand_takes_a_float_block_count(api: VspClient) -> None:
    ldev = api.create_ldev("8M")
    api.invoke("POST", f"ldevs/{ldev}/actions/expand/invoke",
               {"parameters": {"additionalBlockCapacity": 16384.0, "enhancedExpansion": True}})
    assert api.get(f"ldevs/{ldev}")["blockCapacity"] == 16384 + 16384
    with pytest.raises(ApiError) as e:
        api.invoke("POST", f"ldevs/{ldev}/actions/expand/invoke", {"parameters": {"additionalBlockCapacity": 1.5}})
    refused(e, 400)


# -- PATCH ldevs --------------------------------------------------------------------------------------
def test_patch_settings_are_stored_and_reported(api: VspClient, system: SystemProcess) -> None:
    ldev = api.create_ldev("8M")
    api.invoke("PATCH", f"ldevs/{ldev}", {"label": "db01", "isAluaEnabled": True,
                                          "dataReductionMode": "compression",
                                          "isFullAllocationEnabled": True,
                                          "isCompressionAccelerationEnabled": True,
                                          "dataReductionProcessMode": "post_process"})
    system.restart()
    with system.client() as c:
        v = c.get(f"ldevs/{ldev}")
    assert (v["label"], v["isAluaEnabled"], v["dataReductionMode"], v["isFullAllocationEnabled"],
            v["isCompressionAccelerationEnabled"], v["dataReductionProcessMode"]) == (
        "db01", True, "compression", True, True, "post_process")


def test_patch_refuses_unmodelled_fields_clearly(api: VspClient, system: SystemProcess) -> None:
    ldev = api.create_ldev("8M")
    before = config_rows(system)
    for body in ({"isRelocationEnabled": True}, {"tieringPolicy": {"tierLevel": 1}}, {"ssid": "0004"}):
        with pytest.raises(ApiError) as e:
            api.invoke("PATCH", f"ldevs/{ldev}", body)
        refused(e, 400, "The API is not supported for the specified storage system")
    for body in ({}, {"label": "x" * 33}, {"isAluaEnabled": "yes"}, {"nosuch": 1}):
        with pytest.raises(ApiError) as e:
            api.invoke("PATCH", f"ldevs/{ldev}", body)
        refused(e, 400)
    assert config_rows(system) == before


# -- actions --------------------------------------------------------------------------------------------
def test_block_then_format_zeroes_the_volume(api: VspClient, system: SystemProcess) -> None:
    ldev = api.create_ldev("16M")
    api.add_lun(ldev)
    with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as c:
        c.write(0, os.urandom(4 * MiB))
        c.flush()
    path = system.data_dir / "ldevs" / f"{ldev:05d}.img"
    assert os.stat(path).st_blocks * 512 >= 4 * MiB
    with pytest.raises(ApiError) as e:  # not blocked
        api.invoke("POST", f"ldevs/{ldev}/actions/format/invoke", {"parameters": {"operationType": "QFMT"}})
    refused(e, 412, "block it")
    api.invoke("POST", f"ldevs/{ldev}/actions/change-status/invoke", {"parameters": {"status": "blk"}})
    assert api.get(f"ldevs/{ldev}")["status"] == "BLK"
    with pytest.raises(Exception):  # a blocked LDEV is not exported  # noqa: B017
        with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as c:
            c.read(0, 512)
    api.invoke("POST", f"ldevs/{ldev}/actions/format/invoke",
               {"parameters": {"operationType": "FMT", "isDataReductionForceFormat": False}})
    assert api.get(f"ldevs/{ldev}")["status"] == "NML"
    assert os.stat(path).st_blocks == 0  # one hole: nothing allocated
    with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as c:
        assert c.read(0, 4 * MiB) == bytes(4 * MiB)
    assert api.get(f"ldevs/{ldev}")["numOfUsedBlock"] == 0


def test_blocked_state_survives_restart_and_nml_restores(api: VspClient, system: SystemProcess) -> None:
    ldev = api.create_ldev("8M")
    api.invoke("POST", f"ldevs/{ldev}/actions/change-status/invoke", {"parameters": {"status": "blk"}})
    system.restart()
    with system.client() as c:
        assert c.get(f"ldevs/{ldev}")["status"] == "BLK"
        c.invoke("POST", f"ldevs/{ldev}/actions/change-status/invoke", {"parameters": {"status": "nml"}})
        c.add_lun(ldev)
        with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as n:
            assert n.read(0, 512) == bytes(512)
        with pytest.raises(ApiError) as e:
            c.invoke("POST", f"ldevs/{ldev}/actions/change-status/invoke", {"parameters": {"status": "off"}})
        refused(e, 400)


def test_set_qos_is_stored_and_reported(api: VspClient, system: SystemProcess) -> None:
    ldev = api.create_ldev("8M")
    for key, value in (("upperIops", 5000), ("lowerIops", 1000), ("responsePriority", 2)):
        api.invoke("POST", f"ldevs/{ldev}/actions/set-qos/invoke", {"parameters": {key: value}})
    got = api.get("ldevs", headLdevId=ldev, count=1, detailInfoType="qos")["data"][0]["qos"]
    assert (got["upperIops"], got["lowerIops"], got["responsePriority"], got["upperTransferRate"]) == (
        5000, 1000, 2, -1)
    assert api.get(f"ldevs/{ldev}", detailInfoType="qos")["qos"]["upperIops"] == 5000
    before = config_rows(system)
    for params in ({"lowerIops": 6000}, {"upperIops": 5}, {"responsePriority": 9}, {}, {"nosuch": 1}):
        with pytest.raises(ApiError) as e:
            api.invoke("POST", f"ldevs/{ldev}/actions/set-qos/invoke", {"parameters": params})
        refused(e, 400)
    assert config_rows(system) == before


def test_discard_zero_page_is_accepted(api: VspClient) -> None:
    ldev = api.create_ldev("8M")
    job = api.invoke("POST", f"ldevs/{ldev}/actions/discard-zero-page/invoke")
    assert job["state"] == "Succeeded"
    with pytest.raises(ApiError) as e:
        api.invoke("POST", "ldevs/4000/actions/discard-zero-page/invoke")
    refused(e, 404)


def test_pair_volume_refuses_format_and_block(linked: tuple[SystemProcess, SystemProcess, VspClient,
                                                            VspClient]) -> None:
    p, s, pc, sc = linked
    pv, sv = pc.create_ldev("8M"), sc.create_ldev("8M")
    pc.add_lun(pv)
    sc.add_lun(sv)
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": "fmt", "copyPairName": "p1", "replicationType": "TC",
        "remoteStorageDeviceId": sc.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True}, remote=sc)
    before = config_rows(p)
    for body, action in (({"parameters": {"status": "blk"}}, "change-status"),
                         ({"parameters": {"operationType": "QFMT"}}, "format")):
        with pytest.raises(ApiError) as e:
            pc.invoke("POST", f"ldevs/{pv}/actions/{action}/invoke", body)
        refused(e, 412, "P-VOL")
    assert config_rows(p) == before


# -- pools ----------------------------------------------------------------------------------------------
def test_pool_create_expand_delete(api: VspClient, system: SystemProcess) -> None:
    vols = [api.create_ldev("64M") for _ in range(3)]
    api.invoke("POST", "pools", {"poolId": 5, "poolName": "p5", "poolType": "DP", "ldevIds": vols[:2],
                                 "warningThreshold": 60, "depletionThreshold": 75})
    pool = api.get("pools/5")
    assert (pool["poolName"], pool["poolType"], pool["totalPoolCapacity"], pool["warningThreshold"]) == (
        "p5", "HDP", 128, 60)
    assert api.get(f"ldevs/{vols[0]}")["attributes"] == ["CVS", "POOL"]
    assert [x["ldevId"] for x in api.get("ldevs", poolId=5, ldevOption="dpVolume")["data"]] == []
    api.invoke("POST", "pools/5/actions/expand/invoke", {"parameters": {"ldevIds": [vols[2]]}})
    assert api.get("pools/5")["totalPoolCapacity"] == 192
    # a DP volume in the new pool: what it uses is what its file really holds
    dp = api.create_ldev("32M", pool_id=5)
    api.add_lun(dp)
    assert api.get("pools/5")["availableVolumeCapacity"] == 192
    with NbdClient("127.0.0.1", system.nbd_port, str(dp)) as c:
        c.write(0, os.urandom(8 * MiB))
        c.flush()
    pool = api.get("pools/5")
    assert 184 - 1 <= pool["availableVolumeCapacity"] <= 184 and pool["totalLocatedCapacity"] == 32
    # pool volumes are in use: no delete, no LU path, not twice in a pool
    before = config_rows(system)
    for method, path, body in (("DELETE", f"ldevs/{vols[0]}", None),
                               ("POST", "luns", {"portId": "CL1-A", "hostGroupNumber": 0, "ldevId": vols[0]}),
                               ("POST", "pools", {"poolName": "again", "ldevIds": [vols[1]]}),
                               ("DELETE", "pools/5", None),  # it has a DP volume
                               ("DELETE", "pools/0", None)):
        with pytest.raises(ApiError) as e:
            api.invoke(method, path, body)
        refused(e, 412)
    assert config_rows(system) == before
    api.delete_lun(f"CL1-A,0,{api.get(f'ldevs/{dp}')['ports'][0]['lun']}")
    api.delete_ldev(dp)
    system.restart()
    with system.client() as c:
        assert c.get("pools/5")["totalPoolCapacity"] == 192
        c.invoke("DELETE", "pools/5")
        with pytest.raises(ApiError) as e:
            c.get("pools/5")
        refused(e, 404)
        assert "POOL" not in c.get(f"ldevs/{vols[0]}")["attributes"]
        c.delete_ldev(vols[0])  # an ordinary LDEV again
        assert [p["poolId"] for p in c.get("pools", detailInfoType="FMC,tierPhysicalCapacity,efficiency,"
                                                                    "formattedCapacity,autoAddPoolVol")["data"]] == [0]


def test_pool_create_refusals_change_nothing(api: VspClient, system: SystemProcess) -> None:
    a = api.create_ldev("8M")
    mapped = api.create_ldev("8M")
    api.add_lun(mapped)
    before = config_rows(system)
    for body in ({"poolName": "x", "ldevIds": [a, mapped]},  # one is mapped: none is taken
                 {"poolName": "x", "ldevIds": [a, 4000]},
                 {"poolName": "x", "ldevIds": [a, a]},
                 {"poolName": "x", "poolId": 0, "ldevIds": [a]},
                 {"poolName": "vspemu-pool0", "ldevIds": [a]},
                 {"poolName": "x"},
                 {"poolName": "x", "ldevIds": [a], "poolType": "HTI"},
                 {"poolName": "x", "ldevIds": [a], "warningThreshold": 90, "depletionThreshold": 80},
                 {"poolName": "", "ldevIds": [a]}):
        with pytest.raises(ApiError) as e:
            api.invoke("POST", "pools", body)
        refused(e, 400 if "poolType" in body or "ldevIds" not in body or not body["poolName"] else 412)
    assert config_rows(system) == before
    assert [p["poolId"] for p in api.get("pools")["data"]] == [0]


# -- storage facts ---------------------------------------------------------------------------------------
def test_total_capacities_follow_real_use(api: VspClient, system: SystemProcess) -> None:
    first = api.get("total-capacities/instance")
    assert first["total"]["totalCapacity"] > 0 and first["total"]["freeSpace"] > 0
    ldev = api.create_ldev("64M")
    api.add_lun(ldev)
    with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as c:
        c.write(0, os.urandom(16 * MiB))
        c.flush()
    pool0 = api.get("pools/0")
    assert pool0["totalLocatedCapacity"] == 64
    scoped = api.get(f"storages/{api.storage_device_id}/total-capacities/instance")
    assert set(scoped) >= {"internal", "external", "total"}


def test_unmodelled_apis_answer_not_supported_and_unknown_objects_404(api: VspClient) -> None:
    for path in ("total-efficiencies/instance", "date-times/instance", "time-zones", "nvm-subsystems"):
        with pytest.raises(ApiError) as e:
            api.get(path)
        refused(e, 400, "The API is not supported for the specified storage system")
    syslog = api.get("auditlog-syslog-servers/instance")
    assert syslog["primarySyslogServer"]["isEnabled"] is False
    for path in ("pools/9", "users/nobody", "user-groups/nogroup", "no-such-objects"):
        with pytest.raises(ApiError) as e:
            api.get(path)
        refused(e, 404)


# -- users ------------------------------------------------------------------------------------------------
def test_user_groups_are_the_built_in_ones(api: VspClient) -> None:
    names = {g["userGroupId"] for g in api.get("user-groups")["data"]}
    assert {"Administrator User Group", "Storage Administrator (View Only) User Group",
            "Storage Administrator (View & Modify) User Group"} <= names
    admin = api.get("user-groups/Administrator User Group")
    assert admin["users"] == ["maintenance"] and admin["isBuiltIn"]
    with pytest.raises(ApiError) as e:
        api.invoke("POST", "user-groups", {"userGroupName": "mine", "roleNames": []})
    refused(e, 400, "not supported")


def test_factory_password_changed_through_the_api_survives_restart(api: VspClient,
                                                                   system: SystemProcess) -> None:
    me = api.get("users/maintenance")
    assert me["isBuiltIn"] and me["userGroupNames"] == ["Administrator User Group"]
    api.invoke("PATCH", "users/maintenance", {"userPassword": "N3w-secret!"})
    rows = str(config_rows(system))
    assert "N3w-secret!" not in rows and "raid-maintenance" not in rows
    system.password = "N3w-secret!"
    system.restart()
    with pytest.raises(ApiError) as e:
        VspClient(system.rest_url, verify=str(system.cert_path), password="raid-maintenance")
    assert e.value.status == 401
    with system.client() as c:
        assert c.get("users/maintenance")["userId"] == "maintenance"
        with pytest.raises(ApiError) as e2:  # too short: refused, nothing changed
            c.invoke("PATCH", "users/maintenance", {"userPassword": "abc"})
        refused(e2, 400)
    with system.client():
        pass


def test_new_users_roles_and_view_only_refusal(api: VspClient, system: SystemProcess) -> None:
    api.invoke("POST", "users", {"userId": "ops", "authentication": "local", "userPassword": "ops-pass1",
                                 "userGroupNames": ["Storage Administrator (View & Modify) User Group"]})
    api.invoke("POST", "users", {"userId": "audit", "authentication": "local", "userPassword": "audit-pass1",
                                 "userGroupNames": ["Storage Administrator (View Only) User Group"]})
    assert sorted(u["userId"] for u in api.get("users")["data"]) == ["audit", "maintenance", "ops"]
    url, cert = system.rest_url, str(system.cert_path)
    with VspClient(url, user="ops", password="ops-pass1", verify=cert) as ops:
        ldev = ops.create_ldev("8M")  # modify: allowed
        with pytest.raises(ApiError) as e:  # managing users needs the security role
            ops.invoke("POST", "users", {"userId": "x1", "userPassword": "x-pass-1",
                                         "userGroupNames": ["Administrator User Group"]})
        refused(e, 403)
        ops.invoke("PATCH", "users/ops", {"userPassword": "ops-pass2"})  # one's own password: allowed
    before = config_rows(system)
    with VspClient(url, user="audit", password="audit-pass1", verify=cert) as audit:
        assert audit.get(f"ldevs/{ldev}")["ldevId"] == ldev  # view: allowed
        for method, path, body in (("POST", "ldevs", {"poolId": 0, "byteFormatCapacity": "8M"}),
                                   ("DELETE", f"ldevs/{ldev}", None),
                                   ("PATCH", f"ldevs/{ldev}", {"label": "no"}),
                                   ("POST", "pools", {"poolName": "x", "ldevIds": [ldev]}),
                                   ("PATCH", "users/ops", {"userPassword": "stolen-1"}),
                                   ("DELETE", "users/ops", None)):
            with pytest.raises(ApiError) as e:
                audit.invoke(method, path, body)
            body_ = refused(e, 403)
            assert body_["messageId"] == "KART40049-E"
        assert config_rows(system) == before
    # groups: add / remove; the built-in account keeps its group; deleting a user ends it
    api.invoke("POST", "users/audit/actions/add-user-group/invoke",
               {"parameters": {"userGroupNames": ["Storage Administrator (View & Modify) User Group"]}})
    assert len(api.get("users/audit")["userGroupNames"]) == 2
    api.invoke("POST", "users/audit/actions/remove-user-group/invoke",
               {"parameters": {"userGroupNames": ["Storage Administrator (View Only) User Group"]}})
    assert api.get("users/audit")["userGroupNames"] == ["Storage Administrator (View & Modify) User Group"]
    for method, path, body in (("DELETE", "users/maintenance", None),
                               ("POST", "users", {"userId": "ops", "userPassword": "ops-pass1",
                                                  "userGroupNames": ["Administrator User Group"]}),
                               ("POST", "users", {"userId": "y", "userPassword": "y-pass-1",
                                                  "userGroupNames": ["No Such Group"]}),
                               ("POST", "users", {"userId": "bad/name", "userPassword": "y-pass-1",
                                                  "userGroupNames": ["Administrator User Group"]})):
        with pytest.raises(ApiError):
            api.invoke(method, path, body)
    api.invoke("DELETE", "users/ops")
    with pytest.raises(ApiError) as e:
        VspClient(url, user="ops", password="ops-pass2", verify=cert)
    assert e.value.status == 401
