"""GAD quorum arbitration (issue 18): when the two systems lose each other exactly one side keeps serving.

Link cut with the fault facility (the path groups of both systems held down, docs/faults-on-demand.md): the
P side claims the pairs on the quorum volume of the third system and serves alone (PSUE, I/O mode Local), the
S side sees the P side alive on the quorum and goes Block (host reads and writes refused). After the repair
a resync from the P side makes the volumes identical. A whole P system lost: its heartbeat stops on the
quorum, the S side claims and serves (SSWS, Local); the P system back is Block, and a swap resync makes the S
side the primary with both volumes identical again. Quorum-less: the P side wins a link loss.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from tests.conftest import MakeSystem
from tests.test_gad import GadLab, MiB, assert_blocked, fill_random, glab, make_gad_lab  # noqa: F401
from vspemu.client.nbd import NbdClient, NbdError
from vspemu.replication.gad_io import CLAIM
from vspemu.system.quorum import SLOT_SIZE, QuorumSlot, slot_of, slot_offset

pytestmark = pytest.mark.timeout(600)


def cut(lab: GadLab) -> list[tuple[Any, int]]:
    """Hold every path between p and s down, both directions."""
    return [(c, c.add_fault("path-group", remoteSerialNumber=other.serial)["faultId"])
            for c, other in ((lab.pc, lab.s), (lab.sc, lab.p))]


def repair(lab: GadLab, faults: list[tuple[Any, int]]) -> None:
    """Clear the faults and wait until every path works again."""
    for c, fid in faults:
        c.clear_fault(fid)
    lab.wait_paths()


def slot(lab: GadLab, qldev: int, who: str) -> QuorumSlot | None:
    me, partner = (lab.p, lab.s) if who == "p" else (lab.s, lab.p)
    with NbdClient("127.0.0.1", lab.q.nbd_port, str(qldev)) as c:
        return QuorumSlot.unpack(c.read(slot_offset(slot_of(me.serial, partner.serial)), SLOT_SIZE))


def quorum_ldev(lab: GadLab) -> int:
    return int(lab.pc.private("GET", "external-volumes")["data"][0]["externalLdevId"])


def wait_local(lab: GadLab, view: str, want: tuple[str, str], timeout: float = 60.0) -> dict[str, Any]:
    """This side's own view (no Remote-Authorization: the other side may be unreachable)."""
    deadline = time.monotonic() + timeout
    while True:
        info = lab.pair(view=view, local=True)
        got = (info["pvolStatus"], info["pvolIOMode"]) if view == "p" else (info["svolStatus"], info["svolIOMode"])
        if got == want:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"{view} side: {got}, not {want}")
        time.sleep(0.2)


def test_link_cut_one_side_serves(glab: GadLab) -> None:  # noqa: F811
    lab = glab
    pvol, svol = lab.volumes("16M")
    with lab.nbd("p", pvol) as c:
        fill_random(c, 4 * MiB)
    lab.create(pvol, svol)
    lab.wait("PAIR", "PAIR")
    qldev = quorum_ldev(lab)

    faults = cut(lab)
    # hosts write on both sides at once while the link is cut: the P side's write waits for the arbitration
    # and succeeds (it serves alone); the S side's write fails (Block)
    results: dict[str, BaseException | None] = {}

    def write(side: str, ldev: int) -> None:
        try:
            with lab.nbd(side, ldev) as c:
                c.write(MiB, os.urandom(65536))
                c.flush()
            results[side] = None
        except (NbdError, OSError) as e:
            results[side] = e

    threads = [threading.Thread(target=write, args=a) for a in (("p", pvol), ("s", svol))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["p"] is None and results["s"] is not None, results
    wait_local(lab, "p", ("PSUE", "Local"))
    wait_local(lab, "s", ("PSUE", "Block"))
    assert_blocked(lab, "s", svol)
    pslot = slot(lab, qldev, "p")
    assert pslot is not None and pslot.flags & CLAIM and pslot.epoch >= 1  # the P side's claim on q's volume
    with lab.nbd("p", pvol) as c:  # the P side keeps serving
        c.write(2 * MiB, os.urandom(MiB))
        c.flush()

    repair(lab, faults)
    lab.action("resync")
    info = lab.wait("PAIR", "PAIR", timeout=120)
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    assert lab.digest("p", pvol, 16 * MiB) == lab.digest("s", svol, 16 * MiB)
    deadline = time.monotonic() + 20
    while (ps := slot(lab, qldev, "p")) is not None and ps.flags & CLAIM:  # the claim is withdrawn in PAIR
        assert time.monotonic() < deadline, "the claim stays"
        time.sleep(0.2)
    # and both sides write again
    with lab.nbd("s", svol) as c:
        c.write(3 * MiB, os.urandom(65536))
    assert lab.digest("p", pvol, 16 * MiB) == lab.digest("s", svol, 16 * MiB)


def test_primary_system_lost_the_secondary_takes_over(glab: GadLab) -> None:  # noqa: F811
    lab = glab
    pvol, svol = lab.volumes("16M")
    with lab.nbd("p", pvol) as c:
        fill_random(c, 4 * MiB)
    lab.create(pvol, svol)
    lab.wait("PAIR", "PAIR")
    qldev = quorum_ldev(lab)
    lab.p.stop()  # the whole P system: its heartbeat on the quorum stops
    try:
        with lab.nbd("s", svol) as c:  # waits for the arbitration, then the S side serves alone
            c.write(MiB, os.urandom(65536))
            c.flush()
        wait_local(lab, "s", ("SSWS", "Local"))
        sslot = slot(lab, qldev, "s")
        assert sslot is not None and sslot.flags & CLAIM
        with lab.nbd("s", svol) as c:
            c.write(2 * MiB, os.urandom(MiB))
            c.flush()
    finally:
        lab.p.start()
    lab.pc.close()
    lab.pc = lab.p.client()
    # the P system back: it sees the S side's claim and stays Block; it never serves beside the S side
    wait_local(lab, "p", ("PSUE", "Block"))
    assert_blocked(lab, "p", pvol)
    lab.wait_paths()
    # the way back: a swap resync issued on the S side (it becomes the primary and copies its differences)
    lab.action("resync", view="s", doSwapSvol=True)
    deadline = time.monotonic() + 120
    while True:
        info = lab.pair(view="s")
        if (info["pvolStatus"], info["svolStatus"]) == ("PAIR", "PAIR"):
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert info["pvolLdevId"] == svol and (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    assert lab.digest("p", pvol, 16 * MiB) == lab.digest("s", svol, 16 * MiB)


def test_quorum_less_the_primary_wins(make_system: MakeSystem) -> None:
    lab = make_gad_lab(make_system, quorum_less=True)
    try:
        pvol, svol = lab.volumes("16M")
        lab.create(pvol, svol)
        info = lab.wait("PAIR", "PAIR")
        assert info["quorumDiskId"] == 0
        faults = cut(lab)
        # no host I/O: the status polls find the link dead and both sides decide
        wait_local(lab, "p", ("PSUE", "Local"))
        wait_local(lab, "s", ("PSUE", "Block"))
        with lab.nbd("p", pvol) as c:
            c.write(0, os.urandom(MiB))
        repair(lab, faults)
        lab.action("resync")
        lab.wait("PAIR", "PAIR", timeout=120)
        assert lab.digest("p", pvol, 16 * MiB) == lab.digest("s", svol, 16 * MiB)
    finally:
        lab.close()


def test_link_and_quorum_lost_neither_side_serves(glab: GadLab) -> None:  # noqa: F811
    """The quorum system and the link both gone: neither side can make sure the other does not serve, so both
    go Block (the plan's rule: never both Local); back, a resync from the P side restores Mirror."""
    lab = glab
    pvol, svol = lab.volumes("16M")
    lab.create(pvol, svol)
    lab.wait("PAIR", "PAIR")
    lab.q.stop()
    try:
        faults = cut(lab)
        with pytest.raises((NbdError, OSError)), lab.nbd("p", pvol) as c:
            c.write(0, os.urandom(4096))
        wait_local(lab, "p", ("PSUE", "Block"))
        wait_local(lab, "s", ("PSUE", "Block"))
        assert_blocked(lab, "s", svol)
    finally:
        lab.q.start()
    repair(lab, faults)
    lab.action("resync")
    info = lab.wait("PAIR", "PAIR", timeout=120)
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    assert lab.digest("p", pvol, 16 * MiB) == lab.digest("s", svol, 16 * MiB)
