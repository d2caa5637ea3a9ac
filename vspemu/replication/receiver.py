"""The receiving half of a replication link connection: frames parsed out of a receive buffer, unsealed.

A :class:`FrameReceiver` is fed by the transport's :class:`asyncio.BufferedProtocol` (``_get_buffer``,
``_buffer_updated``) or, for polled completion, straight from the socket (``_receive_now``): frames are parsed
in place out of one receive buffer, a payload over :data:`SMALL_PAYLOAD` is received directly into a pooled,
page-aligned buffer of :data:`BUFFERS` (one copy from the socket), and a sealed frame (see :mod:`.wire`) is
checked and decrypted there (``decrypt`` for a header or a small payload, ``decrypt_into`` in place for a
large one). cryptography 51 refuses an in-place ``decrypt_into`` ("data and buf must not overlap"); where it
does (:data:`IN_PLACE_DECRYPT`, probed once), a large payload is decrypted into a second pooled buffer instead
and the first goes back to the pool. Any failed check closes the connection. Each frame is handed to ``_frame``, which
:class:`.connection.Connection` implements (replies, requests, pings).
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import select
import time
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vspemu.buffers import BufferPool
from vspemu.replication.spinner import Spinner
from vspemu.replication.wire import (
    DATA_HEADER,
    FIXED,
    FLAG_DATA,
    FRAME_TYPES,
    MAX_HEADER,
    MAX_PAYLOAD,
    NONCE,
    PATH_COMMUNICATION_FAILED,
    PREFIX,
    REQUEST,
    TAG,
    FrameCipher,
    decode_data_header,
)

RX_SIZE = 256 << 10  # per connection receive buffer (prefixes, headers, small payloads)
SMALL_PAYLOAD = 64 << 10  # larger payloads are received in place into a pooled buffer
POOL_LIMIT = 64 << 20  # process-wide: free payload buffers kept for reuse

BUFFERS = BufferPool(POOL_LIMIT)  # process-wide: link receive buffers and the copier's read buffers


def _in_place_decrypt_works() -> bool:
    """Whether this cryptography decrypts in place (50 does; 51 raises ValueError on overlapping buffers)."""
    aead, nonce = AESGCM(bytes(16)), bytes(12)
    sealed = bytearray(aead.encrypt(nonce, bytes(64), b"probe"))
    view = memoryview(sealed)
    try:
        aead.decrypt_into(nonce, view, b"probe", view[:64])
    except ValueError:
        return False
    return bytes(sealed[:64]) == bytes(64)


IN_PLACE_DECRYPT = _in_place_decrypt_works()


class FrameReceiver:
    """The receiving half of a connection (the base of :class:`.connection.Connection`)."""

    closed: asyncio.Event  # set by the connection when it is closed

    def __init__(self, rx_key: bytes | None) -> None:
        self._rx_cipher: FrameCipher | None = FrameCipher(rx_key) if rx_key else None
        self._tag = TAG if rx_key else 0  # bytes of tag per record on the wire
        self.last_rx = time.monotonic()
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
        self._poller: select.poll | None = None  # this connection's socket, for polled completion
        self._fd = -1
        self._spinner = Spinner.of(asyncio.get_running_loop())

    def _frame(self, ftype: int, request_id: int, header: dict[str, Any], payload: bytes | memoryview,
               buf: mmap.mmap | None) -> None:
        """Handle one received frame (``payload`` in ``buf``, a pooled buffer, if it was received in place)."""
        raise NotImplementedError

    def close(self, status: str = PATH_COMMUNICATION_FAILED, reason: str = "closed") -> None:
        raise NotImplementedError

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
            if seal is not None and self._rx_cipher is not None:  # decrypted (in place if allowed), then checked
                sealed, n = view, len(view) - TAG
                sealed_buf: mmap.mmap | None = None
                if IN_PLACE_DECRYPT:
                    view = sealed[:n]
                else:  # into a second pooled buffer; the sealed one goes back to the pool
                    sealed_buf, buf = buf, BUFFERS.get(n)
                    view = memoryview(buf)[:n]
                try:
                    self._rx_cipher.aead.decrypt_into(seal[0], sealed, seal[1], view)
                except InvalidTag:
                    del view
                    self.close(PATH_COMMUNICATION_FAILED, "integrity check failed: a payload was altered, "
                                                          "replayed or out of order")
                    return
                finally:
                    del sealed
                    if sealed_buf is not None:
                        BUFFERS.put(sealed_buf)
                        del sealed_buf
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
                raw = rx.aead.decrypt(NONCE.pack(c), self._rxv[at:at + n], prefix)
            except InvalidTag:
                self.close(PATH_COMMUNICATION_FAILED, "integrity check failed: a frame was altered, replayed or "
                                                      "out of order")
                return None
            self._payload_seal = (NONCE.pack(c + 1), prefix) if payload_len else None
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
