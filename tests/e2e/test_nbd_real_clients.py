"""Real NBD clients (qemu-img, nbdcopy, qemu-io, nbdinfo, fio) against the standalone NBD runner."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vspemu.client.nbd import NbdClient

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    path: Path
    size: int

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/0"

    def client(self) -> NbdClient:
        return NbdClient("127.0.0.1", self.port, "0")


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    started: list[Server] = []

    def start(size: int = 64 * MiB, path: Path | None = None) -> Server:
        path = path or tmp_path / "export.img"
        cmd = [sys.executable, "-m", "vspemu.volumes.nbd_main", "--file", str(path), "--size", str(size)]
        proc = subprocess.Popen([*cmd, "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("NBD listening on"), line
        server = Server(proc, int(line.rsplit(":", 1)[1]), path, size)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.terminate()
        server.proc.wait(10)


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def run(*cmd: str, timeout: float = 120) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def make_image(path: Path, size: int) -> bytes:
    """Random data with zero runs and holes (so clients use WRITE_ZEROES / TRIM where they like)."""
    data = bytearray(os.urandom(size))
    for start in range(0, size, 8 * MiB):
        data[start + MiB : start + 3 * MiB] = bytes(2 * MiB)
    data[size - 4096 - 123 : size - 123] = bytes(4096)
    path.write_bytes(data)
    return bytes(data)


def test_nbdinfo(start_server: StartServer) -> None:
    need("nbdinfo")
    server = start_server()
    info = json.loads(run("nbdinfo", "--json", server.uri))
    export = info["exports"][0]
    assert export["export-size"] == server.size
    assert export["can_flush"] and export["can_fua"] and export["can_trim"] and export["can_zero"]
    assert export["can_multi_conn"] and not export["is_read_only"]
    assert "0" in run("nbdinfo", "--list", server.uri)


def test_qemu_img_convert_round_trip(start_server: StartServer, tmp_path: Path) -> None:
    need("qemu-img")
    server = start_server()
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    data = make_image(src, server.size)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", str(src), server.uri)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(back))
    assert back.read_bytes() == data
    assert server.path.read_bytes() == data
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri)


def test_nbdcopy_round_trip(start_server: StartServer, tmp_path: Path) -> None:
    need("nbdcopy")
    server = start_server()
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    with server.client() as c:  # stale data that nbdcopy must overwrite (incl. the zero runs)
        c.write(0, b"\xee" * (4 * MiB))
    data = make_image(src, server.size)
    run("nbdcopy", "--flush", str(src), server.uri)
    back.write_bytes(b"")
    run("nbdcopy", server.uri, str(back))
    assert back.read_bytes() == data
    assert server.path.read_bytes() == data


def test_qemu_io_odd_offsets(start_server: StartServer) -> None:
    need("qemu-io")
    server = start_server()
    out = run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 1234 5555",
        "-c", "write -P 0xcd -f 7777777 333",  # -f: FUA
        "-c", "write -z 1300 100",  # WRITE_ZEROES inside the first range
        "-c", "aio_write -P 0x11 10000000 1000001",
        "-c", "aio_write -P 0x22 12000001 65537",
        "-c", "aio_flush",
        "-c", "flush",
        "-c", "read -P 0xab 1234 66",
        "-c", "read -P 0 1300 100",
        "-c", "read -P 0xab 1400 5389",
        "-c", "read -P 0 0 1234",
        "-c", "read -P 0 6789 1000",
        "-c", "read -P 0xcd 7777777 333",
        "-c", "read -P 0x11 10000000 1000001",
        "-c", "read -P 0x22 12000001 65537",
        "-c", "discard 1048576 1048576",
        "-c", "read -P 0 1048576 1048576",
        server.uri,
    )  # fmt: skip
    assert "Pattern verification failed" not in out, out
    with open(server.path, "rb") as f:
        f.seek(1234)
        assert f.read(66) == b"\xab" * 66


def test_fio_verify(start_server: StartServer) -> None:
    need("fio")
    server = start_server(size=256 * MiB)
    common = ["fio", "--ioengine=nbd", f"--uri={server.uri}", "--verify=crc32c", "--size=256M", "--group_reporting"]
    for args in (
        ["--name=rand", "--rw=randwrite", "--bs=64k", "--iodepth=16", "--numjobs=1"],
        ["--name=seq", "--rw=write", "--bs=1M", "--iodepth=8"],
        ["--name=mixed", "--rw=randwrite", "--bsrange=4k-512k", "--iodepth=32", "--verify_backlog=64"],
    ):
        out = run(*common, *args, "--output-format=json", timeout=300)
        result = json.loads(out[out.index("{") :])
        assert result["jobs"][0]["error"] == 0, out


def test_sigkill_after_acknowledged_flush(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    fua_data, flushed_data = os.urandom(3 * MiB), os.urandom(MiB + 17)
    with server.client() as c:
        c.write(5 * MiB, fua_data, fua=True)
        c.write(20 * MiB + 3, flushed_data)
        c.zero(30 * MiB, MiB, fua=True)
        c.flush()
    server.proc.kill()
    server.proc.wait(10)
    again = start_server(path=server.path)
    with again.client() as c:
        assert c.read(5 * MiB, len(fua_data)) == fua_data
        assert c.read(20 * MiB + 3, len(flushed_data)) == flushed_data
        assert c.read(30 * MiB, MiB) == bytes(MiB)
    if shutil.which("qemu-io"):
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 999 4097", "-c", "flush", again.uri)
        again.proc.kill()
        again.proc.wait(10)
        third = start_server(path=server.path)
        run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 999 4097", third.uri)


def test_fua_and_flush_call_fdatasync(tmp_path: Path) -> None:
    """Under strace: each FUA write / FLUSH is one fdatasync before the reply; plain writes none."""
    need("strace")
    trace = tmp_path / "trace.txt"
    cmd = [sys.executable, "-m", "vspemu.volumes.nbd_main", "--file", str(tmp_path / "x.img"), "--size", "1048576"]
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=fdatasync", "-o", str(trace), *cmd, "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])

        def syncs() -> int:
            return trace.read_text().count("fdatasync(")

        with NbdClient("127.0.0.1", port, "0") as c:
            before = syncs()
            for i in range(5):
                c.write(i * 4096, b"p" * 4096)
            assert syncs() == before
            c.write(0, b"f" * 4096, fua=True)
            assert syncs() == before + 1  # the reply came after fdatasync
            c.flush()
            assert syncs() == before + 2
            c.zero(8192, 4096, fua=True)
            assert syncs() == before + 3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # strace and the server it runs
        proc.wait(10)
