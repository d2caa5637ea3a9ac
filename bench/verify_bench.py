"""Online verify benchmark: verify of a pair vs ``sha256sum`` of both volume files, in the same run.

Usage: python bench/verify_bench.py [--size-gib 2] [--rounds 2] [--dir DIR]

A TrueCopy pair of a volume full of random data is created and copied (PAIR). Then, alternately (so that both
see the same page-cache state), the round is timed:
- ``vspemu verify`` of the pair (both systems hash their own volume in parallel; digests cross the link), with
  the default hash (sha1) and with blake2b;
- ``sha256sum P.img S.img``: one process hashing the two files one after the other (the baseline).
The ratio is baseline seconds / verify seconds (the target is at least 1x). The best round of each is kept.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import print_table, start_linked
from tc_bench import create_pair, fill, wait_pair

GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-verifybench-"))
    size = int(args.size_gib * GiB)
    p, s, pc, sc = start_linked(base, (450001, 450002))
    try:
        pv = pc.create_ldev(f"{size // 2**20}M")
        pc.add_lun(pv)
        sv = sc.create_ldev(f"{size // 2**20}M")
        fill(p.nbd_port, pv, size)
        create_pair(pc, sc, "vb", pv, sv)
        wait_pair(pc, "vb", sc)
        pid = f"{sc.storage_device_id},vb,vbP_,vbS_,p{pv}"
        files = [str(p.data_dir / "ldevs" / f"{pv:05d}.img"), str(s.data_dir / "ldevs" / f"{sv:05d}.img")]
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name in ("verify sha1", "verify blake2b", "sha256sum both"):
                t = time.perf_counter()
                if name == "sha256sum both":
                    subprocess.run(["sha256sum", *files], check=True, capture_output=True)
                else:
                    r = pc.verify(pid, sc, hash=name.split()[1])
                    assert r["differingTrackCount"] == 0, r
                dt = time.perf_counter() - t
                best[name] = min(best.get(name, dt), dt)
        base_s = best["sha256sum both"]
        rows = [(name, f"{secs:.2f}", f"{2 * size / secs / 2**20:.0f}", f"{base_s / secs:.2f}x")
                for name, secs in best.items()]
        print_table(f"verify of a {args.size_gib:g} GiB TC pair vs sha256sum of both files (best of "
                    f"{args.rounds})", ("what", "seconds", "MiB/s (both volumes)", "ratio vs sha256sum"), rows)
    finally:
        pc.close()
        sc.close()
        p.stop()
        s.stop()
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
