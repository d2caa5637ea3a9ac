"""/metrics: Prometheus text from real systems, parsed with prometheus_client's own parser; it follows a pair."""

from __future__ import annotations

import ssl
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess
from vspemu.replication.bitmap import TRACK
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER

MiB = 1 << 20
CG = "mcg"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(sysp: SystemProcess, auth: httpx.Auth | None = None, headers: dict[str, str] | None = None,
           path: str = "/metrics") -> httpx.Response:
    trust = ssl.create_default_context(cafile=str(sysp.cert_path))
    return httpx.get(f"{sysp.rest_url}{path}", verify=trust, auth=auth, headers=headers)


def samples(sysp: SystemProcess, client: VspClient | None = None) -> Samples:
    if client is not None:
        r = scrape(sysp, headers=client.headers())
    else:
        r = scrape(sysp, auth=httpx.BasicAuth(DEFAULT_USER, DEFAULT_PASSWORD))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


def find(got: Samples, name: str, **labels: str) -> list[float]:
    want = set(labels.items())
    return [v for (n, ls), v in got.items() if n == name and want <= set(ls)]


def pairs(got: Samples, status: str, rtype: str = "TC", role: str = "P") -> float:
    return value(got, "vspemu_pairs", status=status, replication_type=rtype, role=role)


def wait_for(fn, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_metrics_refuse_unauthenticated(system: SystemProcess, api: VspClient) -> None:
    for path in ("/metrics", "/ConfigurationManager/vspemu/v1/metrics"):
        r = scrape(system, path=path)
        assert r.status_code == 401
        assert "messageId" in r.json()  # the array's error format
        assert scrape(system, path=path, headers={"Authorization": "Session not-a-token"}).status_code == 401
        assert scrape(system, path=path, auth=httpx.BasicAuth(DEFAULT_USER, "wrong")).status_code == 401
        assert scrape(system, path=path, headers=api.headers()).status_code == 200
        assert scrape(system, path=path, auth=httpx.BasicAuth(DEFAULT_USER, DEFAULT_PASSWORD)).status_code == 200
    got = samples(system)
    assert pairs(got, "PAIR") == 0
    # REST requests are counted by route template and status: the refused scrapes too
    assert value(got, "vspemu_rest_requests_total", method="GET", route="/metrics", status="401") >= 3


def test_metrics_follow_a_truecopy_pair(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, pc, sc = linked
    pv, sv = pc.create_ldev("64M"), sc.create_ldev("64M")
    pc.add_lun(pv)
    sc.add_lun(sv)
    before = samples(p, pc)
    assert pairs(before, "COPY") + pairs(before, "PAIR") == 0
    nbd_writes = value(before, "vspemu_nbd_requests_total", op="write")
    with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c:
        c.write(0, b"x" * (4 * MiB))
    pc.invoke("POST", "remote-mirror-copypairs",
              {"copyGroupName": CG, "copyPairName": "p1", "replicationType": "TC",
               "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
               "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=sc)
    got = samples(p, pc)
    assert pairs(got, "COPY") + pairs(got, "PAIR") == 1  # the create job ends once the copy runs
    got = wait_for(lambda: (g := samples(p, pc)) and pairs(g, "PAIR") == 1 and g)
    assert value(got, "vspemu_pair_dirty_bytes", copy_group=CG, pair="p1") == 0
    assert value(got, "vspemu_pair_copy_progress_percent", copy_group=CG, pair="p1") == 100
    assert value(got, "vspemu_pair_info", copy_group=CG, pair="p1", replication_type="TC", role="P",
                 status="PAIR", peer_status="PAIR") == 1
    # the secondary counts its S-VOL record
    assert pairs(samples(s, sc), "PAIR", role="S") == 1
    # host I/O: the write counter, bytes and latency histogram moved
    assert value(got, "vspemu_nbd_requests_total", op="write") >= nbd_writes + 1
    assert value(got, "vspemu_nbd_request_seconds_count", op="write") >= 1
    assert value(got, "vspemu_nbd_request_seconds_bucket", op="write", le="+Inf") == \
        value(got, "vspemu_nbd_request_seconds_count", op="write")
    assert value(got, "vspemu_nbd_bytes_total", op="write") >= 4 * MiB
    # the copy went over the link: bytes counted on an outbound path of the primary
    assert sum(find(got, "vspemu_link_sent_bytes_total", remote=s.storage_device_id, direction="outbound")) >= 4 * MiB
    assert sum(find(got, "vspemu_remote_path_up", remote=s.storage_device_id)) == 2
    # the create job and its REST request
    assert sum(find(got, "vspemu_job_seconds_count", method="POST", state="Succeeded")) >= 1
    assert value(got, "vspemu_rest_requests_total", method="POST",
                 route="/ConfigurationManager/v1/objects/remote-mirror-copypairs", status="202") == 1

    pid = f"{s.storage_device_id},{CG},{CG}P_,{CG}S_,p1"
    pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/split/invoke",
              {"parameters": {"replicationType": "TC"}}, remote=sc)
    got = samples(p, pc)
    assert pairs(got, "PSUS") == 1 and pairs(got, "PAIR") == 0
    assert value(got, "vspemu_pair_dirty_bytes", copy_group=CG, pair="p1") == 0
    with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c:
        c.write(0, b"P" * 4096)  # track 0
        c.write(10 * MiB, b"P" * 4096)  # another track
    got = samples(p, pc)
    assert value(got, "vspemu_pair_dirty_bytes", copy_group=CG, pair="p1") == 2 * TRACK
    assert value(got, "vspemu_pair_copy_progress_percent", copy_group=CG, pair="p1") < 100

    pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/resync/invoke",
              {"parameters": {"replicationType": "TC"}}, remote=sc)
    got = wait_for(lambda: (g := samples(p, pc)) and pairs(g, "PAIR") == 1 and g)
    assert pairs(got, "PSUS") == 0
    assert value(got, "vspemu_pair_dirty_bytes", copy_group=CG, pair="p1") == 0


def test_metrics_show_a_ur_journal(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, pc, sc = linked
    for c in (pc, sc):
        c.create_journal(1, [c.create_ldev("64M")])
    pv, sv = pc.create_ldev("32M"), sc.create_ldev("32M")
    pc.add_lun(pv)
    sc.add_lun(sv)
    got = samples(p, pc)
    assert value(got, "vspemu_journal_used_bytes", journal="1") == 0
    assert value(got, "vspemu_journal_capacity_bytes", journal="1") > 0
    pc.invoke("POST", "remote-mirror-copypairs",
              {"copyGroupName": "ug", "copyPairName": "u0", "replicationType": "UR",
               "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
               "isNewGroupCreation": True, "fenceLevel": "ASYNC", "doInitialCopy": True,
               "isDataReductionForceCopy": True, "muNumber": 1, "pvolJournalId": 1, "svolJournalId": 1},
              remote=sc)
    wait_for(lambda: pairs(samples(p, pc), "PAIR", rtype="UR") == 1)
    s.pause()  # the secondary stops pulling: what is written stays in the master journal
    try:
        with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c:
            for i in range(8):
                c.write(i * MiB, b"j" * MiB)
        got = samples(p, pc)
        assert value(got, "vspemu_journal_used_bytes", journal="1") >= 8 * MiB
        assert value(got, "vspemu_journal_usage_percent", journal="1") > 0
        assert value(got, "vspemu_mirror_q_count", journal="1", mu="1", copy_group="ug") >= 8
        assert value(got, "vspemu_mirror_lag_seconds", journal="1", mu="1", copy_group="ug") >= 0
    finally:
        s.resume()
    # once the secondary restored them, qCount drains to 0
    wait_for(lambda: value(samples(p, pc), "vspemu_mirror_q_count", journal="1", mu="1", copy_group="ug") == 0)


@pytest.mark.parametrize("path", ["/ConfigurationManager/vspemu/v1/status"])
def test_status_json_needs_a_session(system: SystemProcess, api: VspClient, path: str) -> None:
    assert scrape(system, path=path).status_code == 401
    r = scrape(system, path=path, headers=api.headers())
    assert r.status_code == 200
    assert r.json()["storageDeviceId"] == system.storage_device_id
    page = scrape(system, path="/ConfigurationManager/vspemu/status")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert scrape(system, path="/ConfigurationManager/vspemu/status/..%2Fapp.py").status_code == 404


def status_json(sysp: SystemProcess, client: VspClient) -> dict:  # type: ignore[type-arg]
    r = scrape(sysp, path="/ConfigurationManager/vspemu/v1/status", headers=client.headers())
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_faults_in_force_show_in_metrics_and_status(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, pc, _sc = linked
    got = samples(p, pc)
    assert value(got, "vspemu_faults_active", kind="path-group") == 0
    assert value(got, "vspemu_faults_active", kind="ldev-eio") == 0
    assert status_json(p, pc)["faults"] == []
    ldev = pc.create_ldev("16M")
    pg = pc.add_fault("path-group", remoteSerialNumber=s.serial, pathGroupId=0)
    eio = pc.add_fault("ldev-eio", ldevId=ldev)
    got = samples(p, pc)
    assert value(got, "vspemu_faults_active", kind="path-group") == 1
    assert value(got, "vspemu_faults_active", kind="ldev-eio") == 1
    assert value(got, "vspemu_faults_active", kind="path") == 0
    faults = {f["faultId"]: f for f in status_json(p, pc)["faults"]}
    assert set(faults) == {pg["faultId"], eio["faultId"]}
    assert faults[pg["faultId"]]["kind"] == "path-group"
    assert faults[pg["faultId"]]["target"] == f"path group 0 to serial {s.serial}"
    assert faults[pg["faultId"]]["since"] == pg["createdAt"]
    assert faults[eio["faultId"]]["target"] == f"LDEV {ldev}"
    # the path group's paths are down while the fault is in force
    wait_for(lambda: sum(find(samples(p, pc), "vspemu_remote_path_up", remote=s.storage_device_id)) == 0)

    pc.clear_fault(eio["faultId"])
    got = samples(p, pc)
    assert value(got, "vspemu_faults_active", kind="ldev-eio") == 0
    assert value(got, "vspemu_faults_active", kind="path-group") == 1
    assert [f["faultId"] for f in status_json(p, pc)["faults"]] == [pg["faultId"]]
    pc.clear_faults()
    got = samples(p, pc)
    assert sum(find(got, "vspemu_faults_active")) == 0
    assert status_json(p, pc)["faults"] == []
    wait_for(lambda: sum(find(samples(p, pc), "vspemu_remote_path_up", remote=s.storage_device_id)) == 2)


def test_remote_path_errors_grow_under_a_path_group_fault(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, pc, _sc = linked
    remote = s.storage_device_id

    def errors(got: Samples, kind: str) -> float:
        return sum(find(got, "vspemu_remote_path_errors_total", remote=remote, kind=kind))

    got = samples(p, pc)
    assert len(find(got, "vspemu_remote_path_errors_total", remote=remote, kind="refused")) == 2  # per path
    assert sum(find(got, "vspemu_remote_path_connects_total", remote=remote)) >= 2
    before = {kind: errors(got, kind) for kind in ("refused", "disconnected")}
    connects = sum(find(got, "vspemu_remote_path_connects_total", remote=remote))
    fault = pc.add_fault("path-group", remoteSerialNumber=s.serial, pathGroupId=0)
    # both connections are cut, and the reconnect attempts are refused while the fault is in force
    got = wait_for(lambda: (g := samples(p, pc)) and errors(g, "disconnected") >= before["disconnected"] + 2
                   and errors(g, "refused") >= before["refused"] + 2 and g)
    assert sum(find(got, "vspemu_remote_path_up", remote=remote)) == 0
    pc.clear_fault(fault["faultId"])
    # the paths reconnect: the connects counter grows, the error counters never go back
    got = wait_for(lambda: (g := samples(p, pc))
                   and sum(find(g, "vspemu_remote_path_connects_total", remote=remote)) >= connects + 2 and g)
    assert errors(got, "refused") >= before["refused"] + 2
    assert errors(got, "disconnected") >= before["disconnected"] + 2
