"""Crash windows and secrets on disk (issue 14).

The crash tests kill a storage system at an exact point of an operation: ``VSPEMU_TEST_CRASH_AT`` in its
environment makes it ``os._exit(9)`` there (see vspemu/crashpoints.py), then it is started again and the
S-VOL must end equal to the P-VOL.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from vspemu.certs import ensure_certificate
from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, link_systems, volume_digest
from vspemu.replication.bitmap import _HEADER, _MAGIC, DirtyBitmap, tracks_for

MiB = 1 << 20
SIZE = 32 * MiB
CG = "crg"
CRASH_ENV = "VSPEMU_TEST_CRASH_AT"

MakeSystem = Callable[..., SystemProcess]


# -- bitmap files that cannot be trusted load as all marked ------------------------------------------------
def _write_bitmap_file(path: Path, ntracks: int, bits: bytes) -> None:
    path.write_bytes(_MAGIC + ntracks.to_bytes(8, "little") + bits)


@pytest.mark.parametrize("content", [
    pytest.param(b"VSPBMAP0" + (128).to_bytes(8, "little") + b"\0" * 16, id="unknown-magic"),
    pytest.param(b"", id="empty"),
    pytest.param(_MAGIC + b"\x80", id="truncated-header"),
    pytest.param(_MAGIC + (128).to_bytes(8, "little") + b"\0" * 5, id="truncated-bits"),
    pytest.param(_MAGIC + (128).to_bytes(8, "little") + b"\0" * 17, id="too-long"),
])
def test_invalid_bitmap_file_loads_all_marked(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "00001.mu0.bmp"
    path.write_bytes(content)
    size = 128 * 256 * 1024 - 4096  # 128 tracks, the last one partial
    bm = DirtyBitmap.open(path, size)
    assert bm.count() == tracks_for(size) == 128
    bm.close()
    again = DirtyBitmap.open(path, size)  # and it was rewritten as a valid, all-marked file
    assert again.count() == 128
    again.close()


def test_valid_bitmap_file_keeps_its_marks(tmp_path: Path) -> None:
    path = tmp_path / "00001.mu0.bmp"
    bits = np.zeros(16, dtype=np.uint8)
    bits[0], bits[15] = 0b101, 0x80
    _write_bitmap_file(path, 128, bits.tobytes())
    bm = DirtyBitmap.open(path, 128 * 256 * 1024)
    assert list(bm.tracks()) == [0, 2, 127]
    bm.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # rewritten 0600


def test_bitmap_created_0600_even_with_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        bm = DirtyBitmap.create(tmp_path / "b.bmp", 10 * MiB, marked=True)
    finally:
        os.umask(old)
    assert bm.count() == 40
    bm.close()
    assert stat.S_IMODE((tmp_path / "b.bmp").stat().st_mode) == 0o600


# -- kill -9 at pair create and resync ----------------------------------------------------------------------
def _fill(nbd_port: int, ldev: int, chunks: list[tuple[int, int]]) -> None:
    with NbdClient("127.0.0.1", nbd_port, str(ldev)) as c:
        for off, length in chunks:
            c.write(off, os.urandom(length))
        c.flush()


def _pair_statuses(pc: VspClient, sc: VspClient, s: SystemProcess) -> tuple[str, str]:
    info = pc.get(f"remote-mirror-copypairs/{s.storage_device_id},{CG},{CG}P_,{CG}S_,p1", remote=sc)
    return info["pvolStatus"], info["svolStatus"]


def _wait_pair(pc: VspClient, sc: VspClient, s: SystemProcess, want: tuple[str, str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (got := _pair_statuses(pc, sc, s)) != want:
        assert time.monotonic() < deadline, got
        time.sleep(0.2)


def _crash_lab(make_system: MakeSystem, monkeypatch: pytest.MonkeyPatch, point: str
               ) -> tuple[SystemProcess, SystemProcess, VspClient, VspClient]:
    """A primary that crashes at ``point`` and a secondary, linked."""
    monkeypatch.setenv(CRASH_ENV, point)
    p = make_system()
    monkeypatch.delenv(CRASH_ENV)
    s = make_system()
    pc, sc = p.client(), s.client()
    link_systems(pc, sc)
    return p, s, pc, sc


def _volumes(p: SystemProcess, s: SystemProcess, pc: VspClient, sc: VspClient) -> tuple[int, int]:
    pv, sv = pc.create_ldev("32M"), sc.create_ldev("32M")
    pc.add_lun(pv)
    sc.add_lun(sv)
    # data the initial copy must bring over, and data on the S-VOL where the P-VOL has none (to be zeroed)
    _fill(p.nbd_port, pv, [(0, 3 * MiB), (12 * MiB + 4096, 2 * MiB), (SIZE - MiB, MiB)])
    _fill(s.nbd_port, sv, [(20 * MiB, MiB)])
    return pv, sv


def _create_body(kind: str, s: SystemProcess, pv: int, sv: int) -> dict[str, object]:
    body: dict[str, object] = {"copyGroupName": CG, "copyPairName": "p1", "replicationType": kind,
                               "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv,
                               "svolLdevId": sv, "isNewGroupCreation": True, "copyPace": 15}
    if kind == "TC":
        body["fenceLevel"] = "NEVER"
    else:
        body.update(fenceLevel="ASYNC", doInitialCopy=True, isDataReductionForceCopy=True, muNumber=1,
                    pvolJournalId=1, svolJournalId=1)
    return body


def _crash_in(p: SystemProcess, action: Callable[[], object]) -> None:
    """Run an action that makes the primary reach its crash point; wait until the process is gone."""
    with pytest.raises(Exception):  # noqa: B017 - the connection drops, or the job is lost with the process
        action()
    assert p.proc is not None
    assert p.proc.wait(timeout=60) == 9


def _journals(pc: VspClient, sc: VspClient) -> None:
    for c in (pc, sc):
        c.create_journal(1, [c.create_ldev("64M")])


def _crash_at_create(make_system: MakeSystem, monkeypatch: pytest.MonkeyPatch, kind: str,
                     between: Callable[[SystemProcess, int], None] | None = None) -> None:
    p, s, pc, sc = _crash_lab(make_system, monkeypatch, "pair-create-after-commit")
    if kind == "UR":
        _journals(pc, sc)
    pv, sv = _volumes(p, s, pc, sc)
    want = volume_digest(p.nbd_port, pv, SIZE)
    assert volume_digest(s.nbd_port, sv, SIZE) != want
    _crash_in(p, lambda: pc.invoke("POST", "remote-mirror-copypairs", _create_body(kind, s, pv, sv), remote=sc))
    pc.close()
    if between is not None:
        between(p, pv)
    p.start()
    with p.client() as pc2:
        _wait_pair(pc2, sc, s, ("PAIR", "PAIR"))
        assert volume_digest(p.nbd_port, pv, SIZE) == want
        assert volume_digest(s.nbd_port, sv, SIZE) == want
    sc.close()


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["TC", "UR"])
def test_kill_after_pair_record_commit_still_copies(make_system: MakeSystem, monkeypatch: pytest.MonkeyPatch,
                                                     kind: str) -> None:
    """The pair record (COPY) is committed, the process dies: its bitmap was durable before, so after the
    restart the initial copy runs and the data written before the create reaches the S-VOL."""
    _crash_at_create(make_system, monkeypatch, kind)


@pytest.mark.e2e
def test_kill_before_pair_record_commit_leaves_no_pair(make_system: MakeSystem,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the bitmap is written but before the record commits: no pair on the primary, and the same
    create issued again (the secondary already holds its record) makes the pair and copies."""
    p, s, pc, sc = _crash_lab(make_system, monkeypatch, "pair-create-before-commit")
    pv, sv = _volumes(p, s, pc, sc)
    want = volume_digest(p.nbd_port, pv, SIZE)
    body = _create_body("TC", s, pv, sv)
    _crash_in(p, lambda: pc.invoke("POST", "remote-mirror-copypairs", body, remote=sc))
    pc.close()
    p.start()
    with p.client() as pc2:
        groups = pc2.get("remote-mirror-copygroups", remote=sc, remoteStorageDeviceId=s.storage_device_id)
        assert groups["data"] == []
        assert "HORC" not in str(pc2.get(f"ldevs/{pv}"))
        pc2.invoke("POST", "remote-mirror-copypairs", body, remote=sc)
        _wait_pair(pc2, sc, s, ("PAIR", "PAIR"))
        assert volume_digest(s.nbd_port, sv, SIZE) == want
    sc.close()


@pytest.mark.e2e
def test_recovered_copy_pair_with_clean_bitmap_copies_everything(make_system: MakeSystem,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A COPY pair whose copy never started and whose bitmap holds no mark (as an earlier version left it
    after a crash at create) is recovered as all marked."""
    def lose_marks(p: SystemProcess, pv: int) -> None:
        path = p.data_dir / "bitmaps" / f"{pv:05d}.mu0.bmp"
        ntracks = tracks_for(SIZE)
        _write_bitmap_file(path, ntracks, bytes(-(-ntracks // 8)))
        assert path.stat().st_size == _HEADER + ntracks // 8

    _crash_at_create(make_system, monkeypatch, "TC", lose_marks)


@pytest.mark.e2e
def test_kill_during_resync_after_the_secondary_cleared_its_bitmap(make_system: MakeSystem,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A resync merges the S side's bitmap, then tells the S side to clear its own: the merge is durable
    first, so a crash right after the S side cleared loses none of the S-VOL's changes."""
    p, s, pc, sc = _crash_lab(make_system, monkeypatch, "pair-resync-after-clear")
    pv, sv = _volumes(p, s, pc, sc)
    pc.invoke("POST", "remote-mirror-copypairs", _create_body("TC", s, pv, sv), remote=sc)
    _wait_pair(pc, sc, s, ("PAIR", "PAIR"))
    pid = f"{s.storage_device_id},{CG},{CG}P_,{CG}S_,p1"
    pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/split/invoke",
              {"parameters": {"replicationType": "TC", "svolAccessMode": "rw"}}, remote=sc)
    _wait_pair(pc, sc, s, ("PSUS", "SSUS"))
    _fill(s.nbd_port, sv, [(5 * MiB, MiB)])  # only the S side's bitmap knows of this change
    _crash_in(p, lambda: pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/resync/invoke",
                                   {"parameters": {"replicationType": "TC"}}, remote=sc))
    pc.close()
    p.start()
    with p.client() as pc2:
        _wait_pair(pc2, sc, s, ("PSUS", "SSUS"))  # the S side learns that the primary never went COPY
        pc2.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/resync/invoke",
                   {"parameters": {"replicationType": "TC"}}, remote=sc)
        _wait_pair(pc2, sc, s, ("PAIR", "PAIR"))
        assert volume_digest(s.nbd_port, sv, SIZE) == volume_digest(p.nbd_port, pv, SIZE)
    sc.close()


# -- secrets on disk and in the process list ----------------------------------------------------------------
def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)) or ".": stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.e2e
def test_data_dir_0700_and_every_file_0600(make_system: MakeSystem, tmp_path: Path) -> None:
    """After two systems ran with a UR pair (bitmaps, journals, LDEV images, the configuration database with
    its WAL, the TLS key): the data directories are 0700, every directory in them 0700, every file 0600; an
    existing lax data directory is tightened at start."""
    lax = tmp_path / "sys-430001"
    (lax / "ldevs").mkdir(parents=True)
    os.chmod(lax, 0o755)
    os.chmod(lax / "ldevs", 0o755)
    (lax / "stray").write_bytes(b"x")
    os.chmod(lax / "stray", 0o644)
    old = os.umask(0o022)  # as a user's shell would have it
    try:
        p, s = make_system(serial=430001), make_system()
    finally:
        os.umask(old)
    with p.client() as pc, s.client() as sc:
        link_systems(pc, sc)
        _journals(pc, sc)
        pv, sv = _volumes(p, s, pc, sc)
        pc.invoke("POST", "remote-mirror-copypairs", _create_body("UR", s, pv, sv), remote=sc)
        _wait_pair(pc, sc, s, ("PAIR", "PAIR"))
        _fill(p.nbd_port, pv, [(7 * MiB, MiB)])
        for system in (p, s):
            modes = _modes(system.data_dir)
            names = set(modes)
            assert {"config.sqlite3", "config.sqlite3-wal", "tls/server.key", "bitmaps"} <= names, names
            assert any(n.startswith("bitmaps/") for n in names), names
            assert any(n.startswith("ldevs/") for n in names), names
            wrong = {n: oct(m) for n, m in modes.items()
                     if m != (0o700 if (system.data_dir / n).is_dir() else 0o600)}
            assert not wrong, wrong


@pytest.mark.e2e
def test_lab_password_not_in_the_process_list(make_system: MakeSystem) -> None:
    secret = "pw-" + os.urandom(6).hex()
    p = make_system(password=secret)
    assert p.proc is not None
    cmdline = Path(f"/proc/{p.proc.pid}/cmdline").read_bytes()
    assert secret.encode() not in cmdline
    assert b"--password" not in cmdline
    with p.client(password=secret) as c:
        assert c.get("ldevs", count=1) is not None
    with pytest.raises(ApiError) as refused:  # the default password is refused
        p.client(password="raid-maintenance")
    assert refused.value.status == 401


@pytest.mark.e2e
def test_password_file(make_system: MakeSystem, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSPEMU_PASSWORD", "not-this-one")  # the file wins over the environment
    secret = "file-" + os.urandom(6).hex()
    f = tmp_path / "pw"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, secret.encode() + b"\n")
    os.close(fd)
    p = make_system(extra_args=["--password-file", str(f)])
    with p.client(password=secret) as c:
        assert c.get("ldevs", count=1) is not None
    for wrong in ("not-this-one", "raid-maintenance"):
        with pytest.raises(ApiError) as refused:
            p.client(password=wrong)
        assert refused.value.status == 401


def test_tls_key_never_readable_by_others(tmp_path: Path) -> None:
    """The key is created 0600 in a new file: a reader who opened a world-readable leftover temporary file
    (or the file before a chmod) gets nothing of it."""
    tls = tmp_path / "tls"
    tls.mkdir()
    stale = tls / "server.tmp"
    stale.write_bytes(b"")
    os.chmod(stale, 0o644)
    old = os.umask(0o022)
    try:
        with open(stale, "rb") as reader:
            ensure_certificate(tls / "server.crt", tls / "server.key", "vspemu-test", ["127.0.0.1"])
            assert b"PRIVATE KEY" not in reader.read()
    finally:
        os.umask(old)
    assert b"PRIVATE KEY" in (tls / "server.key").read_bytes()
    assert stat.S_IMODE((tls / "server.key").stat().st_mode) == 0o600
