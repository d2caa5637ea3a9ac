"""The fault campaign: TrueCopy (each fence level) and Universal Replicator pairs under host writes, through
cycles of faults, each cycle checking the invariants of remote replication.

Kinds of fault, each cycle one of them while a host keeps writing over NBD:

- ``kill_p`` / ``kill_s``: kill -9 of the primary / the secondary, then a restart;
- ``cut_link``: the replication network (a veth pair between the two systems' network namespaces, REST and
  NBD on another network) goes down, then up (``ip link set ... down/up``); skipped without namespaces;
- ``close_ports``: the replication ports of one system (alternately the primary's and the secondary's) are
  taken offline and back online (vspemu's link-port route: listeners closed, connections dropped; iptables
  and nft are not available to close them otherwise).

Invariants, checked in every cycle (tests/faultlab.py holds the checks; each write stamps its sequence number,
volume and slot into its 4 KiB block, so images can be compared with the record of acknowledged writes):

- every acknowledged host write survives on the P-VOL (checked after the repair, e.g. after the restart of a
  killed primary);
- TrueCopy: while the fault holds, the S-VOL holds every write acknowledged while the pair showed PAIR (all
  writes acknowledged before the fault; with fence DATA or STATUS every acknowledged write, as a write that
  could not be copied must fail); the fault is noticed (PSUE) and the fence level decides whether writes
  continue (NEVER) or fail (DATA, and STATUS since the S side cannot be told over a cut link);
- Universal Replicator: the S-VOLs are always the image of a prefix of the write sequence (across both
  volumes of the journal);
- after the repair and the resync (or the journal catching up), S-VOL == P-VOL byte for byte.

CI runs one cycle of each kind per mode (``VSPEMU_FAULT_CYCLES`` cycles of each kind otherwise); figures of a
run go to the JSON-lines file ``VSPEMU_FAULT_REPORT`` if set (docs/faults.md has those of a 100-cycle run).
Run it alone: ``.venv/bin/python -m pytest -m faults tests/test_faults.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faultlab import (
    ACKED,
    FAILED,
    Netns,
    Violation,
    Writer,
    cleanup_stale,
    fill_initial,
    netns_unavailable,
    read_file_images,
    read_images,
    read_stable_images,
)

from vspemu.client import VspClient
from vspemu.lab import SystemProcess, link_systems, set_link_ports

pytestmark = pytest.mark.faults

CYCLES = int(os.environ.get("VSPEMU_FAULT_CYCLES", "1"))  # cycles of each kind of fault, per mode
REPORT = os.environ.get("VSPEMU_FAULT_REPORT")
SLOTS = 1024  # 4 KiB slots: 4 MiB volumes
KINDS = ("kill_p", "kill_s", "cut_link", "close_ports")
MODES = ("TC-NEVER", "TC-DATA", "TC-STATUS", "UR")
CG = "flt"
PRE = 0.8  # seconds of writes in PAIR before a fault
DURING = 1.5  # seconds of writes under the fault
PATH_TIMEOUT = 3  # timeoutValueForRemoteIOInSeconds of the path groups (a cut link is noticed within it)

_serials = iter(range(430001, 439999))


@dataclass
class Figures:
    mode: str
    topology: str
    cycles: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # total per kind
    max_seconds: dict[str, float] = field(default_factory=dict)  # the longest cycle per kind
    issued: int = 0
    acked: int = 0
    failed: int = 0
    pvol_checks: int = 0
    svol_checks: int = 0
    equal_checks: int = 0
    svol_writes_checked: int = 0
    ur_max_behind: int = 0
    resyncs: int = 0
    psue_seen: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


class Campaign:
    def __init__(self, mode: str, tmp: Path, net: Netns | None) -> None:
        self.mode = mode
        self.ur = mode == "UR"
        self.fence = None if self.ur else mode.split("-")[1]
        self.tmp = tmp
        self.net = net
        self.figures = Figures(mode, "netns" if net else "loopback")

    # -- set-up ------------------------------------------------------------------------------------------
    def _system(self, index: int) -> SystemProcess:
        serial = next(_serials)
        args = ["--min-remote-io-timeout", "1"]
        if self.net is not None:
            return self.net.system(index, self.tmp / f"sys-{serial}", serial, extra_args=args)
        return SystemProcess(self.tmp / f"sys-{serial}", serial, extra_args=args)

    def start(self) -> None:
        self.p, self.s = self._system(0).start(), self._system(1).start()
        self.pc, self.sc = self.p.client(), self.s.client()
        link_systems(self.pc, self.sc)
        for c, other in ((self.pc, self.s), (self.sc, self.p)):
            c.invoke("PATCH", f"remotepath-groups/{other.serial},R9,0",
                     {"timeoutValueForRemoteIOInSeconds": PATH_TIMEOUT})
        if self.ur:
            for c in (self.pc, self.sc):
                c.create_journal(1, [c.create_ldev("64M")])
                # the journal absorbs a cut or a restart shorter than a minute: the pairs stay PAIR
                c.invoke("PATCH", "journals/1", {"mirrorUnit": {"muNumber": 1, "pathBlockadeWatchInMinutes": 1}})
        self.pvols, self.svols = [], []
        for _ in range(2):
            for c, vols in ((self.pc, self.pvols), (self.sc, self.svols)):
                v = c.create_ldev(f"{SLOTS * 4 // 1024}M")
                c.add_lun(v)
                vols.append(v)
        fill_initial(self.p.host, self.p.nbd_port, self.pvols, SLOTS)
        for i, (pv, sv) in enumerate(zip(self.pvols, self.svols, strict=True)):
            body: dict[str, Any] = {
                "copyGroupName": CG, "copyPairName": f"f{i}", "replicationType": "UR" if self.ur else "TC",
                "remoteStorageDeviceId": self.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                "isNewGroupCreation": i == 0, "copyPace": 15}
            if self.ur:
                body.update(fenceLevel="ASYNC", isDataReductionForceCopy=True)
                if i == 0:
                    body.update(muNumber=1, pvolJournalId=1, svolJournalId=1)
            else:
                body["fenceLevel"] = self.fence
            self.pc.invoke("POST", "remote-mirror-copypairs", body, remote=self.sc)
        self.wait_pair()
        self.writer = Writer(self.p.host, lambda: self.p.nbd_port, self.pvols, SLOTS, seed=hash(self.mode) & 0xFFFF,
                             pause_s=0.001)
        self.writer.start()
        self.writer.pause()

    def close(self) -> None:
        w = getattr(self, "writer", None)
        if w is not None:
            w.stop()
        for c in (getattr(self, "pc", None), getattr(self, "sc", None)):
            if c is not None:
                c.close()
        for sysp in (getattr(self, "p", None), getattr(self, "s", None)):
            if sysp is not None:
                sysp.stop()

    # -- status --------------------------------------------------------------------------------------------
    @staticmethod
    def local_statuses(c: VspClient) -> set[str]:
        return {x["status"] for x in c.get("remote-copypairs")["data"]}

    def in_pair(self, statuses: set[str]) -> bool:
        return bool(statuses) and statuses <= ({"PAIR", "PFUL"} if self.ur else {"PAIR"})

    def wait_pair(self, timeout: float = 90.0) -> None:
        """Until both sides show PAIR for every pair, resyncing the group if the primary shows it suspended."""
        deadline = time.monotonic() + timeout
        resync_at = 0.0
        while True:
            ps, ss = self.local_statuses(self.pc), self.local_statuses(self.sc)
            if self.in_pair(ps) and self.in_pair(ss):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.mode}: the pairs did not return to PAIR: P {ps}, S {ss}")
            if ps & {"PSUE", "PSUS", "PFUS"} and time.monotonic() >= resync_at:
                self.pc.wait_path_status(f"{self.s.serial},R9,0", "NML_01", 30)
                gid = f"{self.s.storage_device_id},{CG},{CG}P_,{CG}S_"
                self.pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/resync/invoke",
                               {"parameters": {"replicationType": "UR" if self.ur else "TC"}}, remote=self.sc,
                               nowait=True)
                self.figures.resyncs += 1
                resync_at = time.monotonic() + 10
            time.sleep(0.1)

    def wait_drained(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while any(j["qCount"] for j in self.pc.get("journals", journalInfo="basic")["data"]):
            assert time.monotonic() < deadline, f"{self.mode}: the journal did not drain"
            time.sleep(0.05)

    def wait_primary_psue(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "PSUE" in self.local_statuses(self.pc):
                return True
            time.sleep(0.05)
        return False

    # -- one cycle ---------------------------------------------------------------------------------------
    def cycle(self, kind: str, index: int) -> None:
        f = self.figures
        t0 = time.monotonic()
        self.writer.resume()
        time.sleep(PRE)
        issued0, _ = self.writer.snapshot()
        paired = self.in_pair(self.local_statuses(self.pc))  # every write so far was acknowledged in PAIR
        closed = self.pc if index % 2 == 0 else self.sc
        if kind == "kill_p":
            self.p.kill()
        elif kind == "kill_s":
            self.s.kill()
        elif kind == "cut_link":
            assert self.net is not None
            self.net.set_link_network(False)
        else:
            set_link_ports(closed, False)
        time.sleep(DURING)

        # while the fault holds: the S-VOLs
        svol_images = None
        if kind == "kill_s":
            svol_images = read_file_images(self.s.data_dir, self.svols, SLOTS)  # what it restarts with
        elif kind in ("cut_link", "close_ports") and not self.ur:
            # the writes go on, so the primary notices: PSUE, and the fence level decides
            if not self.wait_primary_psue():
                raise Violation(f"{self.mode} {kind}: the primary did not suspend the pair")
            f.psue_seen[kind] = f.psue_seen.get(kind, 0) + 1
            _, acked_a = self.writer.snapshot()
            time.sleep(0.5)
            _, acked_b = self.writer.snapshot()
            if self.fence == "NEVER" and acked_b == acked_a:
                raise Violation(f"{self.mode} {kind}: writes are not accepted after PSUE with fence NEVER")
            if self.fence != "NEVER" and acked_b != acked_a:
                raise Violation(f"{self.mode} {kind}: {acked_b - acked_a} writes acknowledged after PSUE with "
                                f"fence {self.fence} and the secondary unreachable (the P-VOL must be fenced)")
        if svol_images is None:
            svol_images = read_stable_images(self.s.host, self.s.nbd_port, self.svols, SLOTS)
        with self.writer._lock:
            hist = self.writer.history
            if self.ur:
                j = hist.check_prefix(svol_images)
                f.ur_max_behind = max(f.ur_max_behind, hist.last_seq - j)
                f.svol_writes_checked += j
                f.svol_checks += 1
            elif paired:
                # every write acknowledged while the pair showed PAIR: all of them before the fault; with
                # DATA / STATUS all of them (one that could not be copied fails), and so for a dead primary
                upto = issued0 if self.fence == "NEVER" and kind != "kill_p" else hist.last_seq
                hist.check_survives(svol_images, upto, what="TC S-VOL")
                f.svol_writes_checked += upto
                f.svol_checks += 1

        # repair
        if kind == "kill_p":
            self.p.start()
            self.pc.close()
            self.pc = self.p.client()
        elif kind == "kill_s":
            self.s.start()
            self.sc.close()
            self.sc = self.s.client()
        elif kind == "cut_link":
            assert self.net is not None
            self.net.set_link_network(True)
        else:
            set_link_ports(closed, True)
        time.sleep(0.3)  # some writes after the repair too
        self.writer.pause()
        with self.writer._lock:
            self.writer.history.check_survives(read_images(self.p.host, self.p.nbd_port, self.pvols, SLOTS))
        f.pvol_checks += 1

        # heal: PAIR again (resync where suspended), journal drained; then S-VOL == P-VOL
        self.wait_pair()
        if self.ur:
            self.wait_drained()
        for pv, sv in zip(self.pvols, self.svols, strict=True):
            a = _read(self.p, pv)
            b = _read(self.s, sv)
            if a != b:
                raise Violation(f"{self.mode} {kind}: S-VOL {sv} differs from P-VOL {pv} after the resync")
        f.equal_checks += 1
        f.cycles[kind] = f.cycles.get(kind, 0) + 1
        took = time.monotonic() - t0
        f.seconds[kind] = round(f.seconds.get(kind, 0.0) + took, 2)
        f.max_seconds[kind] = round(max(f.max_seconds.get(kind, 0.0), took), 2)

    def finish(self) -> None:
        self.writer.pause()
        h = self.writer.history
        f = self.figures
        f.issued, f.acked, f.failed = h.last_seq, h.outcome.count(ACKED), h.outcome.count(FAILED)


def _read(sysp: SystemProcess, ldev: int) -> bytes:
    from vspemu.client.nbd import NbdClient

    with NbdClient(sysp.host, sysp.nbd_port, str(ldev)) as c:
        return c.read(0, SLOTS * 4096)


@pytest.fixture(scope="module")
def netns_reason() -> str | None:
    reason = netns_unavailable()
    if reason is None:
        cleanup_stale()
    return reason


@pytest.fixture
def campaign_net(netns_reason: str | None) -> Iterator[Netns | None]:
    if netns_reason is not None:
        yield None
        return
    with Netns(2, link_network=True) as net:
        yield net


@pytest.mark.timeout(180 + 240 * CYCLES)  # (a cycle takes some seconds; a hung one must still end the run)
@pytest.mark.parametrize("mode", MODES)
def test_fault_campaign(mode: str, tmp_path: Path, campaign_net: Netns | None) -> None:
    camp = Campaign(mode, tmp_path, campaign_net)
    kinds = [k for k in KINDS if k != "cut_link" or campaign_net is not None]
    try:
        camp.start()
        for i in range(CYCLES):
            for kind in kinds:
                try:
                    camp.cycle(kind, i)
                except AssertionError as e:
                    camp.figures.violations.append(f"cycle {i} {kind}: {e}")
                    raise
        camp.finish()
    finally:
        if REPORT:
            with open(REPORT, "a") as out:
                out.write(json.dumps(camp.figures.__dict__) + "\n")
        camp.close()
    assert sum(camp.figures.cycles.values()) == CYCLES * len(kinds)


def test_the_checks_find_violations() -> None:
    """The invariant checks themselves: a lost acknowledged write, a torn block, an image that is no prefix."""
    from faultlab import History, decode, stamp

    h = History(volumes=2, slots=4)
    for vol, slot, outcome in [(0, 1, ACKED), (1, 1, ACKED), (0, 1, FAILED), (0, 2, ACKED)]:  # writes 1-4
        h.target.append((vol, slot))
        h.outcome.append(outcome)
    ok = [[0, 1, 4, 0], [0, 2, 0, 0]]
    h.check_survives(ok)
    h.check_survives([[0, 3, 4, 0], [0, 2, 0, 0]])  # the failed write 3 may be there
    with pytest.raises(Violation, match="write 4 was acknowledged"):
        h.check_survives([[0, 1, 0, 0], [0, 2, 0, 0]])
    h.check_survives([[0, 1, 0, 0], [0, 2, 0, 0]], upto=3)  # (write 4 not required: after the fault)
    assert h.check_prefix([[0, 1, 0, 0], [0, 0, 0, 0]]) == 1
    assert h.check_prefix([[0, 1, 0, 0], [0, 2, 0, 0]]) == 2  # (3 failed: it may be missing)
    assert h.check_prefix([[0, 3, 0, 0], [0, 2, 0, 0]]) == 3
    with pytest.raises(Violation, match="not a prefix"):
        h.check_prefix([[0, 0, 0, 0], [0, 2, 0, 0]])  # 2 without 1
    with pytest.raises(Violation, match="not a prefix"):
        h.check_prefix([[0, 1, 4, 0], [0, 0, 0, 0]])  # 4 without 2
    with pytest.raises(Violation, match="not one of this slot"):
        h.check_prefix([[0, 1, 1, 0], [0, 0, 0, 0]])  # write 1 went to slot 1, not 2
    image = b"".join(stamp(0, 1, s) for s in range(4))
    assert decode(image, 1) == [0, 0, 0, 0]
    torn = image[:4096 + 512] + stamp(7, 1, 1)[512:4096] + image[8192:]
    with pytest.raises(Violation, match="slot 1"):
        decode(torn, 1)
    with pytest.raises(Violation, match="slot 0"):
        decode(image, 0)  # another volume's blocks


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chattr"), reason="needs chattr as root")
def test_fence_data_acknowledges_no_uncopied_write_at_queue_depth(make_system: Any) -> None:
    """Fence DATA: a write that could not be copied fails, and so does every later one. Sixteen writes in
    flight when the S-VOL starts failing (its file made immutable on the secondary: each copy gets an error):
    none may be acknowledged without being on the S-VOL. (They were, all but the first: the pair was fenced
    only after the S side had been told of the suspension, and the others failed meanwhile.)"""
    from vspemu.client.nbd import NbdClient
    from vspemu.nbdproto import CMD_WRITE

    p, s = make_system(), make_system()
    pc, sc = p.client(), s.client()
    link_systems(pc, sc)
    pv, sv = pc.create_ldev("16M"), sc.create_ldev("16M")
    pc.add_lun(pv)
    sc.add_lun(sv)
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": "qd", "copyPairName": "p", "replicationType": "TC",
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "DATA", "copyPace": 15}, remote=sc)
    svol_file = s.data_dir / "ldevs" / f"{sv:05d}.img"
    subprocess.run(["chattr", "+i", str(svol_file)], check=True)
    try:
        with NbdClient(p.host, p.nbd_port, str(pv)) as c:
            handles = {c.submit(CMD_WRITE, k * 65536, data=bytes([k + 1]) * 4096): k for k in range(16)}
            errors = {}
            for _ in handles:
                h, err, _ = c.reply()
                errors[handles[h]] = err
    finally:
        subprocess.run(["chattr", "-i", str(svol_file)], check=True)
    assert pc.get("remote-copypairs")["data"][0]["status"] == "PSUE"
    with NbdClient(s.host, s.nbd_port, str(sv)) as c:
        acked_not_copied = [k for k, err in errors.items()
                            if err == 0 and c.read(k * 65536, 4096) != bytes([k + 1]) * 4096]
    assert not acked_not_copied, f"writes {acked_not_copied} acknowledged but not on the S-VOL"
    pc.close()
    sc.close()
