"""Faults on demand (vspemu.system.faults, docs/faults-on-demand.md): each kind has the effect the array
would show, is listed, clears, and survives a restart of the system."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest

from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient, NbdError
from vspemu.lab import SystemProcess, volume_digest

MiB = 1 << 20
CG = "fod"

Linked = tuple[SystemProcess, SystemProcess, VspClient, VspClient]


def _paths(c: VspClient, gid: str) -> dict[tuple[str, str], str]:
    g = c.get(f"remotepath-groups/{gid}")
    return {(p["localPortId"], p["remotePortId"]): p["pathStatus"]
            for p in g["remotePaths"]}


def _wait_paths(c: VspClient, gid: str, want: dict[tuple[str, str], str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (got := _paths(c, gid)) != want:
        assert time.monotonic() < deadline, got
        time.sleep(0.1)


def _faults_rows(s: SystemProcess) -> list[str]:
    with sqlite3.connect(s.data_dir / "config.sqlite3") as db:
        return [r[0] for r in db.execute("SELECT doc FROM objects WHERE kind = 'faults' ORDER BY id")]


def _tc_pair(p: SystemProcess, s: SystemProcess, pc: VspClient, sc: VspClient, fence: str) -> tuple[int, int]:
    pv, sv = pc.create_ldev("8M"), sc.create_ldev("8M")
    pc.add_lun(pv)
    sc.add_lun(sv)
    body = {"copyGroupName": CG, "copyPairName": "p1", "replicationType": "TC",
            "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": fence, "copyPace": 15}
    pc.invoke("POST", "remote-mirror-copypairs", body, remote=sc)
    return pv, sv


def _pair(pc: VspClient) -> dict:
    return pc.get(f"remote-mirror-copypairs/NotSpecified,{CG},{CG}P_,NotSpecified,p1")


def _wait_pair(pc: VspClient, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (got := _pair(pc)["pvolStatus"]) != status:
        assert time.monotonic() < deadline, got
        time.sleep(0.1)


def test_path_and_path_group_faults_cut_refuse_and_clear(linked: Linked) -> None:
    p, s, pc, sc = linked
    gid = f"{s.serial},R9,0"
    pv, sv = _tc_pair(p, s, pc, sc, "DATA")
    _wait_pair(pc, "PAIR")
    # one path down: that path fails (ERR_13, connection cut and refused), the other keeps the pair in PAIR
    one = pc.add_fault("path", localPortId="CL3-A", remoteSerialNumber=s.serial, remotePortId="CL3-A")
    assert one["kind"] == "path" and isinstance(one["faultId"], int)
    _wait_paths(pc, gid, {("CL3-A", "CL3-A"): "ERR_13", ("CL4-A", "CL4-A"): "NML_01"})
    with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c:
        c.write(0, b"a" * 4096)
        c.flush()
    assert _pair(pc)["pvolStatus"] == "PAIR"
    time.sleep(1)  # the path keeps trying to reconnect; the fault keeps refusing it
    assert _paths(pc, gid)[("CL3-A", "CL3-A")] == "ERR_13"
    # the whole path group down: a host write with fence DATA fails and the pair goes PSUE
    grp = pc.add_fault("path-group", remoteSerialNumber=s.serial, pathGroupId=0)
    _wait_paths(pc, gid, {("CL3-A", "CL3-A"): "ERR_13", ("CL4-A", "CL4-A"): "ERR_13"})
    assert [f["faultId"] for f in pc.faults()] == [one["faultId"], grp["faultId"]]
    with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c, pytest.raises(NbdError) as e:
        c.write(MiB, b"d" * 4096)
    assert e.value.errno in (1, 5)
    assert _pair(pc)["pvolStatus"] == "PSUE"
    # clearing one fault by id keeps the other in force; clearing all brings the paths back
    assert pc.clear_fault(grp["faultId"])["kind"] == "path-group"
    _wait_paths(pc, gid, {("CL3-A", "CL3-A"): "ERR_13", ("CL4-A", "CL4-A"): "NML_01"})
    assert [f["kind"] for f in pc.clear_faults()] == ["path"]
    assert pc.faults() == []
    _wait_paths(pc, gid, {("CL3-A", "CL3-A"): "NML_01", ("CL4-A", "CL4-A"): "NML_01"})
    sid = f"{s.storage_device_id},{CG},{CG}P_,{CG}S_,p1"
    pc.invoke("PUT", f"remote-mirror-copypairs/{sid}/actions/resync/invoke",
              {"parameters": {"replicationType": "TC"}}, remote=sc)
    _wait_pair(pc, "PAIR")
    assert volume_digest(p.nbd_port, pv, 8 * MiB) == volume_digest(s.nbd_port, sv, 8 * MiB)


def test_ldev_eio_survives_a_restart_and_clears(system: SystemProcess) -> None:
    with system.client() as c:
        ldev = c.create_ldev("4M")
        c.add_lun(ldev)
        with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as h:
            h.write(0, b"x" * 4096)
        fault = c.add_fault("ldev-eio", ldevId=ldev)
    for _ in range(2):  # before and after a restart
        with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as h:
            with pytest.raises(NbdError) as e:
                h.read(0, 4096)
            assert e.value.errno == 5
            with pytest.raises(NbdError) as e:
                h.write(0, b"y" * 4096)
            assert e.value.errno == 5
        system.restart()
    with system.client() as c:
        assert [f["faultId"] for f in c.faults()] == [fault["faultId"]]
        c.clear_fault(fault["faultId"])
        assert c.faults() == []
    with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as h:
        assert h.read(0, 4096) == b"x" * 4096


def test_bad_requests_change_nothing(system: SystemProcess) -> None:
    with system.client() as c:
        before = _faults_rows(system)
        bad: list[dict] = [
            {"kind": "nonsense"},
            {"kind": "path", "localPortId": "CL3-A", "remoteSerialNumber": 1},  # remotePortId missing
            {"kind": "path", "localPortId": "CL1-A", "remoteSerialNumber": 1, "remotePortId": "CL3-A"},
            {"kind": "ldev-eio", "ldevId": 999},  # no such LDEV
            {"kind": "ldev-eio", "ldevId": "1"},
            {"kind": "journal-full", "journalId": 5},  # no such journal
            {"kind": "path-delay", "remoteSerialNumber": 1},  # neither latency nor bandwidth
            {"kind": "path-delay", "remoteSerialNumber": 1, "latencyMs": -1},
            {"kind": "path-group", "remoteSerialNumber": 1, "ldevId": 0},  # a field of another kind
            {"kind": "path-group", "remoteSerialNumber": 1, "color": "red"},
        ]
        for body in bad:
            with pytest.raises(ApiError) as e:
                c.private("POST", "faults", body)
            assert 400 <= e.value.status < 500, body
            assert e.value.body and e.value.body["messageId"].startswith("KART"), e.value.body
        for method, path in (("DELETE", "faults/7"), ("GET", "faults/7"), ("DELETE", "faults/x")):
            with pytest.raises(ApiError) as e:
                c.private(method, path)
            assert e.value.status in (400, 404)
        r = c.raw("GET", "vspemu/v1/faults")  # no session
        assert r.status_code == 401
        assert c.faults() == [] and _faults_rows(system) == before


def test_journal_full_goes_pful_then_pfus_and_clears(linked: Linked) -> None:
    p, s, pc, sc = linked
    for c in (pc, sc):
        c.create_journal(1, [c.create_ldev("64M")])
        c.invoke("PATCH", "journals/1", {"dataOverflowWatchInSeconds": 1})
    pv, sv = pc.create_ldev("8M"), sc.create_ldev("8M")
    pc.add_lun(pv)
    sc.add_lun(sv)
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": CG, "copyPairName": "p1", "replicationType": "UR", "muNumber": 1,
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "ASYNC", "pvolJournalId": 1, "svolJournalId": 1}, remote=sc)
    _wait_pair(pc, "PAIR")
    fault = pc.add_fault("journal-full", journalId=1)
    assert _pair(pc)["pvolStatus"] == "PFUL"
    with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c:
        c.write(0, os.urandom(MiB))  # waits for room for the overflow watch; then the mirror is suspended
    _wait_pair(pc, "PFUS")
    assert pc.get("journals/1")["journalStatus"] == "PJSF"
    pc.clear_fault(fault["faultId"])
    gid = f"{s.storage_device_id},{CG},{CG}P_,{CG}S_"
    pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/resync/invoke",
              {"parameters": {"replicationType": "UR"}}, remote=sc)
    _wait_pair(pc, "PAIR")
    deadline = time.monotonic() + 60
    while volume_digest(p.nbd_port, pv, 8 * MiB) != volume_digest(s.nbd_port, sv, 8 * MiB):
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_path_delay_slows_the_link_and_clears(linked: Linked) -> None:
    p, s, pc, sc = linked
    fault = pc.add_fault("path-delay", remoteSerialNumber=s.serial, latencyMs=200, bandwidthMiBps=2)
    t0 = time.monotonic()
    tally = pc.link_test(s.serial, size=MiB, count=4)
    slowed = time.monotonic() - t0
    assert tally.get("failed", 0) == 0, tally
    # 4 sequential echoes of 1 MiB: each request waits 200 ms and 0.5 s of bucket on the way out (at least)
    assert slowed >= 4 * 0.7, slowed
    assert pc.faults()[0]["bandwidthMiBps"] == 2
    pc.clear_fault(fault["faultId"])
    tally = pc.link_test(s.serial, size=MiB, count=4)
    assert tally.get("failed", 0) == 0, tally


def test_cli_and_system_stop(system: SystemProcess) -> None:
    env = {**os.environ, "VSPEMU_CA_CERT": str(system.cert_path)}
    base = [sys.executable, "-m", "vspemu", "fault"]
    with system.client() as c:
        ldev = c.create_ldev("4M")
    out = subprocess.run([*base, "add", "ldev-eio", "--ldev", str(ldev), "--system", system.rest_url, "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = subprocess.run([*base, "list", "--system", system.rest_url, "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and f'"ldevId": {ldev}' in listed.stdout, listed
    refused = subprocess.run([*base, "add", "ldev-eio", "--ldev", "4000", "--system", system.rest_url], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "KART" in refused.stderr, refused
    # system-stop: answered, then the process is gone as with kill -9; the stored faults outlive it
    with system.client() as c:
        assert c.add_fault("system-stop")["kind"] == "system-stop"
    assert system.proc is not None
    assert system.proc.wait(30) == 137
    system.start()
    with system.client() as c:
        assert [f["kind"] for f in c.faults()] == ["ldev-eio"]
        c.clear_faults()
        assert c.faults() == []


def test_ldev_eio_on_a_pvol_suspends_the_pair(linked: Linked) -> None:
    p, s, pc, sc = linked
    pv, sv = _tc_pair(p, s, pc, sc, "NEVER")
    _wait_pair(pc, "PAIR")
    fault = pc.add_fault("ldev-eio", ldevId=pv)
    with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c, pytest.raises(NbdError) as e:
        c.write(0, b"e" * 4096)
    assert e.value.errno == 5
    _wait_pair(pc, "PSUE", timeout=30)
    pc.clear_fault(fault["faultId"])
    sid = f"{s.storage_device_id},{CG},{CG}P_,{CG}S_,p1"
    pc.invoke("PUT", f"remote-mirror-copypairs/{sid}/actions/resync/invoke",
              {"parameters": {"replicationType": "TC"}}, remote=sc)
    _wait_pair(pc, "PAIR")
    assert volume_digest(p.nbd_port, pv, 8 * MiB) == volume_digest(s.nbd_port, sv, 8 * MiB)


def test_ur_pulls_stop_while_the_secondarys_path_group_is_down(linked: Linked) -> None:
    """UR: the secondary pulls the journal over its own path group; with that group held down the journal
    holds the writes (the path watch runs), and after clearing it the mirror catches up."""
    p, s, pc, sc = linked
    for c in (pc, sc):
        c.create_journal(1, [c.create_ldev("64M")])
    pv, sv = pc.create_ldev("8M"), sc.create_ldev("8M")
    pc.add_lun(pv)
    sc.add_lun(sv)
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": CG, "copyPairName": "p1", "replicationType": "UR", "muNumber": 1,
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "ASYNC", "pvolJournalId": 1, "svolJournalId": 1}, remote=sc)
    _wait_pair(pc, "PAIR")
    fault = sc.add_fault("path-group", remoteSerialNumber=p.serial)
    _wait_paths(sc, f"{p.serial},R9,0", {("CL3-A", "CL3-A"): "ERR_13", ("CL4-A", "CL4-A"): "ERR_13"})
    with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c:
        c.write(0, os.urandom(2 * MiB))
        c.flush()
    time.sleep(1)
    assert pc.get("journals", journalInfo="basic")["data"][0]["qCount"] > 0  # nobody pulls
    assert _pair(pc)["pvolStatus"] == "PAIR"  # within the path watch time
    sc.clear_fault(fault["faultId"])
    deadline = time.monotonic() + 60
    while pc.get("journals", journalInfo="basic")["data"][0]["qCount"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert volume_digest(p.nbd_port, pv, 8 * MiB) == volume_digest(s.nbd_port, sv, 8 * MiB)
