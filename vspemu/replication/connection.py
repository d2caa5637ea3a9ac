"""One authenticated connection of the replication link: frames in and out, request / reply, handler dispatch.

A :class:`Connection` is made by the handshake (:mod:`.handshake`) once both sides proved they share the link
secret; it frames, seals and unseals as :mod:`.wire` describes. After the handshake both sides may send
REQUESTs: many may be in flight (request ids), each is served concurrently (by its own task, or, for a
handler marked :func:`inline_handler`, right in the receive callback until it first suspends), and a handler
exception comes back as an ERROR frame (:class:`.wire.RemoteError` on the caller) without harming the
connection. Receiving (parsing, large payloads in place into pooled page-aligned buffers, unsealing) is the
base class's, :class:`.receiver.FrameReceiver`; sending, request / reply and serving are here. Both
sides send PING every ``keepalive/5`` seconds; a side that hears nothing for ``0.6 * keepalive`` seconds
declares the connection dead (:func:`keepalive_timing`).

Polled completion (:data:`POLL_SECONDS`, :meth:`.receiver.FrameReceiver._poll_reply`) and the secondary's
polled wait for the next mirrored write (:class:`.spinner.Spinner`) take a wake-up out of a mirrored host
write at queue depth 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
import select
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

from vspemu.aio import resume
from vspemu.replication.receiver import BUFFERS, SMALL_PAYLOAD, FrameReceiver
from vspemu.replication.wire import (
    DATA_WRITE,
    ERROR,
    FIXED,
    GOAWAY,
    NONCE,
    PATH_COMMUNICATION_FAILED,
    PATH_TIMEOUT,
    PING,
    PREFIX,
    REPLY,
    REQUEST,
    TAG,
    FrameCipher,
    LinkDown,
    LinkTimeout,
    PeerInfo,
    RemoteError,
    encode_header,
)

log = logging.getLogger(__name__)

MAX_CONCURRENT_HANDLERS = 256
DEFAULT_KEEPALIVE = 15.0
MAX_INFLIGHT_PAYLOAD = 256 << 20  # per connection: payload of the requests being served before we stop reading
WRITE_HIGH = 8 << 20  # senders wait while more than this is queued in the transport (until WRITE_LOW)
WRITE_LOW = 2 << 20
# Polled completion, as the block layer's hybrid polling does for fast devices: a small data.write (a mirrored
# host write) that is the only request of the process waiting for a reply (a TrueCopy write at queue depth 1)
# polls its socket for up to this long before it sleeps in the event loop, and receives its reply right there
# (see FrameReceiver._poll_reply); other requests (e.g. the long-polling jnl.read) never poll. On a VM a sleeping
# process is woken by an interrupt to a halted vCPU, which costs more than the round trip itself
# (bench/pingpong.py: 62-80 us sleeping, 20-25 us polling, 2 vCPUs). While it polls, the event loop does
# nothing else, hence "the only one". Environment VSPEMU_LINK_POLL_US overrides the time; 0 turns polling off.
POLL_SECONDS = float(os.environ.get("VSPEMU_LINK_POLL_US", "200")) / 1e6
POLL_MAX_PAYLOAD = 64 << 10

_F = TypeVar("_F", bound=Callable[..., Any])
# a request payload is bytes or (when large) a memoryview of a pooled receive buffer
Handler = Callable[[PeerInfo, dict[str, Any], bytes], Awaitable[tuple[dict[str, Any], bytes | bytearray | memoryview]]]


class Pacer(Protocol):
    """What delays a connection's sends (a fault on demand: :class:`.link.SendShaper`)."""

    async def pace(self, nbytes: int) -> None: ...


def keepalive_timing(keepalive: float) -> tuple[float, float]:
    """(ping interval, dead after) for a path time-out of ``keepalive`` seconds."""
    return max(0.1, min(keepalive / 5.0, 2.0)), max(0.5, keepalive * 0.6)


def inline_handler(fn: _F) -> _F:
    """Mark a handler that may be stepped outside a task (it never relies on ``asyncio.current_task()``).

    The link runs such a handler right in its receive callback; only if it suspends does it continue as a
    task. That saves a task and a loop iteration per request on the hot path (e.g. ``data.write``).
    """
    fn.link_inline = True  # type: ignore[attr-defined]
    return fn


async def _continue(awaitable: Awaitable[None]) -> None:
    await awaitable


def _expire(fut: asyncio.Future[Any], msg_type: str, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(LinkTimeout(f"no answer to {msg_type} within {timeout} s"))


class _FrameProtocol(asyncio.BufferedProtocol):
    """The transport's protocol once the handshake is done: hands everything to its Connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn._get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        conn._buffer_updated(nbytes)
        conn._spinner.spin()

    def eof_received(self) -> bool:
        self.conn.close(PATH_COMMUNICATION_FAILED, "connection lost: the peer closed it")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close(PATH_COMMUNICATION_FAILED,
                        f"connection lost: {type(exc).__name__ if exc else 'closed'}")

    def pause_writing(self) -> None:
        self.conn._write_paused = True

    def resume_writing(self) -> None:
        self.conn._resume_writing()


class Connection(FrameReceiver):
    """One authenticated connection; symmetric: both ends may send requests and serve handlers.

    The handshake runs on asyncio streams; :meth:`start` then switches the transport to a
    :class:`asyncio.BufferedProtocol`: frames are parsed straight out of a receive buffer and a large payload
    (over :data:`.receiver.SMALL_PAYLOAD`) is received directly into a pooled, page-aligned buffer (one copy
    from the socket; see :class:`.receiver.FrameReceiver`). A request payload reaches its handler as a
    memoryview of that buffer (the buffer is reused only once nobody references it); a reply payload reaches the
    caller as ``bytes``. A frame is written with one ``writev`` (header and payload, not concatenated, see
    :meth:`_write_two`); senders wait only while the transport's buffer is above its high-water mark.

    Back-pressure: the connection stops reading while :data:`MAX_CONCURRENT_HANDLERS` requests are being
    served or their payloads reach :data:`MAX_INFLIGHT_PAYLOAD`.

    With ``keys`` (send key, receive key) every frame is sealed (see :mod:`.wire`): a large payload is
    encrypted from the caller's buffer into a pooled one (``encrypt_into``), and received in place (with its
    tag) and decrypted there (``decrypt_into``); any failed tag check closes the connection.
    """

    waiting = 0  # requests of the process waiting for their reply, every connection included

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: PeerInfo,
                 handlers: dict[str, Handler], keepalive: float, keys: tuple[bytes, bytes] | None = None) -> None:
        super().__init__(keys[1] if keys else None)  # the receiving half
        self.reader = reader
        self._tx: FrameCipher | None = FrameCipher(keys[0]) if keys else None
        self.writer = writer
        self.transport = cast(asyncio.Transport, writer.transport)  # a socket transport: reads and writes
        self.peer = peer
        self.handlers = handlers
        self.keepalive = keepalive
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._handlers_active = 0
        self._inflight_payload = 0
        self.closed = asyncio.Event()
        self.close_status = PATH_COMMUNICATION_FAILED
        self.close_reason = ""
        self.requests_sent = 0
        self._tasks: list[asyncio.Task[None]] = []
        # sending
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.shaper: Pacer | None = None  # a latency / bandwidth fault on demand (see .link.Link.shaper_for)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport = self.transport
        transport.pause_reading()
        leftover = bytes(self.reader._buffer)  # type: ignore[attr-defined]  # read during the handshake, unparsed
        self.reader._buffer.clear()  # type: ignore[attr-defined]
        eof = self.reader.at_eof() or self.reader._eof  # type: ignore[attr-defined]
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        transport.set_protocol(_FrameProtocol(self))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            self._poller = select.poll()
            self._poller.register(self._fd, select.POLLIN)
            self._spinner.add(self._fd, self)
        self._tasks = [loop.create_task(self._watchdog())]
        if leftover:
            self._ensure_room(len(leftover))
            self._rx[:len(leftover)] = leftover
            self._end = len(leftover)
            self._parse()
        if eof:
            self.close(PATH_COMMUNICATION_FAILED, "connection lost: the peer closed it")
        elif not self.closed.is_set() and not self._rx_paused:
            transport.resume_reading()

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    # -- sending ---------------------------------------------------------------------------------------
    def _write_frame(self, ftype: int, request_id: int, header: dict[str, Any],
                     payload: bytes | bytearray | memoryview = b"") -> None:
        if self.closed.is_set():
            raise LinkDown(f"connection to {self.peer.storage_device_id} is closed ({self.close_reason})")
        flags, hdr = encode_header(ftype, header)
        self._write_raw(ftype, flags, request_id, hdr, payload)

    def _write_raw(self, ftype: int, flags: int, request_id: int, hdr: bytes,
                   payload: bytes | bytearray | memoryview = b"") -> None:
        """Write one frame (sealed if the connection is), its header already encoded."""
        n = len(payload) if isinstance(payload, (bytes, bytearray)) else memoryview(payload).nbytes
        try:
            tx = self._tx
            if tx is None:
                frame = PREFIX.pack(FIXED + len(hdr) + n, ftype, flags, 0, request_id, len(hdr)) + hdr
                if n:
                    self._write_two(frame, payload, n)
                else:
                    self.transport.write(frame)
                return
            prefix = PREFIX.pack(FIXED + len(hdr) + TAG + (n + TAG if n else 0), ftype, flags, 0, request_id,
                                 len(hdr) + TAG)
            aead = tx.aead
            c = tx.take(2 if n else 1)
            frame = prefix + aead.encrypt(NONCE.pack(c), hdr, prefix)
            if not n:
                self.transport.write(frame)
            elif n <= SMALL_PAYLOAD:
                self._write_two(frame, aead.encrypt(NONCE.pack(c + 1), payload, prefix), n + TAG)
            else:  # encrypted straight into a pooled buffer: the one pass over the payload
                buf = BUFFERS.get(n + TAG)
                view = memoryview(buf)[:n + TAG]
                aead.encrypt_into(NONCE.pack(c + 1), payload, prefix, view)
                self._write_two(frame, view, n + TAG)
                del view  # the pool hands the buffer out again only once the transport no longer holds it
                BUFFERS.put(buf)
        except (ConnectionError, OSError, RuntimeError) as e:
            self.close(PATH_COMMUNICATION_FAILED, f"send failed: {e}")
            raise LinkDown(str(e)) from e

    def _write_two(self, frame: bytes, payload: bytes | bytearray | memoryview, n: int) -> None:
        """Frame and payload with one ``writev`` straight to the socket while the transport has nothing queued
        (what Python 3.12's ``writelines`` does; 3.11's joins them, a copy of every payload). What the socket
        does not take now is handed to the transport, which copies only that rest."""
        transport = self.transport
        sent = 0
        if self._fd >= 0 and not transport.get_write_buffer_size() and not transport.is_closing():
            try:
                sent = os.writev(self._fd, (frame, payload))
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(frame) + n:
                return
        if sent < len(frame):
            transport.write(frame[sent:])
            transport.write(payload)
        else:
            transport.write(memoryview(payload)[sent - len(frame):])

    async def _send(self, ftype: int, request_id: int, header: dict[str, Any],
                    payload: bytes | bytearray | memoryview = b"") -> None:
        if self.shaper is not None:  # fault on demand: latency and a bandwidth limit on the sending side
            await self.shaper.pace(len(payload) if isinstance(payload, (bytes, bytearray)) else
                                   memoryview(payload).nbytes)
        self._write_frame(ftype, request_id, header, payload)
        if self._write_paused:
            await self._drain()

    async def _drain(self) -> None:
        while self._write_paused:
            if self.closed.is_set():
                raise LinkDown(f"connection to {self.peer.storage_device_id} is closed ({self.close_reason})")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def _resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def request(self, msg_type: str, header: dict[str, Any], payload: bytes | bytearray | memoryview = b"",
                      timeout: float | None = None, sent: Callable[[], None] | None = None
                      ) -> tuple[dict[str, Any], bytes]:
        """Send a request and wait for its reply. ``sent`` is called once the request is handed to the
        transport, before the wait (work that overlaps with the remote side's)."""
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[dict[str, Any], bytes]] = loop.create_future()
        self._pending[request_id] = fut
        self.requests_sent += 1
        timer = None
        Connection.waiting += 1
        try:
            await self._send(REQUEST, request_id, {"m": msg_type, "h": header}, payload)
            if sent is not None:
                sent()
            if POLL_SECONDS > 0 and Connection.waiting == 1 and msg_type == DATA_WRITE and not fut.done() \
                    and len(payload) <= POLL_MAX_PAYLOAD:
                self._poll_reply(fut, POLL_SECONDS)
            if timeout is not None:
                if fut.done():
                    return fut.result()
                timer = loop.call_later(max(timeout, 0), _expire, fut, msg_type, timeout)
            return await fut
        finally:
            Connection.waiting -= 1
            if timer is not None:
                timer.cancel()
            self._pending.pop(request_id, None)

    def _frame(self, ftype: int, request_id: int, header: dict[str, Any], payload: bytes | memoryview,
               buf: mmap.mmap | None) -> None:
        if ftype == REQUEST:
            self._dispatch(request_id, header, payload, buf)
            return
        if buf is not None:  # callers get bytes: they may keep the payload as long as they like
            payload = bytes(payload)
            BUFFERS.put(buf)
        if ftype == REPLY or ftype == ERROR:
            fut = self._pending.get(request_id)
            if fut is None or fut.done():
                return  # the caller gave up (time-out)
            if ftype == REPLY:
                h = header.get("h", {})
                fut.set_result((h if isinstance(h, dict) else {}, payload))  # type: ignore[arg-type]
            else:
                err = header.get("error", {})
                if not isinstance(err, dict):
                    err = {}
                fut.set_exception(RemoteError(str(err.get("type", "Error")), str(err.get("message", "")), err))
        elif ftype == PING:
            return
        elif ftype == GOAWAY:
            self.close(PATH_COMMUNICATION_FAILED, f"peer closed: {header.get('reason', '')}")
        else:
            self.close(PATH_COMMUNICATION_FAILED, f"protocol error: unexpected frame type {ftype} after the "
                                                  f"handshake")

    def _dispatch(self, request_id: int, header: dict[str, Any], payload: bytes | memoryview,
                  buf: mmap.mmap | None) -> None:
        msg_type = str(header.get("m", ""))
        handler = self.handlers.get(msg_type)
        self._handlers_active += 1
        self._inflight_payload += len(payload)
        if self._handlers_active >= MAX_CONCURRENT_HANDLERS or self._inflight_payload >= MAX_INFLIGHT_PAYLOAD:
            self._rx_paused = True
            self.transport.pause_reading()
        h = header.get("h")
        small_write = msg_type == DATA_WRITE and len(payload) <= POLL_MAX_PAYLOAD and isinstance(h, dict) and \
            not h.get("copy")
        coro = self._serve(request_id, msg_type, handler, header, payload, buf)
        del payload, buf
        awaitable: Awaitable[None]
        if handler is not None and getattr(handler, "link_inline", False):
            try:
                yielded = coro.send(None)
            except StopIteration:
                if small_write:
                    self._spinner.answered()  # a mirrored host write, answered already: the next may come soon
                return
            except BaseException:  # noqa: BLE001 - _serve handles its handler's errors; this is a bug
                log.exception("link: serving %s failed", msg_type)
                return
            awaitable = resume(coro, yielded)
        else:
            awaitable = coro
        task = asyncio.get_running_loop().create_task(_continue(awaitable))
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)

    def _handler_done(self, nbytes: int) -> None:
        self._handlers_active -= 1
        self._inflight_payload -= nbytes
        if self._rx_paused and self._handlers_active < MAX_CONCURRENT_HANDLERS and \
                self._inflight_payload < MAX_INFLIGHT_PAYLOAD and not self.closed.is_set():
            self._rx_paused = False
            self.transport.resume_reading()
            self._parse()  # frames already in the buffer

    async def _serve(self, request_id: int, msg_type: str, handler: Handler | None, header: dict[str, Any],
                     payload: bytes | memoryview, buf: mmap.mmap | None) -> None:
        nbytes = len(payload)
        try:
            try:
                if handler is None:
                    raise LookupError(f"no handler for message type {msg_type!r}")
                h = header.get("h", {})
                reply_header, reply_payload = await handler(self.peer, h if isinstance(h, dict) else {},
                                                            payload)  # type: ignore[arg-type]  # see Handler
            except asyncio.CancelledError:
                raise
            except Exception as e:
                err: dict[str, Any] = {"type": type(e).__name__, "message": str(e)}
                for attr in ("key", "message_id", "status"):  # a VspError keeps its identity
                    value = getattr(e, attr, None)
                    if isinstance(value, (str, int)):
                        err[attr] = value
                with contextlib.suppress(LinkDown):
                    await self._send(ERROR, request_id, {"error": err})
                return
            with contextlib.suppress(LinkDown):
                await self._send(REPLY, request_id, {"h": reply_header}, reply_payload)
        finally:
            payload = b""
            if buf is not None:
                BUFFERS.put(buf)
                buf = None
            self._handler_done(nbytes)

    async def _watchdog(self) -> None:
        while not self.closed.is_set():
            interval, dead_after = keepalive_timing(self.keepalive)
            try:
                await asyncio.wait_for(self.closed.wait(), interval)
                return
            except TimeoutError:
                pass
            if time.monotonic() - self.last_rx > dead_after:
                self.close(PATH_TIMEOUT, f"no frame from the peer for {dead_after:.1f} s")
                return
            if not self._write_paused:  # data is flowing otherwise; that is proof of life enough
                with contextlib.suppress(LinkDown):
                    self._write_frame(PING, 0, {})

    def close(self, status: str = PATH_COMMUNICATION_FAILED, reason: str = "closed") -> None:
        if self.closed.is_set():
            return
        self.close_status, self.close_reason = status, reason
        self.closed.set()
        self._spinner.remove(self._fd, self)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(LinkDown(f"path {self.peer.local_port_id}->{self.peer.remote_port_id} "
                                           f"failed: {reason}"))
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)  # _drain sees the connection closed
        self._drain_waiters = []
        self._payload_buf = self._payload_view = None
        self.transport.abort()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in list(self._handler_tasks):
            task.cancel()

