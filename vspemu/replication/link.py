"""The replication link's paths and sessions: remote paths, path groups, replication ports, message handlers.

Every storage system listens on one TCP port per replication port (CL3-A, CL4-A, CL3-B, CL4-B). A *remote
path* (:class:`RemotePath`) is a live, authenticated connection from a local replication port to a port of a
remote system, kept up by a supervisor that reconnects with a back-off; a *path group* (:class:`PathGroup`)
bundles the paths to one remote system (remotepath-groups in the REST API) and sends each request on one of its
working paths, again on another if that path fails. :class:`Link` is a system's side of it all: the listeners
of its replication ports (accepting and authenticating inbound connections, at most
:data:`MAX_PENDING_HANDSHAKES` pending handshakes, :data:`MAX_PENDING_PER_ADDRESS` from one address), its path
groups, the faults on demand (a path held down, a :class:`SendShaper` on a connection) and the registry of
message handlers.

The other modules of the link: :mod:`.wire` (the frame layout, the handshake's messages and proofs, the
sealing of frames, the exceptions), :mod:`.handshake` (both sides of the handshake), :mod:`.connection` (one
authenticated connection: sending, request / reply, handler dispatch, keepalive), :mod:`.receiver` (its
receiving half: parsing and unsealing frames, polled completion) and :mod:`.spinner` (the secondary's polled
wait for the next mirrored write).

Message handlers: each message type is served by exactly one handler, registered with
:meth:`Link.register_handler` by the module that owns the message (registering a type twice raises):

==================  ========================================================================================
``vspemu.echo``     this module (every system serves it: tests and diagnostics)
``pair.*``          :mod:`vspemu.replication.engine`: create, set, state, delete, bitmap, swap of a pair
``data.*``          :mod:`vspemu.replication.engine`: ``data.write`` (mirrored writes and copy chunks, binary
                    header, see :mod:`.wire`), ``data.flush``, ``data.extents``
``jnl.*``           :mod:`vspemu.replication.ur`: ``jnl.read`` and ``jnl.split`` (Universal Replicator)
``verify.*``        :mod:`vspemu.replication.verify`: ``verify.sums`` (online verify of a pair)
==================  ========================================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from vspemu.replication import handshake
from vspemu.replication.connection import DEFAULT_KEEPALIVE, Connection, Handler, inline_handler
from vspemu.replication.wire import (
    CIPHERS,
    ECHO,
    PATH_COMMUNICATION_FAILED,
    PATH_INIT_FAILED,
    PATH_INVALID_PORT,
    PATH_NORMAL,
    PATH_REJECTED,
    PATH_TIMEOUT,
    HandshakeRefused,
    LinkDown,
    LinkTimeout,
    PeerInfo,
    ProtocolError,
    link_cipher,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0  # the whole handshake, either side (the HELLO's is wire.HELLO_TIMEOUT)
MAX_PENDING_HANDSHAKES = 64
MAX_PENDING_PER_ADDRESS = 16  # so that idle sockets from one address cannot take every handshake slot

SecretLookup = Callable[[str], bytes | None]
AddressLookup = Callable[[str, str], tuple[str, int] | None]


class SendShaper:
    """A fault on demand on a path group's connections: every frame sent waits ``latency`` seconds, and the
    payload bytes pass a token bucket of ``rate`` bytes per second (0: no limit)."""

    def __init__(self, latency: float = 0.0, rate: float = 0.0) -> None:
        self.latency = latency
        self.rate = rate
        self._free_at = 0.0  # when the bucket has room again (monotonic)

    async def pace(self, nbytes: int) -> None:
        delay = self.latency
        if self.rate > 0 and nbytes:
            now = time.monotonic()
            start = max(self._free_at, now)
            self._free_at = start + nbytes / self.rate
            delay += self._free_at - now
        if delay > 0:
            await asyncio.sleep(delay)


class RemotePath:
    """One path of a group: keeps a connection from a local port to a remote port up, reconnecting."""

    def __init__(self, group: PathGroup, local_port_id: str, remote_port_id: str) -> None:
        self.group = group
        self.local_port_id = local_port_id
        self.remote_port_id = remote_port_id
        self.status = PATH_INIT_FAILED
        self.reason = "not connected yet"
        self.conn: Connection | None = None
        self.attempted = asyncio.Event()  # set after the first connection attempt concluded
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # counters for /metrics (vspemu_remote_path_errors_total, ..._connects_total): bumped by the
        # supervisor only, never on the data path
        self.connect_failures = 0  # attempts that failed: refused, unreachable, timed out, protocol error
        self.refusals = 0  # attempts refused before or in the handshake (ERR_04/06/10, offline port, fault)
        self.disconnects = 0  # established connections that went down
        self.connects = 0  # connections established (the first and every reconnect)

    @property
    def key(self) -> tuple[str, str]:
        return self.local_port_id, self.remote_port_id

    @property
    def is_up(self) -> bool:
        return self.conn is not None and self.conn.is_open

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.conn is not None:
            self.conn.close(PATH_COMMUNICATION_FAILED, "path removed")

    def _set(self, status: str, reason: str) -> None:
        if status != self.status:
            log.info("path %s -> %s/%s: %s (%s)", self.local_port_id, self.group.remote_device_id,
                     self.remote_port_id, status, reason)
        self.status, self.reason = status, reason
        self.changed.set()

    async def _supervise(self) -> None:
        link = self.group.link
        backoff = 0.1
        while True:
            try:
                conn = await self._connect()
            except HandshakeRefused as e:
                self.refusals += 1
                self._set(e.status, str(e))
            except TimeoutError:
                self.connect_failures += 1
                self._set(PATH_TIMEOUT, "connection attempt timed out")
            except (OSError, asyncio.IncompleteReadError, ProtocolError) as e:
                self.connect_failures += 1
                self._set(PATH_INIT_FAILED, f"{type(e).__name__}: {e}")
            else:
                self.conn = conn
                self.connects += 1
                self._set(PATH_NORMAL, "connected")
                self.attempted.set()
                backoff = 0.1
                await conn.closed.wait()
                self.conn = None
                self.disconnects += 1
                self._set(conn.close_status, conn.close_reason)
            self.attempted.set()
            await asyncio.sleep(backoff * (0.75 + secrets.randbelow(50) / 100))
            backoff = min(backoff * 2, link.max_backoff)

    async def _connect(self) -> Connection:
        link = self.group.link
        if not link.port_enabled(self.local_port_id):
            raise HandshakeRefused(PATH_INIT_FAILED, f"local port {self.local_port_id} is offline")
        if link.path_fault is not None and link.path_fault(self.local_port_id, self.group.remote_serial,
                                                           self.remote_port_id, self.group.path_group_id):
            raise HandshakeRefused(PATH_COMMUNICATION_FAILED, "the path is held down (fault on demand)")
        address = link.address_of(self.group.remote_device_id, self.remote_port_id)
        if address is None:
            raise HandshakeRefused(PATH_INVALID_PORT, f"{self.remote_port_id} is not a replication port of "
                                                      f"{self.group.remote_device_id}")
        secret = link.secret_for(self.group.remote_device_id)
        if secret is None:
            raise HandshakeRefused(PATH_REJECTED, f"no secret for {self.group.remote_device_id}")
        timeout = min(HANDSHAKE_TIMEOUT, self.group.timeout)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address[0], address[1]), timeout)
        try:
            keys = await asyncio.wait_for(handshake.initiate(
                reader, writer, secret, local_id=link.storage_device_id, local_serial=link.serial,
                remote_id=self.group.remote_device_id, local_port_id=self.local_port_id,
                remote_port_id=self.remote_port_id, keepalive=self.group.timeout, cipher=link.cipher), timeout)
        except BaseException:
            writer.transport.abort()
            raise
        peer = PeerInfo(self.group.remote_device_id, self.group.remote_serial, self.local_port_id,
                        self.remote_port_id, True)
        conn = Connection(reader, writer, peer, link.handlers, self.group.timeout, keys)
        if link.shaper_for is not None:
            conn.shaper = link.shaper_for(self.group.remote_serial, self.group.path_group_id)
        conn.start()
        return conn


    def view(self) -> dict[str, Any]:
        return {"localPortId": self.local_port_id, "remotePortId": self.remote_port_id,
                "pathStatus": self.status, "reason": self.reason}




class PathGroup:
    """The paths from this system to one remote system under one path group id."""

    def __init__(self, link: Link, remote_serial: int, remote_device_id: str, path_group_id: int,
                 timeout: float = DEFAULT_KEEPALIVE) -> None:
        self.link = link
        self.remote_serial = remote_serial
        self.remote_device_id = remote_device_id
        self.path_group_id = path_group_id
        self.timeout = float(timeout)
        self.paths: dict[tuple[str, str], RemotePath] = {}
        self._rr = itertools.count()

    # -- state -------------------------------------------------------------------------------------
    @property
    def active_paths(self) -> list[RemotePath]:
        return [p for p in self.paths.values() if p.is_up]

    @property
    def status(self) -> str:
        """NML_01 if every path is up; otherwise the status of the first failed path."""
        for p in self.paths.values():
            if p.status != PATH_NORMAL:
                return p.status
        return PATH_NORMAL

    def set_timeout(self, timeout: float) -> None:
        self.timeout = float(timeout)
        for p in self.paths.values():
            if p.conn is not None:
                p.conn.keepalive = self.timeout

    async def add_path(self, local_port_id: str, remote_port_id: str) -> RemotePath:
        path = self.paths.get((local_port_id, remote_port_id))
        if path is None:
            path = RemotePath(self, local_port_id, remote_port_id)
            self.paths[path.key] = path
            path.start()
        return path

    async def remove_path(self, local_port_id: str, remote_port_id: str) -> None:
        path = self.paths.pop((local_port_id, remote_port_id), None)
        if path is not None:
            await path.stop()

    async def close(self) -> None:
        for key in list(self.paths):
            await self.remove_path(*key)

    async def wait_attempted(self, timeout: float) -> None:
        """Wait until every path made its first connection attempt (or ``timeout``)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.attempted.wait() for p in self.paths.values())), timeout)

    async def wait_status(self, status: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.paths and all(p.status == status for p in self.paths.values()):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.05, left))

    # -- requests ----------------------------------------------------------------------------------
    async def call(self, msg_type: str, header: dict[str, Any], payload: bytes | bytearray | memoryview = b"",
                   timeout: float | None = None, sent: Callable[[], None] | None = None
                   ) -> tuple[dict[str, Any], bytes]:
        """Send a request on a working path and return the reply (header, payload).

        If the path fails before the answer arrives, the request is sent again on another working path of
        the group (handlers must therefore be idempotent). ``timeout`` bounds the whole call (default: the
        group's timeoutValueForRemoteIOInSeconds). Raises :class:`LinkDown` when no path works,
        :class:`LinkTimeout` when the deadline passes, :class:`RemoteError` when the remote handler raised.
        ``sent`` is called once, when the request is first handed to a connection (see
        :meth:`Connection.request`); if it raises, the call raises that without waiting for the reply.
        """
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget

        def sent_once() -> None:  # a request sent again on another path does not call it again
            nonlocal sent
            callback, sent = sent, None
            if callback is not None:
                callback()

        tried: set[tuple[str, str]] = set()
        last: Exception | None = None
        while True:
            candidates = [p for p in self.active_paths if p.key not in tried]
            if not candidates:
                if last is not None:
                    raise LinkDown(f"every path to {self.remote_device_id} failed; last: {last}") from last
                raise LinkDown(f"no working path to {self.remote_device_id} in path group {self.path_group_id}")
            path = candidates[next(self._rr) % len(candidates)]
            conn = path.conn
            if conn is None:
                tried.add(path.key)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkTimeout(f"no answer to {msg_type} from {self.remote_device_id} within {budget} s")
            try:
                return await conn.request(msg_type, header, payload, left, sent_once)
            except LinkTimeout:
                raise
            except LinkDown as e:
                tried.add(path.key)
                last = e

    def view(self) -> list[dict[str, Any]]:
        return [p.view() for p in self.paths.values()]


class Link:
    """The replication ports of one storage system: listeners, path groups and message handlers."""

    inline_handler = staticmethod(inline_handler)  # so users of Link can mark handlers without another import

    def __init__(self, storage_device_id: str, serial: int, secret_for: SecretLookup, address_of: AddressLookup,
                 host: str = "127.0.0.1", ports: dict[str, int] | None = None, max_backoff: float = 2.0,
                 cipher: str | None = None) -> None:
        self.storage_device_id = storage_device_id
        self.cipher = link_cipher() if cipher is None else cipher  # both ends of a connection must agree
        if self.cipher not in CIPHERS:
            raise ValueError(f"unknown link cipher {self.cipher!r}")
        self.serial = serial
        self.secret_for = secret_for
        self.address_of = address_of
        self.host = host
        self.ports: dict[str, int] = dict(ports or {})
        self.max_backoff = max_backoff
        self.handlers: dict[str, Handler] = {}
        self.groups: dict[tuple[int, int], PathGroup] = {}
        self._servers: dict[str, asyncio.Server] = {}
        self._inbound: dict[str, set[Connection]] = {}
        self._pending_handshakes = 0
        self._pending_by_address: dict[str, int] = {}
        self.rejected_connections = 0
        # faults on demand (vspemu.system.faults): whether a path (local port, remote serial, remote port,
        # path group id or None for an inbound connection) is held down; the send shaper of a connection
        self.path_fault: Callable[[str, int, str, int | None], bool] | None = None
        self.shaper_for: Callable[[int, int | None], SendShaper | None] | None = None
        self.register_handler(ECHO, _echo)

    # -- handlers ----------------------------------------------------------------------------------
    def register_handler(self, msg_type: str, handler: Handler) -> None:
        """Serve requests of ``msg_type``: ``await handler(peer, header, payload) -> (header, payload)``.

        One handler per message type, registered by the module that owns the message (see the module
        docstring): registering a type that already has a handler raises ValueError."""
        if msg_type in self.handlers:
            raise ValueError(f"message type {msg_type!r} already has a handler on this link")
        self.handlers[msg_type] = handler

    # -- listeners ---------------------------------------------------------------------------------
    async def start(self) -> None:
        for port_id, port in list(self.ports.items()):
            await self._listen(port_id, port)

    async def _listen(self, port_id: str, port: int) -> None:
        server = await asyncio.start_server(lambda r, w: self._accept(port_id, r, w), self.host, port,
                                            reuse_address=True)
        sock_port = server.sockets[0].getsockname()[1]
        self.ports[port_id] = int(sock_port)
        self._servers[port_id] = server

    def port_enabled(self, port_id: str) -> bool:
        return port_id in self._servers

    async def set_port_enabled(self, port_id: str, enabled: bool) -> None:
        """Take a replication port offline (listener closed, its connections dropped) or back online."""
        if enabled:
            if port_id not in self._servers:
                await self._listen(port_id, self.ports[port_id])
            return
        server = self._servers.pop(port_id, None)
        if server is not None:
            server.close()
        for conn in list(self._inbound.get(port_id, ())):
            conn.close(PATH_COMMUNICATION_FAILED, f"port {port_id} taken offline")
        for group in self.groups.values():
            for path in group.paths.values():
                if path.local_port_id == port_id and path.conn is not None:
                    path.conn.close(PATH_INIT_FAILED, f"local port {port_id} taken offline")

    def addresses(self) -> dict[str, tuple[str, int]]:
        return {p: (self.host, n) for p, n in self.ports.items()}

    def drop_peer(self, storage_device_id: str) -> None:
        """Close every inbound connection from a system (its registration was removed)."""
        for conns in self._inbound.values():
            for conn in list(conns):
                if conn.peer.storage_device_id == storage_device_id:
                    conn.close(PATH_REJECTED, "registration removed")

    async def _accept(self, port_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        address = str(peername[0]) if isinstance(peername, tuple) and peername else "?"
        pending = self._pending_by_address.get(address, 0)
        if self._pending_handshakes >= MAX_PENDING_HANDSHAKES or pending >= MAX_PENDING_PER_ADDRESS:
            self.rejected_connections += 1
            writer.transport.abort()
            return
        self._pending_handshakes += 1
        self._pending_by_address[address] = pending + 1
        try:
            peer, keepalive, keys = await asyncio.wait_for(handshake.answer(
                reader, writer, port_id=port_id, local_id=self.storage_device_id, local_serial=self.serial,
                cipher=self.cipher, secret_for=self.secret_for), HANDSHAKE_TIMEOUT)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError, HandshakeRefused) as e:
            self.rejected_connections += 1
            log.warning("replication port %s: connection from %s refused: %s: %s", port_id,
                        writer.get_extra_info("peername"), type(e).__name__, e)
            writer.transport.abort()
            return
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            self._pending_handshakes -= 1
            left = self._pending_by_address.pop(address, 1) - 1
            if left > 0:
                self._pending_by_address[address] = left
        if port_id not in self._servers:  # the port went offline meanwhile
            writer.transport.abort()
            return
        if self.path_fault is not None and self.path_fault(port_id, peer.serial, peer.remote_port_id, None):
            self.rejected_connections += 1
            writer.transport.abort()  # the path is held down (fault on demand)
            return
        conn = Connection(reader, writer, peer, self.handlers, keepalive, keys)
        if self.shaper_for is not None:
            conn.shaper = self.shaper_for(peer.serial, None)
        conns = self._inbound.setdefault(port_id, set())
        conns.add(conn)
        conn.start()
        await conn.closed.wait()
        conns.discard(conn)


    def apply_faults(self) -> None:
        """The faults on demand changed: cut the connections of paths now held down, (re)set send shapers."""
        fault, shaper_for = self.path_fault, self.shaper_for
        for group in self.groups.values():
            for path in group.paths.values():
                conn = path.conn
                if conn is None:
                    continue
                if fault is not None and fault(path.local_port_id, group.remote_serial, path.remote_port_id,
                                               group.path_group_id):
                    conn.close(PATH_COMMUNICATION_FAILED, "the path is held down (fault on demand)")
                else:
                    conn.shaper = shaper_for(group.remote_serial, group.path_group_id) if shaper_for else None
        for port_id, conns in self._inbound.items():
            for conn in list(conns):
                peer = conn.peer
                if fault is not None and fault(port_id, peer.serial, peer.remote_port_id, None):
                    conn.close(PATH_COMMUNICATION_FAILED, "the path is held down (fault on demand)")
                else:
                    conn.shaper = shaper_for(peer.serial, None) if shaper_for else None

    # -- path groups -------------------------------------------------------------------------------
    def path_group(self, remote_serial: int, path_group_id: int) -> PathGroup | None:
        return self.groups.get((remote_serial, path_group_id))

    def ensure_group(self, remote_serial: int, remote_device_id: str, path_group_id: int,
                     timeout: float = DEFAULT_KEEPALIVE) -> PathGroup:
        group = self.groups.get((remote_serial, path_group_id))
        if group is None:
            group = PathGroup(self, remote_serial, remote_device_id, path_group_id, timeout)
            self.groups[(remote_serial, path_group_id)] = group
        return group

    async def remove_group(self, remote_serial: int, path_group_id: int) -> None:
        group = self.groups.pop((remote_serial, path_group_id), None)
        if group is not None:
            await group.close()

    async def close(self) -> None:
        for key in list(self.groups):
            await self.remove_group(*key)
        for port_id in list(self._servers):
            await self.set_port_enabled(port_id, False)


@inline_handler
async def _echo(peer: PeerInfo, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Echo: answers the payload and its SHA-256; ``delay`` (s) waits first, ``fail`` raises."""
    delay = header.get("delay")
    if isinstance(delay, (int, float)) and 0 < delay <= 60:
        await asyncio.sleep(delay)
    if header.get("fail"):
        raise RuntimeError(str(header["fail"]))
    return {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload), "from": peer.storage_device_id,
            "port": peer.local_port_id}, payload
