"""One storage system as a server: sessions, storages, pools, LDEVs, LU paths, jobs, errors, persistence.

Every test talks HTTPS to a real ``vspemu serve`` process.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import httpx
import pytest

from vspemu.client import ApiError, JobFailed, VspClient
from vspemu.lab import SystemProcess

ROOT = "/ConfigurationManager"


def session_headers(c: VspClient) -> dict[str, str]:
    return {"Authorization": f"Session {c.token}", "Content-Type": "application/json"}


def assert_error_body(r: httpx.Response, status: int, message_id: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    for key in ("errorSource", "messageId", "message", "solution", "solutionType", "detailCode"):
        assert key in body, body
    assert body["messageId"].startswith("KART")
    if message_id:
        assert body["messageId"] == message_id, body
    return body


# -- sessions -----------------------------------------------------------------------------------------
def test_version_needs_no_auth(system: SystemProcess) -> None:
    r = httpx.get(f"{system.rest_url}{ROOT}/configuration/version", verify=False)
    assert r.status_code == 200
    assert r.json()["apiVersion"]


def test_session_lifecycle(system: SystemProcess) -> None:
    c = system.client()
    assert isinstance(c.session_id, int) and c.token
    sessions = c.get("sessions")["data"]
    assert any(s["sessionId"] == c.session_id and s["userId"] == "maintenance" for s in sessions)
    one = c.get(f"sessions/{c.session_id}")
    assert one["sessionId"] == c.session_id and "lastAccessTime" in one
    token = c.token
    c.logout()
    r = httpx.get(f"{system.rest_url}{ROOT}/v1/objects/storages", verify=False,
                  headers={"Authorization": f"Session {token}"})
    body = assert_error_body(r, 401)
    assert "The specified token is invalid" in body["message"]


def test_bad_credentials_and_missing_token(system: SystemProcess) -> None:
    r = httpx.post(f"{system.rest_url}{ROOT}/v1/objects/sessions", auth=("maintenance", "wrong"), verify=False)
    assert "User authentication failed" in assert_error_body(r, 401)["message"]
    r = httpx.post(f"{system.rest_url}{ROOT}/v1/objects/sessions", auth=("nobody", "x"), verify=False)
    assert_error_body(r, 401)
    r = httpx.post(f"{system.rest_url}{ROOT}/v1/objects/sessions", verify=False)
    assert_error_body(r, 401)
    for headers in ({}, {"Authorization": "Session nope"}, {"Authorization": "Basic bWFpbnRlbmFuY2U6eA=="}):
        r = httpx.get(f"{system.rest_url}{ROOT}/v1/objects/ldevs", headers=headers, verify=False)
        assert "The specified token is invalid" in assert_error_body(r, 401)["message"]


def test_session_expires_after_alive_time(system: SystemProcess) -> None:
    c = system.client(alive_time=1)
    c.get("storages")
    time.sleep(0.6)
    c.get("storages")  # each use restarts the idle clock
    time.sleep(0.6)
    c.get("storages")
    time.sleep(1.5)
    with pytest.raises(ApiError) as e:
        c.get("storages")
    assert e.value.status == 401 and "The specified token is invalid" in e.value.message
    with pytest.raises(ApiError) as e:
        system.client(alive_time=301)
    assert e.value.status == 400


def test_session_limit_is_64(system: SystemProcess) -> None:
    clients = [system.client() for _ in range(64)]
    with pytest.raises(ApiError) as e:
        system.client()
    assert e.value.status == 503 and e.value.message_id == "KART40055-E"
    clients.pop().logout()
    system.client().logout()  # a slot is free again
    for c in clients:
        c.logout()


def test_resource_lock_is_per_session(system: SystemProcess) -> None:
    a, b = system.client(), system.client()
    job = a.request("PUT", "v1/services/resource-group-service/actions/lock/invoke",
                    json={"parameters": {"waitTime": 0}}, objects=False)
    assert a.wait_job(job)["state"] == "Succeeded"
    job = b.request("POST", f"v1/{b.storage_device_id}/services/resource-group-service/actions/lock/invoke",
                    json={"parameters": {"waitTime": 1}}, objects=False)
    with pytest.raises(JobFailed) as e:
        b.wait_job(job)
    assert e.value.message_id == "KART40050-E"
    a.logout()  # ending the session releases its lock
    job = b.request("POST", "v1/services/resource-group-service/actions/lock/invoke", objects=False)
    assert b.wait_job(job)["state"] == "Succeeded"
    job = b.request("PUT", "v1/services/resource-group-service/actions/unlock/invoke", objects=False)
    assert b.wait_job(job)["state"] == "Succeeded"


# -- storages and pools ---------------------------------------------------------------------------------
def test_storages_both_forms(system: SystemProcess, api: VspClient) -> None:
    data = api.get("storages")["data"]
    assert len(data) == 1
    s = data[0]
    assert s["storageDeviceId"] == system.storage_device_id == f"900000{system.serial:06d}"
    assert s["serialNumber"] == system.serial and s["model"] == "VSP 5500H"
    assert api.get("storages/instance")["storageDeviceId"] == s["storageDeviceId"]
    assert api.get(f"storages/{s['storageDeviceId']}")["serialNumber"] == system.serial
    with pytest.raises(ApiError) as e:
        api.get("storages/900000999999")
    assert e.value.status == 404
    with pytest.raises(ApiError) as e:
        api.get("storages/900000999999/ldevs/0")
    assert e.value.status == 404


def test_pool_tells_the_truth(api: VspClient) -> None:
    pools = api.get("pools")["data"]
    assert [p["poolId"] for p in pools] == [0]
    before = api.get("pools/0")
    assert before["numOfLdevs"] == 0 and before["totalPoolCapacity"] > 0
    api.create_ldev("64M")
    after = api.get("pools/0")
    assert after["numOfLdevs"] == 1 and after["totalLocatedCapacity"] == 64
    with pytest.raises(ApiError) as e:
        api.get("pools/7")
    assert e.value.status == 404


# -- LDEVs ----------------------------------------------------------------------------------------------
def test_ldev_create_get_label_expand_delete(system: SystemProcess, api: VspClient) -> None:
    ldev = api.create_ldev("10G")
    assert ldev == 0  # lowest free id
    info = api.get(f"ldevs/{ldev}")
    assert info["emulationType"] == "OPEN-V-CVS"
    assert info["blockCapacity"] == 10 * 2 * 1024 * 1024
    assert info["byteFormatCapacity"] == "10.00 G"
    assert info["numOfPorts"] == 0 and info["ports"] == [] and info["status"] == "NML"
    assert info["attributes"] == ["CVS", "HDP"] and info["poolId"] == 0 and info["numOfUsedBlock"] == 0
    # a sparse file: a 10 GiB LDEV costs no disk
    img = system.data_dir / "ldevs" / f"{ldev:05d}.img"
    assert img.stat().st_size == 10 << 30 and img.stat().st_blocks == 0
    assert api.create_ldev(2097152, ldev_id=5) == 5
    assert api.get("ldevs/5")["byteFormatCapacity"] == "1.00 G"
    assert api.create_ldev("512M") == 1
    assert api.create_ldev("1T") == 2
    assert api.get("ldevs/2")["byteFormatCapacity"] == "1.00 T"
    for method in ("PATCH", "PUT"):
        api.invoke(method, "ldevs/5", {"label": f"lbl-{method}"})
        assert api.get("ldevs/5")["label"] == f"lbl-{method}"
    for method in ("POST", "PUT"):
        api.invoke(method, "ldevs/5/actions/expand/invoke", {"parameters": {"additionalByteFormatCapacity": "1G"}})
    assert api.get("ldevs/5")["blockCapacity"] == 3 * 2097152
    job = api.invoke("DELETE", "ldevs/5")
    assert job["affectedResources"] == ["/ConfigurationManager/v1/objects/ldevs/5"]
    assert api.get("ldevs/5")["emulationType"] == "NOT DEFINED"
    assert not (system.data_dir / "ldevs" / "00005.img").exists()


def test_ldev_list_filters(api: VspClient) -> None:
    for ldev_id in (3, 4, 10):
        api.create_ldev("1G", ldev_id=ldev_id)
    api.add_lun(4)
    all_ = api.get("ldevs", headLdevId=0, count=6)["data"]
    assert [x["ldevId"] for x in all_] == [0, 1, 2, 3, 4, 5]
    assert [x["emulationType"] for x in all_][:4] == ["NOT DEFINED"] * 3 + ["OPEN-V-CVS"]
    assert [x["ldevId"] for x in api.get("ldevs", ldevOption="defined")["data"]] == [3, 4, 10]
    assert [x["ldevId"] for x in api.get("ldevs", ldevOption="defined", count=2)["data"]] == [3, 4]
    assert [x["ldevId"] for x in api.get("ldevs", ldevOption="luMapped")["data"]] == [4]
    assert [x["ldevId"] for x in api.get("ldevs", ldevOption="luUnmapped")["data"]] == [3, 10]
    assert [x["ldevId"] for x in api.get("ldevs", ldevOption="dpVolume", headLdevId=4)["data"]] == [4, 10]
    assert [x["ldevId"] for x in api.get("ldevs", ldevOption="undefined", count=4)["data"]] == [0, 1, 2, 5]
    assert [x["ldevId"] for x in api.get("ldevs", poolId=0)["data"]] == [3, 4, 10]
    assert api.get("ldevs", journalId=0)["data"] == []
    for bad in ({"count": 0}, {"count": 16385}, {"ldevOption": "bogus"}, {"headLdevId": -1}):
        with pytest.raises(ApiError) as e:
            api.get("ldevs", **bad)
        assert e.value.status == 400, bad


@pytest.mark.parametrize("body,status,message_id", [
    ({"poolId": 0, "byteFormatCapacity": "1G", "capacityInGB": 1}, 400, "KART40038-E"),
    ({"poolId": 0}, 400, "KART40037-E"),
    ({"byteFormatCapacity": "1G"}, 400, "KART40037-E"),
    ({"poolId": 0, "byteFormatCapacity": "1G", "blockCapacity": 2097152}, 400, "KART40037-E"),
    ({"poolId": 0, "byteFormatCapacity": "ten gigs"}, 400, "KART40039-E"),
    ({"poolId": 0, "byteFormatCapacity": "0G"}, 400, "KART40039-E"),
    ({"poolId": 0, "blockCapacity": "2097152"}, 400, "KART40039-E"),
    ({"poolId": 0, "blockCapacity": -5}, 400, "KART40039-E"),
    ({"poolId": 0, "byteFormatCapacity": "1G", "ldevId": 70000}, 400, "KART40039-E"),
    ({"poolId": 0, "byteFormatCapacity": "1G", "label": "x" * 33}, 400, "KART40039-E"),
    ({"poolId": 0, "byteFormatCapacity": "300T"}, 400, "KART40039-E"),
    ({"poolId": 3, "byteFormatCapacity": "1G"}, 404, "KART30013-E"),
    ([1, 2], 400, "KART40036-E"),
])
def test_ldev_create_refused(system: SystemProcess, api: VspClient, body: object, status: int,
                             message_id: str) -> None:
    r = api.raw("POST", "v1/objects/ldevs", json=body, headers=session_headers(api))
    err = assert_error_body(r, status, message_id)
    assert err["errorSource"] == "/ConfigurationManager/v1/objects/ldevs"
    assert api.get("ldevs", ldevOption="defined")["data"] == []  # nothing changed
    assert list((system.data_dir / "ldevs").iterdir()) == []


def test_malformed_json_and_wrong_methods(api: VspClient) -> None:
    h = session_headers(api)
    for content in (b"{", b"\xff\xfe", b'{"poolId": 0,,}', b"null", b'"x"'):
        r = api.raw("POST", "v1/objects/ldevs", content=content, headers=h)
        assert_error_body(r, 400)
    assert_error_body(api.raw("DELETE", "v1/objects/pools", headers=h), 405, "KART30001-E")
    assert_error_body(api.raw("GET", "v1/objects/no-such-thing", headers=h), 404, "KART30000-E")
    assert_error_body(api.raw("GET", "v1/objects/ldevs/abc", headers=h), 400)
    assert_error_body(api.raw("GET", "v1/objects/ldevs/99999", headers=h), 400)
    assert api.get("ldevs", ldevOption="defined")["data"] == []


def test_duplicate_and_missing_ldev(api: VspClient) -> None:
    api.create_ldev("1G", ldev_id=7)
    with pytest.raises(JobFailed) as e:
        api.create_ldev("1G", ldev_id=7)
    assert e.value.message_id == "KART40045-E"
    assert e.value.body["errorCode"] == {"SSB1": "2E22", "SSB2": "0001"}
    for method, path, body in (("DELETE", "ldevs/8", None), ("PATCH", "ldevs/8", {"label": "x"}),
                               ("POST", "ldevs/8/actions/expand/invoke",
                                {"parameters": {"additionalByteFormatCapacity": "1G"}})):
        with pytest.raises(ApiError) as e2:
            api.invoke(method, path, body)
        assert e2.value.status == 404 and e2.value.message_id == "KART30013-E"


# -- ports, host groups, LU paths ------------------------------------------------------------------------
def test_ports_host_groups_luns(api: VspClient) -> None:
    ports = {p["portId"]: p for p in api.get("ports")["data"]}
    assert {"CL1-A", "CL2-A", "CL3-A", "CL4-A"} <= set(ports)
    assert ports["CL1-A"]["portType"] == "FIBRE"
    hgs = api.get("host-groups", portId="CL1-A")["data"]
    assert [(h["hostGroupId"], h["hostGroupName"]) for h in hgs] == [("CL1-A,0", "1A-G00")]
    assert api.get("host-groups/CL2-A,0")["hostGroupName"] == "2A-G00"
    ldev = api.create_ldev("1G")
    lun_a = api.add_lun(ldev, "CL1-A")
    lun_b = api.add_lun(ldev, "CL2-A")
    assert lun_a == "CL1-A,0,0" and lun_b == "CL2-A,0,0"
    info = api.get(f"ldevs/{ldev}")
    assert info["numOfPorts"] == 2
    assert {(p["portId"], p["hostGroupNumber"], p["lun"]) for p in info["ports"]} == {
        ("CL1-A", 0, 0), ("CL2-A", 0, 0)}
    assert api.get(f"luns/{lun_a}")["ldevId"] == ldev
    assert [x["lunId"] for x in api.get("luns", portId="CL1-A", hostGroupNumber=0)["data"]] == [lun_a]
    with pytest.raises(JobFailed) as e:
        api.add_lun(ldev, "CL1-A")  # already mapped there
    assert e.value.status == 0 and e.value.message_id == "KART40044-E"
    with pytest.raises(ApiError) as e2:
        api.add_lun(ldev, "CL9-Z")
    assert e2.value.status == 404
    with pytest.raises(ApiError) as e2:
        api.add_lun(999, "CL1-A")
    assert e2.value.status == 404
    with pytest.raises(JobFailed) as e:
        api.delete_ldev(ldev)  # still mapped
    assert e.value.message_id == "KART40063-E"
    api.delete_lun(lun_a)
    api.delete_lun(lun_b)
    assert api.get(f"ldevs/{ldev}")["numOfPorts"] == 0
    api.delete_ldev(ldev)


# -- jobs -------------------------------------------------------------------------------------------------
def test_job_poll_mode_and_completed_header(system: SystemProcess, api: VspClient) -> None:
    job = api.request("POST", "ldevs", json={"poolId": 0, "byteFormatCapacity": "1G"})
    assert job["status"] in ("Initializing", "Running", "Completed")
    assert job["self"] == f"/ConfigurationManager/v1/objects/jobs/{job['jobId']}"
    assert job["request"]["requestMethod"] == "POST"
    done = api.job(job["jobId"])  # a configuration job is done by the first poll
    assert done["status"] == "Completed" and done["state"] == "Succeeded"
    assert done["affectedResources"] == ["/ConfigurationManager/v1/objects/ldevs/0"]
    assert done["completedTime"].endswith("Z")
    for value in ("Completed", "Completed;"):
        r = api.raw("POST", f"v1/objects/storages/{system.storage_device_id}/ldevs",
                    json={"poolId": 0, "byteFormatCapacity": "1G"},
                    headers={**session_headers(api), "Response-Job-Status": value, "Response-Max-Wait": "30"})
        assert r.status_code == 202
        body = r.json()
        assert body["status"] == "Completed" and body["state"] == "Succeeded"
        assert body["self"].startswith(f"/ConfigurationManager/v1/objects/storages/{system.storage_device_id}/jobs/")
        assert body["affectedResources"][0].startswith(
            f"/ConfigurationManager/v1/objects/storages/{system.storage_device_id}/ldevs/")
    jobs = api.get("jobs")["data"]
    assert {j["jobId"] for j in jobs} >= {1, 2, 3}
    with pytest.raises(ApiError) as e:
        api.job(99999)
    assert e.value.status == 404


def test_failed_job_carries_error(api: VspClient) -> None:
    api.create_ldev("1G", ldev_id=1)
    job = api.request("POST", "ldevs", json={"poolId": 0, "byteFormatCapacity": "1G", "ldevId": 1})
    job = api.job(job["jobId"])
    assert job["status"] == "Completed" and job["state"] == "Failed"
    err = job["error"]
    assert err["messageId"] == "KART40045-E" and err["message"] and err["solution"]


def test_fifty_concurrent_jobs(system: SystemProcess) -> None:
    clients = [system.client() for _ in range(5)]

    def make(i: int) -> int:
        return clients[i % 5].create_ldev("1G")

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        ids = list(pool.map(make, range(50)))
    assert sorted(ids) == list(range(50))
    assert len(clients[0].get("ldevs", ldevOption="defined", count=100)["data"]) == 50
    # and 50 jobs issued without waiting are all Completed when polled
    jobs = [clients[0].request("POST", "luns", json={"portId": "CL1-A", "hostGroupNumber": 0, "ldevId": i})
            for i in range(50)]
    done = [clients[0].wait_job(j, timeout=30) for j in jobs]
    assert {d["state"] for d in done} == {"Succeeded"}
    assert len(clients[0].get("luns", portId="CL1-A")["data"]) == 50


# -- persistence -------------------------------------------------------------------------------------------
def test_configuration_survives_kill_9(system: SystemProcess) -> None:
    c = system.client()
    a = c.create_ldev("2G", label="keep-me")
    b = c.create_ldev("1G", ldev_id=42)
    c.add_lun(a, "CL2-A")
    c.invoke("DELETE", f"ldevs/{b}")
    c.create_ldev("3G", ldev_id=43)
    system.kill()
    system.start()
    c = system.client()
    assert [x["ldevId"] for x in c.get("ldevs", ldevOption="defined")["data"]] == [a, 43]
    info = c.get(f"ldevs/{a}")
    assert info["label"] == "keep-me" and info["blockCapacity"] == 2 * 2097152 and info["numOfPorts"] == 1
    assert c.get("ldevs/43")["blockCapacity"] == 3 * 2097152
    # the account still works, and its password is not stored in plain text
    raw = (system.data_dir / "config.sqlite3").read_bytes()
    assert b"raid-maintenance" not in raw


def test_openapi_document(system: SystemProcess) -> None:
    r = httpx.get(f"{system.rest_url}{ROOT}/openapi.json", verify=False)
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert "/ConfigurationManager/v1/objects/ldevs" in paths
    assert "/ConfigurationManager/v1/objects/storages/{storageDeviceId}/ldevs" in paths
    assert "/ConfigurationManager/v1/objects/sessions" in paths


def test_ldev_data_survives_kill_9(system: SystemProcess) -> None:
    from vspemu.client.nbd import NbdClient

    c = system.client()
    ldev = c.create_ldev("64M")
    c.add_lun(ldev)
    blob = os.urandom(3 * 1024 * 1024 + 512)
    with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as n:
        n.write(12345 * 512, blob, fua=True)  # durable when acknowledged (FUA)
        n.write(40 * 1024 * 1024, b"flushed" * 512)
        n.flush()  # durable when the flush is acknowledged
    system.kill()
    system.start()
    with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as n:
        assert n.read(12345 * 512, len(blob)) == blob
        assert n.read(40 * 1024 * 1024, 7 * 512) == b"flushed" * 512
