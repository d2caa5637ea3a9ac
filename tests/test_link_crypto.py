"""The link's protection after the handshake, seen from the wire, and its handshake slots.

Two :class:`Link` objects in this process talk through a TCP proxy (:class:`Proxy`) that records every byte
and can alter, replay or drop a frame in transit. The proxy finds frames by their length prefix, which is in
clear in every protocol version; it needs nothing else of the link's format.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from vspemu.buffers import BufferPool
from vspemu.replication import connection as C, link as L, receiver as R, wire as W
from vspemu.replication.link import Link, PathGroup
from vspemu.replication.wire import ECHO, LinkDown, PeerInfo

A_ID, B_ID = "900000000011", "900000000012"
SECRET = bytes(range(32, 64))
MARKER = b"KNOWN-PLAINTEXT-MARKER:"
SMALL = R.SMALL_PAYLOAD
TYPE_AT, FLAGS_AT, REQUEST, FLAG_DATA = 4, 5, 16, 1  # frame prefix: u32 length, u8 type, u8 flags, ...

# called with (direction "ab" or "ba", frame); returns the frames to send on instead (none: dropped)
Tamper = Callable[[str, bytes], list[bytes]]


class Proxy:
    """Forwards whole frames between a connecting link and a listening one, records them, may tamper."""

    def __init__(self, target: Callable[[], tuple[str, int]], tamper: Tamper | None = None) -> None:
        self.target = target
        self.tamper = tamper
        self.frames: dict[str, list[bytes]] = {"ab": [], "ba": []}
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def wire(self, direction: str) -> bytes:
        return b"".join(self.frames[direction])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()

    async def _serve(self, a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter) -> None:
        b_reader, b_writer = await asyncio.open_connection(*self.target())
        pumps = [asyncio.create_task(self._pump("ab", a_reader, b_writer)),
                 asyncio.create_task(self._pump("ba", b_reader, a_writer))]
        self.tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
                self.tasks.discard(task)
            a_writer.transport.abort()
            b_writer.transport.abort()

    async def _pump(self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(4)
                frame = head + await reader.readexactly(int.from_bytes(head, "big"))
                self.frames[direction].append(frame)
                for out in self.tamper(direction, frame) if self.tamper else [frame]:
                    writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return


async def through_proxy(tamper: Tamper | None = None, **link_kw: Any) -> tuple[Link, Link, PathGroup, Proxy]:
    """Link a (connecting) -> proxy -> link b (listening), one path CL3-A -> CL3-A, connected."""
    b = Link(B_ID, 2, lambda d: SECRET if d == A_ID else None, lambda d, p: None, ports={"CL3-A": 0}, **link_kw)
    proxy = Proxy(lambda: ("127.0.0.1", b.ports["CL3-A"]), tamper)
    a = Link(A_ID, 1, lambda d: SECRET if d == B_ID else None,
             lambda d, p: ("127.0.0.1", proxy.port) if d == B_ID else None, ports={"CL3-A": 0}, max_backoff=0.2,
             **link_kw)
    await proxy.start()
    await a.start()
    await b.start()
    group = a.ensure_group(2, B_ID, 0, 15.0)
    await group.add_path("CL3-A", "CL3-A")
    assert await group.wait_status("NML_01", 10), group.view()
    return a, b, group, proxy


async def close_all(a: Link, b: Link, proxy: Proxy) -> None:
    await a.close()
    await b.close()
    await proxy.close()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


def recording_writes(b: Link) -> list[tuple[dict[str, Any], bytes]]:
    """Serve data.write on b by recording what arrives (as a volume would write it)."""
    written: list[tuple[dict[str, Any], bytes]] = []

    @C.inline_handler
    async def write(peer: PeerInfo, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        written.append((dict(header), bytes(payload)))
        return {}, b""

    b.register_handler(W.DATA_WRITE, write)
    return written


def inbound(b: Link) -> list[C.Connection]:
    return [c for conns in b._inbound.values() for c in conns]


def is_data_write(direction: str, frame: bytes) -> bool:
    return direction == "ab" and frame[TYPE_AT] == REQUEST and frame[FLAGS_AT] == FLAG_DATA


def test_no_known_plaintext_on_the_wire_after_the_handshake() -> None:
    """Payloads (a small data.write, a 1 MiB one received in place, an echo) and JSON headers never appear in
    clear on the wire, in either direction."""
    async def body() -> None:
        a, b, group, proxy = await through_proxy()
        written = recording_writes(b)
        try:
            small = MARKER * (4096 // len(MARKER)) + MARKER[:4096 % len(MARKER)]
            large = MARKER * ((1 << 20) // len(MARKER))
            for i, data in enumerate((small, large)):
                assert await group.call(W.DATA_WRITE, {"ldev": 5, "offset": i << 20, "length": len(data)},
                                        data) == ({}, b"")
            header, echoed = await group.call(ECHO, {"note": MARKER.decode()}, large[:100_000])
            assert echoed == large[:100_000] and written == [
                ({"ldev": 5, "offset": 0, "length": 4096}, small),
                ({"ldev": 5, "offset": 1 << 20, "length": len(large)}, large)]
            wire_ab, wire_ba = proxy.wire("ab"), proxy.wire("ba")
            assert len(wire_ab) > len(small) + len(large) + 100_000 and len(wire_ba) > 100_000  # it all went by
            assert MARKER[:12] not in wire_ab and MARKER[:12] not in wire_ba
            assert b"vspemu.echo" not in wire_ab  # request headers are sealed too
        finally:
            await close_all(a, b, proxy)

    run(body)


def test_the_opt_out_sends_in_clear_and_both_sides_must_agree() -> None:
    """VSPEMU_LINK_CIPHER=none (here the cipher argument) sends frames in clear (what the test above would see
    without the protection); a side that wants another cipher than its peer is refused (ERR_04)."""
    async def body() -> None:
        a, b, group, proxy = await through_proxy(cipher="none")
        try:
            await group.call(ECHO, {}, MARKER * 10)
            assert MARKER in proxy.wire("ab")
        finally:
            await close_all(a, b, proxy)
        b = Link(B_ID, 2, lambda d: SECRET, lambda d, p: None, ports={"CL3-A": 0}, cipher="aes-256-gcm")
        a = Link(A_ID, 1, lambda d: SECRET, lambda d, p: ("127.0.0.1", b.ports["CL3-A"]), ports={"CL3-A": 0},
                 cipher="none")
        await a.start()
        await b.start()
        group = a.ensure_group(2, B_ID, 0, 15.0)
        await group.add_path("CL3-A", "CL3-A")
        try:
            assert await group.wait_status("ERR_04", 10), group.view()
            assert "cipher" in group.view()[0]["reason"]
        finally:
            await a.close()
            await b.close()

    run(body)


def test_an_unknown_cipher_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSPEMU_LINK_CIPHER", "rot13")
    with pytest.raises(ValueError, match="VSPEMU_LINK_CIPHER"):
        Link(A_ID, 1, lambda d: None, lambda d, p: None)
    monkeypatch.setenv("VSPEMU_LINK_CIPHER", "none")
    assert Link(A_ID, 1, lambda d: None, lambda d, p: None).cipher == "none"
    monkeypatch.delenv("VSPEMU_LINK_CIPHER")
    assert Link(A_ID, 1, lambda d: None, lambda d, p: None).cipher == "aes-256-gcm"


def flip(at: Callable[[bytes], int]) -> Tamper:
    """Flip one bit of the first data.write request in transit, at ``at(frame)``."""
    done = False

    def tamper(direction: str, frame: bytes) -> list[bytes]:
        nonlocal done
        if done or not is_data_write(direction, frame):
            return [frame]
        done = True
        i = at(frame)
        return [frame[:i] + bytes([frame[i] ^ 0x10]) + frame[i + 1:]]

    return tamper


@pytest.mark.parametrize("size", [4096, 1 << 20])
@pytest.mark.parametrize("where", ["payload", "header", "request id"])
@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "into a second buffer"])
def test_a_flipped_bit_in_transit_closes_the_connection_and_nothing_is_written(
        size: int, where: str, in_place: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if in_place and not R.IN_PLACE_DECRYPT:
        pytest.skip("this cryptography refuses in-place decryption")
    monkeypatch.setattr(R, "IN_PLACE_DECRYPT", in_place)
    at = {"payload": lambda f: len(f) - 100,  # in the payload (near its end: the tag comes last)
          "header": lambda f: 20 + 3,  # in the data.write header (the ldev), just after the 20-byte prefix
          "request id": lambda f: 15}[where]  # the prefix is in clear but authenticated

    async def body() -> None:
        a, b, group, proxy = await through_proxy(flip(at))
        written = recording_writes(b)
        try:
            first = inbound(b)
            data = os.urandom(size)
            with pytest.raises(LinkDown):
                await group.call(W.DATA_WRITE, {"ldev": 5, "offset": 0, "length": size}, data)
            assert written == []  # nothing reached the volume, corrupted or not
            assert len(first) == 1 and first[0].closed.is_set() and "integrity" in first[0].close_reason
            # the path comes back (a new connection, new keys) and carries writes again
            assert await group.wait_status("NML_01", 10), group.view()
            assert await group.call(W.DATA_WRITE, {"ldev": 5, "offset": 0, "length": size}, data) == ({}, b"")
            assert written == [({"ldev": 5, "offset": 0, "length": size}, data)]
        finally:
            await close_all(a, b, proxy)

    run(body)


@pytest.mark.parametrize("how", ["replay", "drop", "swap"])
def test_a_replayed_dropped_or_reordered_frame_is_rejected(how: str) -> None:
    """The first data.write is sent twice (replay), left out (drop), or sent after the second (swap): the
    receiver closes the connection at the first frame out of sequence and serves none of it."""
    held: list[bytes] = []
    count = 0

    def tamper(direction: str, frame: bytes) -> list[bytes]:
        nonlocal count
        if not is_data_write(direction, frame):
            return [frame]
        count += 1
        if count == 1:
            if how == "replay":
                return [frame, frame]
            held.append(frame)
            return []
        if count == 2 and how == "swap":
            return [frame, held[0]]
        return [frame]

    async def body() -> None:
        a, b, group, proxy = await through_proxy(tamper)
        written = recording_writes(b)
        try:
            first = inbound(b)
            one, two = os.urandom(4096), os.urandom(4096)
            calls = [asyncio.create_task(group.call(W.DATA_WRITE, {"ldev": 5, "offset": i * 4096, "length": 4096},
                                                    data, timeout=5.0)) for i, data in enumerate((one, two))]
            await asyncio.wait_for(first[0].closed.wait(), 10)
            assert "integrity" in first[0].close_reason
            await asyncio.gather(*calls, return_exceptions=True)
            payloads = [p for _, p in written]
            assert payloads in ([], [one]) if how == "replay" else payloads == []
        finally:
            await close_all(a, b, proxy)

    run(body)


def test_idle_sockets_from_one_address_do_not_block_a_real_peer() -> None:
    """A flood of idle connections from one address (127.0.0.2), kept at 80 open at all times, does not keep
    a real path from another address (127.0.0.1) from coming up within the usual time."""
    stop, flooded = threading.Event(), threading.Event()
    opened = 0

    def flood(port: int) -> None:
        nonlocal opened
        socks: list[socket.socket] = []
        while not stop.is_set():
            alive = []
            for s in socks:
                try:
                    gone = s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    s.close()
                else:
                    alive.append(s)
            socks = alive
            for _ in range(min(16, 80 - len(socks))):  # at most 16 new connections per 10 ms
                s = socket.socket()
                s.bind(("127.0.0.2", 0))
                try:
                    s.connect(("127.0.0.1", port))
                except OSError:
                    s.close()
                    break
                socks.append(s)
                opened += 1
            if opened >= 80:
                flooded.set()
            stop.wait(0.01)
        for s in socks:
            s.close()

    async def body() -> None:
        b = Link(B_ID, 2, lambda d: SECRET if d == A_ID else None, lambda d, p: None, ports={"CL3-A": 0})
        a = Link(A_ID, 1, lambda d: SECRET if d == B_ID else None,
                 lambda d, p: ("127.0.0.1", b.ports["CL3-A"]), ports={"CL3-A": 0}, max_backoff=0.2)
        await b.start()
        await a.start()
        thread = threading.Thread(target=flood, args=(b.ports["CL3-A"],), daemon=True)
        thread.start()
        try:
            assert await asyncio.to_thread(flooded.wait, 10)
            group = a.ensure_group(2, B_ID, 0, 15.0)
            await group.add_path("CL3-A", "CL3-A")
            assert await group.wait_status("NML_01", 10), group.view()
            assert (await group.call(ECHO, {}, b"through"))[1] == b"through"
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 10)
            await a.close()
            await b.close()

    run(body)


def test_a_connection_that_sends_no_hello_is_dropped_long_before_the_handshake_time_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the handshake time-out made a minute long, an idle connection is still dropped (it sent no HELLO):
    it does not hold a handshake slot until the whole handshake's time-out."""
    monkeypatch.setattr(L, "HANDSHAKE_TIMEOUT", 60.0)

    def idle(port: int) -> bytes | None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            try:
                return sock.recv(1)  # b"": closed by the server
            except ConnectionResetError:
                return b""
            except TimeoutError:
                return None  # still open after 30 s

    async def body() -> None:
        b = Link(B_ID, 2, lambda d: SECRET, lambda d, p: None, ports={"CL3-A": 0})
        await b.start()
        try:
            assert await asyncio.to_thread(idle, b.ports["CL3-A"]) == b""
            assert b.rejected_connections == 1 and b._pending_handshakes == 0 and not b._pending_by_address
        finally:
            await b.close()

    run(body)


def test_a_payload_and_its_sealed_copy_share_a_buffer_size_class() -> None:
    """An 8 MiB copy chunk and its encryption (8 MiB + 16-byte tag) take buffers of one class (8 MiB + a page),
    so neither a 16 MiB buffer nor two classes evicting each other from a full pool."""
    page = mmap.PAGESIZE
    assert BufferPool.size_for(8 << 20) == BufferPool.size_for((8 << 20) + W.TAG) == (8 << 20) + page
    assert BufferPool.size_for((8 << 20) + page + 1) == (16 << 20) + page
    assert [BufferPool.size_for(n) for n in (1, page, page + 1, 2 * page, 2 * page + 1)] == \
        [page, page, 2 * page, 2 * page, 3 * page]
    pool = BufferPool(64 << 20)
    reads = [pool.get(8 << 20) for _ in range(7)]  # a pool full of copy chunks' read buffers...
    kept = {id(b) for b in reads}
    for buf in reads:
        pool.put(buf)
    del reads, buf
    sealed = pool.get((8 << 20) + W.TAG)  # ...hands one of them out for a sealed copy: no fresh mmap
    assert id(sealed) in kept


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "into a second buffer"])
def test_large_sealed_payloads_arrive_intact_whether_or_not_in_place_decryption_is_allowed(
        in_place: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """cryptography 51 refuses ``decrypt_into`` with overlapping buffers ("data and buf must not overlap"): a
    receiver that decrypts in place there closes its connection on every sealed data frame, so TC pairs go PSUE
    and UR journals never drain. The receiver probes this once and then decrypts into a second pooled buffer;
    both ways the payload arrives intact and the pool does not grow (a tampered one is refused: the flipped-bit
    test runs both ways too)."""
    if in_place and not R.IN_PLACE_DECRYPT:
        pytest.skip("this cryptography refuses in-place decryption")
    monkeypatch.setattr(R, "IN_PLACE_DECRYPT", in_place)
    sizes = [SMALL + 1, 1 << 20, (4 << 20) + 123]  # received into pooled buffers (over SMALL_PAYLOAD)

    async def body() -> None:
        a, b, group, proxy = await through_proxy()
        written = recording_writes(b)
        try:
            for _ in range(3):
                for size in sizes:
                    data = os.urandom(size)
                    header = {"ldev": 7, "offset": 0, "length": size}
                    assert await group.call(W.DATA_WRITE, header, data) == ({}, b"")
                    assert written[-1] == (header, data)
            held = R.BUFFERS._bytes
            for size in sizes * 3:  # the same sizes again: buffers come back to the pool, none are leaked
                await group.call(W.DATA_WRITE, {"ldev": 7, "offset": 0, "length": size}, os.urandom(size))
            assert R.BUFFERS._bytes == held
        finally:
            await close_all(a, b, proxy)

    run(body)


def test_the_in_place_probe_agrees_with_the_installed_cryptography() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    aead, nonce = AESGCM(bytes(range(16))), bytes(range(12))
    sealed = bytearray(aead.encrypt(nonce, b"p" * 4096, b""))
    view = memoryview(sealed)
    try:
        aead.decrypt_into(nonce, view, b"", view[:4096])
        works = bytes(sealed[:4096]) == b"p" * 4096
    except ValueError:
        works = False
    assert R.IN_PLACE_DECRYPT is works
