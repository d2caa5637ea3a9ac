"""Thin Image benchmark: snapshot create + split time, host write latency with snapshots, pool use. Not a test.

Usage: python bench/snapshot_bench.py [--size-gib 1] [--runtime 8] [--repeat 5] [--dir DIR] [--qd1-only]

``--qd1-only``: only queue depth 1, to compare two versions run alternately on a noisy machine: random
writes with no snapshot; 4 KiB writes one per 256 KiB track (a 4 KiB write, 252 KiB skipped: fio
``zonesize``/``zoneskip``) with no snapshot, then right after 8 splits, where *every* write is a first write
(the random run after a split mixes first writes and writes to tracks saved already, in a proportion that
depends on how fast it goes); a host FLUSH (it returns when the first writes' old tracks are saved and the
new bytes are in the P-VOL: the write-behind's drain); random writes again with every track saved.

One storage system. Measured:
- create + split (``autoSplit``) of a snapshot of a sparse 1 TiB P-VOL and of a ``--size-gib`` P-VOL, as the
  client sees it (the job answered Completed in the POST's reply); the median of ``--repeat`` snapshots
  (each deleted before the next). The target is independent of the volume's size and under 100 ms;
- fio 4 KiB random writes at queue depth 1 over NBD on the ``--size-gib`` P-VOL (full of data): no snapshot,
  then with 8 snapshots split just before the run (the run's first write to each 256 KiB track copies it
  out, so this is the copy-on-write worst case), then again with the same 8 snapshots (tracks saved
  already). The target is at most 1.5x. The same at queue depth 8 (no snapshot, then 8 fresh snapshots): there
  the first writes waiting at the same time share one sync of the pool;
- the pool's use after rewriting 1% of the P-VOL after each of 8 splits (a contiguous 1% at a random
  place each time, and 1% in scattered 4 KiB writes), against 8 x 1% of the volume.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import fio, print_table

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess

MiB = 1 << 20
GiB = 1 << 30


def fill(port: int, ldev: int, size: int) -> None:
    chunk = os.urandom(16 * MiB)
    with NbdClient("127.0.0.1", port, str(ldev)) as c:
        for off in range(0, size, 16 * MiB):
            c.write(off, chunk[: min(16 * MiB, size - off)])
            chunk = chunk[1:] + chunk[:1]
        c.flush()


def timed_snapshot(c: VspClient, pvol: int, group: str) -> tuple[float, str]:
    body = {"pvolLdevId": pvol, "snapshotPoolId": 0, "snapshotGroupName": group, "autoSplit": True}
    t = time.perf_counter()
    job = c.request("POST", "snapshots", json=body, wait_completed=True)
    dt = time.perf_counter() - t
    assert job["state"] == "Succeeded", job
    return dt, c.resource_id(job)


def first_writes(port: int, ldev: int, size: int) -> dict[str, float]:
    """fio at queue depth 1: one 4 KiB write at the start of each 256 KiB track, in order (4 KiB written,
    252 KiB skipped), over the whole volume: mean latency (us) and IOPS."""
    out = subprocess.run(["fio", "--name=f", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/{ldev}",
                          "--rw=write", "--bs=4k", "--iodepth=1", f"--size={size}", f"--io_size={size // 64}",
                          "--zonemode=strided", "--zonesize=4k", "--zonerange=256k", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    return {"lat_us": job["lat_ns"]["mean"] / 1000, "iops": job["iops"], "n": job["total_ios"]}


def snapshot_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in (data_dir / "snapshots").glob("*.tis"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--qd1-only", action="store_true")
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-snapbench-"))
    size = int(args.size_gib * GiB)
    system = SystemProcess(base / "array", 460001, extra_args=["--log-level", "warning"]).start()
    rows: list[tuple[str, ...]] = []
    try:
        c = system.client()
        big = c.create_ldev("1T")
        c.add_lun(big)
        vol = c.create_ldev(f"{size // MiB}M")
        c.add_lun(vol)
        fill(system.nbd_port, vol, size)
        with NbdClient("127.0.0.1", system.nbd_port, str(big)) as n:  # some data on the big one too
            for off in range(0, 1 << 40, 1 << 36):
                n.write(off, os.urandom(MiB))
        times: dict[str, list[float]] = {"1 TiB": [], f"{args.size_gib:g} GiB": []}
        for _ in range(0 if args.qd1_only else args.repeat):
            for name, ldev in ((f"{args.size_gib:g} GiB", vol), ("1 TiB", big)):
                dt, sid = timed_snapshot(c, ldev, "bench")
                times[name].append(dt)
                c.invoke("DELETE", f"snapshots/{sid}")
        med = {k: statistics.median(v) * 1000 for k, v in times.items() if v}
        small = med.get(f"{args.size_gib:g} GiB", 1.0)
        for name, ms in med.items():
            rows.append((f"create + split, {name} P-VOL (median of {args.repeat})", f"{ms:.1f} ms",
                         f"{ms / small:.2f}x the {args.size_gib:g} GiB one"))

        def lat() -> dict[str, float]:
            return fio(system.nbd_port, vol, "randwrite", "4k", 1, f"{size // MiB}M", args.runtime)

        none = lat()
        if args.qd1_only:
            stride0 = first_writes(system.nbd_port, vol, size)
            sids = [timed_snapshot(c, vol, f"lat{i}")[1] for i in range(8)]
            stride = first_writes(system.nbd_port, vol, size)
            t = time.perf_counter()
            with NbdClient("127.0.0.1", system.nbd_port, str(vol)) as n:
                n.flush()  # drains the pending log: the old tracks saved, the new bytes in the P-VOL
            flush_s = time.perf_counter() - t
            again = lat()
            rows.append(("4 KiB random write, QD1, no snapshot", f"{none['lat_us']:.0f} us", "1.00x"))
            rows.append(("4 KiB one write per track, QD1, no snapshot", f"{stride0['lat_us']:.0f} us, "
                         f"{stride0['n']:.0f} writes", "1.00x"))
            rows.append(("... 8 snapshots split just before: every write a first write", f"{stride['lat_us']:.0f} us",
                         f"{stride['lat_us'] / stride0['lat_us']:.2f}x"))
            rows.append(("host FLUSH right after (waits for the first writes' tracks to be saved)",
                         f"{flush_s * 1000:.0f} ms", f"{flush_s * 1e6 / stride['n']:.0f} us per first write"))
            rows.append(("4 KiB random write, the same 8 snapshots, every track saved", f"{again['lat_us']:.0f} us",
                         f"{again['lat_us'] / none['lat_us']:.2f}x"))
            for sid in sids:
                c.invoke("DELETE", f"snapshots/{sid}")
            print_table(f"Thin Image, QD1 only ({args.size_gib:g} GiB P-VOL, fio {args.runtime} s)",
                        ("what", "result", "ratio"), rows)
            return
        sids = [timed_snapshot(c, vol, f"lat{i}")[1] for i in range(8)]
        used0 = snapshot_bytes(system.data_dir)
        fresh = lat()
        saved = snapshot_bytes(system.data_dir) - used0
        t = time.perf_counter()
        fill(system.nbd_port, vol, size)  # every track not saved yet is now
        fill_s = time.perf_counter() - t
        again = lat()
        tracks = size // (256 << 10)
        rows.append(("4 KiB random write, QD1, no snapshot", f"{none['lat_us']:.0f} us", "1.00x"))
        rows.append(("... 8 snapshots split just before (first writes copy tracks)",
                     f"{fresh['lat_us']:.0f} us, {fresh['iops'] * args.runtime:.0f} writes",
                     f"{fresh['lat_us'] / none['lat_us']:.2f}x ({saved / MiB:.0f} MiB saved)"))
        rows.append(("... the same 8 snapshots, every track saved already", f"{again['lat_us']:.0f} us",
                     f"{again['lat_us'] / none['lat_us']:.2f}x"))
        rows.append(("(rewriting the rest of the P-VOL in 16 MiB writes meanwhile)", f"{fill_s:.1f} s",
                     f"{fill_s * 1e6 / tracks:.0f} us per 256 KiB track"))
        for sid in sids:
            c.invoke("DELETE", f"snapshots/{sid}")
        # queue depth 8: the first writes to different tracks share one sync of the pool (group commit)
        none8 = fio(system.nbd_port, vol, "randwrite", "4k", 8, f"{size // MiB}M", args.runtime)
        sids = [timed_snapshot(c, vol, f"qd{i}")[1] for i in range(8)]
        fresh8 = fio(system.nbd_port, vol, "randwrite", "4k", 8, f"{size // MiB}M", args.runtime)
        rows.append(("4 KiB random write, QD8, no snapshot", f"{none8['lat_us']:.0f} us, {none8['iops']:.0f} IOPS",
                     "1.00x"))
        rows.append(("... QD8, 8 snapshots split just before", f"{fresh8['lat_us']:.0f} us, {fresh8['iops']:.0f} "
                     "IOPS", f"{fresh8['lat_us'] / none8['lat_us']:.2f}x"))
        for sid in sids:
            c.invoke("DELETE", f"snapshots/{sid}")

        rnd = random.Random(7)
        pct = size // 100
        for how in ("contiguous", "scattered 4 KiB"):
            before = snapshot_bytes(system.data_dir)
            pool0 = c.get("pools/0")
            sids = []
            for i in range(8):
                sids.append(timed_snapshot(c, vol, f"use{i}")[1])
                with NbdClient("127.0.0.1", system.nbd_port, str(vol)) as n:
                    if how == "contiguous":
                        off = rnd.randrange(0, size - pct) // 4096 * 4096
                        n.write(off, os.urandom(pct))
                    else:
                        for _ in range(pct // 4096):
                            n.write(rnd.randrange(0, size // 4096) * 4096, os.urandom(4096))
                    n.flush()
            used = snapshot_bytes(system.data_dir) - before
            pool1 = c.get("pools/0")
            pool_mb = pool0["availableVolumeCapacity"] - pool1["availableVolumeCapacity"]
            rows.append((f"pool use after 8 x (split, rewrite 1% {how})", f"{used / MiB:.1f} MiB "
                         f"(pool view {pool_mb} MB)", f"{used / (8 * pct):.2f}x 8 x 1%"))
            for sid in sids:
                c.invoke("DELETE", f"snapshots/{sid}")
        c.close()
    finally:
        system.stop()
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    print_table(f"Thin Image snapshots ({args.size_gib:g} GiB P-VOL, fio {args.runtime} s)",
                ("what", "result", "ratio"), rows)


if __name__ == "__main__":
    main()
