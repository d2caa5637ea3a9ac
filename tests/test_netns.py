"""The storage systems on separate hosts: each in its own network namespace with its own address (on a bridge
in the root namespace, where the test runs), REST, NBD and replication link bound to that address. TrueCopy
and Universal Replicator run their create / write / split / resync / compare flow across the namespaces, and
a host taken off the network (its bridge port down) is a cut link: PSUE by fence level for TrueCopy, by the
path watch for Universal Replicator; back online, a resync makes the volumes equal again.

Skipped where network namespaces cannot be made (not root, no CAP_NET_ADMIN, no iproute2). Every namespace
and link is removed at the end, also after a failure (tests/faultlab.py).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultlab import Netns, cleanup_stale, netns_unavailable

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient, NbdError
from vspemu.lab import SystemProcess, link_systems, volume_digest

MiB = 1 << 20
PATH_TIMEOUT = 3  # timeoutValueForRemoteIOInSeconds: a cut is noticed within seconds


@dataclass
class Hosts:
    net: Netns
    p: SystemProcess
    s: SystemProcess
    pc: VspClient
    sc: VspClient

    def nbd(self, side: str, ldev: int) -> NbdClient:
        sysp = self.p if side == "p" else self.s
        return NbdClient(sysp.host, sysp.nbd_port, str(ldev))

    def digest(self, side: str, ldev: int, size: int) -> str:
        sysp = self.p if side == "p" else self.s
        return volume_digest(sysp.nbd_port, ldev, size, host=sysp.host)

    def volumes(self, count: int, size: str) -> list[tuple[int, int]]:
        out = []
        for _ in range(count):
            pv, sv = self.pc.create_ldev(size), self.sc.create_ldev(size)
            self.pc.add_lun(pv)
            self.sc.add_lun(sv)
            out.append((pv, sv))
        return out

    def gid(self, group: str) -> str:
        return f"{self.s.storage_device_id},{group},{group}P_,{group}S_"

    def action(self, group: str, name: str, rtype: str, **params: object) -> None:
        self.pc.invoke("PUT", f"remote-mirror-copygroups/{self.gid(group)}/actions/{name}/invoke",
                       {"parameters": {"replicationType": rtype, **params}}, remote=self.sc)

    def statuses(self, group: str) -> set[tuple[str, str]]:
        g = self.pc.get(f"remote-mirror-copygroups/{self.gid(group)}", remote=self.sc)
        return {(p["pvolStatus"], p["svolStatus"]) for p in g["copyPairs"]}

    def local_status(self, group: str) -> set[str]:
        """The primary's own view (no Remote-Authorization: works while the secondary is unreachable)."""
        g = self.pc.get(f"remote-mirror-copygroups/NotSpecified,{group},{group}P_,NotSpecified")
        return {p["pvolStatus"] for p in g["copyPairs"]}

    def wait(self, group: str, want: set[tuple[str, str]], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.statuses(group)) != want:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)

    def wait_local(self, group: str, want: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.local_status(group)) != {want}:
            assert time.monotonic() < deadline, got
            time.sleep(0.05)

    def wait_paths(self) -> None:
        self.pc.wait_path_status(f"{self.s.serial},R9,0", "NML_01", 60)
        self.sc.wait_path_status(f"{self.p.serial},R9,0", "NML_01", 60)


@pytest.fixture(scope="module")
def can_netns() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    cleanup_stale()


@pytest.fixture
def hosts(can_netns: None, tmp_path: Path) -> Iterator[Hosts]:
    with Netns(2) as net:
        started: list[SystemProcess] = []
        clients: list[VspClient] = []
        try:
            for i, serial in enumerate((440001, 440002)):
                started.append(net.system(i, tmp_path / f"sys-{serial}", serial,
                                          extra_args=["--min-remote-io-timeout", "1"]).start())
            clients = [s.client() for s in started]
            link_systems(clients[0], clients[1])
            for c, other in ((clients[0], started[1]), (clients[1], started[0])):
                c.invoke("PATCH", f"remotepath-groups/{other.serial},R9,0",
                         {"timeoutValueForRemoteIOInSeconds": PATH_TIMEOUT})
            yield Hosts(net, started[0], started[1], clients[0], clients[1])
        finally:
            for c in clients:
                c.close()
            for s in started:
                s.stop()


def _listening(ns: str) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket in a namespace (/proc/net/tcp{,6} as seen from it)."""
    out = set()
    for name in ("tcp", "tcp6"):
        r = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/proc/net/{name}"], capture_output=True,
                           text=True, check=True)
        for line in r.stdout.splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if name == "tcp":
                addr = str(ipaddress.IPv4Address(raw[::-1]))
            else:  # four little-endian 32-bit words
                addr = str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
            out.add((addr, int(port_hex, 16)))
    return out


def test_each_system_listens_only_on_its_own_address(hosts: Hosts) -> None:
    for sysp, host in ((hosts.p, hosts.net.hosts[0]), (hosts.s, hosts.net.hosts[1])):
        listening = _listening(host.ns)
        assert {a for a, _ in listening} == {host.address}, listening
        assert {p for _, p in listening} == {sysp.rest_port, sysp.nbd_port, *sysp.link_ports}
    # each knows the other by its own address: REST for Remote-Authorization, the link ports for the paths
    peer = hosts.pc.get(f"remote-storages/{hosts.s.storage_device_id}")
    assert peer["restServerIp"] == hosts.s.host
    assert hosts.sc.get(f"remote-storages/{hosts.p.storage_device_id}")["restServerIp"] == hosts.p.host
    hosts.wait_paths()


def test_truecopy_across_hosts_and_a_host_off_the_network(hosts: Hosts) -> None:
    """One copy group per fence level, each with one pair; the secondary's host leaves the network while
    the host writes to every P-VOL: NEVER goes on (PSUE, tracked), DATA and STATUS fail the write and fence
    the P-VOL (the S side cannot be told). Back online: resync, and S-VOL == P-VOL."""
    fences = ("NEVER", "DATA", "STATUS")
    vols = dict(zip(fences, hosts.volumes(3, "16M"), strict=True))
    for fence, (pv, sv) in vols.items():
        with hosts.nbd("p", pv) as c:
            c.write(0, os.urandom(8 * MiB))
        hosts.pc.invoke("POST", "remote-mirror-copypairs", {
            "copyGroupName": f"tc{fence[0]}", "copyPairName": "p", "replicationType": "TC",
            "remoteStorageDeviceId": hosts.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": fence, "copyPace": 15}, remote=hosts.sc)
        assert hosts.statuses(f"tc{fence[0]}") == {("PAIR", "PAIR")}
        assert hosts.digest("p", pv, 16 * MiB) == hosts.digest("s", sv, 16 * MiB)
    # mirrored writes, a split with S-VOL writes, a resync: equal again
    for fence, (pv, sv) in vols.items():
        g = f"tc{fence[0]}"
        with hosts.nbd("p", pv) as c:
            c.write(9 * MiB, os.urandom(MiB))
        with hosts.nbd("s", sv) as c, hosts.nbd("p", pv) as c2:
            assert c.read(9 * MiB, MiB) == c2.read(9 * MiB, MiB)
        hosts.action(g, "split", "TC", svolAccessMode="rw")
        assert hosts.statuses(g) == {("PSUS", "SSUS")}
        with hosts.nbd("p", pv) as c:
            c.write(0, b"P" * 4096)
        with hosts.nbd("s", sv) as c:
            c.write(5 * MiB, b"S" * 4096)
        hosts.action(g, "resync", "TC")
        hosts.wait(g, {("PAIR", "PAIR")})
        assert hosts.digest("p", pv, 16 * MiB) == hosts.digest("s", sv, 16 * MiB)
    # the secondary's host leaves the network
    hosts.net.set_host_online(1, False)
    try:
        for fence, (pv, _) in vols.items():
            with hosts.nbd("p", pv) as c:
                if fence == "NEVER":
                    c.write(MiB, b"n" * 4096)  # waits for the link time-out, then accepted and tracked
                    c.write(2 * MiB, b"n" * 4096)
                else:
                    with pytest.raises(NbdError) as e:
                        c.write(MiB, b"d" * 4096)  # the write that could not be copied fails
                    assert e.value.errno in (1, 5)
                    with pytest.raises(NbdError) as e:
                        c.write(2 * MiB, b"d" * 4096)  # and the P-VOL is fenced
                    assert e.value.errno == 1
            hosts.wait_local(f"tc{fence[0]}", "PSUE")
    finally:
        hosts.net.set_host_online(1, True)
    hosts.wait_paths()
    for fence, (pv, sv) in vols.items():
        g = f"tc{fence[0]}"
        hosts.action(g, "resync", "TC")
        hosts.wait(g, {("PAIR", "PAIR")})
        with hosts.nbd("p", pv) as c:
            c.write(3 * MiB, b"after" * 800)  # writable again after the resync
        assert hosts.digest("p", pv, 16 * MiB) == hosts.digest("s", sv, 16 * MiB), fence


def test_universal_replicator_across_hosts_and_a_host_off_the_network(hosts: Hosts) -> None:
    """A mirror of two pairs across the hosts: journaled writes, split, resync, equal. Then the secondary's
    host leaves the network: the primary, no longer read, suspends the mirror after the path watch time
    (0 minutes: within a second or two) and keeps taking writes into its bitmaps; back online: the secondary
    learns PSUE, a resync copies the differences, and the volumes are equal."""
    for c in (hosts.pc, hosts.sc):
        c.create_journal(1, [c.create_ldev("64M")])
    vols = hosts.volumes(2, "16M")
    for pv, _ in vols:
        with hosts.nbd("p", pv) as c:
            c.write(0, os.urandom(8 * MiB))
    for i, (pv, sv) in enumerate(vols):
        body = {"copyGroupName": "ur", "copyPairName": f"u{i}", "replicationType": "UR",
                "remoteStorageDeviceId": hosts.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                "isNewGroupCreation": i == 0, "fenceLevel": "ASYNC", "isDataReductionForceCopy": True}
        if i == 0:
            body.update(muNumber=1, pvolJournalId=1, svolJournalId=1)
        hosts.pc.invoke("POST", "remote-mirror-copypairs", body, remote=hosts.sc)
    assert hosts.statuses("ur") == {("PAIR", "PAIR")}

    def drained() -> None:
        deadline = time.monotonic() + 60
        while hosts.pc.get("journals", journalInfo="basic")["data"][0]["qCount"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def equal() -> None:
        for pv, sv in vols:
            assert hosts.digest("p", pv, 16 * MiB) == hosts.digest("s", sv, 16 * MiB)

    for pv, _ in vols:  # journaled writes, pulled across the hosts
        with hosts.nbd("p", pv) as c:
            for k in range(16):
                c.write(k * 997 * 4096 % (15 * MiB), os.urandom(4096 * (1 + k % 4)))
    drained()
    equal()
    hosts.action("ur", "split", "UR")
    assert hosts.statuses("ur") == {("PSUS", "SSUS")}
    with hosts.nbd("p", vols[0][0]) as c:
        c.write(10 * MiB, os.urandom(MiB))
    hosts.action("ur", "resync", "UR")
    hosts.wait("ur", {("PAIR", "PAIR")})
    drained()
    equal()
    # the path watch at 0 minutes: a pull missing for a second suspends the mirror
    for c in (hosts.pc, hosts.sc):
        c.invoke("PATCH", "journals/1", {"mirrorUnit": {"muNumber": 1, "pathBlockadeWatchInMinutes": 0}})
    hosts.net.set_host_online(1, False)
    try:
        for pv, _ in vols:
            with hosts.nbd("p", pv) as c:
                c.write(4 * MiB, os.urandom(MiB))  # journaled: the host does not wait for the secondary
        hosts.wait_local("ur", "PSUE")
        assert hosts.pc.get("journals", journalInfo="basic")["data"][0]["journalStatus"] == "PJSE"
        for pv, _ in vols:
            with hosts.nbd("p", pv) as c:
                c.write(6 * MiB, os.urandom(MiB))  # PSUE: still writable, tracked in the bitmap
    finally:
        hosts.net.set_host_online(1, True)
    hosts.wait_paths()
    hosts.wait("ur", {("PSUE", "PSUE")}, timeout=30)
    hosts.action("ur", "resync", "UR")
    hosts.wait("ur", {("PAIR", "PAIR")})
    drained()
    equal()
