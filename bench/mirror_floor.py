"""The floor under a mirrored MiB: the least a synchronous mirror can cost on this machine, without vspemu.

Usage: python bench/mirror_floor.py [--gib 4] [--dir DIR]

Three processes and plain blocking sockets over TCP loopback, no event loop and no vspemu code: a client
sends 1 MiB writes, 8 in flight, as fio at iodepth 8 does (then 4 KiB writes at random offsets, one at a
time, for the latency); a "primary" writes each into its file
and answers. Mirrored, the primary also forwards each write to a "secondary", which writes it into its own
file and answers; the primary answers the client when the secondary has. The forwarding is done two ways:
with copies (``recv_into`` / ``pwrite`` / ``sendall``, what vspemu does) and without them (``splice`` and
``tee`` through pipes: the kernel moves page references from socket to socket and copies only into the
page cache). Each process writes a 2 GiB file over and over (its pages cached, as in tc_bench). A
"sealed" run forwards with copies as the first does, but seals each forwarded MiB with AES-256-GCM (the
primary encrypts into a buffer it reuses, the secondary decrypts into another), as vspemu's link does by
default: the floor of the same design as vspemu's TrueCopy with its link sealed.

The output is the throughput, the CPU time per MiB of every process, and what share of the unmirrored
throughput the mirrored run reached: the bound under TrueCopy's "1 MiB sequential write on a PAIR P-VOL vs
unpaired" on this machine, for any implementation that moves the bytes over TCP. A fourth run has the
primary write each MiB twice, into its file and into a journal file (both cached), and send nothing: what a
Universal Replicator primary whose journal holds the data could reach at best, if the transfer to the
secondary cost nothing at all during the run. Then the same as the first for the mean
latency of 4 KiB writes at queue depth 1 (the bound under "4 KiB iodepth-1 latency vs unpaired").
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

from benchlib import print_table
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MiB = 1 << 20
SPAN = 2 << 30  # bytes of each file written over and over
F_SETPIPE_SZ = 1031
_libc = ctypes.CDLL(None, use_errno=True)
_libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
_libc.tee.restype = ctypes.c_ssize_t
HDR = struct.Struct("!Q")  # a request: the offset; the payload (1 MiB) follows; the answer is the 8 bytes back
TAG = 16  # AES-GCM's tag, after a sealed payload
SEAL_KEY = bytes(range(32))  # (a fixed key: the cost of the cipher is what is measured)


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "big")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _recv_exact(s: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = s.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n


def _tee(src: int, dst: int, n: int) -> int:
    k = _libc.tee(src, dst, n, 0)
    if k < 0:
        raise OSError(ctypes.get_errno(), "tee")
    return int(k)


def _splice_from(sock: socket.socket, pipe_w: int, n: int) -> int:
    """Move up to ``n`` bytes from a socket into a pipe (page references, no copy)."""
    k = os.splice(sock.fileno(), pipe_w, n)
    if k == 0:
        raise EOFError
    return k


def _splice_all(pipe_r: int, dst: int, k: int, offset: int | None = None) -> None:
    """Move exactly ``k`` bytes from a pipe to a socket, or to a file at ``offset``."""
    done = 0
    while done < k:
        done += os.splice(pipe_r, dst, k - done, offset_dst=None if offset is None else offset + done)


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, MiB)
    return r, w


def _prefill(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    chunk = os.urandom(MiB)
    for off in range(0, SPAN, MiB):
        os.pwrite(fd, chunk, off)
    return fd


def _secondary(lsock: socket.socket, path: Path, mode: str, bs: int,
               out: multiprocessing.connection.Connection) -> None:
    fd = _prefill(path)
    c, _ = lsock.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hdr = bytearray(HDR.size)
    buf = bytearray(bs)
    sealed, aead, counter = bytearray(bs + TAG), AESGCM(SEAL_KEY), 0
    r, w = _pipe()
    t0 = _cpu()
    try:
        while True:
            _recv_exact(c, memoryview(hdr))
            (off,) = HDR.unpack(hdr)
            if mode == "copy":
                _recv_exact(c, memoryview(buf))
                os.pwrite(fd, buf, off)
            elif mode == "sealed":  # received whole, checked and decrypted into the buffer that is written
                _recv_exact(c, memoryview(sealed))
                aead.decrypt_into(_nonce(counter), sealed, bytes(hdr), buf)
                counter += 1
                os.pwrite(fd, buf, off)
            else:  # socket -> pipe -> file: one copy, into the page cache
                left = bs
                while left:
                    k = _splice_from(c, w, left)
                    _splice_all(r, fd, k, off + bs - left)
                    left -= k
            c.sendall(hdr)
    except (EOFError, ConnectionError):
        pass
    out.send(_cpu() - t0)


def _primary(lsock: socket.socket, path: Path, mode: str, bs: int, depth: int, s_port: int,
             out: multiprocessing.connection.Connection) -> None:
    fd = _prefill(path)
    jfd = _prefill(path.with_suffix(".jnl")) if mode == "journal" else -1
    c, _ = lsock.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    link = None
    ack = bytearray(HDR.size)
    if mode not in ("alone", "journal"):
        link = socket.create_connection(("127.0.0.1", s_port))
        link.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if depth > 1:
            def answer() -> None:  # the secondary's answers go on to the client, in order
                relayed = bytearray(HDR.size)
                try:
                    while True:
                        _recv_exact(link, memoryview(relayed))
                        c.sendall(relayed)
                except (EOFError, OSError):
                    pass

            threading.Thread(target=answer, daemon=True).start()
    hdr = bytearray(HDR.size)
    buf = bytearray(bs)
    sealed, aead, counter = bytearray(bs + TAG), AESGCM(SEAL_KEY), 0
    r1, w1 = _pipe()
    r2, w2 = _pipe()
    t0 = _cpu()
    try:
        while True:
            _recv_exact(c, memoryview(hdr))
            (off,) = HDR.unpack(hdr)
            if mode in ("alone", "copy", "sealed", "journal"):
                _recv_exact(c, memoryview(buf))
                if link is not None:  # forward first, write locally while the secondary works
                    link.sendall(hdr)
                    if mode == "sealed":
                        aead.encrypt_into(_nonce(counter), buf, bytes(hdr), sealed)
                        counter += 1
                        link.sendall(sealed)
                    else:
                        link.sendall(buf)
                os.pwrite(fd, buf, off)
                if jfd >= 0:  # a journal that holds the data, as UR's does (the secondary pulls it later)
                    os.pwrite(jfd, buf, off)
            else:  # splice: client socket -> pipe, tee -> second pipe -> link socket, first pipe -> file
                assert link is not None
                link.sendall(hdr)
                left = bs
                while left:
                    k = _splice_from(c, w1, left)
                    t = 0
                    while t < k:
                        t += _tee(r1, w2, k - t)
                    _splice_all(r2, link.fileno(), k)
                    _splice_all(r1, fd, k, off + bs - left)
                    left -= k
            if link is None:
                c.sendall(hdr)
            elif depth == 1:
                _recv_exact(link, memoryview(ack))
                c.sendall(ack)
    except (EOFError, ConnectionError):
        pass
    out.send(_cpu() - t0)
    if link is not None:
        link.close()


def run(mode: str, total: int, bs: int, depth: int, base: Path) -> dict[str, float]:
    """One run: client -> primary (-> secondary): MiB/s, mean latency (us) and CPU ms per MiB of each process."""
    ctx = multiprocessing.get_context("fork")
    lp, ls = socket.socket(), socket.socket()
    for s in (lp, ls):
        s.bind(("127.0.0.1", 0))
        s.listen()
    p_out, p_in = ctx.Pipe(False)
    s_out, s_in = ctx.Pipe(False)
    procs = [ctx.Process(target=_primary, args=(lp, base / "p.img", mode, bs, depth, ls.getsockname()[1], p_in))]
    if mode not in ("alone", "journal"):
        procs.append(ctx.Process(target=_secondary, args=(ls, base / "s.img", mode, bs, s_in)))
    for p in procs:
        p.start()
    c = socket.create_connection(lp.getsockname(), timeout=600)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = os.urandom(bs)
    ack = bytearray(HDR.size)
    n = total // bs
    rnd = random.Random(1)
    offsets = [(i * bs) % SPAN for i in range(n)] if bs >= MiB else [rnd.randrange(SPAN // bs) * bs for _ in range(n)]
    c.sendall(HDR.pack(0) + data)  # the first answer comes once both have prefilled their files
    _recv_exact(c, memoryview(ack))
    t0, w0 = _cpu(), time.perf_counter()
    sent = 0
    for _ in range(min(depth, n)):
        c.sendall(HDR.pack(offsets[sent]))
        c.sendall(data)
        sent += 1
    for _ in range(n):
        _recv_exact(c, memoryview(ack))
        if sent < n:
            c.sendall(HDR.pack(offsets[sent]))
            c.sendall(data)
            sent += 1
    wall, client = time.perf_counter() - w0, _cpu() - t0
    c.close()
    mib = n * bs / MiB
    result = {"MiBps": mib / wall, "lat_us": wall / n * depth * 1e6, "client": client / mib * 1000,
              "P": p_out.recv() / mib * 1000}
    if mode not in ("alone", "journal"):
        result["S"] = s_out.recv() / mib * 1000
    for p in procs:
        p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0, help="written by each 1 MiB run")
    ap.add_argument("--count", type=int, default=20000, help="4 KiB writes of each latency run")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-floor-"))
    modes = ("alone", "copy", "splice", "sealed", "journal")
    try:
        seq = {mode: run(mode, int(args.gib * (1 << 30)), MiB, 8, base) for mode in modes}
        lat = {mode: run(mode, args.count * 4096, 4096, 1, base) for mode in modes[:2]}
    finally:
        for name in ("p.img", "s.img", "p.jnl"):
            (base / name).unlink(missing_ok=True)
        if args.dir is None:
            base.rmdir()
    labels = {"alone": "primary alone (the unpaired baseline)", "copy": "mirrored, with copies",
              "splice": "mirrored, splice/tee (no copy through user memory)",
              "sealed": "mirrored, with copies, sealed (AES-256-GCM, as vspemu's link)",
              "journal": "primary writing a journal copy too, nothing sent (UR's best case)"}
    rows: list[tuple[str, ...]] = []
    for mode, r in seq.items():
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k not in ("MiBps", "lat_us"))
        rows.append((f"1 MiB, 8 in flight: {labels[mode]}", f"{r['MiBps']:.0f} MiB/s", cpu,
                     f"{r['MiBps'] / seq['alone']['MiBps']:.2f}x throughput"))
    for mode, r in lat.items():
        rows.append((f"4 KiB, 1 in flight: {labels[mode]}", f"{r['lat_us']:.0f} us", "",
                     f"{r['lat_us'] / lat['alone']['lat_us']:.2f}x latency"))
    print_table("The floor under a mirrored write, without vspemu (blocking sockets, TCP loopback)",
                ("chain", "result", "CPU ms per MiB", "vs alone"), rows)


if __name__ == "__main__":
    main()
