"""One NBD connection's state, and its handshake: fixed newstyle option negotiation (docs/nbd.md).

:class:`ConnectionBase` holds what a connection knows (its buffers, phase, volume, budget share) and the
option phase: the client flags, then ``EXPORT_NAME``, ``GO``, ``INFO``, ``LIST`` and ``ABORT`` (anything else
is answered ``NBD_REP_ERR_UNSUP``). ``GO`` / ``EXPORT_NAME`` attach the connection to its volume and start
the transmission phase, which :class:`vspemu.volumes.nbd._Connection` serves.
"""

from __future__ import annotations

import asyncio
import mmap
import socket
import struct

from vspemu.nbdproto import (
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_NAME,
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
)
from vspemu.volumes.nbd_common import (
    _CLIENT_FLAGS,
    _DONE,
    _OPT,
    _OPTIONS,
    _TRANSMISSION,
    _U16,
    _U32,
    HANDSHAKE_OUTPUT,
    MAX_OPTION,
    MAX_REQUEST,
    TRANSMISSION_FLAGS,
    ServerSide,
    log,
)
from vspemu.volumes.volume import Volume, VolumeIOError


class ConnectionBase(asyncio.BufferedProtocol):
    def __init__(self, server: ServerSide) -> None:
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
