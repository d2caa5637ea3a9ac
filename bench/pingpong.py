"""The floor under a mirrored write's latency: a bare uvloop round trip between two processes.

Usage: python bench/pingpong.py [--count 5000] [--size 64]
       python bench/pingpong.py --link [--cipher both|aes-256-gcm|none] [--count 5000] [--size 4096]

A synchronous mirror (TrueCopy in PAIR) adds at least one such round trip (primary -> secondary -> primary)
to every host write; this measures it on this machine, without any vspemu code, over TCP loopback.

``--link`` measures the same round trip through the replication link instead: a ``data.write`` of ``--size``
bytes at queue depth 1 from a path group to a second process whose handler answers at once (no volume), as a
mirrored host write would be sent (the coroutine is stepped by hand, as the NBD server does). It reports the
mean round trip and how many calls completed on their first step (their reply was received while polling,
see ``Connection._poll_reply``), and the secondary's count of writes served while it polled for them
(``Spinner.served``). ``--cipher both`` alternates the sealed link and ``VSPEMU_LINK_CIPHER=none``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

import uvloop


def _serve(sock: socket.socket) -> None:
    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Echo, sock=sock)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


async def _client(port: int, count: int, size: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    msg = b"x" * size
    for _ in range(200):  # warm up
        writer.write(msg)
        await reader.readexactly(size)
    t0 = time.perf_counter()
    for _ in range(count):
        writer.write(msg)
        await reader.readexactly(size)
    elapsed = time.perf_counter() - t0
    writer.close()
    return elapsed / count


_A, _B, _SECRET = "800000000001", "800000000002", b"pingpong-secret-0123456789abcdef"


def _link_serve(cipher: str, pipe: Pipe) -> None:
    from vspemu.replication.connection import inline_handler
    from vspemu.replication.link import Link
    from vspemu.replication.spinner import Spinner
    from vspemu.replication.wire import DATA_WRITE, PeerInfo

    @inline_handler
    async def write(peer: PeerInfo, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        return {}, b""

    async def main() -> None:
        b = Link(_B, 2, lambda d: _SECRET if d == _A else None, lambda d, p: None, ports={"CL3-A": 0},
                 cipher=cipher)
        b.register_handler(DATA_WRITE, write)
        await b.start()
        pipe.send(b.ports["CL3-A"])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, pipe.recv)  # until the client is done
        pipe.send(Spinner.of(loop).served)
        await b.close()

    uvloop.run(main())


async def _link_client(port: int, cipher: str, count: int, size: int) -> tuple[float, int]:
    from vspemu.aio import resume
    from vspemu.replication.link import Link
    from vspemu.replication.wire import DATA_WRITE

    a = Link(_A, 1, lambda d: _SECRET if d == _B else None, lambda d, p: ("127.0.0.1", port),
             ports={"CL3-A": 0}, cipher=cipher)
    await a.start()
    group = a.ensure_group(2, _B, 0, 15.0)
    await group.add_path("CL3-A", "CL3-A")
    if not await group.wait_status("NML_01", 10):
        raise SystemExit(f"the path did not come up: {group.view()}")
    data = os.urandom(size)
    first_step = 0

    async def write(offset: int) -> None:
        nonlocal first_step
        call = group.call(DATA_WRITE, {"ldev": 0, "offset": offset, "length": size}, data)
        try:
            yielded = call.send(None)  # as the NBD server steps a host write
        except StopIteration:
            first_step += 1
            return
        await resume(call, yielded)

    try:
        for i in range(500):  # warm up
            await write(i * size)
        first_step = 0
        t0 = time.perf_counter()
        for i in range(count):
            await write(i * size)
        return (time.perf_counter() - t0) / count, first_step
    finally:
        await a.close()


def _link_run(cipher: str, count: int, size: int) -> str:
    ours, theirs = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_link_serve, args=(cipher, theirs), daemon=True)
    server.start()
    try:
        port = ours.recv()
        rtt, first = uvloop.run(_link_client(port, cipher, count, size))
        ours.send("done")
        served = ours.recv()
    finally:
        server.join(10)
        if server.is_alive():
            server.terminate()
    return f"{cipher}: {rtt * 1e6:.1f} us, {100 * first / count:.0f} % on the first step, {served} polled by B"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--size", type=int, default=None, help="bytes per message (default 64, 4096 with --link)")
    ap.add_argument("--link", action="store_true", help="through the replication link (data.write, QD1)")
    ap.add_argument("--cipher", choices=("both", "aes-256-gcm", "none"), default="both")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if args.link:
        size = 4096 if args.size is None else args.size
        ciphers = ["aes-256-gcm", "none"] if args.cipher == "both" else [args.cipher]
        print(f"replication link data.write of {size} bytes, QD1, two processes, TCP loopback:")
        for _ in range(args.runs):
            for cipher in ciphers:
                print("  " + _link_run(cipher, args.count, size), flush=True)
        return
    args.size = 64 if args.size is None else args.size
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = multiprocessing.Process(target=_serve, args=(sock,), daemon=True)
    server.start()
    try:
        rtts = [uvloop.run(_client(sock.getsockname()[1], args.count, args.size)) for _ in range(args.runs)]
    finally:
        server.terminate()
    print("uvloop ping-pong between two processes, TCP loopback, "
          f"{args.size}-byte messages: " + ", ".join(f"{r * 1e6:.1f} us" for r in rtts) + f" ({args.runs} runs)")


if __name__ == "__main__":
    main()
