"""Universal Replicator 4 KiB random-write latency at QD1, next to an unpaired volume in the same run.

Usage: python bench/ur_qd1.py [--dir DIR] [--runtime 4] [--repeat 3]

Small writes are journaled with their data; writes of ``REF_MIN`` and more by reference (their data stays in
the P-VOL until the secondary pulls them). Run with ``VSPEMU_JOURNAL_BY_REFERENCE=0`` in the environment to
compare with a journal that stores every write.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import fio, print_table, start_linked
from ur_bench import ur_pair, wait_drained

from vspemu.replication.ur import BY_REFERENCE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-urqd1-"))
    p, s, pc, sc = start_linked(base, (482101, 482102))
    try:
        for c in (pc, sc):
            c.create_journal(1, [c.create_ldev("2G")])
        pv, sv, solo = pc.create_ldev("1G"), sc.create_ldev("1G"), pc.create_ldev("1G")
        for ldev in (pv, solo):
            pc.add_lun(ldev)
            fio(p.nbd_port, ldev, "write", "1M", 8, "1G", runtime=None)  # first touch, outside the runs
        ur_pair(pc, sc, "ur", pv, sv, 1)
        solo_lat: list[float] = []
        ur_lat: list[float] = []
        for _ in range(args.repeat):
            solo_lat.append(fio(p.nbd_port, solo, "randwrite", "4k", 1, "1G", runtime=args.runtime)["lat_us"])
            ur_lat.append(fio(p.nbd_port, pv, "randwrite", "4k", 1, "1G", runtime=args.runtime)["lat_us"])
            wait_drained(pc, "ur")
            time.sleep(0.5)
        med_s, med_u = statistics.median(solo_lat), statistics.median(ur_lat)
        print_table(f"UR 4 KiB random write, QD1 ({args.repeat} x {args.runtime} s; by reference: {BY_REFERENCE})",
                    ("volume", "mean latency, median (runs)", "baseline", "ratio"),
                    [("UR P-VOL (PAIR)", f"{med_u:.0f} us ({', '.join(f'{x:.0f}' for x in ur_lat)})",
                      f"unpaired {med_s:.0f} us ({', '.join(f'{x:.0f}' for x in solo_lat)})",
                      f"{med_u / med_s:.2f}x")])
    finally:
        for c in (pc, sc):
            c.close()
        for sp in (p, s):
            sp.stop()


if __name__ == "__main__":
    main()
