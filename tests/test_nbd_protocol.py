"""The NBD server (vspemu.volumes.nbd) against the pure-Python client, via the standalone runner."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vspemu.client import nbd
from vspemu.client.nbd import NbdClient, NbdError, NbdOptionError

SIZE = 64 << 20
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    path: Path
    stderr: Path

    def client(self, export: str = "0") -> NbdClient:
        return NbdClient("127.0.0.1", self.port, export, timeout=20)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    started: list[Server] = []

    def start(*extra: str, size: int = SIZE) -> Server:
        path = tmp_path / f"disk{len(started)}.img"
        err = tmp_path / f"stderr{len(started)}.txt"
        cmd = [sys.executable, "-m", "vspemu.volumes.nbd_main", "--file", str(path), "--size", str(size)]
        proc = subprocess.Popen(
            [*cmd, "--port", "0", *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=err.open("w"), text=True
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("NBD listening on"), line + err.read_text()
        server = Server(proc, int(line.rsplit(":", 1)[1]), path, err)
        started.append(server)
        return server

    yield start
    for server in started:
        alive = server.proc.poll() is None
        server.proc.terminate()
        server.proc.wait(10)
        assert alive, "the NBD server died: " + server.stderr.read_text()
        assert server.stderr.read_text() == "", "the NBD server complained"


@pytest.fixture
def server(start_server: StartServer) -> Server:
    return start_server()


def raw_connect(port: int, client_flags: int = 3) -> tuple[socket.socket, int]:
    """Connect, read the greeting, send the client flags; return the socket and the handshake flags."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = recv_exact(sock, 18)
    magic, opt_magic, flags = struct.unpack(">QQH", greeting)
    assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    sock.sendall(struct.pack(">I", client_flags))
    return sock, flags


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def wait_closed(sock: socket.socket, timeout: float = 10) -> None:
    """The server closes the connection: recv reaches EOF (or a reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    sock.close()


def assert_serving(server: Server) -> None:
    with server.client() as c:
        c.write(4096, b"still alive")
        assert c.read(4096, 11) == b"still alive"


# -- handshake ----------------------------------------------------------------------------------------
def test_handshake_info_and_list(server: Server) -> None:
    sock, flags = raw_connect(server.port)
    assert flags == 3  # FIXED_NEWSTYLE | NO_ZEROES
    sock.close()
    info = nbd.export_info("127.0.0.1", server.port, "0")
    assert info["size"] == SIZE
    expected = 1 | 4 | 8 | 32 | 64 | 256  # HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES MULTI_CONN
    assert info["flags"] == expected
    assert (info["min_block"], info["preferred_block"], info["max_block"]) == (1, 4096, 32 << 20)
    assert nbd.list_exports("127.0.0.1", server.port) == ["0"]
    with server.client() as c:
        assert c.size == SIZE


def test_unknown_export(server: Server) -> None:
    with pytest.raises(NbdOptionError) as e:
        server.client("7")
    assert e.value.reply == (1 << 31) + 6  # NBD_REP_ERR_UNKNOWN
    with pytest.raises(NbdOptionError):
        nbd.export_info("127.0.0.1", server.port, "")
    assert_serving(server)


def test_unsupported_option_then_go(server: Server) -> None:
    hs = nbd._Handshake("127.0.0.1", server.port, 10)
    for option in (8, 5, 9, 10, 11, 1234):  # STRUCTURED_REPLY, STARTTLS, META_CONTEXT, EXTENDED_HEADERS...
        with pytest.raises(NbdOptionError) as e:
            hs.option(option)
        assert e.value.reply == (1 << 31) + 1  # NBD_REP_ERR_UNSUP
    with pytest.raises(NbdOptionError) as e:
        hs.option(nbd.OPT_GO, b"\x00\x00")  # too short
    assert e.value.reply == (1 << 31) + 3  # NBD_REP_ERR_INVALID
    assert hs.info(nbd.OPT_GO, "0")["size"] == SIZE
    sock = hs.sock
    sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 99, 0, 8))
    assert struct.unpack(">IIQ", recv_exact(sock, 16)) == (nbd.SIMPLE_REPLY_MAGIC, 0, 99)
    assert recv_exact(sock, 8) == bytes(8)
    sock.close()


@pytest.mark.parametrize("client_flags", [1, 3])
def test_export_name_option(server: Server, client_flags: int) -> None:
    sock, _ = raw_connect(server.port, client_flags)
    sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, 1, 1) + b"0")  # NBD_OPT_EXPORT_NAME
    size, flags = struct.unpack(">QH", recv_exact(sock, 10))
    assert size == SIZE and flags & 1
    if client_flags == 1:  # no NO_ZEROES: 124 bytes of padding follow
        assert recv_exact(sock, 124) == bytes(124)
    sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 5, 512, 3) + b"abc")
    assert struct.unpack(">IIQ", recv_exact(sock, 16)) == (nbd.SIMPLE_REPLY_MAGIC, 0, 5)
    sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 6, 0, 0))
    wait_closed(sock)
    with server.client() as c:
        assert c.read(512, 3) == b"abc"


def test_export_name_unknown_closes(server: Server) -> None:
    sock, _ = raw_connect(server.port)
    sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, 1, 2) + b"42")
    wait_closed(sock)
    assert_serving(server)


def test_abort(server: Server) -> None:
    hs = nbd._Handshake("127.0.0.1", server.port, 10)
    hs.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_ABORT, 0))
    magic, option, reply, length = struct.unpack(">QIII", recv_exact(hs.sock, 20))
    assert (option, reply, length) == (nbd.OPT_ABORT, nbd.REP_ACK, 0)
    wait_closed(hs.sock)


# -- data -----------------------------------------------------------------------------------------------
def test_read_write_flush_trim_zero(server: Server) -> None:
    data = os.urandom(1 << 20)
    with server.client() as c:
        assert c.read(0, 4096) == bytes(4096)
        c.write(0, data)
        c.write(SIZE - 4096, data[:4096], fua=True)
        c.write(12345, b"odd", fua=False)
        assert c.read(0, 12345) == data[:12345]
        assert c.read(12345, 3) == b"odd"
        assert c.read(SIZE - 4096, 4096) == data[:4096]
        c.flush()
        c.trim(65536, 65536)
        assert c.read(65536, 65536) == bytes(65536)
        c.zero(200000, 1000)
        c.zero(300000, 5000, fua=True, no_hole=True)
        assert c.read(200000, 1000) == bytes(1000)
        assert c.read(300000, 5000) == bytes(5000)
        assert c.read(0, 0) == b""
        c.write(0, b"")
    expected = bytearray(data)
    expected[12345:12348] = b"odd"
    expected[65536:131072] = bytes(65536)
    expected[200000:201000] = bytes(1000)
    expected[300000:305000] = bytes(5000)
    with open(server.path, "rb") as f:
        assert f.read(1 << 20) == bytes(expected)
        f.seek(SIZE - 4096)
        assert f.read() == data[:4096]


def test_largest_requests(server: Server) -> None:
    data = os.urandom(1 << 20) * 32
    with server.client() as c:
        c.write(0, data)
        assert c.read(0, 32 << 20) == data
        with pytest.raises(NbdError) as e:
            c.read(0, (32 << 20) + 1)
        assert e.value.errno == nbd.EINVAL
        with pytest.raises(NbdError) as e:  # the server discards the payload and goes on
            c.write(0, bytes((32 << 20) + 1))
        assert e.value.errno == nbd.EINVAL
        assert c.read(0, 4096) == data[:4096]


def test_out_of_range_and_unknown_commands(server: Server) -> None:
    with server.client() as c:
        cases: list[tuple[Callable[[], object], int]] = [
            (lambda: c.read(SIZE - 10, 11), nbd.EINVAL),
            (lambda: c.read(SIZE, 1), nbd.EINVAL),
            (lambda: c.read(1 << 63, 1), nbd.EINVAL),
            (lambda: c.write(SIZE - 1, b"xy"), nbd.ENOSPC),
            (lambda: c.write((1 << 64) - 1, b"x" * 100000), nbd.ENOSPC),
            (lambda: c.trim(SIZE - 512, 1024), nbd.EINVAL),
            (lambda: c.zero(SIZE, 1), nbd.ENOSPC),
            (lambda: c._call(5), nbd.EINVAL),  # CACHE: not advertised
            (lambda: c._call(7, 0, 4096), nbd.EINVAL),  # BLOCK_STATUS: not negotiated
            (lambda: c._call(0xFFFF, 0, 4096), nbd.EINVAL),
        ]
        for call, errno_code in cases:
            with pytest.raises(NbdError) as e:
                call()
            assert e.value.errno == errno_code
            c.write(0, b"ok")
            assert c.read(0, 2) == b"ok"


def test_write_refused_is_eperm(start_server: StartServer) -> None:
    server = start_server("--read-only-gate")
    with server.client() as c:
        for call in (lambda: c.write(0, b"x"), lambda: c.write(0, os.urandom(1 << 20), fua=True),
                     lambda: c.trim(0, 4096), lambda: c.zero(0, 4096)):  # fmt: skip
            with pytest.raises(NbdError) as e:
                call()
            assert e.value.errno == nbd.EPERM
        assert c.read(0, 4096) == bytes(4096)
        c.flush()


# -- robustness -----------------------------------------------------------------------------------------
def test_garbage_and_abrupt_disconnects(server: Server) -> None:
    # garbage instead of the client flags / an option / a request
    for payload in (b"\xff" * 64, struct.pack(">I", 3) + os.urandom(200)):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        recv_exact(sock, 18)
        sock.sendall(payload)
        wait_closed(sock)
    sock, _ = raw_connect(server.port)
    sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, 7, 1 << 30))  # absurd option length
    wait_closed(sock)
    c = server.client()
    c.sock.sendall(os.urandom(100))
    wait_closed(c.sock)

    # disconnects: mid-handshake, mid-header, mid-payload, with replies unread
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.close()
    sock, _ = raw_connect(server.port)
    sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, 7, 100) + b"\0" * 10)
    sock.close()
    c = server.client()
    c.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 1 << 20) + bytes(5000))
    c.sock.close()
    c = server.client()
    c.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 1000))
    c.sock.close()
    c = server.client()
    for i in range(64):
        c.submit(nbd.CMD_READ, i << 20, 1 << 20)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    c.sock.close()
    time.sleep(0.2)
    assert_serving(server)


def test_disc_answers_inflight_first(start_server: StartServer) -> None:
    server = start_server("--slow-replicator", "0.2")
    c = server.client()
    handle = c.submit(nbd.CMD_WRITE, 0, data=b"late write", flags=nbd.CMD_FLAG_FUA)
    c.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0))
    assert c.reply() == (handle, 0, b"")
    wait_closed(c.sock)
    with server.client() as c:
        assert c.read(0, 10) == b"late write"


# -- concurrency ----------------------------------------------------------------------------------------
def test_pipelined_requests_replies_out_of_order(start_server: StartServer) -> None:
    server = start_server("--slow-replicator", "0.3")
    with server.client() as c:
        w = c.submit(nbd.CMD_WRITE, 0, data=b"A" * 4096)
        f = c.submit(nbd.CMD_FLUSH)
        r = c.submit(nbd.CMD_READ, 8192, 100)
        # the read is answered while the write waits for its (slow) replicator
        assert c.reply() == (r, 0, bytes(100))
        assert {c.reply()[:2] for _ in range(2)} == {(w, 0), (f, 0)}
        assert c.read(0, 4096) == b"A" * 4096


def _worker(server: Server, index: int, errors: list[BaseException]) -> None:
    try:
        region = index * (4 << 20)
        with server.client() as c:
            blocks = {}
            pos = region
            sizes = [512, 4096, 65536, 100000, 262144, 1 << 20]
            for i in range(40):
                size = sizes[i % len(sizes)]
                if pos + size > region + (4 << 20):
                    break
                blocks[pos] = os.urandom(size)
                pos += size
            handles = {c.submit(nbd.CMD_WRITE, off, data=d): off for off, d in blocks.items()}
            for _ in handles:
                handle, error, _data = c.reply()
                assert error == 0 and handle in handles
            c.flush()
            reads = {c.submit(nbd.CMD_READ, off, len(d)): off for off, d in blocks.items()}
            for _ in reads:
                handle, error, data = c.reply()
                assert error == 0 and data == blocks[reads[handle]]
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


@pytest.mark.parametrize("slow", [False, True])
def test_many_connections_in_parallel(start_server: StartServer, slow: bool) -> None:
    server = start_server(*(["--slow-replicator", "0.01"] if slow else []))
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_worker, args=(server, i, errors)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_plain_asyncio_loop(start_server: StartServer) -> None:
    """uvloop is what we run under, but the server works on the default asyncio loop too."""
    server = start_server("--no-uvloop")
    test_read_write_flush_trim_zero(server)
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_worker, args=(server, i, errors)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_memory_bound_under_backpressure(start_server: StartServer) -> None:
    """A client pushing 256 MiB of writes at a slow volume: the server stops reading, RSS stays bounded
    (by 32 MiB in flight + one request; without back-pressure it grows by ~250 MiB)."""
    server = start_server("--slow-replicator", "0.2", size=256 << 20)
    base = server.rss()
    peak = 0
    c = server.client()
    chunk = os.urandom(1 << 20)
    sender = threading.Thread(target=lambda: [c.submit(nbd.CMD_WRITE, i << 20, data=chunk) for i in range(256)])
    sender.start()
    for _ in range(256):
        handle, error, _ = c.reply()
        assert error == 0
        peak = max(peak, server.rss())
    sender.join()
    c.close()
    assert peak - base < 72 << 20, f"RSS grew by {(peak - base) >> 20} MiB"


# -- the NbdServer contract, in process -----------------------------------------------------------------
def test_nbd_server_in_process_lookup_and_deleted_ldev(tmp_path: Path) -> None:
    """Export lookup happens at GO time; a volume deleted later drops its connections; close() ends them."""
    import asyncio

    import uvloop

    from vspemu.volumes.nbd import NbdServer
    from vspemu.volumes.volume import Volume

    volumes = {
        "5": Volume.create(5, tmp_path / "ldev5", 1 << 20),
        "6": Volume.create(6, tmp_path / "ldev6", 4096),
        "7": Volume.create(7, tmp_path / "ldev7", 1 << 20),
    }
    loop = uvloop.new_event_loop()
    server = NbdServer(volumes.get, lambda: sorted(volumes))
    loop.run_until_complete(server.start("127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def in_loop(fn: Callable[[], object]) -> None:
        done = threading.Event()
        loop.call_soon_threadsafe(lambda: (fn(), done.set()))
        assert done.wait(5)

    try:
        port = server.port
        assert nbd.list_exports("127.0.0.1", port) == ["5", "6", "7"]
        with NbdClient("127.0.0.1", port, "7") as c7:  # a file shorter than its volume (never happens...)
            c7.write(0, b"z" * (1 << 20))
            os.truncate(tmp_path / "ldev7", 100_000)
            with pytest.raises((NbdError, ConnectionError)):  # ...gives an error or a closed connection
                c7.read(0, 512 << 10)
        with NbdClient("127.0.0.1", port, "7") as c7:
            with pytest.raises(NbdError) as e:
                c7.read(200_000, 4096)
            assert e.value.errno == nbd.EIO
        with NbdClient("127.0.0.1", port, "6") as c6:
            assert c6.size == 4096
        c = NbdClient("127.0.0.1", port, "5")
        c.write(0, b"hello", fua=True)
        assert c.read(0, 5) == b"hello"
        removed = volumes["5"]
        in_loop(removed.remove)  # the LDEV is deleted while a host has it open: the connection is dropped
        wait_closed(c.sock)
        with pytest.raises(NbdOptionError):  # and a removed volume is never served again
            NbdClient("127.0.0.1", port, "5")
        volumes.pop("5")
        held = NbdClient("127.0.0.1", port, "6")
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        wait_closed(held.sock)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        for v in volumes.values():
            v.close()
