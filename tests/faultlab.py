"""Helpers of the fault campaign (tests/test_faults.py) and the separate-hosts tests (tests/test_netns.py).

- :class:`Netns`: storage systems on "separate hosts": each in its own network namespace, reached from the
  test (in the root namespace) over a bridge; optionally a separate replication network (a veth pair between
  the two namespaces) that can be cut with ``ip link set ... down`` while REST and NBD stay reachable.
- :class:`Writer`: a host that writes 4 KiB blocks over NBD, each stamped with a global sequence number, the
  volume and the slot, and records which writes were acknowledged; :class:`History` checks volume images
  against that record (every acknowledged write survives; a UR S-VOL is the image of a prefix of the sequence).
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import os
import random
import re
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess

BLOCK = 4096
MAGIC = b"VSPFAULT"
_HEAD = struct.Struct("!8sQII")  # magic, sequence number, volume index, slot

ACKED, FAILED, PENDING = "acked", "failed", "pending"


# -- network namespaces ------------------------------------------------------------------------------------

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


_PREFIX = "vsf"  # every namespace and root-namespace link this module makes starts with it, then the pid (hex)
_counter = itertools.count()


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here (None if they can)."""
    if os.environ.get("VSPEMU_NO_NETNS"):
        return "VSPEMU_NO_NETNS is set"
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    try:
        probe = f"{_PREFIX}{os.getpid():06x}probe"
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"cannot create a network namespace: {r.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
    except FileNotFoundError:
        return "the ip command (iproute2) is not installed"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> None:
    """Remove namespaces and root links left by runs of this module whose process is gone (killed tests)."""
    pat = re.compile(rf"^{_PREFIX}([0-9a-f]{{6}})")
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pat.match(name)
        if m and not _pid_alive(int(m.group(1), 16)):
            _kill_ns_processes(name)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = pat.match(name)
        if m and not _pid_alive(int(m.group(1), 16)):
            _ip("link", "del", name, check=False)


def _kill_ns_processes(ns: str) -> None:
    r = _ip("netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def _free_subnet() -> ipaddress.IPv4Network:
    """A /28 of 198.51.100.0/24 (TEST-NET-2) that no route of the root namespace overlaps."""
    used = []
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "prohibit", "blackhole"):
            word = line.split()[1]
        try:
            used.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    candidates = list(ipaddress.ip_network("198.51.100.0/24").subnets(new_prefix=28))
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free /28 in 198.51.100.0/24")


@dataclass
class Host:
    """One namespace: a "host" of a storage system."""

    ns: str
    address: str  # its address on the management network (REST, NBD; the link too without a link network)
    root_port: str  # its veth's end on the bridge in the root namespace
    link_address: str | None = None  # its address on the replication network, if there is one


class Netns:
    """Namespaces (one per storage system) on a bridge in the root namespace, optionally with a separate
    replication network between the first two. Use as a context manager: everything made is removed at exit,
    also after a failure."""

    def __init__(self, count: int = 2, link_network: bool = False) -> None:
        self.count = count
        self.link_network = link_network
        self.tag = f"{_PREFIX}{os.getpid():06x}{next(_counter) % 36:x}"
        self.bridge = f"{self.tag}br"
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[-1])  # the root namespace's address on the bridge
        self.hosts: list[Host] = []
        self._made_ns: list[str] = []
        self._made_links: list[str] = []
        for i in range(count):
            self.hosts.append(Host(ns=f"{self.tag}-h{i}", address=str(hosts[i]), root_port=f"{self.tag}r{i}",
                                   link_address=f"203.0.113.{i + 1}" if link_network and i < 2 else None))

    def __enter__(self) -> Netns:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_links.append(self.bridge)
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, h in enumerate(self.hosts):
            _ip("netns", "add", h.ns)
            self._made_ns.append(h.ns)
            _ip("-n", h.ns, "link", "set", "lo", "up")
            inner = f"{self.tag}i{i}"
            _ip("link", "add", h.root_port, "type", "veth", "peer", "name", inner)
            self._made_links.append(h.root_port)
            _ip("link", "set", inner, "netns", h.ns)
            _ip("-n", h.ns, "link", "set", inner, "name", "mgmt0")
            _ip("-n", h.ns, "addr", "add", f"{h.address}/{self.subnet.prefixlen}", "dev", "mgmt0")
            _ip("-n", h.ns, "link", "set", "mgmt0", "up")
            _ip("link", "set", h.root_port, "master", self.bridge)
            _ip("link", "set", h.root_port, "up")
        if self.link_network:
            a, b = self.hosts[0], self.hosts[1]
            _ip("link", "add", f"{self.tag}la", "type", "veth", "peer", "name", f"{self.tag}lb")
            self._made_links.append(f"{self.tag}la")
            for h, end in ((a, f"{self.tag}la"), (b, f"{self.tag}lb")):
                _ip("link", "set", end, "netns", h.ns)
                _ip("-n", h.ns, "link", "set", end, "name", "repl0")
                _ip("-n", h.ns, "addr", "add", f"{h.link_address}/24", "dev", "repl0")
                _ip("-n", h.ns, "link", "set", "repl0", "up")

    def close(self) -> None:
        for ns in self._made_ns:
            _kill_ns_processes(ns)
            _ip("netns", "del", ns, check=False)
        for link in self._made_links:
            _ip("link", "del", link, check=False)  # (gone already if its peer's namespace went)
        self._made_ns, self._made_links = [], []

    # -- faults ---------------------------------------------------------------------------------------
    def set_link_network(self, up: bool) -> None:
        """Cut (or restore) the replication network: its veth goes down in the first namespace (the other
        end loses its carrier)."""
        assert self.link_network
        _ip("-n", self.hosts[0].ns, "link", "set", "repl0", "up" if up else "down")

    def set_host_online(self, index: int, up: bool) -> None:
        """Take a host off the network (its bridge port down: nothing reaches it, it reaches nothing)."""
        _ip("link", "set", self.hosts[index].root_port, "up" if up else "down")

    def system(self, index: int, data_dir: Path, serial: int, **kwargs: object) -> NetnsSystem:
        h = self.hosts[index]
        extra = list(kwargs.pop("extra_args", []) or [])  # type: ignore[call-overload]
        if h.link_address:
            extra += ["--link-host", h.link_address]
        return NetnsSystem(h.ns, data_dir, serial, host=h.address, extra_args=extra, **kwargs)  # type: ignore[arg-type]


class NetnsSystem(SystemProcess):
    """A storage-system process run inside a network namespace (``ip netns exec``, which execs it: the pid
    is the server's, so kill -9 hits the server)."""

    def __init__(self, ns: str, *args: object, **kwargs: object) -> None:
        self.ns = ns
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *super().command()]


# -- the stamped writer --------------------------------------------------------------------------------------

def stamp(seq: int, vol: int, slot: int) -> bytes:
    """The 4 KiB block that write ``seq`` puts into ``slot`` of volume ``vol`` (seq 0: the initial fill)."""
    head = _HEAD.pack(MAGIC, seq, vol, slot)
    tail = hashlib.blake2b(head, digest_size=64).digest()
    return (head + tail * (BLOCK // 64))[:BLOCK]


def decode(image: bytes, vol: int) -> list[int]:
    """The sequence number in each slot of a volume image; raises if a block is not a whole stamp of that
    volume and slot (torn, foreign, or garbage data)."""
    out = []
    for slot in range(len(image) // BLOCK):
        blk = image[slot * BLOCK:(slot + 1) * BLOCK]
        magic, seq, v, s = _HEAD.unpack_from(blk)
        if magic != MAGIC or v != vol or s != slot or blk != stamp(seq, vol, slot):
            raise Violation(f"volume {vol} slot {slot}: not an intact block of this slot "
                            f"(magic {magic!r}, seq {seq}, vol {v}, slot {s})")
        out.append(seq)
    return out


class Violation(AssertionError):
    """An invariant of the campaign does not hold."""


@dataclass
class History:
    """Every write the writer issued: (volume, slot) and its outcome, indexed by sequence number - 1."""

    volumes: int
    slots: int
    target: list[tuple[int, int]] = field(default_factory=list)
    outcome: list[str] = field(default_factory=list)

    @property
    def last_seq(self) -> int:
        return len(self.target)

    def acked_count(self) -> int:
        return self.outcome.count(ACKED)

    def _writes_to(self, upto: int) -> dict[tuple[int, int], list[int]]:
        by: dict[tuple[int, int], list[int]] = {}
        for seq in range(1, upto + 1):
            by.setdefault(self.target[seq - 1], []).append(seq)
        return by

    def check_survives(self, images: Sequence[list[int]], upto: int | None = None, what: str = "P-VOL") -> None:
        """Every write acknowledged up to ``upto`` (default: all) is in the images: each slot holds its last
        acknowledged write, or a later write (one that failed or is not in ``upto``: it may or may not be there)."""
        upto = self.last_seq if upto is None else upto
        by = self._writes_to(self.last_seq)
        for vol in range(self.volumes):
            for slot in range(self.slots):
                got = images[vol][slot]
                seqs = by.get((vol, slot), [])
                last_acked = max((s for s in seqs if s <= upto and self.outcome[s - 1] == ACKED), default=0)
                allowed = {last_acked} | {s for s in seqs if s > last_acked}
                if got not in allowed:
                    raise Violation(f"{what} volume {vol} slot {slot} holds write {got}, but write {last_acked} "
                                    f"was acknowledged (up to {upto}) and is lost")

    def check_prefix(self, images: Sequence[list[int]], what: str = "UR S-VOL") -> int:
        """The images are the P-VOLs after some prefix 1..j of the sequence (writes that failed may be missing
        from it, acknowledged ones not); returns j."""
        j = max((max(img) for img in images), default=0)
        by = self._writes_to(min(j, self.last_seq))
        if j > self.last_seq:
            raise Violation(f"{what} holds write {j}, which was never issued")
        for vol in range(self.volumes):
            for slot in range(self.slots):
                got = images[vol][slot]
                seqs = by.get((vol, slot), [])
                if got and got not in seqs:
                    raise Violation(f"{what} volume {vol} slot {slot} holds write {got}, not one of this slot")
                later_acked = [s for s in seqs if s > got and self.outcome[s - 1] == ACKED]
                if later_acked:
                    raise Violation(f"{what} is not a prefix image: it holds write {j} but volume {vol} slot {slot} "
                                    f"has write {got}, not the acknowledged write {later_acked[-1]}")
        return j


class Writer:
    """A host writing stamped 4 KiB blocks to random slots of the P-VOLs, one write at a time (each write is
    issued only after the previous one was answered: the sequence order is the order on the P-VOLs). It
    reconnects after errors (a killed system) and keeps going until stopped."""

    def __init__(self, host: str, port_of: Callable[[], int], ldevs: list[int], slots: int, seed: int = 0,
                 pause_s: float = 0.0) -> None:
        self.host = host
        self.port_of = port_of  # the NBD port of the primary (a restarted system keeps it)
        self.ldevs = ldevs
        self.history = History(len(ldevs), slots)
        self.rng = random.Random(seed)
        self.pause_s = pause_s
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._running.set()
        self._thread = threading.Thread(target=self._run, name="fault-writer", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Stop issuing writes; returns when no write is in flight."""
        self._running.clear()
        self._idle.wait()

    def resume(self) -> None:
        self._idle.clear()  # (before the thread runs again: a pause right after waits for it)
        self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        if self._thread is not None:
            self._thread.join(30)

    def snapshot(self) -> tuple[int, int]:
        """(last sequence number issued, acknowledged writes so far)."""
        with self._lock:
            return self.history.last_seq, self.history.acked_count()

    def _run(self) -> None:
        conns: dict[int, NbdClient] = {}
        try:
            while not self._stop.is_set():
                if not self._running.is_set():
                    for c in conns.values():
                        c.close()
                    conns.clear()
                    self._idle.set()
                    self._running.wait()
                    continue
                self._idle.clear()
                vol = self.rng.randrange(len(self.ldevs))
                slot = self.rng.randrange(self.history.slots)
                with self._lock:
                    self.history.target.append((vol, slot))
                    self.history.outcome.append(PENDING)
                    seq = self.history.last_seq
                try:
                    c = conns.get(vol)
                    if c is None:
                        c = conns[vol] = NbdClient(self.host, self.port_of(), str(self.ldevs[vol]), timeout=30)
                    c.write(slot * BLOCK, stamp(seq, vol, slot))
                except Exception as e:  # noqa: BLE001 - every failure is recorded and the host carries on
                    with self._lock:
                        self.history.outcome[seq - 1] = FAILED
                    if len(self.errors) < 1000:
                        self.errors.append(f"{type(e).__name__}: {e}")
                    c = conns.pop(vol, None)
                    if c is not None:
                        try:
                            c.close()
                        except Exception:  # noqa: BLE001
                            pass
                    time.sleep(0.02)
                    continue
                with self._lock:
                    self.history.outcome[seq - 1] = ACKED
                if self.pause_s:
                    time.sleep(self.pause_s)
        finally:
            for c in conns.values():
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
            self._idle.set()


def fill_initial(host: str, port: int, ldevs: list[int], slots: int) -> None:
    """Write the initial stamp (sequence 0) into every slot of every volume."""
    for vol, ldev in enumerate(ldevs):
        with NbdClient(host, port, str(ldev)) as c:
            data = b"".join(stamp(0, vol, s) for s in range(slots))
            for off in range(0, len(data), 4 << 20):
                c.write(off, data[off:off + (4 << 20)])
            c.flush()


def read_images(host: str, port: int, ldevs: list[int], slots: int) -> list[list[int]]:
    out = []
    for vol, ldev in enumerate(ldevs):
        with NbdClient(host, port, str(ldev)) as c:
            out.append(decode(c.read(0, slots * BLOCK), vol))
    return out


def read_stable_images(host: str, port: int, ldevs: list[int], slots: int, timeout: float = 20.0
                       ) -> list[list[int]]:
    """Images of volumes that should have stopped changing (a cut link, a dead primary): read until two
    reads in a row agree, so a read that spans an update of another volume is not taken for the state."""
    deadline = time.monotonic() + timeout
    last = read_images(host, port, ldevs, slots)
    while True:
        time.sleep(0.3)
        now = read_images(host, port, ldevs, slots)
        if now == last:
            return now
        if time.monotonic() > deadline:
            raise Violation(f"the volumes kept changing for {timeout} s while they should not")
        last = now


def read_file_images(data_dir: Path, ldevs: list[int], slots: int) -> list[list[int]]:
    """Images of LDEVs read from a stopped system's data files (what it restarts with)."""
    out = []
    for vol, ldev in enumerate(ldevs):
        with open(data_dir / "ldevs" / f"{ldev:05d}.img", "rb") as f:
            out.append(decode(f.read(slots * BLOCK), vol))
    return out
