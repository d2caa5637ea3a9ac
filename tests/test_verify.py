"""Online verify of pairs: per-track digests on each side, compared over the link; mark and resync repair."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, volume_digest
from vspemu.replication.bitmap import TRACK

MiB = 1 << 20
SIZE = 32 * MiB
CG = "vcg"
UG = "vug"


@dataclass
class Lab:
    p: SystemProcess
    s: SystemProcess
    pc: VspClient
    sc: VspClient

    def volumes(self, size: str = "32M") -> tuple[int, int]:
        pv = self.pc.create_ldev(size)
        self.pc.add_lun(pv)
        sv = self.sc.create_ldev(size)
        self.sc.add_lun(sv)
        with NbdClient("127.0.0.1", self.p.nbd_port, str(pv)) as c:
            for off in range(0, min(24, int(size[:-1])) * MiB, 4 * MiB):
                c.write(off, os.urandom(4 * MiB))
            c.flush()
        return pv, sv

    def create(self, pv: int, sv: int, rtype: str = "TC", group: str = CG) -> None:
        body: dict[str, object] = {
            "copyGroupName": group, "copyPairName": "p1", "replicationType": rtype,
            "remoteStorageDeviceId": self.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": "NEVER" if rtype == "TC" else "ASYNC", "copyPace": 15}
        if rtype == "UR":
            body.update(muNumber=1, pvolJournalId=1, svolJournalId=1)
        self.pc.invoke("POST", "remote-mirror-copypairs", body, remote=self.sc)

    def gid(self, group: str = CG) -> str:
        return f"{self.s.storage_device_id},{group},{group}P_,{group}S_"

    def pid(self, group: str = CG) -> str:
        return f"{self.gid(group)},p1"

    def status(self, group: str = CG) -> tuple[str, str]:
        x = self.pc.get(f"remote-mirror-copypairs/{self.pid(group)}", remote=self.sc)
        return x["pvolStatus"], x["svolStatus"]

    def wait(self, want: tuple[str, str], group: str = CG, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.status(group)) != want:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)

    def action(self, name: str, rtype: str = "TC", group: str = CG) -> None:
        self.pc.invoke("PUT", f"remote-mirror-copypairs/{self.pid(group)}/actions/{name}/invoke",
                       {"parameters": {"replicationType": rtype}}, remote=self.sc)

    def digest(self, side: str, ldev: int) -> str:
        return volume_digest((self.p if side == "p" else self.s).nbd_port, ldev, SIZE)

    def scribble(self, sv: int, tracks: list[int]) -> None:
        """Change the S-VOL's file directly on disk, with its system stopped: behind the pair's back."""
        self.s.stop()
        path = self.s.data_dir / "ldevs" / f"{sv:05d}.img"
        with open(path, "r+b") as f:
            for t in tracks:
                f.seek(t * TRACK + 1000)
                f.write(b"behind the pair's back")
        self.s.start()
        self.sc.login()
        self.wait_link()

    def wait_link(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.status()
                self.pc.verify(self.pid(), self.sc)
                return
            except ApiError:
                assert time.monotonic() < deadline
                time.sleep(0.2)


@pytest.fixture
def lab(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> Lab:
    return Lab(*linked)


@pytest.mark.e2e
def test_verify_finds_tracks_changed_behind_the_pair_and_mark_resync_repairs(lab: Lab) -> None:
    pv, sv = lab.volumes()
    lab.create(pv, sv)
    lab.wait(("PAIR", "PAIR"))
    r = lab.pc.verify(lab.pid(), lab.sc)
    assert r["state"] == "Completed" and r["differingTrackCount"] == 0
    assert r["pairs"][0]["tracks"] == SIZE // TRACK and r["pairs"][0]["status"] == "PAIR"
    # marking is refused on PAIR (split first), and changes nothing
    with pytest.raises(ApiError) as e:
        lab.pc.verify(lab.pid(), lab.sc, mark=True)
    assert e.value.status == 412 and e.value.message_id == "KART40062-E" and "split" in e.value.message
    lab.action("split")
    lab.wait(("PSUS", "SSUS"))
    changed = [0, 7, 40, 127]  # 127: the last track of 32 MiB
    lab.scribble(sv, changed)
    r = lab.pc.verify(lab.pid(), lab.sc)
    p = r["pairs"][0]
    assert r["differingTrackCount"] == 4 and p["differingTracks"] == changed
    assert p["differingBytes"] == 4 * TRACK and p["marked"] == 0 and p["alreadyMarked"] == 0
    # the group form gives the same
    g = lab.pc.verify(lab.gid(), lab.sc, hash="blake2b", max_tracks=2)
    assert g["differingTrackCount"] == 4 and g["pairs"][0]["differingTracks"] == changed[:2]
    assert g["hash"] == "blake2b"
    # without mark, a resync does not repair them (nothing knows they differ)...
    r = lab.pc.verify(lab.pid(), lab.sc, mark=True)
    assert r["pairs"][0]["marked"] == 4
    lab.action("resync")
    lab.wait(("PAIR", "PAIR"))
    assert lab.pc.verify(lab.pid(), lab.sc)["differingTrackCount"] == 0
    assert lab.digest("p", pv) == lab.digest("s", sv)


@pytest.mark.e2e
def test_resync_without_mark_leaves_the_damage(lab: Lab) -> None:
    """What mark is for: the same scenario without it keeps the differing tracks after a resync."""
    pv, sv = lab.volumes()
    lab.create(pv, sv)
    lab.wait(("PAIR", "PAIR"))
    lab.action("split")
    lab.wait(("PSUS", "SSUS"))
    lab.scribble(sv, [3])
    lab.action("resync")
    lab.wait(("PAIR", "PAIR"))
    r = lab.pc.verify(lab.pid(), lab.sc)
    assert r["pairs"][0]["differingTracks"] == [3] and r["pairs"][0]["rechecked"] is True


@pytest.mark.e2e
def test_ur_verify_after_flush_split_and_refused_in_pair(lab: Lab) -> None:
    for c in (lab.pc, lab.sc):
        c.create_journal(1, [c.create_ldev("128M")])
    pv, sv = lab.volumes()
    lab.create(pv, sv, rtype="UR", group=UG)
    lab.wait(("PAIR", "PAIR"), group=UG)
    with pytest.raises(ApiError) as e:
        lab.pc.verify(lab.pid(UG), lab.sc)
    assert e.value.status == 412 and e.value.message_id == "KART40062-E"
    assert "journal" in e.value.message and "flush" in e.value.message
    with NbdClient("127.0.0.1", lab.p.nbd_port, str(pv)) as c:
        c.write(5 * TRACK, os.urandom(TRACK))  # journaled; the flush split restores it before the S side splits
    lab.action("split", "UR", UG)
    lab.wait(("PSUS", "SSUS"), group=UG)
    r = lab.pc.verify(lab.pid(UG), lab.sc)
    assert r["differingTrackCount"] == 0
    assert lab.digest("p", pv) == lab.digest("s", sv)
    with NbdClient("127.0.0.1", lab.p.nbd_port, str(pv)) as c:
        c.write(9 * TRACK, b"after the split".ljust(4096))  # a P-VOL write after the split: known to the bitmap
    r = lab.pc.verify(lab.gid(UG), lab.sc)
    assert r["pairs"][0]["differingTracks"] == [9] and r["pairs"][0]["alreadyMarked"] == 1


def test_verify_refusals_in_the_array_format(lab: Lab) -> None:
    pv, sv = lab.volumes("8M")
    lab.create(pv, sv)
    lab.wait(("PAIR", "PAIR"))
    url = f"vspemu/v1/remote-mirror-copypairs/{lab.gid()},nosuch/actions/verify/invoke"
    r = lab.pc.raw("POST", url, json={}, headers=lab.pc.headers(lab.sc))
    assert r.status_code == 404 and r.json()["messageId"]
    assert set(r.json()) >= {"messageId", "message", "solution"}
    url = f"vspemu/v1/remote-mirror-copygroups/{lab.s.storage_device_id},nosuch,x,y/actions/verify/invoke"
    r = lab.pc.raw("POST", url, json={}, headers=lab.pc.headers(lab.sc))
    assert r.status_code >= 400 and "messageId" in r.json()
    # without Remote-Authorization
    url = f"vspemu/v1/remote-mirror-copypairs/{lab.pid()}/actions/verify/invoke"
    r = lab.pc.raw("POST", url, json={}, headers=lab.pc.headers())
    assert r.status_code >= 400 and "messageId" in r.json()
    # sent to the S-VOL side
    sid = f"{lab.p.storage_device_id},{CG},{CG}S_,{CG}P_,p1"
    r = lab.sc.raw("POST", f"vspemu/v1/remote-mirror-copypairs/{sid}/actions/verify/invoke", json={},
                   headers=lab.sc.headers(lab.pc))
    assert r.status_code == 412 and "P-VOL" in r.json()["message"]
    # a bad parameter
    r = lab.pc.raw("POST", url, json={"parameters": {"maxTracks": -1}}, headers=lab.pc.headers(lab.sc))
    assert r.status_code == 400 and "messageId" in r.json()
    # no report yet for this pair
    r = lab.pc.raw("GET", f"vspemu/v1/remote-mirror-copypairs/{lab.pid()}/verify", headers=lab.pc.headers())
    assert r.status_code == 404 and "messageId" in r.json()


@pytest.mark.e2e
def test_cli_verify(lab: Lab) -> None:
    pv, sv = lab.volumes("8M")
    lab.create(pv, sv)
    lab.wait(("PAIR", "PAIR"))
    env = {**os.environ, "VSPEMU_CA_CERT": os.pathsep.join(str(x.cert_path) for x in (lab.p, lab.s))}
    out = subprocess.run([sys.executable, "-m", "vspemu", "verify", "--group", CG, "--pair", "p1",
                          "--primary", lab.p.rest_url, "--secondary", lab.s.rest_url],
                         env=env, capture_output=True, text=True, timeout=120)
    print(out.stdout, out.stderr)
    assert out.returncode == 0, out.stderr
    assert "p1" in out.stdout and "0 differing tracks" in out.stdout


def test_hash_tracks_sparse_equals_written_zeros(tmp_path: Path) -> None:
    """A thin volume's holes are not read (SEEK_DATA) but hash as the zeros they read as."""
    from vspemu.replication.verify import _differing, hash_tracks

    size = 8 * MiB + 4096  # a short last track
    sparse, full = tmp_path / "sparse", tmp_path / "full"
    with open(sparse, "wb") as f:
        f.truncate(size)
        f.seek(5 * TRACK + 3)
        f.write(b"x")
    full.write_bytes(bytes(size))
    with open(full, "r+b") as f:
        f.seek(5 * TRACK + 3)
        f.write(b"y")
    fa, fb = os.open(sparse, os.O_RDONLY), os.open(full, os.O_RDONLY)
    try:
        for algo in ("sha1", "blake2b"):
            a, b = hash_tracks(fa, size, 0, 33, algo), hash_tracks(fb, size, 0, 33, algo)
            assert len(a) == 33 * 16 and list(_differing(a, b)) == [5]
    finally:
        os.close(fa)
        os.close(fb)
