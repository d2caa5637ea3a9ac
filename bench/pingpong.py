"""The floor under a mirrored write's latency: a bare uvloop round trip between two processes.

Usage: python bench/pingpong.py [--count 5000] [--size 64]

A synchronous mirror (TrueCopy in PAIR) adds at least one such round trip (primary -> secondary -> primary)
to every host write; this measures it on this machine, without any vspemu code, over TCP loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import time

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = multiprocessing.Process(target=_serve, args=(sock,), daemon=True)
    server.start()
    try:
        rtts = [uvloop.run(_client(sock.getsockname()[1], args.count, args.size)) for _ in range(3)]
    finally:
        server.terminate()
    print("uvloop ping-pong between two processes, TCP loopback, "
          f"{args.size}-byte messages: " + ", ".join(f"{r * 1e6:.1f} us" for r in rtts) + " (3 runs)")


if __name__ == "__main__":
    main()
