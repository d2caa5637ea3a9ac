"""TrueCopy benchmarks: initial copy, empty-volume copy, differential resync, host I/O on a PAIR P-VOL, memory.

Usage: python bench/tc_bench.py [--size-gib 2] [--dir DIR] [--pairs 100] [--skip-memory]

Every figure is printed next to a baseline measured in the same run:
- initial copy of a volume full of random data vs ``cp`` of the same file (+ fsync of the copy);
- initial copy of an empty 1 TiB volume (absolute: the target is under 5 s);
- resync after changing 1 % of the tracks, as a fraction of the full initial copy;
- fio over NBD on a PAIR P-VOL vs the same kind of volume unpaired: 1 MiB sequential write (iodepth 8)
  and 4 KiB random write at iodepth 1 (mean latency; and, for context, the unpaired latency with a yielding
  busy loop running beside, which shows what waking idle CPUs costs on the machine);
- resident size of the primary holding N PAIR pairs of 1 TiB volumes while they copy.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_row, fio, print_table, start_linked

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient

MiB = 1 << 20
GiB = 1 << 30
TRACK = 256 * 1024


def fill(nbd_port: int, ldev: int, size: int) -> None:
    chunk = os.urandom(16 * MiB)
    with NbdClient("127.0.0.1", nbd_port, str(ldev)) as c:
        for off in range(0, size, 16 * MiB):
            n = min(16 * MiB, size - off)
            c.write(off, chunk[:n] if off // (16 * MiB) % 2 else bytes(reversed(chunk[:n])))
            if off % (256 * MiB) == 0:
                chunk = os.urandom(16 * MiB)
        c.flush()


def create_pair(pc: VspClient, sc: VspClient, group: str, pv: int, sv: int, new: bool = True,
                nowait: bool = False) -> None:
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": group, "copyPairName": f"p{pv}", "replicationType": "TC",
        "remoteStorageDeviceId": sc.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": new, "fenceLevel": "NEVER", "copyPace": 15}, remote=sc, nowait=nowait,
        timeout=3600)


def wait_pair(pc: VspClient, group: str, sc: VspClient, timeout: float = 3600) -> None:
    gid = f"{sc.storage_device_id},{group},{group}P_,{group}S_"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        g = pc.get(f"remote-mirror-copygroups/{gid}", remote=sc)
        if all(p["pvolStatus"] == "PAIR" for p in g["copyPairs"]):
            return
        time.sleep(0.02)
    raise TimeoutError(group)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-tcbench-"))
    size = int(args.size_gib * GiB)
    p, s, pc, sc = start_linked(base, (481001, 481002))
    rows: list[tuple[str, str, str, str]] = []
    try:
        # 1. initial copy of random data vs cp
        pv, sv = pc.create_ldev(f"{size // MiB}M"), sc.create_ldev(f"{size // MiB}M")
        for c, ldev in ((pc, pv), (sc, sv)):
            c.add_lun(ldev)
        fill(p.nbd_port, pv, size)
        src = p.data_dir / "ldevs" / f"{pv:05d}.img"
        dst = base / "cp-copy.img"
        t0 = time.monotonic()
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
        cp_s = time.monotonic() - t0
        dst.unlink()
        t0 = time.monotonic()
        create_pair(pc, sc, "big", pv, sv)
        copy_s = time.monotonic() - t0
        rows.append((f"initial copy, {args.size_gib:g} GiB random", f"{size / MiB / copy_s:.0f} MiB/s",
                     f"cp + fsync {size / MiB / cp_s:.0f} MiB/s", f"{cp_s / copy_s:.2f}x"))
        # 3. resync after changing 1% of the tracks
        gid = f"{sc.storage_device_id},big,bigP_,bigS_"
        pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/split/invoke",
                  {"parameters": {"replicationType": "TC"}}, remote=sc)
        ntracks = size // TRACK
        changed = random.Random(1).sample(range(ntracks), max(1, ntracks // 100))
        with NbdClient("127.0.0.1", p.nbd_port, str(pv)) as c:
            for t in changed:
                c.write(t * TRACK, os.urandom(4096))
        t0 = time.monotonic()
        pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/resync/invoke",
                  {"parameters": {"replicationType": "TC"}}, remote=sc, timeout=3600)
        resync_s = time.monotonic() - t0
        stats = pc.raw("GET", "vspemu/v1/replication/stats", headers=pc.headers()).json()["pairs"]
        sent = stats[f"big/p{pv}"]["tracksSentLastCopy"]
        rows.append((f"resync after changing 1% of tracks ({len(changed)})", f"{resync_s:.2f} s ({sent} tracks sent)",
                     f"full copy {copy_s:.2f} s", f"{resync_s / copy_s * 100:.1f}% of full"))
        # 4. host I/O on the PAIR P-VOL vs an unpaired volume
        solo = pc.create_ldev("4G")
        pc.add_lun(solo)
        tp, ts = pc.create_ldev("4G"), sc.create_ldev("4G")
        pc.add_lun(tp)
        create_pair(pc, sc, "io", tp, ts)
        # write the measured region of both volumes once first: both runs then overwrite cached pages (steady
        # state), instead of the faster unpaired run overwriting while the slower paired one still allocates
        # page cache (first touch of guest memory is several times slower on a VM) on both sides
        for vol in (solo, tp):
            fio(p.nbd_port, vol, "write", "1M", 8, "2G", runtime=0)
        pids = {"P": p.proc.pid, "S": s.proc.pid}
        for label, rw, bs, depth in (("1 MiB seq write, iodepth 8", "write", "1M", 8),
                                     ("4 KiB rand write, iodepth 1", "randwrite", "4k", 1)):
            base_r = fio(p.nbd_port, solo, rw, bs, depth, "2G", pids=pids)
            pair_r = fio(p.nbd_port, tp, rw, bs, depth, "2G", pids=pids)
            if bs == "1M":
                rows.append((f"{label}, PAIR P-VOL", f"{pair_r['MiBps']:.0f} MiB/s",
                             f"unpaired {base_r['MiBps']:.0f} MiB/s", f"{pair_r['MiBps'] / base_r['MiBps']:.2f}x"))
                rows.append(cpu_row(label, base_r, pair_r))
            else:
                rows.append((f"{label}, PAIR P-VOL", f"{pair_r['lat_us']:.0f} us ({pair_r['iops']:.0f} IOPS)",
                             f"unpaired {base_r['lat_us']:.0f} us ({base_r['iops']:.0f} IOPS)",
                             f"{pair_r['lat_us'] / base_r['lat_us']:.2f}x latency"))
                # Context: how much of that is waking halted CPUs. A busy loop that yields keeps a CPU awake
                # (as the secondary's polling does while mirrored writes stream in) and takes no CPU from
                # anything runnable.
                busy = subprocess.Popen([sys.executable, "-c", "import os\nwhile True: os.sched_yield()"])
                try:
                    awake = fio(p.nbd_port, solo, rw, bs, depth, "2G")
                finally:
                    busy.kill()
                    busy.wait()
                rows.append((f"{label}, unpaired, a yielding busy loop beside", f"{awake['lat_us']:.0f} us",
                             f"unpaired {base_r['lat_us']:.0f} us", "(wake-up cost of idle CPUs)"))
        # 2. initial copy of an empty 1 TiB volume
        ev, es = pc.create_ldev("1T"), sc.create_ldev("1T")
        t0 = time.monotonic()
        create_pair(pc, sc, "empty", ev, es)
        rows.append(("initial copy, empty 1 TiB volume", f"{time.monotonic() - t0:.2f} s", "target < 5 s", ""))
        # 5. memory with N PAIR pairs of 1 TiB copying
        if not args.skip_memory:
            rss0 = p.rss_bytes()
            peak = rss0
            first = True
            for i in range(args.pairs):
                a, b = pc.create_ldev("1T"), sc.create_ldev("1T")
                pc.add_lun(a)
                with NbdClient("127.0.0.1", p.nbd_port, str(a)) as c:  # data spread over the volume
                    for k in range(8):
                        c.write(k * 128 * GiB + i * MiB, os.urandom(MiB))
                create_pair(pc, sc, "mem", a, b, new=first, nowait=True)
                first = False
                peak = max(peak, p.rss_bytes())
            wait_pair(pc, "mem", sc)
            peak = max(peak, p.rss_bytes())
            rows.append((f"primary RSS with {args.pairs} PAIR pairs of 1 TiB", f"{peak / MiB:.0f} MiB peak",
                         f"{rss0 / MiB:.0f} MiB before", "target < 300 MiB"))
        pc.close()
        sc.close()
    finally:
        p.stop()
        s.stop()
        shutil.rmtree(base, ignore_errors=True)
    print_table("TrueCopy benchmark", ("measure", "vspemu", "baseline (same run)", "ratio"), rows)


if __name__ == "__main__":
    main()
