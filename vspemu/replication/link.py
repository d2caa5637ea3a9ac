"""The replication link: authenticated, multiplexed request/reply over TCP between replication ports.

Every storage system listens on one TCP port per replication port (CL3-A, CL4-A, CL3-B, CL4-B). A *remote
path* is a live, authenticated connection from a local replication port to a port of a remote system; a
*path group* bundles the paths to one remote system (remotepath-groups in the REST API).

Frame (all integers big-endian)::

    u32 length        bytes that follow this field (16 + header length + payload length)
    u8  type          HELLO, CHALLENGE, AUTH, WELCOME, REJECT, REQUEST, REPLY, ERROR, PING, GOAWAY
    u8  flags         0, or FLAG_DATA: the header is the binary DATA_HEADER of a ``data.write`` request
    u16 reserved      0
    u64 request id    pairs a REPLY / ERROR with its REQUEST (0 for other frames)
    u32 header length
    JSON header       UTF-8 (``{"m": type, "h": {...}}`` for a REQUEST); empty for a REPLY without header
    payload           raw bytes (e.g. a 4 MiB copy chunk), never copied into the JSON

``data.write`` requests, the hot path of TrueCopy (every mirrored host write and every copy chunk), carry
their header in binary instead (flag FLAG_DATA, :data:`DATA_HEADER`: ldev u32, bits u32 (zero, fua, copy),
offset u64, length u64) and are answered with an empty REPLY; encoding and parsing JSON cost more than the
rest of the request on the S side for a 4 KiB write.

Handshake (HMAC-SHA256 with the secret the two systems agreed when they registered each other; see
docs/remote.md): the connecting side sends HELLO {v, from, to, ports, nonce, cipher}; the listening side
answers CHALLENGE {nonce, proof} where proof = HMAC(secret, transcript + "server"); the connecting side checks
it and sends AUTH {proof} = HMAC(secret, transcript + "client"); the listening side checks it and answers
WELCOME. The transcript holds the protocol version, both identities and ports, both nonces and the cipher, so
neither can be changed in transit. Either side drops the connection as soon as something is wrong. Before
WELCOME no frame may be larger than :data:`MAX_HANDSHAKE_FRAME`, the HELLO must arrive within
:data:`HELLO_TIMEOUT` seconds of the connection and the whole handshake must finish within
:data:`HANDSHAKE_TIMEOUT` seconds; at most :data:`MAX_PENDING_HANDSHAKES` handshakes may be pending, at most
:data:`MAX_PENDING_PER_ADDRESS` from one address.

Protection of the frames after the handshake (protocol version 2; cipher ``aes-256-gcm``, the default): both
sides derive two keys, one per direction, with HKDF-SHA256 from the link secret (salt: both nonces; info: the
transcript), and every frame after WELCOME is sealed with AES-256-GCM. A sealed frame is::

    prefix            as above, in clear (its fields are needed to receive the frame) but authenticated;
                      header length counts the header's tag, length counts both tags
    header record     AES-GCM(header) + 16-byte tag, nonce = the direction's record counter
    payload record    AES-GCM(payload) + 16-byte tag, nonce = counter + 1 (only if there is a payload)

The nonce is the per-direction record counter (starting at 0, never sent), and the additional data of both
records is the prefix, so a frame that is altered, replayed, reordered, dropped or cut short fails the next
tag check, and any failed check closes the connection (its requests fail with :class:`LinkDown` and nothing
of the frame is handed to a handler). Header and payload are separate records so that a large payload is
still received in place into a pooled buffer and decrypted there (``AESGCM.decrypt_into``), and encrypted
straight from the caller's buffer into a pooled one (``encrypt_into``): one pass over the payload on each
side, no extra copy. What is visible on the wire: frame types, request ids and sizes. Environment
``VSPEMU_LINK_CIPHER=none`` turns the protection off (raw speed for a lab); both sides announce their cipher in
the handshake and a system refuses a peer whose cipher differs (ERR_04), so a link is never half protected.

After the handshake both sides may send REQUESTs: many may be in flight (request ids), each is served
concurrently (by its own task, or, for a handler marked :func:`inline_handler`, right in the receive callback
until it first suspends), and a handler exception comes back as an ERROR frame (:class:`RemoteError` on the
caller) without harming the connection. Large payloads are received in place into pooled page-aligned
buffers (see :class:`Connection`). Both sides send PING every ``keepalive/5`` seconds; a side that hears
nothing for ``0.6 * keepalive`` seconds declares the connection dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import mmap
import os
import secrets
import select
import struct
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vspemu.aio import resume
from vspemu.buffers import BufferPool

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2  # 2: frames after the handshake are sealed (AES-256-GCM), the cipher is negotiated
PREFIX = struct.Struct("!IBBHQI")  # length, type, flags, reserved, request id, header length
FIXED = PREFIX.size - 4  # the bytes of the fixed part counted in "length"

HELLO, CHALLENGE, AUTH, WELCOME, REJECT = 1, 2, 3, 4, 5
REQUEST, REPLY, ERROR = 16, 17, 18
PING, GOAWAY = 32, 34
FRAME_TYPES = {HELLO, CHALLENGE, AUTH, WELCOME, REJECT, REQUEST, REPLY, ERROR, PING, GOAWAY}

MAX_HANDSHAKE_FRAME = 4096
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 64 << 20
HANDSHAKE_TIMEOUT = 5.0
HELLO_TIMEOUT = 1.0  # a connection that sends no HELLO within this is dropped (the real peer sends it at once)
MAX_PENDING_HANDSHAKES = 64
MAX_PENDING_PER_ADDRESS = 16  # so that idle sockets from one address cannot take every handshake slot
MAX_CONCURRENT_HANDLERS = 256
DEFAULT_KEEPALIVE = 15.0
RX_SIZE = 256 << 10  # per connection receive buffer (prefixes, headers, small payloads)
SMALL_PAYLOAD = 64 << 10  # larger payloads are received in place into a pooled buffer
MAX_INFLIGHT_PAYLOAD = 256 << 20  # per connection: payload of the requests being served before we stop reading
POOL_LIMIT = 64 << 20  # process-wide: free payload buffers kept for reuse
WRITE_HIGH = 8 << 20  # senders wait while more than this is queued in the transport (until WRITE_LOW)
WRITE_LOW = 2 << 20
# Polled completion, as the block layer's hybrid polling does for fast devices: a small data.write (a mirrored
# host write) that is the only request of the process waiting for a reply (a TrueCopy write at queue depth 1)
# polls its socket for up to this long before it sleeps in the event loop, and receives its reply right there
# (see Connection._poll_reply); other requests (e.g. the long-polling jnl.read) never poll. On a VM a sleeping
# process is woken by an interrupt to a halted vCPU, which costs more than the round trip itself
# (bench/pingpong.py: 62-80 us sleeping, 20-25 us polling, 2 vCPUs). While it polls, the event loop does
# nothing else, hence "the only one". Environment VSPEMU_LINK_POLL_US overrides the time; 0 turns polling off.
POLL_SECONDS = float(os.environ.get("VSPEMU_LINK_POLL_US", "200")) / 1e6
POLL_MAX_PAYLOAD = 64 << 10
# The secondary's half (see _Spinner): after it answers a small mirrored host write, a system polls its link
# sockets for the next frame for up to twice the usual time until one comes, at most this long, and serves it
# at once; it yields the CPU on every turn. A system's vCPU that would otherwise halt stays awake, so the next
# write is seen without a wake-up (and so are the host's and the primary's wake-ups on a VM; see
# docs/replication.md). Environment VSPEMU_LINK_SPIN_US overrides the time; 0 turns it off.
SPIN_SECONDS = float(os.environ.get("VSPEMU_LINK_SPIN_US", "300")) / 1e6

# remote path status codes (pathStatus), in the array's style; see docs/remote.md
PATH_NORMAL = "NML_01"
PATH_INIT_FAILED = "ERR_02"  # the remote port cannot be reached (refused, unreachable, local port offline)
PATH_TIMEOUT = "ERR_03"  # the remote stopped answering (no frame within the time-out), or connect timed out
PATH_REJECTED = "ERR_04"  # the handshake failed: the peer does not share our secret
PATH_SERIAL_MISMATCH = "ERR_06"  # another storage system answers on that address
PATH_INVALID_PORT = "ERR_10"  # the remote port is not a replication port of the remote system
PATH_COMMUNICATION_FAILED = "ERR_13"  # the connection broke (reset, closed, protocol error)
PATH_STATUS_TEXT = {
    PATH_NORMAL: "Normal",
    PATH_INIT_FAILED: "Initialization Failed",
    PATH_TIMEOUT: "Communication Time Out",
    PATH_REJECTED: "Port Rejected",
    PATH_SERIAL_MISMATCH: "Serial Number Mismatch",
    PATH_INVALID_PORT: "Invalid Port",
    PATH_COMMUNICATION_FAILED: "Communication Failed",
}

FLAG_DATA = 1  # frame flag: binary data.write header
DATA_WRITE = "data.write"
DATA_HEADER = struct.Struct("!IIQQ")  # ldev, bits, offset, length
_DATA_BITS = (("zero", 1), ("fua", 2), ("copy", 4))

ECHO = "vspemu.echo"  # a message type every system serves: used by tests and diagnostics

CIPHER_AES_GCM = "aes-256-gcm"
CIPHER_NONE = "none"  # opt-out (VSPEMU_LINK_CIPHER=none): frames in clear, as in protocol version 1
CIPHERS = (CIPHER_AES_GCM, CIPHER_NONE)
TAG = 16  # AES-GCM tag
_NONCE = struct.Struct("!4xQ")  # 96-bit nonce: 4 zero bytes, the direction's record counter


def link_cipher() -> str:
    """The cipher this process uses on its link: ``VSPEMU_LINK_CIPHER`` (default aes-256-gcm)."""
    value = os.environ.get("VSPEMU_LINK_CIPHER", CIPHER_AES_GCM).strip().lower() or CIPHER_AES_GCM
    if value not in CIPHERS:
        raise ValueError(f"VSPEMU_LINK_CIPHER must be one of {', '.join(CIPHERS)}, not {value!r}")
    return value


class LinkError(Exception):
    """Base of the link's errors."""


class LinkDown(LinkError):
    """No working path: the request could not be delivered or its answer was lost."""


class LinkTimeout(LinkDown):
    """The request's deadline passed before an answer arrived."""


class RemoteError(LinkError):
    """The remote handler raised; ``kind`` is its exception class name, ``detail`` what it sent."""

    def __init__(self, kind: str, message: str, detail: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.remote_message = message
        self.detail = detail or {}
        super().__init__(f"{kind}: {message}")


class ProtocolError(Exception):
    pass


class HandshakeRefused(Exception):
    def __init__(self, status: str, reason: str) -> None:
        self.status = status
        super().__init__(reason)


@dataclass(frozen=True)
class PeerInfo:
    """Who is on the other end of a connection."""

    storage_device_id: str
    serial: int
    local_port_id: str
    remote_port_id: str
    initiator: bool  # True if this side opened the connection (it belongs to one of our path groups)


_F = TypeVar("_F", bound=Callable[..., Any])
# a request payload is bytes or (when large) a memoryview of a pooled receive buffer
Handler = Callable[[PeerInfo, dict[str, Any], bytes], Awaitable[tuple[dict[str, Any], bytes | bytearray | memoryview]]]
SecretLookup = Callable[[str], bytes | None]
AddressLookup = Callable[[str, str], tuple[str, int] | None]


def _transcript(initiator_id: str, responder_id: str, local_port: str, remote_port: str, na: str, nb: str,
                role: str, cipher: str) -> bytes:
    return f"vspemu-link-v{PROTOCOL_VERSION}|{initiator_id}|{responder_id}|{local_port}|{remote_port}|{na}|{nb}|" \
           f"{cipher}|{role}".encode()


def proof(secret: bytes, initiator_id: str, responder_id: str, local_port: str, remote_port: str, na: str,
          nb: str, role: str, *, cipher: str) -> str:
    mac = hmac.new(secret, _transcript(initiator_id, responder_id, local_port, remote_port, na, nb, role, cipher),
                   hashlib.sha256)
    return mac.hexdigest()


def session_keys(secret: bytes, initiator_id: str, responder_id: str, local_port: str, remote_port: str, na: str,
                 nb: str, cipher: str) -> tuple[bytes, bytes] | None:
    """The connection's keys (initiator to responder, responder to initiator), or None for cipher "none"."""
    if cipher == CIPHER_NONE:
        return None
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=f"{na}|{nb}".encode(),
               info=_transcript(initiator_id, responder_id, local_port, remote_port, na, nb, "keys", cipher)
               ).derive(secret)
    return okm[:32], okm[32:]


class FrameCipher:
    """One direction of a connection's protection: AES-256-GCM, the nonce is the direction's record counter."""

    __slots__ = ("aead", "counter")

    def __init__(self, key: bytes) -> None:
        self.aead = AESGCM(key)
        self.counter = 0

    def take(self, records: int) -> int:
        """The counter of the first of ``records`` consecutive records."""
        c = self.counter
        self.counter = c + records
        return c


_encode_json = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(separators=...) builds one per call


def encode_header(ftype: int, header: dict[str, Any]) -> tuple[int, bytes]:
    """(flags, header bytes) of a frame: the binary DATA_HEADER for a data.write, else JSON (nothing for a
    REPLY without header)."""
    if ftype == REQUEST and header.get("m") == DATA_WRITE:
        h = header["h"]
        bits = sum(bit for key, bit in _DATA_BITS if h.get(key))
        return FLAG_DATA, DATA_HEADER.pack(h["ldev"], bits, h["offset"], h["length"])
    if ftype == REPLY and not header.get("h"):
        return 0, b""
    return 0, _encode_json(header).encode()


def encode_frame(ftype: int, request_id: int, header: dict[str, Any], payload_len: int = 0) -> bytes:
    """An unsealed frame without its payload (the handshake, and every frame with cipher "none")."""
    flags, hdr = encode_header(ftype, header)
    return PREFIX.pack(FIXED + len(hdr) + payload_len, ftype, flags, 0, request_id, len(hdr)) + hdr


def decode_data_header(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The request header (``{"m": "data.write", "h": {...}}``) of a FLAG_DATA frame."""
    ldev, bits, offset, length = DATA_HEADER.unpack(raw)
    h: dict[str, Any] = {"ldev": ldev, "offset": offset, "length": length}
    for key, bit in _DATA_BITS:
        if bits & bit:
            h[key] = True
    return {"m": DATA_WRITE, "h": h}


async def read_frame(reader: asyncio.StreamReader, max_frame: int) -> tuple[int, int, dict[str, Any], bytes]:
    """One frame: (type, request id, header, payload). Raises ProtocolError on anything malformed."""
    prefix = await reader.readexactly(PREFIX.size)
    length, ftype, _flags, _res, request_id, header_len = PREFIX.unpack(prefix)
    if ftype not in FRAME_TYPES:
        raise ProtocolError(f"unknown frame type {ftype}")
    if length < FIXED or length - FIXED > max_frame or header_len > length - FIXED or header_len > MAX_HEADER:
        raise ProtocolError(f"bad frame length {length} / header {header_len}")
    raw_header = await reader.readexactly(header_len) if header_len else b"{}"
    payload_len = length - FIXED - header_len
    payload = await reader.readexactly(payload_len) if payload_len else b""
    try:
        header = json.loads(raw_header)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError("header is not JSON") from e
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    return ftype, request_id, header, payload


def keepalive_timing(keepalive: float) -> tuple[float, float]:
    """(ping interval, dead after) for a path time-out of ``keepalive`` seconds."""
    return max(0.1, min(keepalive / 5.0, 2.0)), max(0.5, keepalive * 0.6)


BUFFERS = BufferPool(POOL_LIMIT)  # process-wide: link receive buffers and the copier's read buffers


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


class _Spinner:
    """The secondary's polled wait for the next mirrored write: one per event loop, over every connection.

    When a small ``data.write`` of a host write (not a copy) has been answered inline, the next receive
    callback ends by polling every connection's socket until a frame arrives or the budget is spent: twice the
    moving average of the time from such an answer to the next frame (so only a steady stream of mirrored
    writes, some thousands a second, is polled for), at most :data:`SPIN_SECONDS`. Each turn yields the CPU
    (``sched_yield``), so any other runnable thread on that CPU goes first. What arrives is served right there;
    if it was another such write, polling goes on after the event loop has had its turn (it is never starved).
    """

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Spinner] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Spinner:
        spinner = cls._by_loop.get(loop)
        if spinner is None:
            spinner = cls._by_loop[loop] = cls(loop)
        return spinner

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.poller = select.poll()
        self.conns: dict[int, Connection] = {}
        self.armed = False  # a small mirrored write was just answered
        self.answered_at = 0.0
        self.gap = 1.0  # moving average, seconds from such an answer to the next frame's arrival
        self.resume_scheduled = False
        self.served = 0  # receives made while polling (for tests and curiosity)

    def add(self, fd: int, conn: Connection) -> None:
        self.poller.register(fd, select.POLLIN)
        self.conns[fd] = conn

    def remove(self, fd: int, conn: Connection) -> None:
        if self.conns.get(fd) is conn:
            del self.conns[fd]
            self.poller.unregister(fd)

    def answered(self) -> None:
        self.armed = True
        self.answered_at = time.perf_counter()

    def frame_arrived(self) -> None:
        if self.armed:
            self.armed = False
            self.gap += (time.perf_counter() - self.answered_at - self.gap) / 8

    def spin(self) -> None:
        if not self.armed or self.gap > SPIN_SECONDS:
            return
        end = self.answered_at + min(SPIN_SECONDS, 2 * self.gap)
        poll = self.poller.poll
        while not (ready := poll(0)):
            if time.perf_counter() >= end:
                return
            os.sched_yield()
        for fd, _event in ready:
            conn = self.conns.get(fd)
            if conn is not None and conn._receive_now():
                self.served += 1
        if self.armed and not self.resume_scheduled:  # another one answered: poll on after the loop's turn
            self.resume_scheduled = True
            self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self.resume_scheduled = False
        self.spin()


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


class Connection:
    """One authenticated connection; symmetric: both ends may send requests and serve handlers.

    The handshake runs on asyncio streams; :meth:`start` then switches the transport to a
    :class:`asyncio.BufferedProtocol`: frames are parsed straight out of a receive buffer and a large payload
    (over :data:`SMALL_PAYLOAD`) is received directly into a pooled, page-aligned buffer (one copy from the
    socket). A request payload reaches its handler as a memoryview of that buffer (the buffer is reused only
    once nobody references it); a reply payload reaches the caller as ``bytes``. A frame is written with one
    ``writev`` (header and payload, not concatenated, see :meth:`_write_two`); senders wait only while the
    transport's buffer is above its high-water mark.

    Back-pressure: the connection stops reading while :data:`MAX_CONCURRENT_HANDLERS` requests are being
    served or their payloads reach :data:`MAX_INFLIGHT_PAYLOAD`.

    With ``keys`` (send key, receive key) every frame is sealed (see the module docstring): a large payload is
    encrypted from the caller's buffer into a pooled one (``encrypt_into``), and received in place (with its
    tag) and decrypted there (``decrypt_into``); any failed tag check closes the connection.
    """

    waiting = 0  # requests of the process waiting for their reply, every connection included

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: PeerInfo,
                 handlers: dict[str, Handler], keepalive: float, keys: tuple[bytes, bytes] | None = None) -> None:
        self.reader = reader
        self._tx: FrameCipher | None = FrameCipher(keys[0]) if keys else None
        self._rx_cipher: FrameCipher | None = FrameCipher(keys[1]) if keys else None
        self._tag = TAG if keys else 0  # bytes of tag per record on the wire
        self.writer = writer
        self.transport = writer.transport
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
        self.last_rx = time.monotonic()
        self.requests_sent = 0
        self._tasks: list[asyncio.Task[None]] = []
        # receiving
        self._rx = bytearray(RX_SIZE)
        self._rxv = memoryview(self._rx)
        self._start = 0  # unparsed bytes are self._rx[self._start:self._end]
        self._end = 0
        self._need = PREFIX.size  # bytes from _start the parser waits for
        self._payload_buf: mmap.mmap | None = None  # a large payload being received in place
        self._payload_view: memoryview | None = None
        self._payload_got = 0
        self._payload_frame: tuple[int, int, dict[str, Any]] = (0, 0, {})
        self._payload_seal: tuple[bytes, bytes] | None = None  # (nonce, prefix) of a sealed payload in place
        self._rx_paused = False
        self._parsing = False
        # sending
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._poller: select.poll | None = None  # this connection's socket, for polled completion
        self._fd = -1
        self._spinner = _Spinner.of(asyncio.get_running_loop())
        self.shaper: SendShaper | None = None  # a latency / bandwidth fault on demand (see Link.path_fault)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport = self.transport
        transport.pause_reading()
        leftover = bytes(self.reader._buffer)  # read during the handshake but not parsed yet
        self.reader._buffer.clear()
        eof = self.reader.at_eof() or self.reader._eof
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
            frame = prefix + aead.encrypt(_NONCE.pack(c), hdr, prefix)
            if not n:
                self.transport.write(frame)
            elif n <= SMALL_PAYLOAD:
                self._write_two(frame, aead.encrypt(_NONCE.pack(c + 1), payload, prefix), n + TAG)
            else:  # encrypted straight into a pooled buffer: the one pass over the payload
                buf = BUFFERS.get(n + TAG)
                view = memoryview(buf)[:n + TAG]
                aead.encrypt_into(_NONCE.pack(c + 1), payload, prefix, view)
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

    def _poll_reply(self, fut: asyncio.Future[Any], seconds: float) -> None:
        """Spin on the socket until ``fut`` has its reply or ``seconds`` pass. Whatever arrives is received and
        parsed right here, so a reply completes ``fut`` without a trip through the event loop (and the caller's
        ``await fut`` then does not suspend)."""
        if self._poller is None:
            return
        poll, end = self._poller.poll, time.perf_counter() + seconds
        while not fut.done() and time.perf_counter() < end:
            if poll(0) and not self._receive_now():
                return

    def _receive_now(self) -> bool:
        """Receive and parse what the socket holds, outside the transport's callback (polled completion).
        False when this is not the moment (a parse further up the stack, back-pressure, closed) or on anything
        unusual (end of file, an error): the transport then handles it as usual."""
        if self._parsing or self._rx_paused or self.closed.is_set():
            return False
        try:
            n = os.readv(self._fd, (self._get_buffer(),))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if n == 0:
            return False
        self._buffer_updated(n)
        return True

    # -- receiving -------------------------------------------------------------------------------------
    def _ensure_room(self, need: int) -> None:
        """Make room for ``need`` bytes from _start in the receive buffer (compact, grow or shrink it)."""
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = 0
            if len(self._rx) > RX_SIZE and need <= RX_SIZE:
                self._rx = bytearray(RX_SIZE)
                self._rxv = memoryview(self._rx)
            start = end = 0
        if need > len(self._rx):
            rx = bytearray(need)
            rx[:end - start] = self._rxv[start:end]
            self._rx, self._rxv = rx, memoryview(rx)
            self._start, self._end = 0, end - start
        elif len(self._rx) - start < need or len(self._rx) - end < 4096:
            n = end - start
            self._rx[:n] = bytes(self._rxv[start:end])
            self._start, self._end = 0, n

    def _get_buffer(self) -> memoryview:
        if self._payload_view is not None:
            return self._payload_view[self._payload_got:]
        self._ensure_room(self._need)
        return self._rxv[self._end:]

    def _buffer_updated(self, nbytes: int) -> None:
        self.last_rx = time.monotonic()
        self._spinner.frame_arrived()
        if self._payload_view is not None:
            self._payload_got += nbytes
            if self._payload_got < len(self._payload_view):
                return
            buf, view = self._payload_buf, self._payload_view
            self._payload_buf = self._payload_view = None
            ftype, request_id, header = self._payload_frame
            self._payload_frame = (0, 0, {})
            seal, self._payload_seal = self._payload_seal, None
            if seal is not None and self._rx_cipher is not None:  # decrypted in place, then checked
                sealed, view = view, view[:len(view) - TAG]
                try:
                    self._rx_cipher.aead.decrypt_into(seal[0], sealed, seal[1], view)
                except InvalidTag:
                    self.close(PATH_COMMUNICATION_FAILED, "integrity check failed: a payload was altered, "
                                                          "replayed or out of order")
                    return
                finally:
                    del sealed
            self._frame(ftype, request_id, header, view, buf)
            del view, buf
        else:
            self._end += nbytes
        self._parse()

    def _parse(self) -> None:
        if self._parsing:
            return
        self._parsing = True
        try:
            self._parse_frames()
        finally:
            self._parsing = False

    def _parse_frames(self) -> None:
        while not self._rx_paused and self._payload_view is None and not self.closed.is_set():
            start, end = self._start, self._end
            avail = end - start
            if avail < PREFIX.size:
                self._need = PREFIX.size
                return
            length, ftype, flags, _res, request_id, header_len = PREFIX.unpack_from(self._rx, start)
            tag = self._tag
            if ftype not in FRAME_TYPES or (flags and (flags != FLAG_DATA or ftype != REQUEST or
                                                       header_len != DATA_HEADER.size + tag)):
                self.close(PATH_COMMUNICATION_FAILED, f"protocol error: unknown frame type {ftype} (flags {flags})")
                return
            if length < FIXED or length - FIXED > MAX_PAYLOAD + MAX_HEADER + 2 * tag or \
                    header_len > length - FIXED or header_len > MAX_HEADER + tag or header_len < tag or \
                    0 < length - FIXED - header_len <= tag:
                self.close(PATH_COMMUNICATION_FAILED, f"protocol error: bad frame length {length} / header "
                                                      f"{header_len}")
                return
            total = 4 + length
            header_end = PREFIX.size + header_len
            payload_len = total - header_end  # on the wire: with its tag if sealed
            if avail >= total:
                header = self._header(start, header_len, flags, payload_len)
                if header is None:
                    return
                payload: bytes = b""
                if payload_len:
                    if self._rx_cipher is None:
                        payload = bytes(self._rxv[start + header_end:start + total])
                    else:
                        seal, self._payload_seal = self._payload_seal, None
                        try:
                            if seal is None:  # (never: _header left it)
                                raise InvalidTag
                            payload = self._rx_cipher.aead.decrypt(seal[0], self._rxv[start + header_end:start + total],
                                                                   seal[1])
                        except InvalidTag:
                            self.close(PATH_COMMUNICATION_FAILED, "integrity check failed: a payload was altered, "
                                                                  "replayed or out of order")
                            return
                self._start = start + total
                self._frame(ftype, request_id, header, payload, None)
                continue
            if payload_len > SMALL_PAYLOAD and avail >= header_end:
                header = self._header(start, header_len, flags, payload_len)
                if header is None:
                    return
                buf = BUFFERS.get(payload_len)
                view = memoryview(buf)[:payload_len]
                have = avail - header_end
                view[:have] = self._rxv[start + header_end:end]
                self._payload_buf, self._payload_view, self._payload_got = buf, view, have
                self._payload_frame = (ftype, request_id, header)
                self._start = self._end = 0
                self._need = PREFIX.size
                return
            self._need = total if payload_len <= SMALL_PAYLOAD else header_end
            return

    def _header(self, start: int, header_len: int, flags: int, payload_len: int) -> dict[str, Any] | None:
        """The header of the frame at ``start`` (checked and decrypted if sealed; the nonce and additional data
        of its payload are then left in _payload_seal); None if the connection was closed."""
        at, n = start + PREFIX.size, header_len
        raw: bytes | bytearray | memoryview
        rx = self._rx_cipher
        if rx is not None:
            prefix = bytes(self._rxv[start:at])
            c = rx.take(2 if payload_len else 1)
            try:
                raw = rx.aead.decrypt(_NONCE.pack(c), self._rxv[at:at + n], prefix)
            except InvalidTag:
                self.close(PATH_COMMUNICATION_FAILED, "integrity check failed: a frame was altered, replayed or "
                                                      "out of order")
                return None
            self._payload_seal = (_NONCE.pack(c + 1), prefix) if payload_len else None
            n = len(raw)
        else:
            raw = self._rx[at:at + n]
        if flags:  # FLAG_DATA (checked by the caller)
            return decode_data_header(raw)
        try:
            header = json.loads(raw) if n else {}
        except (ValueError, UnicodeDecodeError):
            self.close(PATH_COMMUNICATION_FAILED, "protocol error: header is not JSON")
            return None
        if not isinstance(header, dict):
            self.close(PATH_COMMUNICATION_FAILED, "protocol error: header is not a JSON object")
            return None
        return header

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
                reply_header, reply_payload = await handler(self.peer, h if isinstance(h, dict) else {}, payload)
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
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)  # _drain sees the connection closed
        self._drain_waiters = []
        self._payload_buf = self._payload_view = None
        self.transport.abort()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in list(self._handler_tasks):
            task.cancel()


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
            keys = await asyncio.wait_for(self._handshake(reader, writer, secret), timeout)
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

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         secret: bytes) -> tuple[bytes, bytes] | None:
        """The handshake of the connecting side; returns the keys (send, receive), None for cipher "none"."""
        link = self.group.link
        cipher = link.cipher
        na = secrets.token_hex(32)
        hello = {"v": PROTOCOL_VERSION, "from": link.storage_device_id, "fromSerial": link.serial,
                 "to": self.group.remote_device_id, "localPortId": self.local_port_id,
                 "remotePortId": self.remote_port_id, "nonce": na, "keepalive": self.group.timeout,
                 "cipher": cipher}
        writer.write(encode_frame(HELLO, 0, hello))
        await writer.drain()
        ftype, _, header, _ = await read_frame(reader, MAX_HANDSHAKE_FRAME)
        if ftype == REJECT:
            raise HandshakeRefused(str(header.get("status", PATH_REJECTED)), str(header.get("reason", "rejected")))
        if ftype != CHALLENGE:
            raise HandshakeRefused(PATH_REJECTED, f"unexpected frame {ftype} in the handshake")
        nb = str(header.get("nonce", ""))
        ids = (link.storage_device_id, self.group.remote_device_id, self.local_port_id, self.remote_port_id, na, nb)
        expected = proof(secret, *ids, "server", cipher=cipher)
        if len(nb) < 32 or not hmac.compare_digest(expected, str(header.get("proof", ""))):
            raise HandshakeRefused(PATH_REJECTED, "the remote system could not prove that it knows the secret")
        mine = proof(secret, *ids, "client", cipher=cipher)
        writer.write(encode_frame(AUTH, 0, {"proof": mine}))
        await writer.drain()
        ftype, _, header, _ = await read_frame(reader, MAX_HANDSHAKE_FRAME)
        if ftype == REJECT:
            raise HandshakeRefused(str(header.get("status", PATH_REJECTED)), str(header.get("reason", "rejected")))
        if ftype != WELCOME:
            raise HandshakeRefused(PATH_REJECTED, f"unexpected frame {ftype} in the handshake")
        keys = session_keys(secret, *ids, cipher)
        return None if keys is None else (keys[0], keys[1])

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
        """Serve requests of ``msg_type``: ``await handler(peer, header, payload) -> (header, payload)``."""
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
            peer, keepalive, keys = await asyncio.wait_for(self._answer_handshake(port_id, reader, writer),
                                                           HANDSHAKE_TIMEOUT)
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

    async def _answer_handshake(self, port_id: str, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> tuple[PeerInfo, float, tuple[bytes, bytes] | None]:
        """The handshake of the listening side: (peer, keepalive, keys (send, receive) or None)."""
        try:
            ftype, _, hello, _ = await asyncio.wait_for(read_frame(reader, MAX_HANDSHAKE_FRAME), HELLO_TIMEOUT)
        except TimeoutError as e:
            raise ProtocolError(f"no HELLO within {HELLO_TIMEOUT} s") from e
        if ftype != HELLO or hello.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"the first frame is not a HELLO of protocol version {PROTOCOL_VERSION}")

        async def reject(status: str, reason: str) -> HandshakeRefused:
            writer.write(encode_frame(REJECT, 0, {"status": status, "reason": reason}))
            with contextlib.suppress(OSError):
                await writer.drain()
            return HandshakeRefused(status, reason)

        initiator = str(hello.get("from", ""))
        na = str(hello.get("nonce", ""))
        local_port = str(hello.get("localPortId", ""))
        if hello.get("to") != self.storage_device_id:
            raise await reject(PATH_SERIAL_MISMATCH, f"this is {self.storage_device_id}, not {hello.get('to')}")
        if hello.get("remotePortId") != port_id:
            raise await reject(PATH_INVALID_PORT, f"this is port {port_id}, not {hello.get('remotePortId')}")
        if hello.get("cipher") != self.cipher:
            raise await reject(PATH_REJECTED, f"link cipher mismatch: this system uses {self.cipher}, the peer "
                                              f"{str(hello.get('cipher'))[:32]} (VSPEMU_LINK_CIPHER)")
        secret = self.secret_for(initiator)
        if secret is None or len(na) < 32:
            raise await reject(PATH_REJECTED, "authentication failed")
        nb = secrets.token_hex(32)
        ids = (initiator, self.storage_device_id, local_port, port_id, na, nb)
        mine = proof(secret, *ids, "server", cipher=self.cipher)
        writer.write(encode_frame(CHALLENGE, 0, {"nonce": nb, "proof": mine}))
        await writer.drain()
        ftype, _, auth, _ = await read_frame(reader, MAX_HANDSHAKE_FRAME)
        expected = proof(secret, *ids, "client", cipher=self.cipher)
        if ftype != AUTH or not hmac.compare_digest(expected, str(auth.get("proof", ""))):
            raise await reject(PATH_REJECTED, "authentication failed")
        writer.write(encode_frame(WELCOME, 0, {"serial": self.serial}))
        await writer.drain()
        keepalive = hello.get("keepalive", DEFAULT_KEEPALIVE)
        if not isinstance(keepalive, (int, float)) or not 0.1 <= keepalive <= 3600:
            keepalive = DEFAULT_KEEPALIVE
        serial = hello.get("fromSerial")
        peer = PeerInfo(initiator, serial if isinstance(serial, int) else 0, port_id, local_port, False)
        keys = session_keys(secret, *ids, self.cipher)
        return peer, float(keepalive), None if keys is None else (keys[1], keys[0])

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


def random_payload(size: int) -> bytes:
    return os.urandom(size)
