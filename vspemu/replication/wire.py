"""The replication link's wire protocol: frames, the handshake's messages and proofs, the sealing of frames.

Every storage system listens on one TCP port per replication port (CL3-A, CL4-A, CL3-B, CL4-B); what travels
between two such ports is described here. The modules of the link:

- :mod:`.wire` (this one): the frame layout and its constants, header encoding and decoding, the handshake's
  proofs and session keys, the per-direction frame cipher, the link's exceptions and :class:`PeerInfo`.
- :mod:`.connection`: one authenticated connection (sending, request / reply, handler dispatch, keepalive);
  :mod:`.receiver` its receiving half (parsing and unsealing frames, polled completion); :mod:`.spinner` the
  secondary's polled wait for the next mirrored write.
- :mod:`.handshake`: the handshake of both sides (the connecting and the listening one).
- :mod:`.link`: remote paths, path groups and the replication ports of a system (listeners, the handler
  registry, faults on demand).

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
docs/remote.md and :mod:`.handshake`): the connecting side sends HELLO {v, from, to, ports, nonce, cipher};
the listening side answers CHALLENGE {nonce, proof} where proof = HMAC(secret, transcript + "server"); the
connecting side checks it and sends AUTH {proof} = HMAC(secret, transcript + "client"); the listening side
checks it and answers WELCOME, or REJECT {status, reason} with a remote path status code (``PATH_*``). The
transcript holds the protocol version, both identities and ports, both nonces and the cipher, so neither can
be changed in transit. Either side drops the connection as soon as something is wrong. Before WELCOME no frame
may be larger than :data:`MAX_HANDSHAKE_FRAME`, the HELLO must arrive within :data:`HELLO_TIMEOUT` seconds of
the connection and the whole handshake must finish within :data:`.link.HANDSHAKE_TIMEOUT` seconds; a listener
keeps at most :data:`.link.MAX_PENDING_HANDSHAKES` handshakes pending, at most
:data:`.link.MAX_PENDING_PER_ADDRESS` from one address.

Protection of the frames after the handshake (protocol version 2; cipher ``aes-256-gcm``, the default): both
sides derive two keys, one per direction, with HKDF-SHA256 from the link secret (salt: both nonces; info: the
transcript), and every frame after WELCOME is sealed with AES-256-GCM. A sealed frame is::

    prefix            as above, in clear (its fields are needed to receive the frame) but authenticated;
                      header length counts the header's tag, length counts both tags
    header record     AES-GCM(header) + 16-byte tag, nonce = the direction's record counter
    payload record    AES-GCM(payload) + 16-byte tag, nonce = counter + 1 (only if there is a payload)

The nonce is the per-direction record counter (starting at 0, never sent), and the additional data of both
records is the prefix, so a frame that is altered, replayed, reordered, dropped or cut short fails the next tag
check, and any failed check closes the connection (its requests fail with :class:`LinkDown` and nothing of the
frame is handed to a handler). Header and payload are separate records so that a large payload is still received
in place into a pooled buffer and decrypted there (``AESGCM.decrypt_into``; into a second pooled buffer with
cryptography 51, which refuses overlapping buffers), and encrypted straight from the caller's buffer into a
pooled one (``encrypt_into``): one pass over the payload on each side, no extra copy (see
:class:`.receiver.FrameReceiver` and :class:`.connection.Connection`). What is visible on the wire: frame types,
request ids and sizes. Environment ``VSPEMU_LINK_CIPHER=none`` turns the protection off (raw speed for a lab);
both sides announce their cipher in the handshake and a system refuses a peer whose cipher differs (ERR_04), so
a link is never half protected.

After the handshake both sides may send REQUESTs: many may be in flight (request ids), each is served
concurrently, and a handler exception comes back as an ERROR frame (:class:`RemoteError` on the caller)
without harming the connection. Both sides send PING every ``keepalive/5`` seconds; a side that hears nothing
for ``0.6 * keepalive`` seconds declares the connection dead (see :mod:`.connection`). GOAWAY {reason} closes
a connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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
HELLO_TIMEOUT = 1.0  # a connection that sends no HELLO within this is dropped (the real peer sends it at once)

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
NONCE = struct.Struct("!4xQ")  # 96-bit nonce: 4 zero bytes, the direction's record counter


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


