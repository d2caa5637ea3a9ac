"""Serve one file over NBD with :class:`NbdServer` (development and benchmarks only).

    python -m vspemu.volumes.nbd_main --file PATH --size BYTES --port P [--name 0]

Prints ``NBD listening on HOST:PORT`` once it accepts connections (``--port 0`` picks a free port).
``--max-connections``, ``--max-connections-per-client``, ``--handshake-timeout``, ``--idle-timeout``,
``--buffer-budget`` (MiB) and ``--stall-timeout`` set the server's limits (:class:`NbdLimits`, docs/nbd.md).
``--read-only-gate`` installs a write gate that refuses every write (``NBD_EPERM``); ``--slow-replicator S``
installs a replicator that waits S seconds before each local write (exercises the asynchronous path).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from vspemu.volumes.nbd import NbdLimits, NbdServer
from vspemu.volumes.volume import Volume, WriteRefused


class _SlowReplicator:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def write(self, volume: Volume, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await asyncio.sleep(self.delay)
        volume.write_local(offset, data)
        if fua:
            await volume.flush_local()

    async def discard(self, volume: Volume, offset: int, length: int, zero: bool, fua: bool) -> None:
        await asyncio.sleep(self.delay)
        volume.discard_local(offset, length)
        if fua:
            await volume.flush_local()

    async def flush(self, volume: Volume) -> None:
        await asyncio.sleep(self.delay)
        await volume.flush_local()


def _refuse(volume: Volume) -> None:
    raise WriteRefused(f"LDEV {volume.ldev_id} is write-protected")


def _open_volume(args: argparse.Namespace) -> Volume:
    path = Path(args.file)
    ldev_id = int(args.name) if args.name.isascii() and args.name.isdigit() else 0
    if not path.exists():
        return Volume.create(ldev_id, path, args.size)
    volume = Volume(ldev_id, path, args.size)
    if path.stat().st_size < args.size:
        volume.resize(args.size)
    return volume


async def _serve(args: argparse.Namespace, volume: Volume) -> None:
    if args.read_only_gate:
        volume.write_gate = _refuse
    if args.slow_replicator:
        volume.replicator = _SlowReplicator(args.slow_replicator)
    limits = NbdLimits(args.max_connections, args.max_connections_per_client, args.handshake_timeout,
                       args.idle_timeout, args.buffer_budget << 20, args.stall_timeout)
    server = NbdServer(lambda name: volume if name == args.name else None, lambda: [args.name], limits)
    await server.start(args.host, args.port)
    print(f"NBD listening on {args.host}:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    volume.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--port", type=int, default=10809)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="0", help="export name (an LDEV id)")
    parser.add_argument("--read-only-gate", action="store_true", help="refuse every write with NBD_EPERM")
    parser.add_argument("--slow-replicator", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    d = NbdLimits()
    parser.add_argument("--max-connections", type=int, default=d.max_connections)
    parser.add_argument("--max-connections-per-client", type=int, default=d.max_connections_per_client)
    parser.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout, metavar="SECONDS")
    parser.add_argument("--idle-timeout", type=float, default=d.idle_timeout, metavar="SECONDS")
    parser.add_argument("--buffer-budget", type=int, default=d.buffer_budget >> 20, metavar="MIB")
    parser.add_argument("--stall-timeout", type=float, default=d.stall_timeout, metavar="SECONDS")
    args = parser.parse_args()
    volume = _open_volume(args)
    if args.no_uvloop:
        asyncio.run(_serve(args, volume))
    else:
        import uvloop

        uvloop.run(_serve(args, volume))


if __name__ == "__main__":
    main()
