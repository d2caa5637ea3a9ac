"""ShadowImage benchmark: the initial copy of a volume full of data vs ``cp`` and ``dd conv=fdatasync`` of the
same file in the same run, and a resync after 1% of the P-VOL changed.

Usage: python bench/shadowimage_bench.py [--size-gib 1] [--rounds 2] [--dir DIR]

One storage system; a P-VOL filled with random data over NBD and an S-VOL of the same size. Each round,
alternately (so both see the same page-cache state):
- the ShadowImage create (copyPace 15) until PAIR, timed from the request to the job's completion (the job
  waits for the copy), then the pair is deleted;
- ``cp --sparse=always P.img X`` followed by ``sync -f X``, and ``dd if=P.img of=X bs=4M conv=fdatasync``.
Then: the pair is created once more, split, 1% of the P-VOL's tracks (spread over the volume, 4 KiB each) are
written over NBD, and the resync is timed until PAIR (only the marked tracks are copied).
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import print_table
from tc_bench import fill

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess

GiB = 1 << 30
MiB = 1 << 20
TRACK = 256 << 10


def create(c: VspClient, pv: int, sv: int) -> None:
    c.invoke("POST", "local-clone-copypairs", {
        "copyGroupName": "bench", "copyPairName": "p1", "replicationType": "SI", "pvolLdevId": pv,
        "svolLdevId": sv, "isNewGroupCreation": True, "copyPace": 15})


PAIR_ID = "bench,benchP_,benchS_,p1"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-sibench-"))
    size = int(args.size_gib * GiB) // TRACK * TRACK
    p = SystemProcess(base / "p", 460001, extra_args=["--log-level", "warning"])
    try:
        p.start()
        c = p.client()
        pv = c.create_ldev(f"{size // MiB}M")
        c.add_lun(pv)
        sv = c.create_ldev(f"{size // MiB}M")
        c.add_lun(sv)
        fill(p.nbd_port, pv, size)
        src = p.data_dir / "ldevs" / f"{pv:05d}.img"
        dst = base / "copy.img"
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name in ("ShadowImage initial copy", "cp + sync", "dd conv=fdatasync bs=4M"):
                dst.unlink(missing_ok=True)
                t = time.perf_counter()
                if name.startswith("ShadowImage"):
                    create(c, pv, sv)
                    el = time.perf_counter() - t
                    c.invoke("DELETE", f"local-clone-copypairs/{PAIR_ID}")
                elif name.startswith("cp"):
                    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
                    subprocess.run(["sync", "-f", str(dst)], check=True)
                    el = time.perf_counter() - t
                else:
                    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=4M", "conv=fdatasync", "status=none"],
                                   check=True)
                    el = time.perf_counter() - t
                best[name] = min(best.get(name, el), el)
        dst.unlink(missing_ok=True)
        # resync after 1% of the tracks changed
        create(c, pv, sv)
        c.invoke("POST", f"local-clone-copypairs/{PAIR_ID}/actions/split/invoke", {"parameters": {"copyPace": 15}})
        tracks = size // TRACK
        changed = random.Random(1).sample(range(tracks), max(1, tracks // 100))
        with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as n:
            for t in changed:
                n.write(t * TRACK, random.randbytes(4096))
            n.flush()
        t0 = time.perf_counter()
        c.invoke("POST", f"local-clone-copypairs/{PAIR_ID}/actions/resync/invoke", {"parameters": {"copyPace": 15}})
        resync = time.perf_counter() - t0
        stats = c.raw("GET", "vspemu/v1/local-clone/stats", headers=c.headers()).json()["pairs"][PAIR_ID]
        mib = size / MiB
        rows: list[tuple[str, ...]] = [(name, f"{sec:.2f} s", f"{mib / sec:.0f} MiB/s") for name, sec in best.items()]
        rows.append((f"resync after 1% changed ({len(changed)} tracks; {stats['tracksCopiedLastCopy']} copied)",
                     f"{resync:.3f} s", f"{len(changed) * TRACK / MiB / resync:.0f} MiB/s of tracks"))
        print_table(f"ShadowImage, {args.size_gib:g} GiB volume of random data, best of {args.rounds}",
                    ("what", "time", "rate"), rows)
        c.close()
    finally:
        p.stop()
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
