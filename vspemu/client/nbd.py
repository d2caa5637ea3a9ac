"""A small synchronous NBD client (fixed newstyle, NBD_OPT_GO, simple replies) for tests and scripts.

>>> with NbdClient("127.0.0.1", 10809, "5") as c:     # export name = LDEV id
...     c.write(0, b"x" * 4096, fua=True)
...     assert c.read(0, 4096) == b"x" * 4096

An error reply raises :class:`NbdError` (``.errno`` is the NBD error, e.g. 1 = EPERM); a refused option
raises :class:`NbdOptionError`. For pipelining, :meth:`NbdClient.submit` sends a request without waiting
and :meth:`NbdClient.reply` collects one reply (in whatever order the server answers).
"""

from __future__ import annotations

import socket
import struct
from types import TracebackType

from vspemu.nbdproto import (
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPT_ABORT,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_REPLY as _OPT_REPLY,
    REP_ACK,
    REP_INFO,
    REP_SERVER,
    REPLY_MAGIC_OPT,
    REQUEST as _REQ,
    REQUEST_MAGIC,
    SIMPLE_REPLY as _REPLY,
    SIMPLE_REPLY_MAGIC,
)

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28

CHUNK = 32 << 20  # largest request the helpers send


__all__ = ["NbdClient", "NbdError", "NbdOptionError", "export_info", "list_exports", "read_range", "write_range"]


class NbdError(Exception):
    """An error reply to a request; ``errno`` is the NBD error code."""

    def __init__(self, errno_code: int, message: str = "") -> None:
        self.errno = errno_code
        super().__init__(message or f"NBD error {errno_code}")


class NbdOptionError(Exception):
    """The server refused an option during the handshake (e.g. an unknown export)."""

    def __init__(self, option: int, reply: int, message: str) -> None:
        self.option = option
        self.reply = reply
        super().__init__(f"option {option} refused with {reply:#x}: {message}")


class _Handshake:
    """The option phase: connect, greet, send options."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            magic, opt_magic, flags = struct.unpack(">QQH", self.recv(18))
            if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & 1:
                raise ConnectionError("not a fixed newstyle NBD server")
            self.sock.sendall(struct.pack(">I", 1 | (flags & 2)))  # FIXED_NEWSTYLE, NO_ZEROES if offered
        except BaseException:
            self.sock.close()
            raise

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("NBD server closed the connection")
            got += k
        return bytes(buf)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return its replies up to (not including) the ACK."""
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        replies: list[tuple[int, bytes]] = []
        while True:
            magic, opt, reply, length = _OPT_REPLY.unpack(self.recv(20))
            payload = self.recv(length) if length else b""
            if magic != REPLY_MAGIC_OPT or opt != option:
                raise ConnectionError("bad option reply")
            if reply == REP_ACK:
                return replies
            if reply & (1 << 31):
                raise NbdOptionError(option, reply, payload.decode("utf-8", "replace"))
            replies.append((reply, payload))

    def info(self, option: int, export: str) -> dict[str, int]:
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        out: dict[str, int] = {}
        for reply, payload in self.option(option, data):
            if reply != REP_INFO or len(payload) < 2:
                continue
            (kind,) = struct.unpack_from(">H", payload)
            if kind == INFO_EXPORT:
                _, out["size"], out["flags"] = struct.unpack(">HQH", payload)
            elif kind == INFO_BLOCK_SIZE:
                _, out["min_block"], out["preferred_block"], out["max_block"] = struct.unpack(">HIII", payload)
        if "size" not in out:
            raise ConnectionError("server sent no NBD_INFO_EXPORT")
        return out

    def abort(self) -> None:
        try:
            self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_ABORT, 0))
        finally:
            self.sock.close()


class NbdClient:
    """One NBD connection to ``export`` (an LDEV id as a string)."""

    def __init__(self, host: str, port: int, export: str, timeout: float = 60.0) -> None:
        hs = _Handshake(host, port, timeout)
        try:
            info = hs.info(OPT_GO, export)
        except BaseException:
            hs.sock.close()
            raise
        self._hs = hs
        self.sock = hs.sock
        self.size: int = info["size"]
        self.flags: int = info["flags"]
        self.max_block: int = info.get("max_block", CHUNK)
        self._next = 1
        self._reads: dict[int, int] = {}  # handle -> length of the data a READ reply carries

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Send NBD_CMD_DISC and close the socket."""
        if self.sock.fileno() < 0:
            return
        try:
            self.sock.sendall(_REQ.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()

    # -- pipelined interface --------------------------------------------------------------------------
    def submit(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> int:
        """Send one request without waiting; return its handle. WRITE takes ``length`` from ``data``."""
        handle = self._next
        self._next += 1
        if cmd == CMD_WRITE:
            length = len(data)
        header = _REQ.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length)
        if len(data) > 65536:  # avoid copying big payloads
            self.sock.sendall(header)
            self.sock.sendall(data)
        else:
            self.sock.sendall(header + data)
        if cmd == CMD_READ:
            self._reads[handle] = length
        return handle

    def reply(self) -> tuple[int, int, bytes]:
        """Receive one reply: (handle, error, data); data is the payload of a successful READ."""
        magic, error, handle = _REPLY.unpack(self._hs.recv(16))
        if magic != SIMPLE_REPLY_MAGIC:
            raise ConnectionError(f"bad reply magic {magic:#x}")
        length = self._reads.pop(handle, 0)
        data = self._hs.recv(length) if length and not error else b""
        return handle, error, data

    def _call(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> bytes:
        sent = self.submit(cmd, offset, length, data, flags)
        handle, error, payload = self.reply()
        if handle != sent:
            raise ConnectionError(f"reply for handle {handle}, expected {sent}")
        if error:
            raise NbdError(error)
        return payload

    # -- commands -------------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        return self._call(CMD_READ, offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._call(CMD_WRITE, offset, data=data, flags=CMD_FLAG_FUA if fua else 0)

    def flush(self) -> None:
        self._call(CMD_FLUSH)

    def trim(self, offset: int, length: int) -> None:
        self._call(CMD_TRIM, offset, length)

    def zero(self, offset: int, length: int, fua: bool = False, no_hole: bool = False) -> None:
        flags = (CMD_FLAG_FUA if fua else 0) | (CMD_FLAG_NO_HOLE if no_hole else 0)
        self._call(CMD_WRITE_ZEROES, offset, length, flags=flags)


def list_exports(host: str, port: int, timeout: float = 30.0) -> list[str]:
    """The export names the server lists (NBD_OPT_LIST)."""
    hs = _Handshake(host, port, timeout)
    try:
        names = []
        for reply, payload in hs.option(OPT_LIST):
            if reply == REP_SERVER:
                (n,) = struct.unpack_from(">I", payload)
                names.append(payload[4 : 4 + n].decode())
        return names
    finally:
        hs.abort()


def export_info(host: str, port: int, export: str, timeout: float = 30.0) -> dict[str, int]:
    """NBD_OPT_INFO: ``size``, ``flags``, ``min_block``, ``preferred_block``, ``max_block``."""
    hs = _Handshake(host, port, timeout)
    try:
        return hs.info(OPT_INFO, export)
    finally:
        hs.abort()


def read_range(host: str, port: int, ldev_id: int, offset: int, length: int) -> bytes:
    """Read ``length`` bytes of LDEV ``ldev_id`` at ``offset``."""
    with NbdClient(host, port, str(ldev_id)) as c:
        parts = []
        for pos in range(offset, offset + length, CHUNK):
            parts.append(c.read(pos, min(CHUNK, offset + length - pos)))
        return b"".join(parts)


def write_range(host: str, port: int, ldev_id: int, offset: int, data: bytes, flush: bool = True) -> None:
    """Write ``data`` to LDEV ``ldev_id`` at ``offset``; with ``flush`` (default) it is durable on return."""
    view = memoryview(data)
    with NbdClient(host, port, str(ldev_id)) as c:
        for pos in range(0, len(data), CHUNK):
            c.write(offset + pos, bytes(view[pos : pos + CHUNK]))
        if flush:
            c.flush()
