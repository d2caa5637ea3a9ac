"""The NBD server: host I/O to LDEVs (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).

Export names are LDEV ids in decimal. Fixed newstyle handshake only (``NBD_FLAG_C_NO_ZEROES`` accepted);
options ``EXPORT_NAME``, ``GO``, ``INFO`` (``NBD_INFO_EXPORT``, ``NBD_INFO_NAME``, ``NBD_INFO_BLOCK_SIZE``),
``LIST`` and ``ABORT``; anything else is answered ``NBD_REP_ERR_UNSUP`` (so simple replies only). Commands
``READ``, ``WRITE`` (``FUA``), ``FLUSH``, ``TRIM``, ``WRITE_ZEROES`` and ``DISC``; the export advertises
``SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN``.

Each connection is one :class:`asyncio.BufferedProtocol` (run it under uvloop; plain asyncio works too).
Requests are parsed straight out of a fixed receive buffer; a large WRITE payload is received directly into
a pooled page-aligned buffer (one copy from the socket, one into the page cache). A large READ reply goes
out with ``sendfile`` (page cache to socket, no copy through our memory) when nothing is queued in the
transport, else it is ``preadv``-ed into a pooled buffer. Reads, and writes to an unpaired volume, complete
synchronously inside the receive callback (``Volume.write`` is driven by hand until it finishes or first
suspends), so the hot path creates no task. Anything that suspends (FLUSH, FUA, a replicator) continues as
a task while the next requests are read; its reply is sent when it finishes (replies may come out of
order, as NBD allows). Reads bypass ``Volume.read`` (same ``pread`` semantics, on ``Volume.fd``).

Memory bound: a connection stops reading from its socket while the payload of its unfinished writes plus
its unsent reply bytes reach ``INFLIGHT_LIMIT`` (32 MiB). Server-wide, every READ / WRITE needs room for its
payload or reply within :attr:`NbdLimits.buffer_budget` before it is served; a connection whose next
request does not fit stops reading and queues until budget comes back (a write completes, a transport's
replies are all out: ``resume_writing`` with a low-water mark of 0, or the next sweep). So the request/reply
data held is at most the budget, whatever the clients do, plus per connection a receive buffer of 256 KiB
(an anonymous mapping: only the pages used are resident). Free payload buffers are pooled server-wide up to
64 MiB (a quarter of the budget at most).

Limits (:class:`NbdLimits`): connections server-wide and per client address (one over a limit is closed
before the greeting); a handshake timeout; an idle timeout for connections that neither send requests nor
take their replies; a stall timeout for a connection that holds budget others are waiting for while its
replies do not move. One sweeper task checks every connection a few times per shortest timeout (at most
every second); the hot path only sets a flag per receive and keeps a running sum.

Durability: a WRITE/TRIM/WRITE_ZEROES with ``FUA`` and every FLUSH are answered only after
``Volume.flush`` (fdatasync) returned. One flush covers all connections (one file per LDEV), hence
``CAN_MULTI_CONN``.

Revocation: a connection in transmission registers with its volume (``Volume.attach_host``); when the
LDEV loses its last LU path, is deleted (``Volume.remove``) or becomes a journal volume, the volume calls
the connection's drop callback and the connection is aborted at once (nothing more of its requests is
served). A closed or removed volume never reopens its file, so a stale connection cannot reach a new LDEV
that reuses the id; a volume whose host I/O is refused (journal) answers ``NBD_EPERM``.

Errors: ``WriteRefused`` -> ``NBD_EPERM``, ``VolumeIOError`` and other I/O errors -> ``NBD_EIO``, a range
past the end -> ``NBD_EINVAL`` (``NBD_ENOSPC`` for WRITE / WRITE_ZEROES), unknown command -> ``NBD_EINVAL``.
A bad request magic or a broken handshake closes the connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import socket
import struct
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from time import perf_counter
from typing import Any, cast

from vspemu.aio import resume
from vspemu.buffers import BufferPool
from vspemu.nbdproto import (
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_NAME,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_REPLY as _OPT_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_SERVER,
    REPLY_MAGIC_OPT,
    REQUEST as _REQ,
    REQUEST_MAGIC,
    SIMPLE_REPLY as _REPLY,
    SIMPLE_REPLY_MAGIC,
)
from vspemu.volumes.volume import Volume, VolumeIOError, WriteRefused

log = logging.getLogger(__name__)

MAX_REQUEST = 32 << 20  # largest READ / WRITE payload accepted
INFLIGHT_LIMIT = 32 << 20  # per connection: unfinished write payload + unsent replies before we stop reading
POOL_LIMIT = 64 << 20  # server-wide: free payload buffers kept for reuse
RX_SIZE = 256 << 10  # per connection receive buffer (headers, options, small payloads)
SMALL_WRITE = 64 << 10  # payloads up to this size are taken from the receive buffer (copied)
SENDFILE_MIN = 64 << 10  # READ replies from this size on are sent with sendfile when the socket has room
MAX_OPTION = 64 << 10  # largest option payload accepted during the handshake
HANDSHAKE_OUTPUT = 1 << 20  # unsent option replies beyond this when the next option comes: close
WRITE_HIGH = 256 << 10  # transport write buffer: pause_writing above this, resume_writing once empty


TF_HAS_FLAGS = 1 << 0
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_CAN_MULTI_CONN = 1 << 8
TRANSMISSION_FLAGS = (
    TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN
)


NBD_EPERM = 1
NBD_EIO = 5
NBD_EINVAL = 22
NBD_ENOSPC = 28

# request counters for /metrics (vspemu.metrics): plain integers, a few list increments per request
OP_READ, OP_WRITE, OP_FLUSH, OP_TRIM, OP_WRITE_ZEROES = range(5)
OP_NAMES = ("read", "write", "flush", "trim", "write_zeroes")
LATENCY_BOUNDS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0)


class NbdStats:
    """Requests, bytes, errors and a latency histogram per operation, for the whole process."""

    def __init__(self) -> None:
        n = len(OP_NAMES)
        self.nbytes = [0] * n
        self.seconds = [0.0] * n
        self.buckets = [[0] * (len(LATENCY_BOUNDS) + 1) for _ in range(n)]  # not cumulative; the last is +Inf
        self.errors = 0

    def record(self, op: int, nbytes: int, seconds: float) -> None:
        self.nbytes[op] += nbytes  # (the request count is the sum of the op's buckets)
        self.seconds[op] += seconds
        self.buckets[op][bisect_left(LATENCY_BOUNDS, seconds)] += 1


STATS = NbdStats()  # one storage system per process

_OPT = struct.Struct(">QII")  # IHAVEOPT, option, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

_CLIENT_FLAGS, _OPTIONS, _TRANSMISSION, _DONE = range(4)


def _pread(volume: Volume, view: memoryview, offset: int) -> None:
    if volume.read_redirect is not None:  # a snapshot S-VOL: its image, not its file
        volume.read_redirect(offset, view)
        return
    fd, got, length = volume.fd, 0, len(view)
    while got < length:
        n = os.preadv(fd, [view[got:] if got else view], offset + got)
        if n == 0:  # the file is shorter than the volume: truncated or removed under us
            raise VolumeIOError(f"LDEV {volume.ldev_id}: short read at {offset + got}")
        got += n


def _nbd_errno(exc: BaseException) -> int:
    if isinstance(exc, WriteRefused):
        return NBD_EPERM
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return NBD_ENOSPC
    if not isinstance(exc, VolumeIOError | OSError):
        log.exception("NBD request failed", exc_info=exc)
    return NBD_EIO


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._rx: mmap.mmap | bytearray = bytearray(0)  # RX_SIZE once admitted (see connection_made)
        self._rxv = memoryview(self._rx)
        self._addr = ""  # the client's address (for the per-client connection limit)
        self._admitted = False
        self._charge = 0  # what this connection counts against the server's buffer budget
        self._waiting = False  # in the server's queue of connections waiting for budget
        self._born = self._active_at = self._loop.time()
        self._rx_seen = False  # received something since the last sweep
        self._last_wbs = 0  # transport write buffer size at the last sweep
        self._start = 0  # unparsed bytes are self._rx[self._start:self._end]
        self._end = 0
        self._phase = _CLIENT_FLAGS
        self._no_zeroes = False
        self._volume: Volume | None = None
        # a large WRITE payload being received directly into a pooled buffer
        self._payload: mmap.mmap | None = None
        self._payload_view: memoryview | None = None
        self._payload_got = 0
        self._payload_req: tuple[int, int, int] = (0, 0, 0)  # flags, handle, offset
        self._header_only = False  # get_buffer offers room for one request header only
        self._skip = 0  # payload bytes of a refused WRITE still to be discarded
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0  # payload bytes of unfinished writes
        self._paused = False
        self._parsing = False
        self._closed = False
        self._sock: socket.socket | None = None

    # -- asyncio callbacks ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._addr = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self._server._admit(self):  # over a connection limit: close before the greeting
            self._closed = True
            self._phase = _DONE
            transport.close()
            return
        self._admitted = True
        # an anonymous mapping: its pages are zero-filled on first use, so an idle connection costs a page
        self._rx = mmap.mmap(-1, RX_SIZE)
        self._rxv = memoryview(self._rx)
        # pause_writing when replies pile up, resume_writing once they are all out: the budget learns of it
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a duplicate, for send(MSG_MORE) + sendfile of large READ replies
            self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        transport.write(_GREETING)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._phase = _DONE
        if self._admitted:
            self._admitted = False
            self._server._leave(self)
        self._account()  # releases this connection's share of the budget
        if self._volume is not None:
            self._volume.detach_host(self._drop)
        self._payload = self._payload_view = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload_view is not None:
            return self._payload_view[self._payload_got :]
        if self._start == self._end:
            self._start = self._end = 0
        elif RX_SIZE - self._end < SMALL_WRITE + _REQ.size:
            n = self._end - self._start
            self._rx[:n] = bytes(self._rxv[self._start : self._end])
            self._start, self._end = 0, n
        if self._header_only and self._end - self._start < _REQ.size:
            # after a large WRITE, expect another one: read its header alone, then its payload in place
            return self._rxv[self._end : self._start + _REQ.size]
        return self._rxv[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._payload_view is not None:
            self._payload_got += nbytes
            if self._payload_got < len(self._payload_view):
                return
            buf, view = self._payload, self._payload_view
            self._payload = self._payload_view = None
            flags, handle, offset = self._payload_req
            assert buf is not None
            if self._phase == _TRANSMISSION:
                self._write(flags, handle, offset, view, buf)
                del view
            else:  # dropped (or closed) meanwhile: the payload goes nowhere
                del view
                self._server._pool.put(buf)
            del buf
        else:
            self._end += nbytes
        self._rx_seen = True
        self._parse()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def pause_writing(self) -> None:
        pass  # the unsent reply bytes are counted by _parse, which stops reading

    def resume_writing(self) -> None:
        self._account()  # every reply is out: give the budget back
        self._maybe_resume()

    # -- parsing ---------------------------------------------------------------------------------------
    def _parse(self) -> None:
        if self._parsing or self._paused or self._closed:
            return
        self._parsing = True
        try:
            if self._phase < _TRANSMISSION:
                self._handshake()
            if self._phase == _TRANSMISSION:
                self._requests()
        finally:
            self._parsing = False

    def _requests(self) -> None:
        rx, rxv = self._rx, self._rxv
        transport = self._transport
        assert transport is not None
        while self._phase == _TRANSMISSION:
            start, end = self._start, self._end
            if self._skip:
                n = min(self._skip, end - start)
                self._skip -= n
                self._start = start + n
                if self._skip:
                    break
                continue
            if end - start < 28:
                break
            inflight = self._pending + transport.get_write_buffer_size()
            if inflight >= INFLIGHT_LIMIT:
                self._paused = True
                transport.pause_reading()
                break
            magic, flags, cmd, handle, offset, length = _REQ.unpack_from(rx, start)
            if magic != REQUEST_MAGIC:
                log.info("NBD: bad request magic %#x, closing the connection", magic)
                self._close()
                break
            if (cmd == CMD_READ or cmd == CMD_WRITE) and length <= MAX_REQUEST:
                # the server-wide buffer budget: room for this request's payload / reply, or wait for it. The
                # other connections' shares cannot change while we parse; ours is brought up to date after.
                server = self._server
                if server._used - self._charge + inflight + length > server._budget:
                    self._wait_for_budget()
                    break
            # after a large WRITE, expect another one (see get_buffer)
            self._header_only = cmd == CMD_WRITE and SMALL_WRITE < length <= MAX_REQUEST
            if cmd == CMD_WRITE:
                if length > MAX_REQUEST:
                    self._reply(handle, NBD_EINVAL)
                    self._start = start + 28
                    self._skip = length
                    continue
                total = 28 + length
                if end - start >= total:
                    self._start = start + total
                    self._write(flags, handle, offset, bytes(rxv[start + 28 : start + total]), None)
                elif length <= SMALL_WRITE:
                    break  # wait for the rest (get_buffer keeps room for it)
                else:  # receive the payload directly into its own buffer
                    buf = self._server._pool.get(length)
                    view = memoryview(buf)[:length]
                    have = end - start - 28
                    view[:have] = rxv[start + 28 : end]
                    self._payload, self._payload_view, self._payload_got = buf, view, have
                    self._payload_req = (flags, handle, offset)
                    self._start = self._end = 0
                    break
            else:
                self._start = start + 28
                self._command(flags, cmd, handle, offset, length)
        # this connection's share of the budget, as it is now (inline: this runs once per socket read)
        charge = self._pending + transport.get_write_buffer_size()
        if self._payload_view is not None:
            charge += len(self._payload_view)
        if charge != self._charge or self._closed:
            self._account()

    def _command(self, flags: int, cmd: int, handle: int, offset: int, length: int) -> None:
        volume = self._volume
        assert volume is not None
        t0 = perf_counter()
        if volume.host_io_refused is not None:  # a journal volume (its connections are dropped, too)
            self._reply(handle, NBD_EPERM)
        elif cmd == CMD_READ:
            self._read(handle, offset, length)
            STATS.record(OP_READ, length, perf_counter() - t0)
        elif cmd == CMD_FLUSH:
            self._run(volume.flush(), handle, 0, None, OP_FLUSH, t0)
        elif cmd == CMD_TRIM or cmd == CMD_WRITE_ZEROES:
            if not volume.check_range(offset, length):
                self._reply(handle, NBD_ENOSPC if cmd == CMD_WRITE_ZEROES else NBD_EINVAL)
                return
            fua = bool(flags & CMD_FLAG_FUA)
            self._run(volume.discard(offset, length, cmd == CMD_WRITE_ZEROES, fua), handle, 0, None,
                      OP_WRITE_ZEROES if cmd == CMD_WRITE_ZEROES else OP_TRIM, t0)
        elif cmd == CMD_DISC:
            self._phase = _DONE
            if not self._tasks:
                self._close()
            elif self._transport is not None:
                self._transport.pause_reading()  # nothing more to read; answer what is in flight
        else:
            self._reply(handle, NBD_EINVAL)

    def _read(self, handle: int, offset: int, length: int) -> None:
        """What Volume.read does, without its bytes object (a fresh 1 MiB one per request costs page faults)."""
        volume = self._volume
        assert volume is not None
        if length > MAX_REQUEST or not volume.check_range(offset, length):
            self._reply(handle, NBD_EINVAL)
            return
        transport = self._transport
        assert transport is not None
        header = _REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)
        sent = 0  # of header + data, sent straight to the socket
        if (length >= SENDFILE_MIN and self._sock is not None and not transport.get_write_buffer_size()
                and volume.read_redirect is None):
            # Nothing is queued in the transport, so we may write to the socket ourselves: the data goes from
            # the page cache to the socket without a copy through our memory.
            try:
                fd = volume.fd
                sent = self._sock.send(header, socket.MSG_MORE)
                while sent == _REPLY.size and sent < _REPLY.size + length:
                    n = os.sendfile(self._sock.fileno(), fd, offset + sent - _REPLY.size, length + _REPLY.size - sent)
                    if n == 0:  # the file is shorter than the volume: truncated under us
                        raise VolumeIOError(f"LDEV {volume.ldev_id}: short read at {offset + sent - _REPLY.size}")
                    sent += n
            except BlockingIOError:
                pass  # the socket is full: the transport sends the rest
            except ConnectionError:  # the client went away (reset, broken pipe): nobody to answer
                self._close()
                return
            except Exception as exc:
                if not sent:
                    self._reply(handle, _nbd_errno(exc))
                else:  # half a reply is out: only closing the connection can tell the client
                    log.warning("NBD: LDEV %s read failed mid-reply: %s", volume.ldev_id, exc)
                    self._close()
                return
            if sent == _REPLY.size + length:
                return
        # the rest (usually all) of the reply: read into a pooled buffer, the transport sends it
        done = max(sent - _REPLY.size, 0)
        pool = self._server._pool
        buf = pool.get(length - done)
        view = memoryview(buf)[: length - done]
        try:
            _pread(volume, view, offset + done)
        except Exception as exc:
            if sent:
                log.warning("NBD: LDEV %s read failed mid-reply: %s", volume.ldev_id, exc)
                self._close()
            else:
                self._reply(handle, _nbd_errno(exc))
        else:
            if not self._closed:  # (two writes: Python 3.11's writelines would join them, one more copy)
                if sent < _REPLY.size:
                    transport.write(header[sent:])
                transport.write(view)
        del view
        pool.put(buf)

    def _write(self, flags: int, handle: int, offset: int, data: bytes | memoryview, buf: mmap.mmap | None) -> None:
        volume = self._volume
        assert volume is not None
        if volume.check_range(offset, len(data)):
            self._run(volume.write(offset, data, bool(flags & CMD_FLAG_FUA)), handle, len(data), buf, OP_WRITE,
                      perf_counter())
        else:
            self._reply(handle, NBD_ENOSPC)
            if buf is not None:
                self._server._pool.put(buf)

    def _run(self, coro: Coroutine[Any, Any, None], handle: int, nbytes: int, buf: mmap.mmap | None,
             op: int, t0: float) -> None:
        """Run a volume operation; answer now if it completes without suspending, else from a task."""
        # Step the operation here until it completes or first suspends: an unpaired write completes without
        # suspending, and a paired one gets as far as sending its data to the S side before a task takes over
        # (a task and a loop iteration saved per request). So a replicator must not rely on
        # asyncio.current_task() (e.g. asyncio.timeout(), or wait_for() in Python 3.12) before it first
        # suspends; vspemu.aio.wait_event is the task-free way to wait with a time limit.
        try:
            yielded = coro.send(None)
        except Exception as exc:
            self._reply(handle, 0 if isinstance(exc, StopIteration) else _nbd_errno(exc))
            if buf is not None:
                self._server._pool.put(buf)  # reused once nothing references it any more
            STATS.record(op, nbytes, perf_counter() - t0)
            return
        awaitable: Awaitable[None] = resume(coro, yielded)
        self._pending += nbytes
        task = self._loop.create_task(self._finish(awaitable, handle, nbytes, buf, op, t0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, awaitable: Awaitable[None], handle: int, nbytes: int, buf: mmap.mmap | None,
                      op: int, t0: float) -> None:
        try:
            await awaitable
            err = 0
        except Exception as exc:
            err = _nbd_errno(exc)
        del awaitable
        self._pending -= nbytes
        self._reply(handle, err)
        STATS.record(op, nbytes, perf_counter() - t0)
        if buf is not None:
            self._server._pool.put(buf)
        self._account()
        self._tasks.discard(asyncio.current_task())
        self._after_completion()

    def _after_completion(self) -> None:
        if self._phase == _DONE:  # DISC received (or closed): close after the last reply
            if not self._tasks:
                self._close()
        else:
            self._maybe_resume()

    def _account(self) -> None:
        """Bring this connection's share of the server's buffer budget up to date."""
        transport = self._transport
        if self._closed or transport is None:
            new = 0
        else:
            new = self._pending + transport.get_write_buffer_size()
            if self._payload_view is not None:
                new += len(self._payload_view)
        old = self._charge
        if new != old:
            self._charge = new
            server = self._server
            server._used += new - old
            if new < old and server._waiters:
                server._release()

    def _wait_for_budget(self) -> None:
        """Stop reading until the server has budget for this connection's next request."""
        self._paused = True
        assert self._transport is not None
        self._transport.pause_reading()
        if not self._waiting:
            self._waiting = True
            self._server._waiters.append(self)

    def _sweep(self, now: float) -> None:
        """Called every tick by the server: the handshake and idle timeouts, stale budget shares."""
        transport = self._transport
        if transport is None or self._closed:
            return
        limits = self._server.limits
        self._account()
        if self._phase < _TRANSMISSION:
            if limits.handshake_timeout and now - self._born >= limits.handshake_timeout:
                log.info("NBD: %s did not finish the handshake in %g s, closing", self._addr,
                         limits.handshake_timeout)
                self._abort()
            return
        wbs = transport.get_write_buffer_size()
        busy = self._rx_seen or self._tasks or self._waiting or wbs < self._last_wbs
        self._rx_seen = False
        self._last_wbs = wbs
        if busy:
            self._active_at = now
            return
        # no request came in, no reply went out, nothing of ours is running: idle, or a client that does
        # not read its replies (then its share of the budget is held for nothing)
        timeout = limits.idle_timeout if self._phase == _TRANSMISSION else (
            limits.handshake_timeout or limits.idle_timeout)  # closing: the client does not read the last replies
        if self._charge and self._server._waiters and limits.stall_timeout:  # and others wait for its budget
            timeout = min(timeout, limits.stall_timeout) if timeout else limits.stall_timeout
        if timeout and now - self._active_at >= timeout:
            log.info("NBD: connection from %s made no progress for %g s (%d reply bytes unsent, %d connections "
                     "waiting for buffers), closing", self._addr, now - self._active_at, wbs,
                     len(self._server._waiters))
            self._abort()

    def _maybe_resume(self) -> None:
        transport = self._transport
        if not self._paused or self._closed or transport is None:
            return
        if self._pending + transport.get_write_buffer_size() < INFLIGHT_LIMIT:
            self._paused = False
            transport.resume_reading()
            self._parse()  # requests already in the receive buffer

    def _reply(self, handle: int, error: int) -> None:
        if error:
            STATS.errors += 1
        if not self._closed:
            assert self._transport is not None
            self._transport.write(_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))

    def _close(self) -> None:
        self._phase = _DONE
        if self._transport is not None and not self._closed:
            self._transport.close()

    def _abort(self) -> None:
        """End the connection now: nothing more is read, answered or sent (unsent replies are dropped)."""
        self._phase = _DONE
        if self._transport is not None and not self._closed:
            self._closed = True
            self._transport.abort()

    def _drop(self) -> None:
        """The volume's host access was revoked (last LU path gone, LDEV deleted, journal volume)."""
        volume = self._volume
        log.info("NBD: LDEV %s is no longer exported, dropping a connection",
                 volume.ldev_id if volume is not None else "?")
        self._abort()

    # -- handshake ------------------------------------------------------------------------------------
    def _handshake(self) -> None:
        rx = self._rx
        transport = self._transport
        assert transport is not None
        while self._phase < _TRANSMISSION:
            start, avail = self._start, self._end - self._start
            if self._phase == _CLIENT_FLAGS:
                if avail < 4:
                    return
                (cflags,) = _U32.unpack_from(rx, start)
                self._start = start + 4
                if cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
                    self._close()
                    return
                self._no_zeroes = bool(cflags & FLAG_NO_ZEROES)
                self._phase = _OPTIONS
                continue
            if avail < 16:
                return
            if transport.get_write_buffer_size() > HANDSHAKE_OUTPUT:
                # another option while earlier replies (one LIST of every LDEV may be 2 MiB) are not read yet
                log.info("NBD: %s does not read its option replies, closing", self._addr)
                self._abort()
                return
            magic, option, length = _OPT.unpack_from(rx, start)
            if magic != IHAVEOPT or length > MAX_OPTION:
                self._close()
                return
            if avail < 16 + length:
                return
            data = bytes(rx[start + 16 : start + 16 + length])
            self._start = start + 16 + length
            self._option(option, data)

    def _option(self, option: int, data: bytes) -> None:
        if option == OPT_EXPORT_NAME:
            volume = self._lookup(data.decode("utf-8", "replace"))
            if volume is None:  # no way to report an error to this option
                self._close()
                return
            reply = struct.pack(">QH", volume.size, TRANSMISSION_FLAGS)
            self._send(reply if self._no_zeroes else reply + bytes(124))
            self._start_transmission(volume)
        elif option == OPT_ABORT:
            self._opt_reply(option, REP_ACK)
            self._close()
        elif option == OPT_LIST:
            if data:
                self._opt_reply(option, REP_ERR_INVALID, b"LIST takes no data")
                return
            try:
                names = self._server._list_exports()
            except Exception:
                log.exception("NBD: list_exports failed")
                names = []
            for name in names:
                raw = name.encode()
                self._opt_reply(option, REP_SERVER, _U32.pack(len(raw)) + raw)
            self._opt_reply(option, REP_ACK)
        elif option == OPT_INFO or option == OPT_GO:
            self._info_or_go(option, data)
        else:
            self._opt_reply(option, REP_ERR_UNSUP, b"option not supported")

    def _info_or_go(self, option: int, data: bytes) -> None:
        if len(data) < 6:
            self._opt_reply(option, REP_ERR_INVALID, b"option too short")
            return
        (name_len,) = _U32.unpack_from(data, 0)
        if 4 + name_len + 2 > len(data):
            self._opt_reply(option, REP_ERR_INVALID, b"bad name length")
            return
        raw_name = data[4 : 4 + name_len]
        (n_info,) = _U16.unpack_from(data, 4 + name_len)
        if 4 + name_len + 2 + 2 * n_info != len(data):
            self._opt_reply(option, REP_ERR_INVALID, b"bad information request count")
            return
        requests = struct.unpack_from(f">{n_info}H", data, 6 + name_len)
        name = raw_name.decode("utf-8", "replace")
        volume = self._lookup(name)
        if volume is None:
            self._opt_reply(option, REP_ERR_UNKNOWN, f"no such export: {name!r}".encode())
            return
        self._opt_reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, volume.size, TRANSMISSION_FLAGS))
        if INFO_NAME in requests:
            self._opt_reply(option, REP_INFO, _U16.pack(INFO_NAME) + raw_name)
        self._opt_reply(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST))
        self._opt_reply(option, REP_ACK)
        if option == OPT_GO:
            self._start_transmission(volume)

    def _lookup(self, name: str) -> Volume | None:
        try:
            volume = self._server._lookup(name)
        except Exception:
            log.exception("NBD: export lookup failed for %r", name)
            return None
        if volume is None or volume.closed or volume.host_io_refused is not None:
            return None
        return volume

    def _start_transmission(self, volume: Volume) -> None:
        try:
            volume.attach_host(self._drop)  # so that revoking the export drops this connection
        except VolumeIOError:  # closed between the lookup and now (cannot happen on one loop, but never serve it)
            self._abort()
            return
        self._volume = volume
        self._phase = _TRANSMISSION
        self._active_at = self._loop.time()

    def _opt_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._send(_OPT_REPLY.pack(REPLY_MAGIC_OPT, option, reply, len(data)) + data)

    def _send(self, data: bytes) -> None:
        if not self._closed:
            assert self._transport is not None
            self._transport.write(data)


@dataclass
class NbdLimits:
    """What one NBD server allows (docs/nbd.md); a timeout of 0 means none."""

    max_connections: int = 256  # server-wide, in any phase
    max_connections_per_client: int = 64  # per client IP address
    handshake_timeout: float = 10.0  # seconds from accept to the end of option negotiation
    idle_timeout: float = 600.0  # seconds a connection may receive nothing (and send nothing out)
    buffer_budget: int = 256 << 20  # server-wide bytes of request payloads and unsent replies
    # seconds a connection holding part of the budget may make no progress (its replies are not read) while
    # other connections wait for budget
    stall_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_client < 1:
            raise ValueError("NBD connection limits must be at least 1")
        if min(self.handshake_timeout, self.idle_timeout, self.stall_timeout) < 0:
            raise ValueError("NBD timeouts must not be negative (0 = none)")
        if self.buffer_budget < MAX_REQUEST:
            raise ValueError(f"the NBD buffer budget must be at least {MAX_REQUEST >> 20} MiB (one request)")


class NbdServer:
    """Serves LDEVs over NBD; the export name is the LDEV id in decimal."""

    def __init__(self, lookup: Callable[[str], Volume | None], list_exports: Callable[[], list[str]],
                 limits: NbdLimits | None = None) -> None:
        self.limits = limits or NbdLimits()
        self._lookup = lookup
        self._list_exports = list_exports
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._per_client: dict[str, int] = {}
        self._pool = BufferPool(min(POOL_LIMIT, self.limits.buffer_budget // 4))
        self._budget = self.limits.buffer_budget
        self._used = 0  # sum of the connections' charges
        self._waiters: deque[_Connection] = deque()  # connections waiting for budget, first come first served
        self._wake_pending = False
        self._sweeper: asyncio.Task[None] | None = None
        self._refusal_logged = -1e9

    @property
    def buffered_bytes(self) -> int:
        """Request payloads and unsent replies held now (what counts against the buffer budget)."""
        return self._used

    def _admit(self, conn: _Connection) -> bool:
        limits = self.limits
        n = self._per_client.get(conn._addr, 0)
        if len(self._connections) >= limits.max_connections or n >= limits.max_connections_per_client:
            now = conn._loop.time()
            if now - self._refusal_logged >= 10:  # at most one line per 10 s, whatever a client does
                self._refusal_logged = now
                log.warning("NBD: connection from %s refused: %d connections (%d from it), limits %d and %d per "
                            "client", conn._addr, len(self._connections), n, limits.max_connections,
                            limits.max_connections_per_client)
            return False
        self._per_client[conn._addr] = n + 1
        self._connections.add(conn)
        return True

    def _leave(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        n = self._per_client.get(conn._addr, 0) - 1
        if n > 0:
            self._per_client[conn._addr] = n
        else:
            self._per_client.pop(conn._addr, None)
        if conn._waiting:
            conn._waiting = False
            try:
                self._waiters.remove(conn)
            except ValueError:
                pass

    def _release(self) -> None:
        """Budget was given back: let the waiting connections try again (soon, not inside the caller)."""
        if not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        waiters = self._waiters
        for _ in range(len(waiters)):  # each at most once: one that still does not fit queues up again
            if not waiters or self._used >= self._budget:
                break
            conn = waiters.popleft()
            conn._waiting = False
            conn._maybe_resume()  # parses again: takes its budget, or waits again at the end of the queue

    async def _sweep_forever(self) -> None:
        limits = self.limits
        timeouts = [t for t in (limits.handshake_timeout, limits.idle_timeout, limits.stall_timeout) if t]
        tick = min(1.0, max(0.05, min(timeouts) / 4)) if timeouts else 1.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for conn in list(self._connections):
                try:
                    conn._sweep(now)
                except Exception:  # never let one connection stop the sweeping
                    log.exception("NBD: sweeping a connection failed")
            if self._waiters:
                self._release()

    @property
    def port(self) -> int:
        """The bound TCP port (useful after ``start(host, 0)``)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True, backlog=128)
        self._sweeper = loop.create_task(self._sweep_forever())

    async def close(self) -> None:
        """Stop listening, close every connection and let volume operations already started finish."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        tasks = [t for c in self._connections for t in c._tasks]
        for conn in list(self._connections):
            conn._close()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        for conn in list(self._connections):  # clients that do not read their last replies: no waiting for them
            conn._abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
