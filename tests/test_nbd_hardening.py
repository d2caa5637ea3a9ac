"""NBD hardening (issue 14): host access ends with the mapping, journal volumes refuse host I/O, and the
server's connection limits, handshake and idle timeouts and buffer budget."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from vspemu.client import VspClient, nbd as nbdc
from vspemu.client.nbd import NbdClient, NbdError, NbdOptionError
from vspemu.lab import SystemProcess


def _nbd(system: SystemProcess, ldev: int) -> NbdClient:
    return NbdClient("127.0.0.1", system.nbd_port, str(ldev), timeout=20)


def _dropped(c: NbdClient) -> None:
    """The server has dropped this connection: a request gets no answer but a closed socket."""
    with pytest.raises(OSError):  # ConnectionResetError, BrokenPipeError or ConnectionError("closed")
        c.write(0, b"x" * 4096)
        c.read(0, 4096)
    c.sock.close()


def _file_bytes(system: SystemProcess, ldev: int, offset: int, length: int) -> bytes:
    with open(system.data_dir / "ldevs" / f"{ldev:05d}.img", "rb") as f:
        f.seek(offset)
        return f.read(length)


# -- access ends with the mapping ---------------------------------------------------------------------------
def test_deleting_the_last_lu_path_drops_the_connection(system: SystemProcess, api: VspClient) -> None:
    ldev = api.create_ldev("16M")
    lun1 = api.add_lun(ldev, "CL1-A")
    lun2 = api.add_lun(ldev, "CL2-A")
    c = _nbd(system, ldev)
    c.write(0, b"a" * 4096)
    api.delete_lun(lun1)  # one path is left: the host keeps its access
    c.write(4096, b"b" * 4096)
    assert c.read(0, 8192) == b"a" * 4096 + b"b" * 4096
    api.delete_lun(lun2)  # the last one: the connection goes at once
    _dropped(c)
    with pytest.raises(NbdOptionError):  # and a new one is refused at the handshake
        _nbd(system, ldev)
    assert str(ldev) not in nbdc.list_exports("127.0.0.1", system.nbd_port)
    assert _file_bytes(system, ldev, 0, 8192) == b"a" * 4096 + b"b" * 4096  # nothing after the drop landed


def test_a_connection_never_reaches_a_new_ldev_with_the_same_id(system: SystemProcess, api: VspClient) -> None:
    """The review's reproduction: a host keeps its connection while the LU path and the LDEV are deleted and
    a new LDEV (here a journal volume) takes the id; before the fix the old connection wrote into it."""
    ldev = api.create_ldev("16M")
    lun = api.add_lun(ldev)
    c = _nbd(system, ldev)
    c.write(0, b"o" * 4096)
    api.delete_lun(lun)
    api.delete_ldev(ldev)
    assert api.create_ldev("32M", ldev_id=ldev) == ldev
    api.create_journal(7, [ldev])
    secret = b"stale host write " * 241
    with pytest.raises(OSError):
        c.write(8192, secret, fua=True)
        c.write(0, secret, fua=True)
    c.sock.close()
    assert secret[:4096] not in _file_bytes(system, ldev, 0, 64 << 10)
    assert _file_bytes(system, ldev, 0, 4096) != b"o" * 4096
    with pytest.raises(NbdOptionError):
        _nbd(system, ldev)


def test_a_deleted_and_recreated_ldev_reads_zeros(system: SystemProcess, api: VspClient) -> None:
    ldev = api.create_ldev("16M")
    lun = api.add_lun(ldev)
    c = _nbd(system, ldev)
    c.write(0, b"q" * 4096)
    api.delete_lun(lun)
    api.delete_ldev(ldev)
    api.create_ldev("16M", ldev_id=ldev)
    api.add_lun(ldev)
    with pytest.raises(OSError):
        c.write(0, b"w" * 4096, fua=True)
        c.read(0, 4096)
    c.sock.close()
    with _nbd(system, ldev) as fresh:
        assert fresh.read(0, 8192) == bytes(8192)


def test_journal_volumes_are_not_reachable_over_nbd(system: SystemProcess, api: VspClient) -> None:
    ldev = api.create_ldev("16M")
    api.create_journal(5, [ldev])
    assert str(ldev) not in nbdc.list_exports("127.0.0.1", system.nbd_port)
    with pytest.raises(NbdOptionError):
        _nbd(system, ldev)
    with pytest.raises(Exception, match="journal"):  # and it cannot be mapped (the journal's guard)
        api.add_lun(ldev)
    api.delete_journal(5)  # out of the journal it is an ordinary LDEV again
    api.add_lun(ldev)
    with _nbd(system, ldev) as c:
        c.write(0, b"j" * 512)
        assert c.read(0, 512) == b"j" * 512


# -- in process: the Volume / NbdServer contract ------------------------------------------------------------
class _Loop:
    """An NbdServer on a uvloop in a thread."""

    def __init__(self, lookup: Callable[[str], object], names: Callable[[], list[str]], **limits: object) -> None:
        import asyncio

        import uvloop

        from vspemu.volumes.nbd import NbdLimits, NbdServer

        self.loop = uvloop.new_event_loop()
        self.server = NbdServer(lookup, names, NbdLimits(**limits))  # type: ignore[arg-type]
        self.loop.run_until_complete(self.server.start("127.0.0.1", 0))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.server.port
        self._asyncio = asyncio

    def call(self, fn: Callable[[], object]) -> None:
        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (fn(), done.set()))
        assert done.wait(5)

    def stop(self) -> None:
        self._asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_refusing_host_io_drops_connections_and_refuses_new_ones(tmp_path: Path) -> None:
    """What a journal volume gets, even if a connection to it existed: dropped, and every request refused."""
    from vspemu.volumes.volume import Volume

    vol = Volume.create(3, tmp_path / "v", 1 << 20)
    srv = _Loop(lambda name: vol if name == "3" else None, lambda: ["3"])
    try:
        c = NbdClient("127.0.0.1", srv.port, "3")
        c.write(0, b"before")
        assert vol.host_connections == 1
        srv.call(lambda: vol.refuse_host_io("a journal volume accepts no host I/O"))
        _dropped(c)
        with pytest.raises(NbdOptionError):
            NbdClient("127.0.0.1", srv.port, "3")
        assert vol.read(0, 6) == b"before"
        srv.call(lambda: vol.refuse_host_io(None))
        with NbdClient("127.0.0.1", srv.port, "3") as c2:
            # refused again while this connection is open, but suppose the drop did not reach it: the
            # requests themselves are refused (EPERM), reads included
            srv.call(lambda: (setattr(vol, "host_io_refused", "journal"), None))
            for call in (lambda: c2.read(0, 6), lambda: c2.write(0, b"x"), c2.flush, lambda: c2.zero(0, 512)):
                with pytest.raises(NbdError) as e:
                    call()
                assert e.value.errno == nbdc.EPERM
        assert vol.read(0, 6) == b"before"
    finally:
        srv.stop()
        vol.close()


def test_a_removed_volume_drops_its_connections(tmp_path: Path) -> None:
    from vspemu.volumes.volume import Volume

    path = tmp_path / "v"
    vol = Volume.create(4, path, 1 << 20)
    srv = _Loop(lambda name: vol if name == "4" else None, lambda: ["4"])
    try:
        c = NbdClient("127.0.0.1", srv.port, "4")
        c.write(0, b"old")
        srv.call(vol.remove)
        Volume.create(4, path, 1 << 20).close()  # a new LDEV with the same id (same file name)
        _dropped(c)
        with pytest.raises(NbdOptionError):  # the lookup still finds the removed object: refused anyway
            NbdClient("127.0.0.1", srv.port, "4")
        assert path.read_bytes()[:3] == b"\0\0\0"
    finally:
        srv.stop()
