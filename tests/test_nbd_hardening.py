"""NBD hardening (issue 14): host access ends with the mapping, journal volumes refuse host I/O, and the
server's connection limits, handshake and idle timeouts and buffer budget."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vspemu import nbdproto as P
from vspemu.client import VspClient, nbd as nbdc
from vspemu.client.nbd import NbdClient, NbdError, NbdOptionError
from vspemu.lab import SystemProcess


def _nbd(system: SystemProcess, ldev: int) -> NbdClient:
    return NbdClient("127.0.0.1", system.nbd_port, str(ldev), timeout=20)


def _dropped(c: NbdClient) -> None:
    """The server has dropped this connection: a request gets no answer but a closed socket."""
    with pytest.raises(OSError):  # ConnectionResetError, BrokenPipeError or ConnectionError("closed")
        c.write(0, b"x" * 4096)
        c.read(0, 4096)
    c.sock.close()


def _file_bytes(system: SystemProcess, ldev: int, offset: int, length: int) -> bytes:
    with open(system.data_dir / "ldevs" / f"{ldev:05d}.img", "rb") as f:
        f.seek(offset)
        return f.read(length)


# -- access ends with the mapping ---------------------------------------------------------------------------
def test_deleting_the_last_lu_path_drops_the_connection(system: SystemProcess, api: VspClient) -> None:
    ldev = api.create_ldev("16M")
    lun1 = api.add_lun(ldev, "CL1-A")
    lun2 = api.add_lun(ldev, "CL2-A")
    c = _nbd(system, ldev)
    c.write(0, b"a" * 4096)
    api.delete_lun(lun1)  # one path is left: the host keeps its access
    c.write(4096, b"b" * 4096)
    assert c.read(0, 8192) == b"a" * 4096 + b"b" * 4096
    api.delete_lun(lun2)  # the last one: the connection goes at once
    _dropped(c)
    with pytest.raises(NbdOptionError):  # and a new one is refused at the handshake
        _nbd(system, ldev)
    assert str(ldev) not in nbdc.list_exports("127.0.0.1", system.nbd_port)
    assert _file_bytes(system, ldev, 0, 8192) == b"a" * 4096 + b"b" * 4096  # nothing after the drop landed


def test_a_connection_never_reaches_a_new_ldev_with_the_same_id(system: SystemProcess, api: VspClient) -> None:
    """The review's reproduction: a host keeps its connection while the LU path and the LDEV are deleted and
    a new LDEV (here a journal volume) takes the id; before the fix the old connection wrote into it."""
    ldev = api.create_ldev("16M")
    lun = api.add_lun(ldev)
    c = _nbd(system, ldev)
    c.write(0, b"o" * 4096)
    api.delete_lun(lun)
    api.delete_ldev(ldev)
    assert api.create_ldev("32M", ldev_id=ldev) == ldev
    api.create_journal(7, [ldev])
    secret = b"stale host write " * 241
    with pytest.raises(OSError):
        c.write(8192, secret, fua=True)
        c.write(0, secret, fua=True)
    c.sock.close()
    assert secret[:4096] not in _file_bytes(system, ldev, 0, 64 << 10)
    assert _file_bytes(system, ldev, 0, 4096) != b"o" * 4096
    with pytest.raises(NbdOptionError):
        _nbd(system, ldev)


def test_a_deleted_and_recreated_ldev_reads_zeros(system: SystemProcess, api: VspClient) -> None:
    ldev = api.create_ldev("16M")
    lun = api.add_lun(ldev)
    c = _nbd(system, ldev)
    c.write(0, b"q" * 4096)
    api.delete_lun(lun)
    api.delete_ldev(ldev)
    api.create_ldev("16M", ldev_id=ldev)
    api.add_lun(ldev)
    with pytest.raises(OSError):
        c.write(0, b"w" * 4096, fua=True)
        c.read(0, 4096)
    c.sock.close()
    with _nbd(system, ldev) as fresh:
        assert fresh.read(0, 8192) == bytes(8192)


def test_journal_volumes_are_not_reachable_over_nbd(system: SystemProcess, api: VspClient) -> None:
    ldev = api.create_ldev("16M")
    api.create_journal(5, [ldev])
    assert str(ldev) not in nbdc.list_exports("127.0.0.1", system.nbd_port)
    with pytest.raises(NbdOptionError):
        _nbd(system, ldev)
    with pytest.raises(Exception, match="journal"):  # and it cannot be mapped (the journal's guard)
        api.add_lun(ldev)
    api.delete_journal(5)  # out of the journal it is an ordinary LDEV again
    api.add_lun(ldev)
    with _nbd(system, ldev) as c:
        c.write(0, b"j" * 512)
        assert c.read(0, 512) == b"j" * 512


# -- in process: the Volume / NbdServer contract ------------------------------------------------------------
class _Loop:
    """An NbdServer on a uvloop in a thread."""

    def __init__(self, lookup: Callable[[str], object], names: Callable[[], list[str]], **limits: object) -> None:
        import asyncio

        import uvloop

        from vspemu.volumes.nbd import NbdLimits, NbdServer

        self.loop = uvloop.new_event_loop()
        self.server = NbdServer(lookup, names, NbdLimits(**limits))  # type: ignore[arg-type]
        self.loop.run_until_complete(self.server.start("127.0.0.1", 0))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.server.port
        self._asyncio = asyncio

    def call(self, fn: Callable[[], object]) -> None:
        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (fn(), done.set()))
        assert done.wait(5)

    def stop(self) -> None:
        self._asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_refusing_host_io_drops_connections_and_refuses_new_ones(tmp_path: Path) -> None:
    """What a journal volume gets, even if a connection to it existed: dropped, and every request refused."""
    from vspemu.volumes.volume import Volume

    vol = Volume.create(3, tmp_path / "v", 1 << 20)
    srv = _Loop(lambda name: vol if name == "3" else None, lambda: ["3"])
    try:
        c = NbdClient("127.0.0.1", srv.port, "3")
        c.write(0, b"before")
        assert vol.host_connections == 1
        srv.call(lambda: vol.refuse_host_io("a journal volume accepts no host I/O"))
        _dropped(c)
        with pytest.raises(NbdOptionError):
            NbdClient("127.0.0.1", srv.port, "3")
        assert vol.read(0, 6) == b"before"
        srv.call(lambda: vol.refuse_host_io(None))
        with NbdClient("127.0.0.1", srv.port, "3") as c2:
            # refused again while this connection is open, but suppose the drop did not reach it: the
            # requests themselves are refused (EPERM), reads included
            srv.call(lambda: (setattr(vol, "host_io_refused", "journal"), None))
            for call in (lambda: c2.read(0, 6), lambda: c2.write(0, b"x"), c2.flush, lambda: c2.zero(0, 512)):
                with pytest.raises(NbdError) as e:
                    call()
                assert e.value.errno == nbdc.EPERM
        assert vol.read(0, 6) == b"before"
    finally:
        srv.stop()
        vol.close()


def test_a_removed_volume_drops_its_connections(tmp_path: Path) -> None:
    from vspemu.volumes.volume import Volume

    path = tmp_path / "v"
    vol = Volume.create(4, path, 1 << 20)
    srv = _Loop(lambda name: vol if name == "4" else None, lambda: ["4"])
    try:
        c = NbdClient("127.0.0.1", srv.port, "4")
        c.write(0, b"old")
        srv.call(vol.remove)
        Volume.create(4, path, 1 << 20).close()  # a new LDEV with the same id (same file name)
        _dropped(c)
        with pytest.raises(NbdOptionError):  # the lookup still finds the removed object: refused anyway
            NbdClient("127.0.0.1", srv.port, "4")
        assert path.read_bytes()[:3] == b"\0\0\0"
    finally:
        srv.stop()


# -- limits: connections, handshake and idle timeouts, buffer budget (standalone server) ---------------------
class _Standalone:
    """``python -m vspemu.volumes.nbd_main`` on a free port (export "0")."""

    def __init__(self, tmp_path: Path, *args: str, size: int = 64 << 20) -> None:
        root = Path(__file__).resolve().parent.parent
        self.err = tmp_path / "nbd.err"
        cmd = [sys.executable, "-m", "vspemu.volumes.nbd_main", "--file", str(tmp_path / "disk.img"),
               "--size", str(size), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=self.err.open("w"), text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("NBD listening on"), line + self.err.read_text()
        self.port = int(line.rsplit(":", 1)[1])

    def client(self, source: str | None = None) -> NbdClient:
        if source is None:
            return NbdClient("127.0.0.1", self.port, "0", timeout=20)
        real = socket.create_connection
        try:  # connect from another loopback address (another "client host")
            socket.create_connection = lambda addr, timeout=None, *_a, **_k: real(  # type: ignore[assignment]
                addr, timeout, source_address=(source, 0))
            return NbdClient("127.0.0.1", self.port, "0", timeout=20)
        finally:
            socket.create_connection = real  # type: ignore[assignment]

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        alive = self.proc.poll() is None
        self.proc.terminate()
        self.proc.wait(10)
        assert alive, "the NBD server died: " + self.err.read_text()


@pytest.fixture
def standalone(tmp_path: Path) -> Iterator[Callable[..., _Standalone]]:
    started: list[_Standalone] = []

    def start(*args: str, size: int = 64 << 20) -> _Standalone:
        started.append(_Standalone(tmp_path, *args, size=size))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def _refused(port: int, source: str = "127.0.0.1") -> bool:
    """A connection over the limit is closed before the greeting: EOF (or a reset), never a hang."""
    with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0)) as sock:
        try:
            return sock.recv(18) == b""
        except ConnectionResetError:
            return True


def _wait_closed(sock: socket.socket, deadline: float = 30) -> None:
    """The server closes the connection (EOF or reset) before the deadline; whatever it sent is skipped."""
    sock.settimeout(deadline)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass


def test_connection_limits(standalone: Callable[..., _Standalone]) -> None:
    srv = standalone("--max-connections", "5", "--max-connections-per-client", "3")
    mine = [srv.client() for _ in range(3)]
    assert _refused(srv.port)  # a 4th from the same address
    other = [srv.client("127.0.0.2"), srv.client("127.0.0.2")]  # another client host has its own share
    assert _refused(srv.port, "127.0.0.3")  # 5 in all: the server-wide cap
    for i, c in enumerate(mine + other):  # the connections already open keep working
        c.write(i * 4096, bytes([i + 1]) * 4096)
        assert c.read(i * 4096, 4096) == bytes([i + 1]) * 4096
    mine.pop().close()  # one goes: room for one more
    end = time.monotonic() + 30
    while True:
        try:
            late = srv.client()
            break
        except (OSError, NbdOptionError):
            assert time.monotonic() < end
            time.sleep(0.05)
    assert late.read(0, 4096) == bytes([1]) * 4096
    for c in [*mine, *other, late]:
        c.close()


def test_handshake_timeout(standalone: Callable[..., _Standalone]) -> None:
    srv = standalone("--handshake-timeout", "1")
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=20)  # connects, never answers
    assert len(silent.recv(18)) == 18  # the greeting
    stuck = socket.create_connection(("127.0.0.1", srv.port), timeout=20)  # negotiates, never ends it
    stuck.recv(18)
    stuck.sendall(struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, 0))
    with srv.client() as c:  # a client that finished its handshake is not affected
        _wait_closed(silent)
        _wait_closed(stuck)
        c.write(0, b"after")
        assert c.read(0, 5) == b"after"
    silent.close()
    stuck.close()


def test_a_client_that_does_not_read_its_option_replies_is_closed(standalone: Callable[..., _Standalone]) -> None:
    """Options answered into a socket nobody reads: the server closes the connection after 1 MiB of unsent
    replies instead of buffering them without end (no handshake timeout here, to show that bound alone)."""
    srv = standalone("--handshake-timeout", "0")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", srv.port))
    sock.recv(18)
    sock.sendall(struct.pack(">I", 3))
    option = struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, 0)  # each answered with two replies (~50 bytes)
    try:
        for _ in range(40):  # up to 40 x 50,000 options: ~100 MiB of replies if nothing stopped them
            sock.sendall(option * 50_000)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed by the server while we were sending
    _wait_closed(sock)
    sock.close()
    with srv.client() as c:
        assert c.read(0, 4) == bytes(4)


def test_idle_timeout(standalone: Callable[..., _Standalone]) -> None:
    srv = standalone("--idle-timeout", "2")
    idle = srv.client()
    busy = srv.client()
    end = time.monotonic() + 4
    while time.monotonic() < end:  # requests every 0.1 s keep a connection open
        busy.write(0, b"busy")
        time.sleep(0.1)
    _wait_closed(idle.sock)
    assert busy.read(0, 4) == b"busy"
    busy.close()
    idle.sock.close()


def test_buffer_budget_bounds_memory_of_clients_that_never_read(standalone: Callable[..., _Standalone]) -> None:
    """Six connections send four 32 MiB READs each and never read a reply: before the budget the server
    held ~60 MiB per connection (~360 MiB); now the replies held are bounded by the budget (32 MiB), and
    connections that hold buffers others wait for are closed after the stall timeout."""
    srv = standalone("--buffer-budget", "32", "--stall-timeout", "2", size=128 << 20)
    base = srv.rss()
    hogs = [socket.create_connection(("127.0.0.1", srv.port), timeout=20) for _ in range(6)]
    for sock in hogs:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for sock in hogs:
        sock.recv(18)
        name = b"0"
        sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, len(name)) + name)
        got = b""
        while len(got) < 10:
            got += sock.recv(10 - len(got))
        for i in range(4):
            sock.sendall(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, i, i << 25, 32 << 20))
    peak = 0
    end = time.monotonic() + 8
    while time.monotonic() < end:
        peak = max(peak, srv.rss())
        time.sleep(0.05)
    grew = peak - base
    assert grew < (32 + 40) << 20, f"RSS grew by {grew >> 20} MiB"
    with srv.client() as c:  # the stalled connections were closed: the others are served again
        c.write(0, b"served")
        assert c.read(0, 6) == b"served"
    for sock in hogs:
        sock.close()


def test_clients_that_read_their_replies_all_progress_within_a_small_budget(
        standalone: Callable[..., _Standalone]) -> None:
    """Eight connections pipelining 8 MiB writes and 32 MiB reads against a 32 MiB budget (one request's
    worth): they take turns, none is starved or stalled for good, and every byte is right."""
    srv = standalone("--buffer-budget", "32", "--slow-replicator", "0.01", size=256 << 20)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with srv.client() as c:
                base = i << 25
                blocks = [os.urandom(1 << 20) * 8 for _ in range(4)]
                handles = [c.submit(nbdc.CMD_WRITE, base + (k << 23), data=b) for k, b in enumerate(blocks)]
                for _ in handles:
                    _h, err, _d = c.reply()
                    assert err == 0
                reads = {c.submit(nbdc.CMD_READ, base, 32 << 20): 0, c.submit(nbdc.CMD_READ, base, 32 << 20): 1}
                for _ in reads:
                    _h, err, data = c.reply()
                    assert err == 0 and data == b"".join(blocks)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def test_serve_takes_the_nbd_limits(make_system: Callable[..., SystemProcess]) -> None:
    """`vspemu serve --nbd-...` reaches the NBD server (here: the per-client cap and the handshake timeout)."""
    system = make_system(extra_args=["--nbd-max-connections-per-client", "2", "--nbd-handshake-timeout", "1"])
    with system.client() as api:
        ldev = api.create_ldev("16M")
        api.add_lun(ldev)
    silent = socket.create_connection(("127.0.0.1", system.nbd_port), timeout=20)
    assert len(silent.recv(18)) == 18
    with _nbd(system, ldev) as c:
        assert _refused(system.nbd_port)  # two connections from this address already
        _wait_closed(silent)  # the handshake timeout
        c.write(0, b"ok")
        assert c.read(0, 2) == b"ok"
    silent.close()
