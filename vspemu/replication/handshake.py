"""The replication link's handshake, both sides: HELLO, CHALLENGE, AUTH, WELCOME (or REJECT).

The messages, the proofs and the session keys are described in :mod:`.wire`. :func:`initiate` is the
connecting side's half (a remote path connecting, see :class:`.link.RemotePath`), :func:`answer` the listening
side's (a replication port accepting, see :class:`.link.Link`). Both raise :class:`.wire.HandshakeRefused`
(with the remote path status code to show) or :class:`.wire.ProtocolError` when something is wrong; the
caller then drops the connection. The time limits (:data:`.link.HANDSHAKE_TIMEOUT`, the number of pending
handshakes) are the caller's; the HELLO's (:data:`.wire.HELLO_TIMEOUT`) is kept here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
from collections.abc import Callable

from vspemu.replication.connection import DEFAULT_KEEPALIVE
from vspemu.replication.wire import (
    AUTH,
    CHALLENGE,
    HELLO,
    HELLO_TIMEOUT,
    MAX_HANDSHAKE_FRAME,
    PATH_INVALID_PORT,
    PATH_REJECTED,
    PATH_SERIAL_MISMATCH,
    PROTOCOL_VERSION,
    REJECT,
    WELCOME,
    HandshakeRefused,
    PeerInfo,
    ProtocolError,
    encode_frame,
    proof,
    read_frame,
    session_keys,
)

Keys = tuple[bytes, bytes]  # (send key, receive key) of a sealed connection


async def initiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes, *,
                   local_id: str, local_serial: int, remote_id: str, local_port_id: str, remote_port_id: str,
                   keepalive: float, cipher: str) -> Keys | None:
    """The handshake of the connecting side; returns the keys (send, receive), None for cipher "none"."""
    na = secrets.token_hex(32)
    hello = {"v": PROTOCOL_VERSION, "from": local_id, "fromSerial": local_serial,
             "to": remote_id, "localPortId": local_port_id,
             "remotePortId": remote_port_id, "nonce": na, "keepalive": keepalive,
             "cipher": cipher}
    writer.write(encode_frame(HELLO, 0, hello))
    await writer.drain()
    ftype, _, header, _ = await read_frame(reader, MAX_HANDSHAKE_FRAME)
    if ftype == REJECT:
        raise HandshakeRefused(str(header.get("status", PATH_REJECTED)), str(header.get("reason", "rejected")))
    if ftype != CHALLENGE:
        raise HandshakeRefused(PATH_REJECTED, f"unexpected frame {ftype} in the handshake")
    nb = str(header.get("nonce", ""))
    ids = (local_id, remote_id, local_port_id, remote_port_id, na, nb)
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


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, port_id: str, local_id: str,
                 local_serial: int, cipher: str, secret_for: Callable[[str], bytes | None]
                 ) -> tuple[PeerInfo, float, Keys | None]:
    """The handshake of the listening side on ``port_id``: (peer, keepalive, keys (send, receive) or None)."""
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
    if hello.get("to") != local_id:
        raise await reject(PATH_SERIAL_MISMATCH, f"this is {local_id}, not {hello.get('to')}")
    if hello.get("remotePortId") != port_id:
        raise await reject(PATH_INVALID_PORT, f"this is port {port_id}, not {hello.get('remotePortId')}")
    if hello.get("cipher") != cipher:
        raise await reject(PATH_REJECTED, f"link cipher mismatch: this system uses {cipher}, the peer "
                                          f"{str(hello.get('cipher'))[:32]} (VSPEMU_LINK_CIPHER)")
    secret = secret_for(initiator)
    if secret is None or len(na) < 32:
        raise await reject(PATH_REJECTED, "authentication failed")
    nb = secrets.token_hex(32)
    ids = (initiator, local_id, local_port, port_id, na, nb)
    mine = proof(secret, *ids, "server", cipher=cipher)
    writer.write(encode_frame(CHALLENGE, 0, {"nonce": nb, "proof": mine}))
    await writer.drain()
    ftype, _, auth, _ = await read_frame(reader, MAX_HANDSHAKE_FRAME)
    expected = proof(secret, *ids, "client", cipher=cipher)
    if ftype != AUTH or not hmac.compare_digest(expected, str(auth.get("proof", ""))):
        raise await reject(PATH_REJECTED, "authentication failed")
    writer.write(encode_frame(WELCOME, 0, {"serial": local_serial}))
    await writer.drain()
    keepalive = hello.get("keepalive", DEFAULT_KEEPALIVE)
    if not isinstance(keepalive, (int, float)) or not 0.1 <= keepalive <= 3600:
        keepalive = DEFAULT_KEEPALIVE
    serial = hello.get("fromSerial")
    peer = PeerInfo(initiator, serial if isinstance(serial, int) else 0, port_id, local_port, False)
    keys = session_keys(secret, *ids, cipher)
    return peer, float(keepalive), None if keys is None else (keys[1], keys[0])
