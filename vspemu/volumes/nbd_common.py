"""The NBD server's numbers, counters and limits (vspemu.volumes.nbd serves, nbd_handshake negotiates).

The tunables (request and buffer sizes), the transmission flags the export advertises, the errno values of
replies, the request counters and latency histogram read by /metrics, the error mapping of a failed request,
:class:`NbdLimits`, and :class:`ServerSide` (what a connection uses of its server).
"""

from __future__ import annotations

import errno
import logging
import struct
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vspemu.buffers import BufferPool
from vspemu.nbdproto import FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC
from vspemu.volumes.volume import Volume, VolumeIOError, WriteRefused, pread_exact

log = logging.getLogger("vspemu.volumes.nbd")  # one logger for the whole NBD server

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
    pread_exact(volume.fd, view, offset, name=f"LDEV {volume.ldev_id}")
    if volume.behind is not None:  # host writes not yet in the file (a Thin Image P-VOL's first writes)
        volume.behind.overlay(offset, view)


def _nbd_errno(exc: BaseException) -> int:
    if isinstance(exc, WriteRefused):
        return NBD_EPERM
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return NBD_ENOSPC
    if not isinstance(exc, VolumeIOError | OSError):
        log.exception("NBD request failed", exc_info=exc)
    return NBD_EIO


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


class ServerSide(Protocol):
    """What a connection uses of its :class:`vspemu.volumes.nbd.NbdServer` (the server-wide limits)."""

    limits: NbdLimits
    _lookup: Callable[[str], Volume | None]
    _list_exports: Callable[[], list[str]]
    _pool: BufferPool
    _budget: int
    _used: int
    _waiters: deque[Any]

    def _admit(self, conn: Any) -> bool: ...

    def _leave(self, conn: Any) -> None: ...

    def _release(self) -> None: ...
