"""Many pairs in one copy group (issue 20, scale): what grows with the number of pairs and what must not.

Speed is measured by bench/scale_bench.py; these tests check the behaviour and the traffic that the scale
work relies on: idle polling that does not grow with the number of pairs, and group operations that act on
every pair of a large group at once.
"""

from __future__ import annotations

import os
import time

import pytest

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, volume_digest

MiB = 1 << 20
CG = "big"


def link_sent(c: VspClient) -> float:
    text = c.raw("GET", "vspemu/v1/metrics", headers=c.headers()).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vspemu_link_sent_bytes"))


def make_group(pc: VspClient, sc: VspClient, n: int, size: str = "1M", luns: bool = False) -> list[tuple[int, int]]:
    vols = [(pc.create_ldev(size), sc.create_ldev(size)) for _ in range(n)]
    for pv, sv in vols if luns else []:
        pc.add_lun(pv)
        sc.add_lun(sv)
    for i, (pv, sv) in enumerate(vols):
        job = pc.request("POST", "remote-mirror-copypairs", json={
            "copyGroupName": CG, "copyPairName": f"p{i}", "replicationType": "TC",
            "remoteStorageDeviceId": sc.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": i == 0, "fenceLevel": "NEVER", "copyPace": 15},
            remote=sc, nowait=True, wait_completed=True)
        pc.wait_job(job)
    return vols


def statuses(pc: VspClient, sc: VspClient) -> set[tuple[str, str]]:
    g = pc.get(f"remote-mirror-copygroups/{sc.storage_device_id},{CG},{CG}P_,{CG}S_", remote=sc)
    return {(p["pvolStatus"], p["svolStatus"]) for p in g["copyPairs"]}


def wait_for(pc: VspClient, sc: VspClient, want: set[tuple[str, str]], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (got := statuses(pc, sc)) != want:
        assert time.monotonic() < deadline, got
        time.sleep(0.2)


@pytest.mark.e2e
def test_idle_polling_of_a_large_group_sends_digests_not_every_status(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    """With every pair PAIR and no host I/O, the status poll exchanges digests of both sides' views, not the
    status of every pair: 200 idle pairs cost a few hundred bytes per poll, as one pair does (before: about
    15 bytes per pair, each way, from each side, every 2 s)."""
    p, s, pc, sc = linked
    make_group(pc, sc, 200)
    wait_for(pc, sc, {("PAIR", "PAIR")})
    time.sleep(2.5)  # a poll round after the last copy settled
    before = link_sent(pc) + link_sent(sc)
    time.sleep(6.5)  # three rounds of polling from each side
    sent = link_sent(pc) + link_sent(sc) - before
    assert sent < 8000, sent  # full status exchanges: about 35 KB in this window
    assert statuses(pc, sc) == {("PAIR", "PAIR")}


@pytest.mark.e2e
def test_group_resync_of_many_pairs_merges_every_secondary_bitmap(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    """A group resync asks the S side for its bitmaps in batches (one round trip for the group): every
    track written on a writable S-VOL while split is copied back over, on every pair of the group."""
    p, s, pc, sc = linked
    vols = make_group(pc, sc, 12, "4M", luns=True)
    for pv, _ in vols:
        with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c:
            c.write(0, os.urandom(MiB))
    wait_for(pc, sc, {("PAIR", "PAIR")})
    gid = f"{sc.storage_device_id},{CG},{CG}P_,{CG}S_"
    pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/split/invoke",
              {"parameters": {"replicationType": "TC", "svolAccessMode": "rw"}}, remote=sc)
    wait_for(pc, sc, {("PSUS", "SSUS")})
    for i, (_, sv) in enumerate(vols):
        with NbdClient("127.0.0.1", s.nbd_port, str(sv)) as c:  # a different track on each S-VOL
            c.write((i % 8) * 256 * 1024 + 2 * MiB, os.urandom(4096))
    pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/resync/invoke",
              {"parameters": {"replicationType": "TC"}}, remote=sc)
    wait_for(pc, sc, {("PAIR", "PAIR")})
    for pv, sv in vols:
        assert volume_digest(p.nbd_port, pv, 4 * MiB) == volume_digest(s.nbd_port, sv, 4 * MiB)

