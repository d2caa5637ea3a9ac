"""GAD failures under write load (issue 18): link cut, kill -9 of the P system, kill -9 of the S system.

Hosts write on both sides at once (two NBD writers per side, each on its own 2 MiB region, random 4 KiB-64 KiB
blocks at 4 KiB offsets, half with FUA, the others acknowledged by a flush after every few) and record each
acknowledged write. Mid-load the link is cut or one system is killed (SIGKILL: nothing flushed or closed).
Then:

* exactly one side keeps accepting writes (the other side's writers fail: Block, or their system is gone);
* every write acknowledged on either side before the failure, and every write the survivor acknowledged after
  it, reads back from the survivor's volume (per block the last acknowledged write wins). The writes a writer
  had not seen acknowledged when it failed are unknown: each of their 4 KiB blocks may hold old or new data.
* after the repair (or the restart) a resync (a swap resync when the S side took over) makes both volumes
  identical byte for byte.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.test_gad import GadLab, MiB, assert_blocked, glab  # noqa: F401 - the fixture
from tests.test_gad_quorum import cut, repair, wait_local
from vspemu.lab import SystemProcess

pytestmark = pytest.mark.timeout(600)

SIZE = 16 * MiB
REGION = 2 * MiB  # each writer's own region
BLOCK = 4096


@dataclass
class Writer:
    side: str
    ldev: int
    base: int  # the region's first byte
    seed: int
    image: bytearray = field(default_factory=lambda: bytearray(REGION), repr=False)  # the acknowledged content
    acks: list[float] = field(default_factory=list)  # monotonic time of each acknowledgement
    # the writes not acknowledged yet (in flight, or waiting for the flush) when the writer failed: (offset, data)
    unknown: list[tuple[int, bytes]] = field(default_factory=list, repr=False)
    error: BaseException | None = None

    def run(self, lab: GadLab, stop: threading.Event) -> None:
        """Half the writes with FUA (acknowledged by their reply); the others plain, acknowledged by the flush
        that follows every few of them."""
        rng = random.Random(self.seed)
        try:
            with lab.nbd(self.side, self.ldev) as c:
                while not stop.is_set():
                    length = rng.randrange(1, 17) * BLOCK
                    offset = rng.randrange(0, (REGION - length) // BLOCK + 1) * BLOCK
                    data = rng.randbytes(length)
                    fua = rng.random() < 0.5
                    self.unknown.append((offset, data))
                    c.write(self.base + offset, data, fua=fua)
                    if not fua and len(self.unknown) < 4:
                        continue
                    if not fua:
                        c.flush()
                    for off, d in self.unknown:
                        self.image[off:off + len(d)] = d
                    self.unknown.clear()
                    self.acks.append(time.monotonic())
        except BaseException as e:  # noqa: BLE001 - looked at by the test
            self.error = e

    def check(self, lab: GadLab, side: str, ldev: int) -> None:
        """Every acknowledged write reads back from ``side``'s volume; the unknown write's blocks are old or new."""
        with lab.nbd(side, ldev) as c:
            got = c.read(self.base, REGION)
        want = bytearray(self.image)
        for offset, data in self.unknown:  # not acknowledged: each block old, or new from any of them
            for b in range(0, len(data), BLOCK):
                if got[offset + b:offset + b + BLOCK] == data[b:b + BLOCK]:
                    want[offset + b:offset + b + BLOCK] = data[b:b + BLOCK]
        if got != want:
            bad = next(i for i in range(REGION) if got[i] != want[i])
            raise AssertionError(f"{self.side} writer {self.seed} ({len(self.acks)} acknowledged writes): "
                                 f"the {side} volume differs at +{bad:#x} of its region")


class Load:
    """Two writers per side, started together, stopped by ``finish``."""

    def __init__(self, lab: GadLab, pvol: int, svol: int) -> None:
        self.stop = threading.Event()
        self.writers = [Writer(side, vol, i * REGION, i)
                        for i, (side, vol) in enumerate([("p", pvol), ("s", svol)] * 2)]
        self.threads = [threading.Thread(target=w.run, args=(lab, self.stop), daemon=True) for w in self.writers]
        for t in self.threads:
            t.start()

    def side(self, side: str) -> list[Writer]:
        return [w for w in self.writers if w.side == side]

    def wait_acks(self, side: str, n: int, after: float = 0.0, timeout: float = 60.0) -> None:
        """Every writer of ``side`` has ``n`` writes acknowledged after time ``after``."""
        deadline = time.monotonic() + timeout
        while not all(sum(t > after for t in w.acks) >= n for w in self.side(side)):
            errors = [w.error for w in self.side(side) if w.error is not None]
            assert not errors, f"{side} side writers failed: {errors}"
            assert time.monotonic() < deadline, f"{side} side: {[len(w.acks) for w in self.side(side)]} writes"
            time.sleep(0.05)

    def wait_failed(self, side: str, timeout: float = 60.0) -> None:
        for t, w in zip(self.threads, self.writers, strict=True):
            if w.side == side:
                t.join(timeout)
                assert w.error is not None, f"{side} side writer {w.seed} still writes"

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)
            assert not t.is_alive(), "a writer hangs"

    def check(self, lab: GadLab, side: str, ldev: int) -> None:
        for w in self.writers:
            w.check(lab, side, ldev)


def restart(system: SystemProcess) -> None:
    if system.proc is None or system.proc.poll() is not None:
        system.start()


def paired(lab: GadLab) -> tuple[int, int]:
    pvol, svol = lab.volumes("16M")
    lab.create(pvol, svol)
    lab.wait("PAIR", "PAIR")
    return pvol, svol


def test_link_cut_under_write_load(glab: GadLab) -> None:  # noqa: F811
    lab = glab
    pvol, svol = paired(lab)
    load = Load(lab, pvol, svol)
    try:
        load.wait_acks("p", 20)
        load.wait_acks("s", 20)
        faults = cut(lab)
        t_cut = time.monotonic()
        # the S side's writers fail (Block); the P side's go on after the arbitration (Local)
        load.wait_failed("s")
        load.wait_acks("p", 30, after=t_cut)
        t_check = time.monotonic()
        load.wait_acks("p", 10, after=t_check)  # and keep going once the S side has failed
    finally:
        load.finish()
    assert all(w.error is None for w in load.side("p")), [w.error for w in load.side("p")]
    wait_local(lab, "p", ("PSUE", "Local"))
    wait_local(lab, "s", ("PSUE", "Block"))
    assert_blocked(lab, "s", svol)
    load.check(lab, "p", pvol)

    repair(lab, faults)
    lab.action("resync")
    info = lab.wait("PAIR", "PAIR", timeout=120)
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    assert lab.digest("p", pvol, SIZE) == lab.digest("s", svol, SIZE)
    load.check(lab, "s", svol)


def test_kill_primary_under_write_load(glab: GadLab) -> None:  # noqa: F811
    lab = glab
    pvol, svol = paired(lab)
    load = Load(lab, pvol, svol)
    try:
        load.wait_acks("p", 20)
        load.wait_acks("s", 20)
        lab.p.kill()
        t_kill = time.monotonic()
        load.wait_failed("p")  # their system is gone
        # the S side's writers wait for the arbitration (the P heartbeat stopped), then go on alone
        load.wait_acks("s", 20, after=t_kill)
    finally:
        load.finish()
        restart(lab.p)
    assert all(w.error is None for w in load.side("s")), [w.error for w in load.side("s")]
    wait_local(lab, "s", ("SSWS", "Local"))
    load.check(lab, "s", svol)  # every write acknowledged before the kill, on both sides, and the S side's after

    lab.pc.close()
    lab.pc = lab.p.client()
    wait_local(lab, "p", ("PSUE", "Block"))  # the P system back sees the S side's claim: it never serves beside it
    assert_blocked(lab, "p", pvol)
    lab.wait_paths()
    lab.action("resync", view="s", doSwapSvol=True)
    deadline = time.monotonic() + 120
    while (info := lab.pair(view="s"))["pvolStatus"] != "PAIR" or info["svolStatus"] != "PAIR":
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert info["pvolLdevId"] == svol and (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    assert lab.digest("p", pvol, SIZE) == lab.digest("s", svol, SIZE)
    load.check(lab, "p", pvol)


def test_kill_secondary_under_write_load(glab: GadLab) -> None:  # noqa: F811
    lab = glab
    pvol, svol = paired(lab)
    load = Load(lab, pvol, svol)
    try:
        load.wait_acks("p", 20)
        load.wait_acks("s", 20)
        lab.s.kill()
        t_kill = time.monotonic()
        load.wait_failed("s")
        load.wait_acks("p", 20, after=t_kill)  # the P side serves alone
    finally:
        load.finish()
        restart(lab.s)
    assert all(w.error is None for w in load.side("p")), [w.error for w in load.side("p")]
    wait_local(lab, "p", ("PSUE", "Local"))
    load.check(lab, "p", pvol)

    lab.sc.close()
    lab.sc = lab.s.client()
    wait_local(lab, "s", ("PSUE", "Block"))
    lab.wait_paths()
    lab.action("resync")
    info = lab.wait("PAIR", "PAIR", timeout=120)
    assert (info["pvolIOMode"], info["svolIOMode"]) == ("Mirror", "Mirror")
    assert lab.digest("p", pvol, SIZE) == lab.digest("s", svol, SIZE)
    load.check(lab, "s", svol)
