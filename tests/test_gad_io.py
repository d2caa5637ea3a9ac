"""GAD in PAIR: both volumes take host writes over NBD at once and end identical (issue 18).

Hosts write interleaved random blocks to both sides at the same time, many to the same small region so
writes from the two sides overlap; then both volumes are compared byte for byte. An acknowledged write is on
both volumes: read back from the other side at once, it is there.
"""

from __future__ import annotations

import os
import random
import threading

from tests.test_gad import GadLab, MiB, fill_random, glab  # noqa: F401 - the fixture

REGION = 4 * MiB  # the writes of both sides land here, so they overlap


def writer(lab: GadLab, side: str, ldev: int, seed: int, count: int, errors: list[BaseException],
           acked: list[tuple[str, int, bytes]]) -> None:
    rng = random.Random(seed)
    try:
        with lab.nbd(side, ldev) as c:
            for i in range(count):
                length = rng.choice((512, 4096, 16384, 65536, 262144))
                offset = rng.randrange(0, REGION - length) // 512 * 512
                data = rng.randbytes(length)
                if i % 50 == 49:
                    c.write(offset, data, fua=True)
                elif i % 97 == 0:
                    c.zero(offset, length)
                    data = bytes(length)
                else:
                    c.write(offset, data)
                acked.append((side, offset, data))
            c.flush()
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_both_sides_write_at_once_and_end_identical(glab: GadLab) -> None:  # noqa: F811
    lab = glab
    pvol, svol = lab.volumes("32M")
    with lab.nbd("p", pvol) as c:
        fill_random(c, 8 * MiB)
    lab.create(pvol, svol)
    lab.wait("PAIR", "PAIR")

    # an acknowledged write is on both volumes: written on one side, read at once from the other
    for side, other, vol, ovol in (("s", "p", svol, pvol), ("p", "s", pvol, svol)):
        data = os.urandom(65536)
        with lab.nbd(side, vol) as c:
            c.write(20 * MiB + 4096, data)
        with lab.nbd(other, ovol) as c:
            assert c.read(20 * MiB + 4096, 65536) == data

    # two writers per side, all at once, on one 4 MiB region
    errors: list[BaseException] = []
    acked: list[tuple[str, int, bytes]] = []
    threads = [threading.Thread(target=writer, args=(lab, side, vol, seed, 400, errors, acked))
               for seed, (side, vol) in enumerate([("p", pvol), ("s", svol)] * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(acked) == 2400
    assert lab.digest("p", pvol, 32 * MiB) == lab.digest("s", svol, 32 * MiB)
    info = lab.pair()
    assert (info["pvolStatus"], info["svolStatus"], info["pvolIOMode"], info["svolIOMode"]) == \
        ("PAIR", "PAIR", "Mirror", "Mirror")


def test_s_side_writes_reach_the_p_volume(glab: GadLab) -> None:  # noqa: F811
    """The S side's writes reach the P side as gad.write (not written on the S side first): after S-only
    writes, the P-VOL holds them and the S-VOL equals it."""
    lab = glab
    pvol, svol = lab.volumes("16M")
    lab.create(pvol, svol)
    lab.wait("PAIR", "PAIR")
    blocks: dict[int, bytes] = {}
    with lab.nbd("s", svol) as c:
        for i in range(64):
            blocks[i * 65536] = os.urandom(65536)
            c.write(i * 65536, blocks[i * 65536])
        c.flush()
    with lab.nbd("p", pvol) as c:
        for off, data in blocks.items():
            assert c.read(off, len(data)) == data
    assert lab.digest("p", pvol, 16 * MiB) == lab.digest("s", svol, 16 * MiB)
