"""``vspemu up --systems N --topology T`` / ``vspemu status`` / ``vspemu down`` as a user runs them.

A three-system chain lab (1 <-> 2 <-> 3) comes up in one command: each system its own process, data directory and
ports; the registrations and path groups are those the summary states; a TrueCopy pair from system 1 to 2 and a
Universal Replicator pair from 2 to 3 reach PAIR with the data; ``vspemu down`` stops every process."""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import process_alive, read_lab_state, stop_lab, topology_links, volume_digest

MiB = 1 << 20
SIZE = 32 * MiB


def b64(text: str) -> str:
    return base64.b64encode(text.encode(errors="surrogateescape")).decode()


def vspemu(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vspemu", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "250"})


@pytest.fixture
def lab_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "lab"
    try:
        yield d
    finally:
        stop_lab(d)  # whatever the test left running


def test_topologies_say_who_is_registered_with_whom() -> None:
    assert topology_links(2, "chain") == topology_links(2, "pair") == [(1, 2)]
    assert topology_links(4, "pair") == [(1, 2), (3, 4)]
    assert topology_links(4, "chain") == [(1, 2), (2, 3), (3, 4)]
    assert topology_links(4, "star") == [(1, 2), (1, 3), (1, 4)]
    assert topology_links(4, "mesh") == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    assert topology_links(3, "none") == topology_links(1, "chain") == []
    assert len(topology_links(8, "mesh")) == 28
    for bad in ((0, "chain"), (9, "chain"), (3, "ring")):
        with pytest.raises(ValueError):
            topology_links(*bad)


def test_up_refuses_a_bad_size_or_topology(lab_dir: Path) -> None:
    for args in (("--systems", "9"), ("--systems", "0"), ("--topology", "ring")):
        r = vspemu("up", "--free-ports", "--detach", "--data-dir", str(lab_dir), *args)
        assert r.returncode != 0, r.stdout
        assert read_lab_state(lab_dir) is None  # nothing started


def wait_pairs(c: VspClient, remote: VspClient, gid: str, want: set[tuple[str, str]], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = {(p["pvolStatus"], p["svolStatus"])
               for p in c.get(f"remote-mirror-copygroups/{gid}", remote=remote)["copyPairs"]}
        if got == want:
            return
        assert time.monotonic() < deadline, got
        time.sleep(0.1)


def volumes(c: VspClient, count: int) -> list[int]:
    out = []
    for _ in range(count):
        v = c.create_ldev("32M")
        c.add_lun(v)
        out.append(v)
    return out


def test_three_system_chain_lab(lab_dir: Path) -> None:
    r = vspemu("up", "--systems", "3", "--topology", "chain", "--free-ports", "--detach", "--data-dir", str(lab_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    state = read_lab_state(lab_dir)
    assert state is not None and state["topology"] == "chain"
    assert (lab_dir / "lab.json").stat().st_mode & 0o777 == 0o600
    systems: list[dict[str, Any]] = state["systems"]
    assert [s["serial"] for s in systems] == [410001, 410002, 410003]
    # each its own process, data directory and ports
    assert len({s["pid"] for s in systems}) == 3 and all(process_alive(s["pid"], "serve") for s in systems)
    assert len({s["dataDir"] for s in systems}) == 3
    ports = [s["restPort"] for s in systems] + [s["nbdPort"] for s in systems] + \
        [p for s in systems for p in s["linkPorts"].values()]
    assert len(set(ports)) == len(ports) == 18
    # the summary lists each system, the links and the export line for the CA
    for s in systems:
        assert s["restUrl"] in r.stdout and s["storageDeviceId"] in r.stdout
    assert "Link 410001 <-> 410002" in r.stdout and "Link 410002 <-> 410003" in r.stdout
    assert "Link 410001 <-> 410003" not in r.stdout
    export = next(x for x in r.stdout.splitlines() if "export VSPEMU_CA_CERT=" in x)
    assert export.split("=", 1)[1].split(os.pathsep) == [s["cert"] for s in systems] + [state["console"]["cert"]]
    assert [s["registeredWith"] for s in systems] == [[410002], [410001, 410003], [410002]]

    clients = [VspClient(s["restUrl"], verify=s["cert"]) for s in systems]
    c1, c2, c3 = clients
    try:
        # registrations and path groups as stated: 1 <-> 2, 2 <-> 3, path group 0 both ways on CL3-A and CL4-A
        for c, want in zip(clients, ([410002], [410001, 410003], [410002]), strict=True):
            remotes = sorted(int(x["serialNumber"]) for x in c.get("remote-storages")["data"]
                             if x.get("dkcType") == "Remote")
            assert remotes == want
            groups = c.get("remotepath-groups")["data"]
            assert sorted(int(g["remoteSerialNumber"]) for g in groups) == want
            for g in groups:
                assert int(g["pathGroupId"]) == 0
                assert sorted((p["localPortId"], p["remotePortId"], p["pathStatus"]) for p in g["remotePaths"]) == \
                    [("CL3-A", "CL3-A", "NML_01"), ("CL4-A", "CL4-A", "NML_01")]
        assert state["links"][0]["remotepathGroupIds"] == {systems[0]["storageDeviceId"]: "410002,R9,0",
                                                           systems[1]["storageDeviceId"]: "410001,R9,0"}
        assert state["links"][1]["remotepathGroupIds"] == {systems[1]["storageDeviceId"]: "410003,R9,0",
                                                           systems[2]["storageDeviceId"]: "410002,R9,0"}

        # a TrueCopy pair from system 1 to system 2 ...
        (tp,), (ts, up), (us,) = volumes(c1, 1), volumes(c2, 2), volumes(c3, 1)
        data = os.urandom(4 * MiB)
        for port, ldev in ((systems[0]["nbdPort"], tp), (systems[1]["nbdPort"], up)):
            with NbdClient("127.0.0.1", port, str(ldev)) as nbd:
                nbd.write(MiB, data)
        c1.invoke("POST", "remote-mirror-copypairs", {
            "copyGroupName": "labtc", "copyPairName": "t0", "replicationType": "TC",
            "remoteStorageDeviceId": c2.storage_device_id, "pvolLdevId": tp, "svolLdevId": ts,
            "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=c2)
        # ... and a Universal Replicator pair from system 2 to system 3
        for c in (c2, c3):
            c.create_journal(1, [c.create_ldev("64M")])
        c2.invoke("POST", "remote-mirror-copypairs", {
            "copyGroupName": "labur", "copyPairName": "u0", "replicationType": "UR",
            "remoteStorageDeviceId": c3.storage_device_id, "pvolLdevId": up, "svolLdevId": us,
            "isNewGroupCreation": True, "fenceLevel": "ASYNC", "doInitialCopy": True,
            "muNumber": 1, "pvolJournalId": 1, "svolJournalId": 1}, remote=c3)
        wait_pairs(c1, c2, f"{c2.storage_device_id},labtc,labtcP_,labtcS_", {("PAIR", "PAIR")})
        wait_pairs(c2, c3, f"{c3.storage_device_id},labur,laburP_,laburS_", {("PAIR", "PAIR")})
        assert volume_digest(systems[0]["nbdPort"], tp, SIZE) == volume_digest(systems[1]["nbdPort"], ts, SIZE)
        deadline = time.monotonic() + 60  # UR: the S-VOL has the data once the journal is restored
        while volume_digest(systems[1]["nbdPort"], up, SIZE) != volume_digest(systems[2]["nbdPort"], us, SIZE):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        for c in clients:
            c.close()

    # the lab console: malformed or hostile requests are refused (401/404/405), never a 5xx; it keeps serving
    url = state["console"]["url"]
    with httpx.Client(verify=ssl.create_default_context(cafile=state["console"]["cert"]), timeout=30) as http:
        for headers in ({}, {"Authorization": "Basic !!!"}, {"Authorization": "Basic " + b64("nocolon")},
                        {"Authorization": "Basic " + b64(":nouser")}, {"Authorization": "Session x"},
                        {"Authorization": "Basic " + "A" * 5000}, {"Authorization": "Basic " + b64("\udcff:x")}):
            assert http.post(f"{url}/api/session", headers=headers).status_code == 401
        assert http.post(f"{url}/api/session", headers={"Authorization": "Basic " + b64("maintenance:wrong")}
                         ).status_code == 401
        for path in ("/api/status", "/api/session"):
            for headers in ({}, {"Authorization": "Session " + "0" * 48}, {"Authorization": "Session"}):
                assert http.request("GET" if path.endswith("status") else "DELETE", url + path,
                                    headers=headers).status_code == 401
        for path in ("/static/app.py", "/static/..%2f..%2flab.json", "/static/", "/nope"):
            assert http.get(url + path).status_code == 404
        assert http.put(f"{url}/api/status").status_code == 405
        r = http.post(f"{url}/api/session", auth=("maintenance", "raid-maintenance"))
        assert r.status_code == 200
        token = r.json()["token"]
        got = http.get(f"{url}/api/status", headers={"Authorization": f"Session {token}"}).json()
        assert [x["serial"] for x in got["systems"]] == [410001, 410002, 410003]
        assert all(x["ok"] for x in got["systems"])
        assert http.delete(f"{url}/api/session", headers={"Authorization": f"Session {token}"}).status_code == 200
        assert http.get(f"{url}/api/status", headers={"Authorization": f"Session {token}"}).status_code == 401

    # status: every system running and answering, its path groups listed
    st = vspemu("status", "--data-dir", str(lab_dir))
    assert st.returncode == 0, st.stdout + st.stderr
    assert st.stdout.count("running") == 4 and st.stdout.count("answers") == 3  # 3 systems and the console
    assert "410001,R9,0 (NML_01/NML_01), 410003,R9,0 (NML_01/NML_01)" in st.stdout

    # a system that dies: `status` says so (exit code 1), the console shows it down and the others still up
    os.kill(systems[2]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while process_alive(systems[2]["pid"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    st = vspemu("status", "--data-dir", str(lab_dir))
    assert st.returncode == 1 and st.stdout.count("answers") == 2 and "not running" in st.stdout, st.stdout
    with httpx.Client(verify=ssl.create_default_context(cafile=state["console"]["cert"]), timeout=30) as http:
        token = http.post(f"{url}/api/session", auth=("maintenance", "raid-maintenance")).json()["token"]
        got = http.get(f"{url}/api/status", headers={"Authorization": f"Session {token}"}).json()
        assert [x["ok"] for x in got["systems"]] == [True, True, False]
        assert "cannot reach" in got["systems"][2]["error"] and got["systems"][2]["status"] is None

    # a second `up` on a running lab is refused and changes nothing
    again = vspemu("up", "--systems", "3", "--free-ports", "--detach", "--data-dir", str(lab_dir))
    assert again.returncode == 1 and "already running" in again.stdout
    assert json.loads((lab_dir / "lab.json").read_text()) == state

    # down: every process gone, the state file too; status says so
    d = vspemu("down", "--data-dir", str(lab_dir))
    assert d.returncode == 0, d.stdout + d.stderr
    assert "stopped console" in d.stdout and not process_alive(state["console"]["pid"])
    for s in systems[:2]:  # (the third was killed above)
        assert f"stopped storage {s['serial']}" in d.stdout
    assert not any(process_alive(s["pid"]) for s in systems)
    assert read_lab_state(lab_dir) is None
    assert vspemu("status", "--data-dir", str(lab_dir)).returncode == 1


def test_foreground_up_stops_on_down(lab_dir: Path, tmp_path: Path) -> None:
    """The default lab (two systems registered with each other) in the foreground: `vspemu down` from another
    terminal stops the supervisor and both systems."""
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 - handed to the child process
    up = subprocess.Popen([sys.executable, "-m", "vspemu", "up", "--free-ports", "--data-dir", str(lab_dir)],
                          stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 90
        while (state := read_lab_state(lab_dir)) is None or not state.get("console"):  # the console is last
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert state["supervisorPid"] == up.pid and state["topology"] == "chain"
        assert [s["registeredWith"] for s in state["systems"]] == [[410002], [410001]]
        d = vspemu("down", "--data-dir", str(lab_dir))
        assert d.returncode == 0 and "stopped vspemu up" in d.stdout, d.stdout
        assert up.wait(30) == 0
        assert "lab stopped" in (tmp_path / "up.log").read_text()
        assert not any(process_alive(s["pid"]) for s in state["systems"])
        assert not process_alive(state["console"]["pid"])
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


@pytest.mark.e2e
def test_eight_system_mesh_lab(lab_dir: Path) -> None:
    """The largest lab: 8 systems, every two registered with each other (28 links, 56 path groups, all NML_01)."""
    r = vspemu("up", "--systems", "8", "--topology", "mesh", "--free-ports", "--detach", "--data-dir", str(lab_dir),
               timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    state = read_lab_state(lab_dir)
    assert state is not None and len(state["systems"]) == 8 and len(state["links"]) == 28
    serials = [s["serial"] for s in state["systems"]]
    assert serials == list(range(410001, 410009))
    for s in state["systems"]:
        others = sorted(set(serials) - {s["serial"]})
        assert s["registeredWith"] == others
        with VspClient(s["restUrl"], verify=s["cert"]) as c:
            groups = c.get("remotepath-groups")["data"]
            assert sorted(int(g["remoteSerialNumber"]) for g in groups) == others
            assert {p["pathStatus"] for g in groups for p in g["remotePaths"]} == {"NML_01"}
    st = vspemu("status", "--data-dir", str(lab_dir))
    assert st.returncode == 0 and st.stdout.count("answers") == 8, st.stdout
    d = vspemu("down", "--data-dir", str(lab_dir))
    assert d.returncode == 0 and d.stdout.count("stopped storage") == 8, d.stdout
    assert not any(process_alive(s["pid"]) for s in state["systems"])


def test_lab_restarts_on_its_data_directory(lab_dir: Path) -> None:
    """`vspemu down` then `vspemu up` on the same data directory: the same ports (even with --free-ports: the
    registrations hold the addresses), the registrations and path groups kept (not made twice), a TrueCopy pair
    PAIR again."""
    r = vspemu("up", "--free-ports", "--detach", "--no-console", "--data-dir", str(lab_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    first = read_lab_state(lab_dir)
    assert first is not None and first["console"] is None
    (s1, s2) = first["systems"]
    with VspClient(s1["restUrl"], verify=s1["cert"]) as c1, VspClient(s2["restUrl"], verify=s2["cert"]) as c2:
        pv, sv = volumes(c1, 1)[0], volumes(c2, 1)[0]
        c1.invoke("POST", "remote-mirror-copypairs", {
            "copyGroupName": "again", "copyPairName": "p", "replicationType": "TC",
            "remoteStorageDeviceId": c2.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=c2)
        gid = f"{c2.storage_device_id},again,againP_,againS_"
        wait_pairs(c1, c2, gid, {("PAIR", "PAIR")})
    assert vspemu("down", "--data-dir", str(lab_dir)).returncode == 0
    assert read_lab_state(lab_dir) is None
    r = vspemu("up", "--free-ports", "--detach", "--no-console", "--data-dir", str(lab_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    second = read_lab_state(lab_dir)
    assert second is not None
    for a, b in zip(first["systems"], second["systems"], strict=True):
        assert (a["restPort"], a["nbdPort"], a["linkPorts"]) == (b["restPort"], b["nbdPort"], b["linkPorts"])
        assert a["pid"] != b["pid"]
    with VspClient(s1["restUrl"], verify=s1["cert"]) as c1, VspClient(s2["restUrl"], verify=s2["cert"]) as c2:
        for c, other in ((c1, 410002), (c2, 410001)):
            assert [int(x["serialNumber"]) for x in c.get("remote-storages")["data"]
                    if x.get("dkcType") == "Remote"] == [other]
            groups = c.get("remotepath-groups")["data"]
            assert len(groups) == 1 and len(groups[0]["remotePaths"]) == 2
            c.wait_path_status(groups[0]["remotepathGroupId"], "NML_01", 30)
        wait_pairs(c1, c2, gid, {("PAIR", "PAIR")})


def test_a_system_that_cannot_start_fails_the_lab(lab_dir: Path) -> None:
    """The second system's data directory cannot be made (a file is in the way): `up` exits 1 and leaves nothing
    running."""
    lab_dir.mkdir(parents=True)
    (lab_dir / "410002").write_text("in the way")
    r = vspemu("up", "--free-ports", "--detach", "--data-dir", str(lab_dir))
    assert r.returncode == 1 and "did not come up" in r.stdout, r.stdout + r.stderr
    assert read_lab_state(lab_dir) is None
    stopped = read_lab_state(lab_dir, "lab.stopped.json")
    assert stopped is None or not any(process_alive(s["pid"]) for s in stopped["systems"])
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
                .splitlines() if str(lab_dir) in line and "serve" in line]
    assert vspemu("up", "--model", "VSP Z99", "--free-ports", "--detach", "--data-dir", str(lab_dir)).returncode == 2


def test_a_system_is_ready_only_when_it_answers_with_its_own_certificate(make_system: Any) -> None:
    """Two pytest runs on one machine can pick the same free port: a system whose REST port another system
    holds must not be taken as ready because the other one answers (its clients then fail certificate checks
    far from the cause); its start fails on its own bind and says so."""
    other = make_system()
    with pytest.raises(RuntimeError, match="exited"):
        make_system(rest_port=other.rest_port)
