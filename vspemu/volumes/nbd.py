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

Modules: this one serves the transmission phase (:class:`_Connection`) and runs the server with its limits
(:class:`NbdServer`); ``nbd_handshake`` holds a connection's state and the option negotiation; ``nbd_common``
the tunables, counters (/metrics), error mapping and :class:`NbdLimits`.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
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
    REQUEST as _REQ,
    REQUEST_MAGIC,
    SIMPLE_REPLY as _REPLY,
    SIMPLE_REPLY_MAGIC,
)
from vspemu.volumes.nbd_common import (
    _DONE,
    _GREETING,
    _TRANSMISSION,
    INFLIGHT_LIMIT,
    MAX_REQUEST,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    OP_FLUSH,
    OP_READ,
    OP_TRIM,
    OP_WRITE,
    OP_WRITE_ZEROES,
    POOL_LIMIT,
    RX_SIZE,
    SENDFILE_MIN,
    SMALL_WRITE,
    STATS,
    WRITE_HIGH,
    NbdLimits as NbdLimits,
    _nbd_errno,
    _pread,
    log,
)
from vspemu.volumes.nbd_handshake import ConnectionBase
from vspemu.volumes.volume import Volume, VolumeIOError


class _Connection(ConnectionBase):
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
                and volume.read_redirect is None and not (volume.behind and volume.behind.overlaps(offset, length))):
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
