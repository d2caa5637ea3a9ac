"""The replication link: frames, handshake, concurrency, big payloads, errors, failover, foreign peers.

The first tests run two :class:`Link` objects in this process (fast, deterministic); the last ones talk to
real ``vspemu serve`` processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from vspemu.client import VspClient
from vspemu.lab import SystemProcess
from vspemu.replication import connection as C, spinner as S, wire as W
from vspemu.replication.link import Link, PathGroup
from vspemu.replication.wire import ECHO, LinkDown, PeerInfo, RemoteError

A_ID, B_ID = "900000000001", "900000000002"
SECRET = bytes(range(32))
PORTS = ["CL3-A", "CL4-A"]


def make_pair(secret_b_has: bytes | None = SECRET, secret_a_has: bytes | None = SECRET) -> tuple[Link, Link]:
    b_ports: dict[str, int] = {p: 0 for p in PORTS}
    a = Link(A_ID, 1, lambda d: secret_a_has if d == B_ID else None,
             lambda d, p: ("127.0.0.1", b.ports[p]) if d == B_ID and p in b.ports else None,
             ports={p: 0 for p in PORTS}, max_backoff=0.2)
    b = Link(B_ID, 2, lambda d: secret_b_has if d == A_ID else None, lambda d, p: None, ports=b_ports)
    return a, b


async def started(*paths: tuple[str, str], timeout: float = 15.0, **kw: Any) -> tuple[Link, Link, PathGroup]:
    a, b = make_pair(**kw)
    await a.start()
    await b.start()
    group = a.ensure_group(2, B_ID, 0, timeout)
    for lp, rp in paths or (("CL3-A", "CL3-A"),):
        await group.add_path(lp, rp)
    await group.wait_attempted(5)
    return a, b, group


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


def test_echo_round_trip_and_handshake() -> None:
    async def main() -> None:
        a, b, group = await started()
        try:
            assert group.status == "NML_01" and len(group.active_paths) == 1
            header, payload = await group.call(ECHO, {"x": 1}, b"hello")
            assert payload == b"hello" and header["from"] == A_ID and header["port"] == "CL3-A"
            assert a.path_group(2, 0) is group and a.path_group(2, 1) is None
        finally:
            await a.close()
            await b.close()

    run(main)


def test_big_payloads_and_many_concurrent_calls() -> None:
    async def main() -> None:
        a, b, group = await started(("CL3-A", "CL3-A"), ("CL4-A", "CL4-A"))
        try:
            data = os.urandom(4 << 20)
            digest = hashlib.sha256(data).hexdigest()

            async def one() -> str:
                header, echoed = await group.call(ECHO, {}, memoryview(data))
                assert echoed == data
                return str(header["sha256"])

            results = await asyncio.gather(*(one() for _ in range(100)))
            assert results == [digest] * 100
        finally:
            await a.close()
            await b.close()

    run(main)


def test_a_message_type_has_one_handler() -> None:
    """The module that owns a message type registers its handler; a second registration of the same type is a
    bug (two modules claiming one message) and raises instead of silently replacing the first handler."""
    async def main() -> None:
        a, _b = make_pair()

        async def first(peer: PeerInfo, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
            return {"who": "first"}, b""

        a.register_handler("test.once", first)
        with pytest.raises(ValueError, match="test.once"):
            a.register_handler("test.once", first)
        with pytest.raises(ValueError, match=ECHO):
            a.register_handler(ECHO, first)  # the link's own
        assert a.handlers["test.once"] is first

    run(main)


def test_remote_handler_error_keeps_the_connection() -> None:
    async def main() -> None:
        a, b, group = await started()

        async def boom(peer: PeerInfo, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
            raise ValueError(f"bad request from {peer.storage_device_id}")

        b.register_handler("test.boom", boom)
        try:
            with pytest.raises(RemoteError) as e:
                await group.call("test.boom", {})
            assert e.value.kind == "ValueError" and A_ID in e.value.remote_message
            with pytest.raises(RemoteError) as e:
                await group.call("test.unknown", {})
            assert e.value.kind == "LookupError"
            conn = group.active_paths[0].conn
            assert (await group.call(ECHO, {}, b"still up"))[1] == b"still up"
            assert group.active_paths[0].conn is conn  # the same connection survived
        finally:
            await a.close()
            await b.close()

    run(main)


def test_slow_handlers_run_concurrently_and_timeouts() -> None:
    async def main() -> None:
        a, b, group = await started()
        try:
            start = time.monotonic()
            await asyncio.gather(*(group.call(ECHO, {"delay": 0.5}) for _ in range(50)))
            assert time.monotonic() - start < 2.0  # 50 x 0.5 s handlers in parallel
            with pytest.raises(W.LinkTimeout):
                await group.call(ECHO, {"delay": 2}, timeout=0.3)
            assert (await group.call(ECHO, {}, b"x"))[1] == b"x"
        finally:
            await a.close()
            await b.close()

    run(main)


def test_failover_to_another_path_and_reconnect() -> None:
    async def main() -> None:
        a, b, group = await started(("CL3-A", "CL3-A"), ("CL4-A", "CL4-A"))
        try:
            assert len(group.active_paths) == 2
            # requests in flight on the failing port are retried on the other path
            calls = [asyncio.ensure_future(group.call(ECHO, {"delay": 0.3}, b"p")) for _ in range(20)]
            await asyncio.sleep(0.1)
            await b.set_port_enabled("CL3-A", False)
            results = await asyncio.gather(*calls)
            assert all(p == b"p" for _, p in results)
            assert await group.wait_status("NML_01", 0.1) is False
            statuses = {p.remote_port_id: p.status for p in group.paths.values()}
            assert statuses["CL4-A"] == "NML_01" and statuses["CL3-A"].startswith("ERR_")
            await b.set_port_enabled("CL3-A", True)
            assert await group.wait_status("NML_01", 5)
            await b.set_port_enabled("CL3-A", False)
            await b.set_port_enabled("CL4-A", False)
            await asyncio.sleep(0.2)
            with pytest.raises(LinkDown):
                await group.call(ECHO, {})
        finally:
            await a.close()
            await b.close()

    run(main)


def test_sent_runs_once_after_sending_and_before_the_reply() -> None:
    """``sent`` (a mirrored write's local write) runs while the remote side works: after the request left,
    before the reply, once even when the request is sent again on another path; if it raises, so does the call."""
    async def main() -> None:
        a, b, group = await started(("CL3-A", "CL3-A"), ("CL4-A", "CL4-A"))
        calls: list[str] = []
        seen: list[list[str]] = []
        ports: list[str] = []

        async def record(peer: PeerInfo, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
            seen.append(list(calls))
            ports.append(peer.local_port_id)
            await asyncio.sleep(float(h.get("delay", 0)))
            return {}, payload

        b.register_handler("t.record", record)
        try:
            assert (await group.call("t.record", {}, b"x" * 100, sent=lambda: calls.append("sent")))[1] == b"x" * 100
            assert calls == ["sent"] and seen == [["sent"]]
            # the first path fails while the handler works: the request goes again on the other path
            calls.clear()
            call = asyncio.ensure_future(group.call("t.record", {"delay": 0.3}, b"y",
                                                    sent=lambda: calls.append("sent")))
            await asyncio.sleep(0.1)
            await b.set_port_enabled(ports[-1], False)
            assert (await call)[1] == b"y"
            assert calls == ["sent"] and len(seen) == 3  # served twice, called once

            def fail() -> None:
                raise OSError(28, "No space left on device")

            with pytest.raises(OSError):
                await group.call("t.record", {}, b"z", sent=fail)
            assert (await group.call(ECHO, {}, b"still up"))[1] == b"still up"
        finally:
            await a.close()
            await b.close()

    run(main)


def test_wrong_secret_is_refused_both_ways() -> None:
    async def main() -> None:
        # the listener does not know us
        a, b, group = await started(secret_b_has=None)
        try:
            assert group.status == "ERR_04" and not group.active_paths
            assert b.rejected_connections >= 1
        finally:
            await a.close()
            await b.close()
        # the listener knows another secret: it cannot prove itself, we disconnect
        a, b, group = await started(secret_b_has=b"x" * 32)
        try:
            assert group.status == "ERR_04"
        finally:
            await a.close()
            await b.close()

    run(main)


def test_dead_peer_detected_by_keepalive() -> None:
    async def main() -> None:
        # a "peer" that completes the handshake and then goes silent
        silent_ready = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _, _, hello, _ = await W.read_frame(reader, 4096)
            nb = "ab" * 32
            pr = W.proof(SECRET, hello["from"], B_ID, hello["localPortId"], hello["remotePortId"], hello["nonce"], nb,
                         "server", cipher=hello["cipher"])
            writer.write(W.encode_frame(W.CHALLENGE, 0, {"nonce": nb, "proof": pr}))
            await W.read_frame(reader, 4096)
            writer.write(W.encode_frame(W.WELCOME, 0, {}))
            silent_ready.set()
            await asyncio.sleep(30)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        a = Link(A_ID, 1, lambda d: SECRET, lambda d, p: ("127.0.0.1", port), ports={"CL3-A": 0})
        await a.start()
        group = a.ensure_group(2, B_ID, 0, timeout=2.0)
        await group.add_path("CL3-A", "CL3-A")
        try:
            await asyncio.wait_for(silent_ready.wait(), 5)
            await group.wait_attempted(5)
            assert group.status == "NML_01"
            start = time.monotonic()
            assert await group.wait_status("ERR_03", 2.5), group.status
            assert time.monotonic() - start <= 2.0
        finally:
            await a.close()
            server.close()

    run(main)


# -- against real processes ------------------------------------------------------------------------------
@pytest.fixture
def linked(make_system: Callable[..., SystemProcess]) -> tuple[SystemProcess, SystemProcess, VspClient, VspClient]:
    p, s = make_system(), make_system()
    cp, cs = p.client(), s.client()
    cp.register_remote(cs)
    gid = cp.create_path_group(cs, 0, "CL3-A", "CL3-A")
    cp.add_remote_path(gid, "CL4-A", "CL4-A")
    cp.wait_path_status(gid, timeout=10)
    return p, s, cp, cs


def test_path_group_call_4mib_x100_between_processes(linked: tuple[SystemProcess, SystemProcess, VspClient,
                                                                    VspClient]) -> None:
    p, s, cp, cs = linked
    result = cp.link_test(s.serial, 0, size=4 << 20, count=100, concurrency=100)
    assert result["succeeded"] == 100, result
    assert set(result["remotePorts"]) == {"CL3-A", "CL4-A"}  # both paths carried traffic
    small = cp.link_test(s.serial, 0, size=512, count=2000, concurrency=200)
    assert small["succeeded"] == 2000, small


def _send_raw(addr: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(addr, timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # EOF: a truncated frame is refused at once, not after the handshake time-out
        sock.settimeout(10)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def test_foreign_peers_are_rejected_and_the_server_keeps_serving(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, cp, cs = linked
    port = next(x["port"] for x in cs.link_info()["linkPorts"] if x["portId"] == "CL3-B")
    addr = ("127.0.0.1", port)
    # garbage bytes, an oversized frame, a truncated frame
    assert _send_raw(addr, os.urandom(5000)) == b""
    assert _send_raw(addr, struct.pack("!IBBHQI", 1 << 30, 1, 0, 0, 0, 0)) == b""
    assert _send_raw(addr, b"\x00\x00") == b""
    # a well-formed HELLO claiming to be the primary, then a wrong proof
    hello = {"v": W.PROTOCOL_VERSION, "from": p.storage_device_id, "fromSerial": p.serial, "to": s.storage_device_id,
             "localPortId": "CL3-B", "remotePortId": "CL3-B", "nonce": "00" * 32, "keepalive": 15,
             "cipher": W.link_cipher()}  # the servers inherit our environment
    with socket.create_connection(addr, timeout=10) as sock:
        sock.sendall(W.encode_frame(W.HELLO, 0, hello))
        reply = sock.recv(4096)
        assert reply[4] == W.CHALLENGE
        sock.sendall(W.encode_frame(W.AUTH, 0, {"proof": "00" * 32}))
        reply = sock.recv(4096)
        assert reply[4] == W.REJECT
        assert sock.recv(4096) == b""  # and disconnected
    # an unknown system
    with socket.create_connection(addr, timeout=10) as sock:
        sock.sendall(W.encode_frame(W.HELLO, 0, {**hello, "from": "900000999999"}))
        assert sock.recv(4096)[4] == W.REJECT
    # a REQUEST without a handshake
    assert _send_raw(addr, W.encode_frame(W.REQUEST, 1, {"m": ECHO, "h": {}}, 0)) == b""
    # the real paths are still up and the server still serves REST and the link
    assert cp.link_test(s.serial, 0, size=1024, count=10)["succeeded"] == 10
    assert all(x == "NML_01" for x in cp.path_statuses(f"{s.serial},R9,0"))
    diag = cs.private("GET", "link/paths")
    assert diag["rejectedConnections"] >= 5


def test_data_write_requests_carry_a_binary_header_and_reach_their_handler() -> None:
    h = {"ldev": 7, "offset": 1 << 40, "length": 4096, "fua": True, "copy": True}
    frame = W.encode_frame(W.REQUEST, 5, {"m": W.DATA_WRITE, "h": h}, 4096)
    length, ftype, flags, _, rid, hlen = W.PREFIX.unpack_from(frame)
    assert (ftype, flags, rid, hlen) == (W.REQUEST, W.FLAG_DATA, 5, W.DATA_HEADER.size)
    assert length == W.FIXED + hlen + 4096 and len(frame) == W.PREFIX.size + hlen
    assert W.decode_data_header(frame[W.PREFIX.size:]) == {"m": W.DATA_WRITE, "h": h}
    assert W.encode_frame(W.REPLY, 5, {"h": {}}) == W.PREFIX.pack(W.FIXED, W.REPLY, 0, 0, 5, 0)

    async def body() -> None:
        a, b, group = await started()
        seen: list[tuple[dict[str, Any], bytes]] = []

        @C.inline_handler
        async def write(peer: PeerInfo, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
            if header.get("offset") == 1:
                raise ValueError("refused")
            seen.append((header, bytes(payload)))
            return {}, b""

        b.register_handler(W.DATA_WRITE, write)
        try:
            for n, extra in ((4096, {"fua": True}), (1 << 20, {"copy": True}), (0, {"zero": True})):
                data = os.urandom(n)
                assert await group.call(W.DATA_WRITE, {"ldev": 3, "offset": 8192, "length": n or 512, **extra},
                                        data) == ({}, b"")
                assert seen[-1] == ({"ldev": 3, "offset": 8192, "length": n or 512, **extra}, data)
            with pytest.raises(RemoteError, match="refused"):
                await group.call(W.DATA_WRITE, {"ldev": 3, "offset": 1, "length": 1}, b"x")
            assert (await group.call(ECHO, {}, b"still up"))[1] == b"still up"
        finally:
            await a.close()
            await b.close()

    run(body)


def test_a_frame_with_unknown_flags_closes_the_connection() -> None:
    async def body() -> None:
        a, b, group = await started()
        try:
            conn = group.active_paths[0].conn
            assert conn is not None
            conn._write_raw(W.REQUEST, 0x80, 9, b"{}")
            inbound = [c for cs in b._inbound.values() for c in cs]
            await asyncio.wait_for(asyncio.gather(*(c.closed.wait() for c in inbound)), 5)
            assert "flags" in inbound[0].close_reason
        finally:
            await a.close()
            await b.close()

    run(body)


def test_a_data_write_whose_json_header_is_not_an_object_gets_an_error_and_the_connection_stays() -> None:
    async def body() -> None:
        a, b, group = await started()

        @C.inline_handler
        async def write(peer: PeerInfo, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
            return {}, bytes(header["ldev"])  # KeyError for a header that was not an object

        b.register_handler(W.DATA_WRITE, write)
        try:
            conn = group.active_paths[0].conn
            assert conn is not None
            raw = json.dumps({"m": W.DATA_WRITE, "h": [1, 2]}).encode()
            conn._write_raw(W.REQUEST, 0, 777, raw, b"abc")
            assert (await group.call(ECHO, {}, b"still up"))[1] == b"still up"
            assert all(c.is_open for cs in b._inbound.values() for c in cs)
        finally:
            await a.close()
            await b.close()

    run(body)


def run_with_b_in_a_thread(handler: C.Handler,
                           body: Callable[[PathGroup, asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    """Link b serves ``handler`` for data.write from its own thread and event loop, as another process would;
    ``body`` runs here with a path group to it and b's loop."""
    a, b = make_pair()
    b_loop = asyncio.new_event_loop()
    b.register_handler(W.DATA_WRITE, handler)
    b_started = asyncio.run_coroutine_threadsafe(b.start(), b_loop)
    thread = threading.Thread(target=b_loop.run_forever, daemon=True)
    thread.start()

    async def main() -> None:
        await a.start()
        group = a.ensure_group(2, B_ID, 0, 15.0)
        await asyncio.wrap_future(b_started)
        await group.add_path("CL3-A", "CL3-A")
        await group.wait_attempted(5)
        try:
            await body(group, b_loop)
        finally:
            await a.close()
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(b.close(), b_loop))

    try:
        run(main)
    finally:
        b_loop.call_soon_threadsafe(b_loop.stop)
        thread.join(5)
        b_loop.close()


def test_a_lone_small_write_gets_its_reply_while_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polled completion: with the serving side running elsewhere (a thread here, another process in real use),
    a lone small ``data.write`` receives and parses its reply while it polls, so the call completes the first
    time it is stepped, without an event-loop trip (the NBD server then answers the host at once, no task).
    A reply that takes longer than the polling time still arrives the ordinary way."""
    monkeypatch.setattr(C, "POLL_SECONDS", 2.0)  # generous: the serving thread needs the GIL to answer
    served: list[bytes] = []

    @C.inline_handler
    async def write(peer: PeerInfo, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        if header["offset"] == 4096:
            await asyncio.sleep(0.2)  # slower than a shortened poll below
        served.append(bytes(payload))
        return {}, b""

    async def body(group: PathGroup, _b_loop: asyncio.AbstractEventLoop) -> None:
        for i in range(20):
            data = os.urandom(4096)
            call = group.call(W.DATA_WRITE, {"ldev": 3, "offset": 8192 * (i + 1), "length": 4096}, data)
            with pytest.raises(StopIteration) as done:
                call.send(None)  # as the NBD server steps a host write
            assert done.value.value == ({}, b"") and served[-1] == data
        monkeypatch.setattr(C, "POLL_SECONDS", 0.01)
        assert await group.call(W.DATA_WRITE, {"ldev": 3, "offset": 4096, "length": 1}, b"s") == ({}, b"")
        assert served[-1] == b"s" and len(served) == 21

    run_with_b_in_a_thread(write, body)


def test_the_secondary_polls_for_the_next_small_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The secondary's polled wait: in a steady stream of small mirrored writes, the serving side receives the
    next write while it polls after answering one, and serves it right there; its event loop still runs other
    work meanwhile; a copy (not a host write) does not start the polling."""
    monkeypatch.setattr(S, "SPIN_SECONDS", 0.05)  # threads share the GIL here: the gaps are longer than usual
    served: list[bytes] = []

    @C.inline_handler
    async def write(peer: PeerInfo, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        served.append(bytes(payload))
        return {}, b""

    async def body(group: PathGroup, b_loop: asyncio.AbstractEventLoop) -> None:
        spinner = S.Spinner.of(b_loop)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        ticker = asyncio.run_coroutine_threadsafe(tick(), b_loop)
        try:
            for i in range(100):
                data = os.urandom(4096)
                assert await group.call(W.DATA_WRITE, {"ldev": 3, "offset": 4096 * i, "length": 4096},
                                        data) == ({}, b"")
                assert served[-1] == data
            assert spinner.served > 20 and ticks > 0
            # The count goes up after the reply is sent, so the last write's may still be on its way: let B's loop
            # finish the callback that served it before reading the count.
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(asyncio.sleep(0), b_loop))
            before = spinner.served
            for _ in range(30):
                await group.call(W.DATA_WRITE, {"ldev": 3, "offset": 0, "length": 4096, "copy": True}, b"c" * 4096)
            assert spinner.served - before <= 1  # (the first copy may still meet the last host write's polling)
            assert len(served) == 130
        finally:
            ticker.cancel()

    run_with_b_in_a_thread(write, body)
