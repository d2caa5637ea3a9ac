"""Thin Image snapshots end to end: real storage-system processes, real bytes over NBD."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from typing import Any

import pytest

from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient, NbdError
from vspemu.lab import SystemProcess, volume_digest

MiB = 1 << 20
TRACK = 256 << 10


def nbd(system: SystemProcess, ldev: int) -> NbdClient:
    return NbdClient("127.0.0.1", system.nbd_port, str(ldev))


def volume(c: VspClient, size: str = "16M") -> int:
    ldev = c.create_ldev(size)
    c.add_lun(ldev)
    return ldev


def fill(system: SystemProcess, ldev: int, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    with nbd(system, ldev) as n:
        for off in range(0, size, 4 * MiB):
            n.write(off, rnd.randbytes(min(4 * MiB, size - off)))
        n.flush()


def scribble(system: SystemProcess, ldev: int, size: int, seed: int, count: int = 40) -> None:
    """Writes of odd sizes at odd places, some across track boundaries, one discard."""
    rnd = random.Random(seed)
    with nbd(system, ldev) as n:
        for _ in range(count):
            length = rnd.choice([512, 4096, 70000, TRACK, MiB + 4096])
            off = rnd.randrange(0, size - length) // 512 * 512
            n.write(off, rnd.randbytes(length))
        n.zero(3 * MiB + 512, 2 * TRACK)
        n.flush()


def digest(system: SystemProcess, ldev: int, size: int) -> str:
    return volume_digest(system.nbd_port, ldev, size)


def snap(c: VspClient, pvol: int, group: str = "g1", **extra: Any) -> tuple[int, int]:
    body = {"pvolLdevId": pvol, "snapshotPoolId": 0, "snapshotGroupName": group, **extra}
    job = c.invoke("POST", "snapshots", body)
    pv, mu = c.resource_id(job).split(",")
    return int(pv), int(mu)


def status(c: VspClient, pvol: int, mu: int) -> str:
    return str(c.get(f"snapshots/{pvol},{mu}")["status"])


def pool_used(c: VspClient) -> int:
    p = c.get("pools/0")
    return int(p["totalPoolCapacity"] - p["availableVolumeCapacity"]) * MiB


def refused(fn: Any, code: int | None = 412) -> dict[str, Any]:
    """The request is refused (``code``; None: its job fails)."""
    with pytest.raises(ApiError) as e:
        fn()
    assert e.value.status == (code or 0), e.value.body
    return e.value.body or {}


def test_snapshot_keeps_the_split_instant_and_restore_brings_it_back(system: SystemProcess, api: VspClient) -> None:
    size = 16 * MiB
    pvol, sv1, sv2 = volume(api), volume(api), volume(api)
    fill(system, pvol, size, 1)
    d0 = digest(system, pvol, size)
    pv, mu1 = snap(api, pvol, "g1", svolLdevId=sv1, autoSplit=True)
    s = api.get(f"snapshots/{pvol},{mu1}")
    assert (pv, s["status"], s["svolLdevId"], s["snapshotGroupName"], s["snapshotPoolId"]) == (
        pvol, "PSUS", sv1, "g1", 0)
    assert "splitTime" in s and s["snapshotId"] == f"{pvol},{mu1}"
    assert digest(system, sv1, size) == d0
    scribble(system, pvol, size, 2)
    d1 = digest(system, pvol, size)
    assert d1 != d0
    assert digest(system, sv1, size) == d0  # the P-VOL changed; the snapshot did not
    # a second snapshot in another group, taken in PAIR and split later
    _, mu2 = snap(api, pvol, "g2", svolLdevId=sv2)
    assert status(api, pvol, mu2) == "PAIR"
    with nbd(system, sv2) as n, pytest.raises(NbdError):  # not split: its S-VOL shows nothing
        n.read(0, 4096)
    api.invoke("POST", f"snapshots/{pvol},{mu2}/actions/split/invoke")
    assert status(api, pvol, mu2) == "PSUS"
    scribble(system, pvol, size, 3)
    assert digest(system, sv1, size) == d0
    assert digest(system, sv2, size) == d1
    listed = api.get("snapshots", pvolLdevId=pvol)["data"]
    assert [(x["muNumber"], x["status"]) for x in listed] == [(mu1, "PSUS"), (mu2, "PSUS")]
    assert [x["pvolLdevId"] for x in api.get("snapshots", svolLdevId=sv2)["data"]] == [pvol]
    # restore the older snapshot: the P-VOL equals it, and the newer one still shows its own instant
    api.invoke("POST", f"snapshots/{pvol},{mu1}/actions/restore/invoke")
    assert digest(system, pvol, size) == d0
    assert status(api, pvol, mu1) == "PAIR"
    assert digest(system, sv2, size) == d1
    # resync then split again: a new point in time
    api.invoke("POST", f"snapshots/{pvol},{mu2}/actions/resync/invoke")
    assert status(api, pvol, mu2) == "PAIR"
    api.invoke("POST", f"snapshots/{pvol},{mu2}/actions/split/invoke")
    assert digest(system, sv2, size) == d0
    # the configuration survives a restart, and so do the images
    system.restart()
    with system.client() as c2:
        assert [(x["muNumber"], x["status"]) for x in c2.get("snapshots", pvolLdevId=pvol)["data"]] == [
            (mu1, "PAIR"), (mu2, "PSUS")]
        scribble(system, pvol, size, 4)
        assert digest(system, sv2, size) == d0
        c2.invoke("DELETE", f"snapshots/{pvol},{mu2}")
        c2.invoke("DELETE", f"snapshots/{pvol},{mu1}")
        assert c2.get("snapshots")["data"] == []


def test_sixty_four_snapshots_share_unchanged_data(system: SystemProcess, api: VspClient) -> None:
    size = 8 * MiB
    pvol, first_sv, last_sv = volume(api, "8M"), volume(api, "8M"), volume(api, "8M")
    fill(system, pvol, size, 10)
    d0 = digest(system, pvol, size)
    before = pool_used(api)
    mus = [snap(api, pvol, f"many{i}", autoSplit=True)[1] for i in range(64)]
    assert pool_used(api) - before < 2 * MiB  # 64 snapshots of unchanged data cost (next to) nothing
    fill(system, pvol, size, 11)  # every track changes once
    grown = pool_used(api) - before
    assert size <= grown < 2 * size, grown  # saved once, shared by all 64, not 64 x 8 MiB
    api.invoke("POST", f"snapshots/{pvol},{mus[0]}/actions/assign-volume/invoke",
               {"parameters": {"svolLdevId": first_sv}})
    api.invoke("POST", f"snapshots/{pvol},{mus[-1]}/actions/assign-volume/invoke",
               {"parameters": {"svolLdevId": last_sv}})
    assert digest(system, first_sv, size) == d0
    assert digest(system, last_sv, size) == d0
    # deleting the newest snapshot hands its saved tracks to the one before
    api.invoke("POST", f"snapshots/{pvol},{mus[-1]}/actions/unassign-volume/invoke")
    api.invoke("DELETE", f"snapshots/{pvol},{mus[-1]}")
    assert digest(system, first_sv, size) == d0
    group = api.get("snapshot-groups/many0")
    assert group["snapshotGroupId"] == "many0" and len(group["snapshots"]) == 1
    api.invoke("DELETE", "snapshot-groups/many0")
    for mu in mus[1:-1]:
        api.invoke("DELETE", f"snapshots/{pvol},{mu}")
    assert pool_used(api) - before < 2 * MiB  # the saved tracks went with the last snapshot


def test_svol_host_writes_stay_with_the_snapshot(system: SystemProcess, api: VspClient) -> None:
    size = 4 * MiB
    pvol, sv, other = volume(api, "4M"), volume(api, "4M"), volume(api, "4M")
    fill(system, pvol, size, 20)
    with nbd(system, pvol) as n:
        base = n.read(0, size)
    _, mu = snap(api, pvol, svolLdevId=sv)
    with nbd(system, sv) as n, pytest.raises(NbdError) as e:  # in PAIR the S-VOL takes no writes
        n.write(0, b"x" * 512)
    assert e.value.errno == 1
    api.invoke("POST", f"snapshots/{pvol},{mu}/actions/split/invoke")
    with nbd(system, sv) as n:
        n.write(100000, b"\x5a" * 5000)  # part of a track: the rest of it must keep the image
        n.flush()
    expect = bytearray(base)
    expect[100000:105000] = b"\x5a" * 5000
    with nbd(system, pvol) as n:
        assert n.read(0, size) == base  # the P-VOL did not see the S-VOL's write
        n.write(0, b"\x11" * size)
    with nbd(system, sv) as n:
        assert n.read(0, size) == expect
    assert api.get(f"snapshots/{pvol},{mu}")["isWrittenInSvol"] is True
    # unassign, assign another volume: the written bytes stay with the snapshot
    api.invoke("POST", f"snapshots/{pvol},{mu}/actions/unassign-volume/invoke")
    assert "svolLdevId" not in api.get(f"snapshots/{pvol},{mu}")
    api.invoke("POST", f"snapshots/{pvol},{mu}/actions/assign-volume/invoke", {"parameters": {"svolLdevId": other}})
    with nbd(system, other) as n:
        assert n.read(0, size) == expect
    api.invoke("POST", f"snapshots/{pvol},{mu}/actions/restore/invoke", {"parameters": {"autoSplit": True}})
    assert status(api, pvol, mu) == "PSUS"
    with nbd(system, pvol) as n:
        assert n.read(0, size) == expect


def test_refusals_change_nothing(system: SystemProcess, api: VspClient) -> None:
    pvol, sv = volume(api, "4M"), volume(api, "4M")
    small = volume(api, "2M")
    _, mu = snap(api, pvol, svolLdevId=sv)
    refused(lambda: api.invoke("POST", f"snapshots/{pvol},{mu}/actions/restore/invoke"))  # not split
    api.invoke("POST", f"snapshots/{pvol},{mu}/actions/split/invoke")
    refused(lambda: api.invoke("POST", f"snapshots/{pvol},{mu}/actions/split/invoke"))  # already split
    api.delete_lun(f"CL1-A,0,{api.get(f'ldevs/{pvol}')['ports'][0]['lun']}")
    body = refused(lambda: api.invoke("DELETE", f"ldevs/{pvol}"), None)  # a P-VOL with snapshots
    assert body["messageId"] == "KART40063-E"
    refused(lambda: snap(api, pvol, "g1"), 409)  # one snapshot of a P-VOL per group
    refused(lambda: snap(api, pvol, "g9", muNumber=mu), 409)
    refused(lambda: snap(api, pvol, "g8", svolLdevId=small), 400)  # not the P-VOL's capacity
    refused(lambda: snap(api, 4000, "g8"), 404)
    refused(lambda: api.get("snapshots/1,2,3"), 400)
    refused(lambda: api.get(f"snapshots/{pvol},1000"), 404)
    refused(lambda: api.invoke("POST", f"snapshots/{pvol},{mu}/actions/explode/invoke"), 404)
    assert [(x["muNumber"], x["status"]) for x in api.get("snapshots")["data"]] == [(mu, "PSUS")]


def test_snapshot_of_a_truecopy_svol_in_pair(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]
                                           ) -> None:
    p, s, pc, sc = linked
    size = 8 * MiB
    pv, sv = volume(pc, "8M"), volume(sc, "8M")
    fill(p, pv, size, 30)
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": "tcg", "copyPairName": "p1", "replicationType": "TC",
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=sc)
    d0 = digest(p, pv, size)
    snap_sv = volume(sc, "8M")
    _, mu = snap(sc, sv, "drtest", svolLdevId=snap_sv, autoSplit=True)  # the DR test: snapshot the S-VOL
    scribble(p, pv, size, 31)  # the host keeps writing on the primary; TC mirrors it into the S-VOL
    d1 = digest(p, pv, size)
    assert digest(s, sv, size) == d1
    assert digest(s, snap_sv, size) == d0
    pair = pc.get(f"remote-mirror-copypairs/{s.storage_device_id},tcg,tcgP_,tcgS_,p1", remote=sc)
    assert pair["pvolStatus"] == "PAIR" and pair["svolStatus"] == "PAIR"
    # restoring onto an S-VOL in PAIR is refused, as on the array
    refused(lambda: sc.invoke("POST", f"snapshots/{sv},{mu}/actions/restore/invoke"))
    assert status(sc, sv, mu) == "PSUS"
    # a snapshot of the P-VOL: its restore goes through the host write path, so TrueCopy mirrors it
    _, pmu = snap(pc, pv, "prod", autoSplit=True)
    scribble(p, pv, size, 32)
    pc.invoke("POST", f"snapshots/{pv},{pmu}/actions/restore/invoke")
    assert digest(p, pv, size) == d1
    assert digest(s, sv, size) == d1
    assert digest(s, snap_sv, size) == d0


def _writer(system: SystemProcess, ldev: int, size: int, stop: threading.Event, acked: dict[int, bytes],
            inflight: dict[int, bytes]) -> None:
    rnd = random.Random(99)
    try:
        with nbd(system, ldev) as n:
            while not stop.is_set():
                slot = rnd.randrange(size // 4096)
                data = rnd.randbytes(4096)
                inflight[slot] = data
                n.write(slot * 4096, data)
                acked[slot] = data
                del inflight[slot]
    except (OSError, NbdError, ConnectionError):
        pass  # the system was killed


@pytest.mark.e2e
def test_kill_9_under_write_load_keeps_the_snapshot_and_every_acked_write(system: SystemProcess,
                                                                          api: VspClient) -> None:
    size = 16 * MiB
    pvol, sv = volume(api), volume(api)
    fill(system, pvol, size, 40)
    with nbd(system, pvol) as n:
        before = n.read(0, size)
    stop = threading.Event()
    acked: dict[int, bytes] = {}
    inflight: dict[int, bytes] = {}
    t = threading.Thread(target=_writer, args=(system, pvol, size, stop, acked, inflight), daemon=True)
    t.start()
    while len(acked) < 200:
        threading.Event().wait(0.01)
    _, mu = snap(api, pvol, svolLdevId=sv, autoSplit=True)  # split while the host writes
    image = hashlib.sha256()
    with nbd(system, sv) as n:
        image.update(n.read(0, size))
    at_split = image.hexdigest()
    n_before = len(acked)
    while len(acked) < n_before + 300:  # first writes to many tracks after the split: copy on write
        threading.Event().wait(0.01)
    system.kill()
    stop.set()
    t.join(10)
    system.start()
    with system.client() as c:
        assert c.get(f"snapshots/{pvol},{mu}")["status"] == "PSUS"
    assert digest(system, sv, size) == at_split
    with nbd(system, pvol) as n:
        now = n.read(0, size)
    for slot, data in acked.items():
        got = now[slot * 4096:(slot + 1) * 4096]
        assert got == data or got == inflight.get(slot), f"acknowledged write to block {slot} lost"
    assert now != before


def test_snapshot_of_a_ur_svol_after_a_flush_split(linked: tuple[SystemProcess, SystemProcess, VspClient,
                                                                 VspClient]) -> None:
    p, s, pc, sc = linked
    size = 8 * MiB
    for c in (pc, sc):
        c.create_journal(1, [c.create_ldev("128M")])
    pv, sv = volume(pc, "8M"), volume(sc, "8M")
    fill(p, pv, size, 50)
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": "urg", "copyPairName": "u0", "replicationType": "UR",
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "ASYNC", "muNumber": 1, "pvolJournalId": 1, "svolJournalId": 1},
        remote=sc)
    gid = f"{s.storage_device_id},urg,urgP_,urgS_"
    scribble(p, pv, size, 51)
    pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/split/invoke",
              {"parameters": {"replicationType": "UR"}}, remote=sc)  # the split flushes the journal first
    d0 = digest(p, pv, size)
    assert digest(s, sv, size) == d0
    snap_sv = volume(sc, "8M")
    _, mu = snap(sc, sv, "urtest", svolLdevId=snap_sv, autoSplit=True)
    pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/resync/invoke",
              {"parameters": {"replicationType": "UR"}}, remote=sc)
    scribble(p, pv, size, 52)  # journal restore on the S-VOL goes through the copy-on-write too
    d1 = digest(p, pv, size)
    deadline = time.monotonic() + 60
    while digest(s, sv, size) != d1:
        assert time.monotonic() < deadline, "the UR S-VOL did not catch up"
        time.sleep(0.2)
    assert digest(s, snap_sv, size) == d0
    refused(lambda: sc.invoke("POST", f"snapshots/{sv},{mu}/actions/restore/invoke"))  # S-VOL in PAIR


def test_clone_copies_the_image_and_leaves_an_ordinary_volume(system: SystemProcess, api: VspClient) -> None:
    size = 4 * MiB
    pvol, a, b = volume(api, "4M"), volume(api, "4M"), volume(api, "4M")
    fill(system, pvol, size, 60)
    d0 = digest(system, pvol, size)
    # Cinder's clone: isClone + clonesAutomation, then it waits until the pair is gone
    snap(api, pvol, "clone1", svolLdevId=a, isClone=True, clonesAutomation=True, copySpeed="faster")
    deadline = time.monotonic() + 60
    while api.get("snapshots", svolLdevId=a)["data"]:
        assert time.monotonic() < deadline, "the clone did not finish"
        time.sleep(0.1)
    # the clone action on a split snapshot, while the P-VOL changes
    _, mu = snap(api, pvol, "clone2", svolLdevId=b, autoSplit=True, isClone=True)
    scribble(system, pvol, size, 61)
    api.invoke("POST", f"snapshots/{pvol},{mu}/actions/clone/invoke")
    assert api.get("snapshots")["data"] == []
    assert digest(system, a, size) == d0
    assert digest(system, b, size) == d0
    with nbd(system, b) as n:  # an ordinary volume now: writable, and it keeps what it holds
        n.write(0, b"\x77" * 4096)
        assert n.read(0, 4096) == b"\x77" * 4096
    api.delete_lun(f"CL1-A,0,{api.get(f'ldevs/{b}')['ports'][0]['lun']}")
    api.delete_ldev(b)



def test_concurrent_first_writes_after_a_split_keep_the_image(system: SystemProcess, api: VspClient) -> None:
    """Eight host connections write 4 KiB blocks all over the P-VOL right after a split, so their first writes
    to fresh tracks wait for the pool's sync together (group commit), and a second snapshot is split while they
    write: the first shows the P-VOL at its split, the second a state between its request and its answer (each
    block a version acknowledged before the request or sent before the answer), every acknowledged write is on
    the P-VOL."""
    size = 16 * MiB
    blocks = size // 4096
    pvol, sv1, sv2 = volume(api), volume(api), volume(api)
    fill(system, pvol, size, 70)
    with nbd(system, pvol) as n:
        base = n.read(0, size)
    _, mu1 = snap(api, pvol, "c1", svolLdevId=sv1, autoSplit=True)
    history: dict[int, list[bytes]] = {b: [base[b * 4096:(b + 1) * 4096]] for b in range(blocks)}
    acked = dict.fromkeys(range(blocks), 0)  # block -> index in history of the last acknowledged version
    errors: list[BaseException] = []
    count = [0]

    def writer(i: int) -> None:
        rnd = random.Random(i)
        try:
            with nbd(system, pvol) as n:
                for _ in range(150):
                    b = rnd.randrange(blocks // 8) * 8 + i  # the writers' blocks are disjoint
                    data = rnd.randbytes(4096)
                    history[b].append(data)
                    n.write(b * 4096, data)
                    acked[b] = len(history[b]) - 1
                    count[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    while count[0] < 200 and not errors:
        time.sleep(0.01)
    before = dict(acked)
    _, mu2 = snap(api, pvol, "c2", svolLdevId=sv2, autoSplit=True)
    after = {b: len(h) - 1 for b, h in history.items()}
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert digest(system, sv1, size) == hashlib.sha256(base).hexdigest()
    with nbd(system, sv2) as n:
        image = n.read(0, size)
    for b in range(blocks):
        got = image[b * 4096:(b + 1) * 4096]
        assert got in history[b][before[b]:after[b] + 1], f"block {b} of the second snapshot"
    with nbd(system, pvol) as n:
        now = n.read(0, size)
    for b in range(blocks):
        assert now[b * 4096:(b + 1) * 4096] == history[b][acked[b]], f"acknowledged write to block {b} lost"
    assert status(api, pvol, mu1) == status(api, pvol, mu2) == "PSUS"
