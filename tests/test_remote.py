"""Remote storage registration, Remote-Authorization, remote path groups and their live status.

Every test runs real ``vspemu serve`` processes that talk to each other over REST and the link.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from vspemu.client import ApiError, VspClient
from vspemu.lab import SystemProcess, free_port

MakeSystem = Callable[..., SystemProcess]
ROOT = "/ConfigurationManager"


def rs_body(remote: SystemProcess, **kw: Any) -> dict[str, Any]:
    return {"storageDeviceId": remote.storage_device_id, "restServerIp": remote.host,
            "restServerPort": remote.rest_port, **kw}


def post_remote(c: VspClient, body: dict[str, Any], remote_header: str | None) -> httpx.Response:
    headers = c.headers()
    if remote_header is not None:
        headers["Remote-Authorization"] = remote_header
    return c.raw("POST", "v1/objects/remote-storages", json=body, headers=headers)


def kinds(c: VspClient) -> dict[str, str]:
    return {r["storageDeviceId"]: r["dkcType"] for r in c.get("remote-storages")["data"]}


def peers(c: VspClient) -> list[str]:
    return [p["storageDeviceId"] for p in c.private("GET", "link/paths")["peers"]]


def assert_error(r: httpx.Response, status: int, message_id: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["messageId"] == message_id, body
    assert {"errorSource", "message", "solution", "solutionType", "detailCode"} <= set(body)
    return body


@pytest.fixture
def two(make_system: MakeSystem) -> tuple[SystemProcess, SystemProcess, VspClient, VspClient]:
    p, s = make_system(), make_system()
    return p, s, p.client(), s.client()


# -- registration ----------------------------------------------------------------------------------------
def test_mutual_registration_lists_local_and_remote(two: tuple[SystemProcess, SystemProcess, VspClient,
                                                               VspClient]) -> None:
    p, s, cp, cs = two
    assert kinds(cp) == {p.storage_device_id: "Local"}
    job = cp.register_remote(cs, mutual=True)
    assert job["affectedResources"][0].endswith(f"/remote-storages/{s.storage_device_id}")
    assert kinds(cp) == {p.storage_device_id: "Local", s.storage_device_id: "Remote"}
    assert kinds(cs) == {s.storage_device_id: "Local", p.storage_device_id: "Remote"}
    local = next(r for r in cp.get("remote-storages")["data"] if r["dkcType"] == "Local")
    assert local["serialNumber"] == p.serial and local["model"] and local["restServerPort"] == p.rest_port
    assert local["communicationModes"] == [{"communicationMode": "lanConnectionMode"}]
    one = cp.get(f"remote-storages/{s.storage_device_id}")
    assert one["serialNumber"] == s.serial and one["restServerPort"] == s.rest_port and one["dkcType"] == "Remote"
    assert cp.get(f"remote-storages/{p.storage_device_id}")["dkcType"] == "Local"
    scoped = cp.request("GET", f"storages/{p.storage_device_id}/remote-storages")
    assert len(scoped["data"]) == 2
    # already registered, on either side
    r = post_remote(cp, rs_body(s), f"Session {cs.token}")
    assert_error(r, 409, "KART40045-E")
    r = post_remote(cs, rs_body(p), f"Session {cp.token}")
    assert_error(r, 409, "KART40045-E")
    with pytest.raises(ApiError) as e:
        cp.get("remote-storages/900000999999")
    assert e.value.status == 404


def test_registration_in_both_directions(two: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, cp, cs = two
    cp.register_remote(cs, mutual=False)
    assert kinds(cp) == {p.storage_device_id: "Local", s.storage_device_id: "Remote"}
    assert kinds(cs) == {s.storage_device_id: "Local"}  # not mutual: not listed there
    cs.register_remote(cp, mutual=False)
    assert kinds(cs) == {s.storage_device_id: "Local", p.storage_device_id: "Remote"}
    # the link secret is the same on both sides: path groups work both ways
    g1 = cp.create_path_group(cs, 1, "CL3-A", "CL3-B")
    g2 = cs.create_path_group(cp, 2, "CL3-B", "CL3-A")
    cp.wait_path_status(g1, timeout=10)
    cs.wait_path_status(g2, timeout=10)
    assert cp.link_test(s.serial, 1, size=65536, count=20, concurrency=5)["succeeded"] == 20
    assert cs.link_test(p.serial, 2, size=65536, count=20, concurrency=5)["succeeded"] == 20


def test_remote_authorization_missing_or_invalid(two: tuple[SystemProcess, SystemProcess, VspClient,
                                                             VspClient]) -> None:
    p, s, cp, cs = two
    assert_error(post_remote(cp, rs_body(s), None), 400, "KART40060-E")
    assert_error(post_remote(cp, rs_body(s), "Basic abc"), 400, "KART40060-E")
    assert_error(post_remote(cp, rs_body(s), "Session not-a-token"), 401, "KART40061-E")
    assert_error(post_remote(cp, rs_body(s), f"Session {cp.token}"), 401, "KART40061-E")  # a local token
    # nothing changed on either side
    assert kinds(cp) == {p.storage_device_id: "Local"} and kinds(cs) == {s.storage_device_id: "Local"}
    assert peers(cp) == [] and peers(cs) == []
    # the same for DELETE
    cp.register_remote(cs)
    r = cp.raw("DELETE", f"v1/objects/remote-storages/{s.storage_device_id}", json={"isMutualDeletion": True},
               headers=cp.headers())
    assert_error(r, 400, "KART40060-E")
    headers = {**cp.headers(), "Remote-Authorization": "Session 0123"}
    r = cp.raw("DELETE", f"v1/objects/remote-storages/{s.storage_device_id}", json={"isMutualDeletion": True},
               headers=headers)
    assert_error(r, 401, "KART40061-E")
    assert s.storage_device_id in kinds(cp) and p.storage_device_id in kinds(cs)


def test_registration_refused(two: tuple[SystemProcess, SystemProcess, VspClient, VspClient],
                              make_system: MakeSystem) -> None:
    p, s, cp, cs = two
    remote = f"Session {cs.token}"
    # unreachable REST server
    r = post_remote(cp, {**rs_body(s), "restServerPort": free_port()}, remote)
    assert_error(r, 412, "KART40065-E")
    # itself: by id, and by pointing at its own REST server with its own token
    assert_error(post_remote(cp, rs_body(p), f"Session {cp.token}"), 400, "KART40101-E")
    r = post_remote(cp, {**rs_body(p), "storageDeviceId": s.storage_device_id}, f"Session {cp.token}")
    assert_error(r, 400, "KART40101-E")
    # another storage system answers at that address
    r = post_remote(cp, {**rs_body(s), "storageDeviceId": "900000999999"}, remote)
    assert_error(r, 412, "KART40102-E")
    # request shape
    assert_error(post_remote(cp, {**rs_body(s), "extra": 1}, remote), 400, "KART40038-E")
    assert_error(post_remote(cp, {"restServerIp": "127.0.0.1"}, remote), 400, "KART40037-E")
    r = post_remote(cp, {**rs_body(s), "storageDeviceId": "nonsense1234"}, remote)
    assert_error(r, 400, "KART40039-E")
    assert kinds(cp) == {p.storage_device_id: "Local"} and kinds(cs) == {s.storage_device_id: "Local"}
    assert peers(cp) == [] and peers(cs) == []


def test_delete_registration(two: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, cp, cs = two
    cp.register_remote(cs, mutual=True)
    gid = cp.create_path_group(cs, 0)
    # refused while a path group uses it
    with pytest.raises(ApiError) as e:
        cp.unregister_remote(cs, mutual=True)
    assert e.value.message_id == "KART40063-E"
    # and mutual deletion is refused while the remote has path groups to us
    gid_back = cs.create_path_group(cp, 0)
    cp.invoke("DELETE", f"remotepath-groups/{gid}")
    with pytest.raises(ApiError) as e:
        cp.unregister_remote(cs, mutual=True)
    assert e.value.message_id == "KART40063-E"
    assert p.storage_device_id in kinds(cs) and s.storage_device_id in kinds(cp)
    cs.invoke("DELETE", f"remotepath-groups/{gid_back}")
    job = cp.unregister_remote(cs, mutual=True)
    assert job["state"] == "Succeeded"
    assert kinds(cp) == {p.storage_device_id: "Local"} and kinds(cs) == {s.storage_device_id: "Local"}
    assert peers(cp) == [] and peers(cs) == []
    # without mutual deletion the other side keeps its registration (and the link secret)
    cp.register_remote(cs, mutual=True)
    cp.unregister_remote(cs, mutual=False)
    assert kinds(cp) == {p.storage_device_id: "Local"}
    assert kinds(cs) == {s.storage_device_id: "Local", p.storage_device_id: "Remote"}
    gid = cs.create_path_group(cp, 3)
    cs.wait_path_status(gid, timeout=10)  # the secondary's paths to the primary still authenticate


# -- remote path groups ----------------------------------------------------------------------------------
def test_path_group_api(two: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, cp, cs = two
    base = {"remoteSerialNumber": str(s.serial), "remoteStorageTypeId": "R9", "pathGroupId": 5,
            "localPortId": "CL3-A", "remotePortId": "CL3-A"}
    with pytest.raises(ApiError) as e:  # not registered yet
        cp.invoke("POST", "remotepath-groups", base)
    assert e.value.status == 404
    cp.register_remote(cs)
    job = cp.invoke("POST", "remotepath-groups", base)
    gid = VspClient.resource_id(job)
    assert gid == f"{s.serial},R9,5"
    g = cp.get(f"remotepath-groups/{gid}")
    assert g["remoteStorageDeviceId"] == s.storage_device_id and g["remoteSerialNumber"] == str(s.serial)
    assert g["pathGroupId"] == 5 and g["numOfPaths"] == 1 and g["timeoutValueForRemoteIOInSeconds"] == 15
    assert g["remotePaths"] == [{"cuType": "REMOTE", "portType": "FIBRE", "pathNumber": 0, "localPortId": "CL3-A",
                                 "remotePortId": "CL3-A", "pathStatus": "NML_01"}]
    assert [x["remotepathGroupId"] for x in cp.get("remotepath-groups")["data"]] == [gid]
    # refusals
    for body, status, mid in [
        (base, 409, "KART40045-E"),
        ({**base, "pathGroupId": 6, "localPortId": "CL1-A"}, 400, "KART40039-E"),
        ({**base, "pathGroupId": 6, "remotePortId": "CL1-A"}, 400, "KART40039-E"),
        ({**base, "pathGroupId": 6, "localPortId": "CL9-Z"}, 404, "KART30013-E"),
        ({**base, "pathGroupId": 6, "remoteStorageTypeId": "M8"}, 400, "KART40039-E"),
        ({**base, "pathGroupId": 256}, 400, "KART40039-E"),
        ({**base, "remoteSerialNumber": "123"}, 404, "KART30013-E"),
        ({**base, "bogus": 1}, 400, "KART40038-E"),
    ]:
        r = cp.raw("POST", "v1/objects/remotepath-groups", json=body, headers=cp.headers())
        assert_error(r, status, mid)
    # PATCH
    cp.invoke("PATCH", f"remotepath-groups/{gid}", {"timeoutValueForRemoteIOInSeconds": 10,
                                                    "roundTripTimeInMilliSeconds": 20, "minNumOfPaths": 2})
    g = cp.get(f"remotepath-groups/{gid}")
    assert (g["timeoutValueForRemoteIOInSeconds"], g["roundTripTimeInMilliSeconds"], g["minNumOfPaths"]) == (10, 20, 2)
    for bad in ({"timeoutValueForRemoteIOInSeconds": 9}, {"timeoutValueForRemoteIOInSeconds": 81},
                {"roundTripTimeInMilliSeconds": 0}, {"minNumOfPaths": 9}):
        r = cp.raw("PATCH", f"v1/objects/remotepath-groups/{gid}", json=bad, headers=cp.headers())
        assert_error(r, 400, "KART40039-E")
    # add / remove paths (POST and PUT)
    cp.add_remote_path(gid, "CL4-A", "CL4-A")
    cp.invoke("PUT", f"remotepath-groups/{gid}/actions/add-remotepath/invoke",
              {"parameters": {"localPortId": "CL3-B", "remotePortId": "CL4-B"}})
    cp.wait_path_status(gid, timeout=10)
    g = cp.get(f"remotepath-groups/{gid}")
    assert [(x["localPortId"], x["remotePortId"]) for x in g["remotePaths"]] == [
        ("CL3-A", "CL3-A"), ("CL4-A", "CL4-A"), ("CL3-B", "CL4-B")]
    r = cp.raw("POST", f"v1/objects/remotepath-groups/{gid}/actions/add-remotepath/invoke",
               json={"parameters": {"localPortId": "CL4-A", "remotePortId": "CL4-A"}}, headers=cp.headers())
    assert_error(r, 409, "KART40045-E")
    cp.remove_remote_path(gid, "CL4-A", "CL4-A")
    cp.remove_remote_path(gid, "CL3-B", "CL4-B")
    with pytest.raises(ApiError) as e:
        cp.remove_remote_path(gid, "CL3-B", "CL4-B")
    assert e.value.message_id == "KART30013-E"
    with pytest.raises(ApiError) as e:
        cp.remove_remote_path(gid, "CL3-A", "CL3-A")  # the last one
    assert e.value.message_id == "KART40062-E"
    for bad_id in ("1,2", "x,R9,5", f"{s.serial},R9,x"):
        r = cp.raw("GET", f"v1/objects/remotepath-groups/{bad_id}", headers=cp.headers())
        assert r.status_code == 400, r.text
    # persistence: a restart brings the path group back, connected
    p.restart()
    cp = p.client()
    cp.wait_path_status(gid, timeout=10)
    g = cp.get(f"remotepath-groups/{gid}")
    assert g["timeoutValueForRemoteIOInSeconds"] == 10 and g["numOfPaths"] == 1
    cp.invoke("DELETE", f"remotepath-groups/{gid}")
    assert cp.get("remotepath-groups")["data"] == []
    with pytest.raises(ApiError) as e:
        cp.get(f"remotepath-groups/{gid}")
    assert e.value.status == 404


def test_two_paths_survive_one_remote_port_going_offline(
        two: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, cp, cs = two
    cp.register_remote(cs)
    gid = cp.create_path_group(cs, 0, "CL3-A", "CL3-A")
    cp.add_remote_path(gid, "CL4-A", "CL4-A")
    cp.wait_path_status(gid, timeout=10)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, p.client() as c2:
        fut = pool.submit(c2.link_test, s.serial, 0, 1 << 20, 300, 16)
        time.sleep(0.3)
        cs.set_link_port("CL3-A", False)  # the remote port stops listening, its connections drop
        result = fut.result(timeout=120)
    assert result["succeeded"] == 300, result
    statuses = dict(zip(["CL3-A", "CL4-A"], cp.path_statuses(gid), strict=True))
    assert statuses["CL4-A"] == "NML_01" and statuses["CL3-A"].startswith("ERR_"), statuses
    assert cp.link_test(s.serial, 0, 4096, 50, 10)["remotePorts"] == {"CL4-A": 50}
    cs.set_link_port("CL3-A", True)
    cp.wait_path_status(gid, timeout=10)


@pytest.mark.e2e
def test_third_system_two_remotes_at_once(make_system: MakeSystem) -> None:
    a, b, c = make_system(), make_system(), make_system()
    ca, cb, cc = a.client(), b.client(), c.client()
    jobs = [ca.invoke("POST", "remote-storages", {"storageDeviceId": x.storage_device_id, "restServerIp": x.host,
                                                  "restServerPort": x.rest_port}, remote=cx, wait=False)
            for x, cx in ((b, cb), (c, cc))]
    for job in jobs:
        ca.wait_job(job)
    assert set(kinds(ca).values()) == {"Local", "Remote"} and len(kinds(ca)) == 3
    assert len(kinds(cb)) == 2 and len(kinds(cc)) == 2
    g_b = ca.create_path_group(cb, 0, "CL3-A", "CL3-A")
    g_c = ca.create_path_group(cc, 0, "CL3-A", "CL3-A")  # same local port, other remote
    ca.add_remote_path(g_c, "CL4-A", "CL4-B")
    for gid in (g_b, g_c):
        ca.wait_path_status(gid, timeout=10)
    assert ca.link_test(b.serial, 0, 65536, 30, 10)["succeeded"] == 30
    assert ca.link_test(c.serial, 0, 65536, 30, 10)["succeeded"] == 30
    # b and c know nothing of each other
    assert c.storage_device_id not in kinds(cb)


@pytest.mark.e2e
def test_killed_remote_shows_in_path_status_and_recovers(
        two: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, cp, cs = two
    cp.register_remote(cs)
    gid = cp.create_path_group(cs, 0, "CL3-A", "CL3-A")
    cp.invoke("PATCH", f"remotepath-groups/{gid}", {"timeoutValueForRemoteIOInSeconds": 10})
    cp.wait_path_status(gid, timeout=10)
    s.kill()
    start = time.monotonic()
    while cp.path_statuses(gid) == ["NML_01"]:
        assert time.monotonic() - start < 10, "path still NML_01 after timeoutValueForRemoteIOInSeconds"
        time.sleep(0.1)
    assert cp.path_statuses(gid)[0] in ("ERR_02", "ERR_13"), cp.path_statuses(gid)
    down = cp.link_test(s.serial, 0, 16, 1)
    assert down["failed"] == 1 and down["errors"][0].startswith("LinkDown"), down
    s.start()
    cp.wait_path_status(gid, timeout=10)
    assert cp.link_test(s.serial, 0, 4096, 10)["succeeded"] == 10


@pytest.mark.e2e
def test_hung_remote_detected_within_timeout(two: tuple[SystemProcess, SystemProcess, VspClient,
                                                        VspClient]) -> None:
    p, s, cp, cs = two
    cp.register_remote(cs)
    gid = cp.create_path_group(cs, 0, "CL3-A", "CL3-A")
    cp.invoke("PATCH", f"remotepath-groups/{gid}", {"timeoutValueForRemoteIOInSeconds": 10})
    cp.wait_path_status(gid, timeout=10)
    s.pause()  # SIGSTOP: TCP stays open, nothing answers
    try:
        start = time.monotonic()
        while cp.path_statuses(gid) == ["NML_01"]:
            assert time.monotonic() - start < 10, "hung peer not detected within the time-out"
            time.sleep(0.1)
        assert cp.path_statuses(gid)[0] in ("ERR_03", "ERR_02"), cp.path_statuses(gid)
    finally:
        s.resume()
    cp.wait_path_status(gid, timeout=15)


def _storages_served(system: SystemProcess, client: VspClient) -> float:
    """GET storages answered by ``system`` so far (its /metrics): how often another system checked a token."""
    import ssl

    from prometheus_client.parser import text_string_to_metric_families

    trust = ssl.create_default_context(cafile=str(system.cert_path))
    r = httpx.get(f"{system.rest_url}/metrics", headers=client.headers(), verify=trust)
    assert r.status_code == 200, r.text
    return sum(s.value for family in text_string_to_metric_families(r.text) for s in family.samples
               if s.name == "vspemu_rest_requests_total" and s.labels.get("method") == "GET"
               and s.labels.get("route", "").endswith("/v1/objects/storages"))


def test_an_accepted_remote_token_is_not_asked_about_again_at_once(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    """Issue 20: every Remote-Authorization check cost a TLS connection and a REST call to the remote (about 10
    ms); a client sends the same token with each call of a sequence (a resync, then status polls), so a token
    the remote accepted is remembered for a few seconds. A refused token is never remembered."""
    p, s, pc, sc = linked
    pc.get("remote-mirror-copygroups", remote=sc, remoteStorageDeviceId=s.storage_device_id)  # checked here
    before = _storages_served(s, sc)
    for _ in range(5):
        assert pc.get("remote-mirror-copygroups", remote=sc, remoteStorageDeviceId=s.storage_device_id)["data"] == []
    assert _storages_served(s, sc) == before  # the remote was not asked again
    with s.client() as other:  # another session's token is checked (once)
        before = _storages_served(s, sc)
        for _ in range(2):
            pc.get("remote-mirror-copygroups", remote=other, remoteStorageDeviceId=s.storage_device_id)
        assert _storages_served(s, sc) == before + 1
    headers = {**pc.headers(), "Remote-Authorization": "Session not-a-token"}
    for _ in range(2):  # refused each time: a refusal is not remembered
        r = pc.raw("GET", pc.objects_path("remote-mirror-copygroups"), headers=headers,
                   params={"remoteStorageDeviceId": s.storage_device_id})
        assert_error(r, 401, "KART40061-E")
    assert _storages_served(s, sc) == before + 3  # (metrics scrapes are not GET storages)
