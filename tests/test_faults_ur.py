"""Faults on demand against Universal Replicator (docs/faults-on-demand.md):

* a path-group fault on the secondary (the group it pulls the journal over) suspends the mirror by error
  (PSUE both sides, master journal PJSE) once the path watch time has run, and after clearing the fault and a
  resync the pair is PAIR again with equal data. The array's smallest useful ``pathBlockadeWatchInMinutes`` is 1
  minute; the project's journals route accepts 0 (the REST field's range is 0-60), and with 0 the secondary
  suspends on its first failed read and the primary after 1 s without a read — the fast test uses 0, the slow
  one (marked e2e) the array's 1 minute and also shows the pair staying PAIR while the watch runs;
* a path-delay fault (latency and a bandwidth limit) on the primary's path group slows the journal's way to the
  secondary: under a write load UR lag, qCount and journal usage grow measurably (the /metrics gauges and the
  journal GET) and drain to 0 after the fault is cleared, the S-VOL then equal to the P-VOL.
"""

from __future__ import annotations

import os
import ssl
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, volume_digest

MiB = 1 << 20
CG = "urfault"
Linked = tuple[SystemProcess, SystemProcess, VspClient, VspClient]


def ur_pair(p: SystemProcess, s: SystemProcess, pc: VspClient, sc: VspClient, size: str = "8M",
            journal: str = "64M", watch_minutes: int | None = None) -> tuple[int, int]:
    for c in (pc, sc):
        c.create_journal(1, [c.create_ldev(journal)])
    pv, sv = pc.create_ldev(size), sc.create_ldev(size)
    pc.add_lun(pv)
    sc.add_lun(sv)
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": CG, "copyPairName": "u1", "replicationType": "UR", "muNumber": 1,
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "ASYNC", "pvolJournalId": 1, "svolJournalId": 1}, remote=sc)
    wait_statuses(pc, sc, {"PAIR"}, {"PAIR"})
    if watch_minutes is not None:
        for c in (pc, sc):
            c.invoke("PATCH", "journals/1",
                     {"mirrorUnit": {"muNumber": 1, "pathBlockadeWatchInMinutes": watch_minutes}})
            mu = c.get("journals/1")["mirrorUnits"]
            assert next(m for m in mu if m["muNumber"] == 1)["pathBlockadeWatchInMinutes"] == watch_minutes
    return pv, sv


def statuses(c: VspClient, side: str) -> set[str]:
    """This system's own statuses of the group's pairs (no Remote-Authorization: each side as it knows it)."""
    dg = f"{CG}P_" if side == "P" else f"{CG}S_"
    g = c.get(f"remote-mirror-copygroups/NotSpecified,{CG},{dg},NotSpecified")
    return {p["pvolStatus"] if side == "P" else p["svolStatus"] for p in g["copyPairs"]}


def wait_statuses(pc: VspClient, sc: VspClient, want_p: set[str], want_s: set[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (got := (statuses(pc, "P"), statuses(sc, "S"))) != (want_p, want_s):
        assert time.monotonic() < deadline, got
        time.sleep(0.2)


def journal(c: VspClient) -> dict[str, Any]:
    return c.get("journals", journalInfo="basic")["data"][0]


def wait_drained(pc: VspClient, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while journal(pc)["qCount"] != 0:
        assert time.monotonic() < deadline, journal(pc)
        time.sleep(0.1)


def write(sysp: SystemProcess, ldev: int, offset: int, length: int) -> None:
    with NbdClient("127.0.0.1", sysp.nbd_port, str(ldev)) as c:
        for off in range(offset, offset + length, MiB):
            c.write(off, os.urandom(MiB))
        c.flush()


def resync(pc: VspClient, sc: VspClient, s: SystemProcess) -> None:
    pc.invoke("PUT", f"remote-mirror-copygroups/{s.storage_device_id},{CG},{CG}P_,{CG}S_/actions/resync/invoke",
              {"parameters": {"replicationType": "UR"}}, remote=sc)


def suspended_by_the_path_fault(p: SystemProcess, s: SystemProcess, pc: VspClient, sc: VspClient, pv: int, sv: int,
                                watch_minutes: int) -> None:
    fault = sc.add_fault("path-group", remoteSerialNumber=p.serial, pathGroupId=0)
    sc.wait_path_status(f"{p.serial},R9,0", "ERR_13", 30)
    write(p, pv, 0, 2 * MiB)
    if watch_minutes:  # within the watch time the journal holds the writes and the pair stays PAIR
        time.sleep(3)
        assert statuses(pc, "P") == {"PAIR"} and journal(pc)["qCount"] > 0
    wait_statuses(pc, sc, {"PSUE"}, {"PSUE"}, timeout=60 * watch_minutes + 90)
    assert journal(pc)["journalStatus"] == "PJSE"
    # a write while suspended is marked; the fault cleared, the paths come back and a resync repairs the S-VOL
    write(p, pv, 4 * MiB, MiB)
    sc.clear_fault(fault["faultId"])
    assert sc.faults() == []
    sc.wait_path_status(f"{p.serial},R9,0", "NML_01", 30)
    pc.wait_path_status(f"{s.serial},R9,0", "NML_01", 30)
    resync(pc, sc, s)
    wait_statuses(pc, sc, {"PAIR"}, {"PAIR"})
    wait_drained(pc)
    assert volume_digest(p.nbd_port, pv, 8 * MiB) == volume_digest(s.nbd_port, sv, 8 * MiB)


def test_ur_path_fault_suspends_after_the_path_watch_and_resyncs(linked: Linked) -> None:
    p, s, pc, sc = linked
    pv, sv = ur_pair(p, s, pc, sc, watch_minutes=0)  # the shortest watch the project accepts (see above)
    suspended_by_the_path_fault(p, s, pc, sc, pv, sv, 0)


@pytest.mark.e2e
def test_ur_path_fault_with_the_arrays_one_minute_watch(linked: Linked) -> None:
    p, s, pc, sc = linked
    pv, sv = ur_pair(p, s, pc, sc, watch_minutes=1)
    suspended_by_the_path_fault(p, s, pc, sc, pv, sv, 1)


def ur_gauges(p: SystemProcess, pc: VspClient) -> tuple[float, float, float]:
    """(vspemu_mirror_lag_seconds, vspemu_mirror_q_count, vspemu_journal_usage_percent) of the primary's mirror."""
    r = httpx.get(f"{p.rest_url}/metrics", verify=ssl.create_default_context(cafile=str(p.cert_path)),
                  headers=pc.headers())
    assert r.status_code == 200, r.text
    got: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name in ("vspemu_mirror_lag_seconds", "vspemu_mirror_q_count") and \
                    sample.labels.get("copy_group") == CG:
                got[sample.name] = sample.value
            elif sample.name == "vspemu_journal_usage_percent" and sample.labels.get("journal") == "1":
                got[sample.name] = sample.value
    return got["vspemu_mirror_lag_seconds"], got["vspemu_mirror_q_count"], got["vspemu_journal_usage_percent"]


def test_path_delay_makes_ur_lag_and_journal_grow_then_drain(linked: Linked) -> None:
    p, s, pc, sc = linked
    pv, sv = ur_pair(p, s, pc, sc, size="32M")
    write(p, pv, 0, 4 * MiB)  # without a fault the journal drains at once
    wait_drained(pc)
    assert ur_gauges(p, pc)[:2] == (0, 0)
    # the journal's data goes primary -> secondary as the primary's answers on the connections the secondary
    # opened: a fault on the primary's path group to it shapes them (200 ms per frame, 1 MiB/s)
    fault = pc.add_fault("path-delay", remoteSerialNumber=s.serial, pathGroupId=0, latencyMs=200, bandwidthMiBps=1)
    write(p, pv, 0, 16 * MiB)
    lag1, q1, usage1 = ur_gauges(p, pc)
    j1 = journal(pc)
    assert q1 > 0 and j1["qCount"] > 0 and usage1 > 0 and j1["usageRate"] > 0, (lag1, q1, usage1, j1)
    deadline = time.monotonic() + 60
    while (lag := ur_gauges(p, pc)[0]) <= max(lag1, 1.0):  # the lag keeps growing: the oldest entry waits
        assert time.monotonic() < deadline, (lag, lag1)
        time.sleep(0.5)
    assert journal(pc)["qCount"] > 0
    # cleared: the backlog drains, lag, qCount and usage go back to 0, and the S-VOL equals the P-VOL
    pc.clear_fault(fault["faultId"])
    wait_drained(pc)
    deadline = time.monotonic() + 60
    while (got := ur_gauges(p, pc)) != (0, 0, 0) or journal(pc)["usageRate"] != 0:
        assert time.monotonic() < deadline, (got, journal(pc))
        time.sleep(0.2)
    assert statuses(pc, "P") == {"PAIR"} and statuses(sc, "S") == {"PAIR"}
    assert volume_digest(p.nbd_port, pv, 32 * MiB) == volume_digest(s.nbd_port, sv, 32 * MiB)
