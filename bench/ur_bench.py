"""Universal Replicator benchmarks, each next to a baseline measured in the same run.

Usage: python bench/ur_bench.py [--dir DIR] [--backlog-gib 4] [--burst-gib 1]

- P-VOL 1 MiB sequential write throughput (fio over NBD, iodepth 8) with a UR pair vs an unpaired volume,
  and with the P-VOL in two mirrors of its journal (multi-target: a third system as the second secondary);
- lag (seconds behind, qCount) under a steady write load at half the link's throughput, the link's
  throughput being measured first in the same run (an initial copy);
- time for the S-VOLs to catch up after a burst of writes;
- resident size of the primary while a backlog builds up in the journal with the link cut (the backlog
  lives on the journal volume, not in memory).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

from benchlib import cpu_row, fio, print_table, start_linked

from vspemu.client import VspClient
from vspemu.lab import SystemProcess, link_systems

MiB = 1 << 20
GiB = 1 << 30


def stats(c: VspClient, group: str) -> dict:
    return c.raw("GET", "vspemu/v1/replication/stats", headers=c.headers()).json()["mirrors"][group]


def ur_pair(pc: VspClient, sc: VspClient, group: str, pv: int, sv: int, jid: int, mu: int = 0) -> None:
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": group, "copyPairName": "u", "replicationType": "UR",
        "remoteStorageDeviceId": sc.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "ASYNC", "muNumber": mu, "pvolJournalId": jid,
        "svolJournalId": jid}, remote=sc, timeout=3600)


def wait_drained(pc: VspClient, group: str, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while stats(pc, group)["qCount"]:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.02)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--backlog-gib", type=float, default=4)
    ap.add_argument("--burst-gib", type=float, default=1)
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-urbench-"))
    p, s, pc, sc = start_linked(base, (482001, 482002))
    rows: list[tuple[str, str, str, str]] = []
    try:
        jsize = f"{int(args.backlog_gib * 1024) + 1024}M"
        for c in (pc, sc):
            c.create_journal(1, [c.create_ldev(jsize)])
        vol = f"{max(8, int(args.backlog_gib) + 2)}G"
        pv, sv = pc.create_ldev(vol), sc.create_ldev(vol)
        solo = pc.create_ldev(vol)
        for ldev in (pv, solo):
            pc.add_lun(ldev)
        # the link's throughput, from an initial copy of 1 GiB of data
        fio(p.nbd_port, pv, "write", "1M", 8, "1G", runtime=None)
        t0 = time.monotonic()
        ur_pair(pc, sc, "ur", pv, sv, 1)
        link_mibps = 1024 / (time.monotonic() - t0)
        rows.append(("link throughput (initial copy of 1 GiB)", f"{link_mibps:.0f} MiB/s", "", ""))
        # 1. sequential write with a UR pair vs unpaired; both regions written once first, so that neither
        #    side pays for first-touch page-cache allocation in the measured run (as in tc_bench.py)
        for ldev in (solo, pv):
            fio(p.nbd_port, ldev, "write", "1M", 8, "2G", runtime=None)
        wait_drained(pc, "ur")
        pids = {"P": p.proc.pid, "S": s.proc.pid}
        base_r = fio(p.nbd_port, solo, "write", "1M", 8, "2G", pids=pids)
        ur_r = fio(p.nbd_port, pv, "write", "1M", 8, "2G", pids=pids)
        wait_drained(pc, "ur")
        rows.append(("1 MiB seq write, iodepth 8, UR P-VOL", f"{ur_r['MiBps']:.0f} MiB/s",
                     f"unpaired {base_r['MiBps']:.0f} MiB/s", f"{ur_r['MiBps'] / base_r['MiBps']:.2f}x"))
        rows.append(cpu_row("1 MiB seq write", base_r, ur_r))
        # the same run again: the journal ring's pages are now in the page cache (the first run wrote most of
        # them for the first time: page allocation, on a VM the first touch of guest memory)
        again = fio(p.nbd_port, pv, "write", "1M", 8, "2G", pids=pids)
        wait_drained(pc, "ur")
        rows.append(("the same, run again (journal pages cached)", f"{again['MiBps']:.0f} MiB/s",
                     f"unpaired {base_r['MiBps']:.0f} MiB/s", f"{again['MiBps'] / base_r['MiBps']:.2f}x"))
        rows.append(cpu_row("run again", base_r, again))
        # 1b. multi-target: the same P-VOL also in mirror 1 of its journal, to a third system (the journal is
        #     written once and read by two secondaries); that mirror is deleted again afterwards
        s2 = SystemProcess(base / "s2", 482003, extra_args=["--log-level", "warning"])
        try:
            s2.start()
            s2c = s2.client()
            link_systems(pc, s2c)
            s2c.create_journal(1, [s2c.create_ldev(jsize)])
            ur_pair(pc, s2c, "ur2", pv, s2c.create_ldev(vol), 1, mu=1)
            two = fio(p.nbd_port, pv, "write", "1M", 8, "2G", pids={**pids, "S2": s2.proc.pid})
            for group in ("ur", "ur2"):
                wait_drained(pc, group)
            rows.append(("the same, P-VOL in two mirrors (two secondaries)", f"{two['MiBps']:.0f} MiB/s",
                         f"one mirror {again['MiBps']:.0f}, unpaired {base_r['MiBps']:.0f} MiB/s",
                         f"{two['MiBps'] / base_r['MiBps']:.2f}x"))
            rows.append(cpu_row("two mirrors", base_r, two))
            pc.invoke("DELETE", f"remote-mirror-copygroups/{s2.storage_device_id},ur2,ur2P_,ur2S_", remote=s2c)
            s2c.close()
        finally:
            s2.stop()
        # 2. lag under a steady load at half the link's throughput
        rate = max(1, int(min(link_mibps, ur_r["MiBps"]) / 2))
        lags: list[float] = []
        qcounts: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                st = stats(pc, "ur")
                lags.append(st["lagSeconds"])
                qcounts.append(st["qCount"])
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        fio(p.nbd_port, pv, "write", "256k", 4, "2G", runtime=15, rate=f"{rate}m")
        done.set()
        sampler.join()
        lags.sort()
        rows.append((f"lag at a steady {rate} MiB/s (half the link)",
                     f"mean {sum(lags) / len(lags):.3f} s, p99 {lags[int(len(lags) * 0.99) - 1]:.3f} s, "
                     f"max {lags[-1]:.3f} s", f"max qCount {max(qcounts)}", "target < 1 s"))
        wait_drained(pc, "ur")
        # 3. catching up after a burst
        burst = f"{int(args.burst_gib * 1024)}M"
        t0 = time.monotonic()
        fio(p.nbd_port, pv, "write", "1M", 8, burst, runtime=None)
        burst_s = time.monotonic() - t0
        catch = wait_drained(pc, "ur")
        rows.append((f"catch up after a {burst} burst", f"{catch:.2f} s after the burst",
                     f"the burst took {burst_s:.2f} s", ""))
        # 4. memory while a backlog builds up with the link cut
        for port in ("CL3-A", "CL4-A"):
            pc.raw("PUT", f"vspemu/v1/link-ports/{port}", json={"enabled": False}, headers=pc.headers())
        rss0 = p.rss_bytes()
        peak = rss0
        done.clear()

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, p.rss_bytes())
                time.sleep(0.2)

        watcher = threading.Thread(target=watch)
        watcher.start()
        size = f"{int(args.backlog_gib * 1024)}M"
        fio(p.nbd_port, pv, "write", "1M", 8, size, runtime=None)
        done.set()
        watcher.join()
        q = stats(pc, "ur")
        rows.append((f"primary RSS while a {size} backlog builds (link cut)",
                     f"{peak / MiB:.0f} MiB peak (+{(peak - rss0) / MiB:.0f} MiB)",
                     f"{rss0 / MiB:.0f} MiB before; journal {q['usageRate']}% used, qCount {q['qCount']}",
                     "target: within 50 MiB"))
        for port in ("CL3-A", "CL4-A"):
            pc.raw("PUT", f"vspemu/v1/link-ports/{port}", json={"enabled": True}, headers=pc.headers())
        pc.close()
        sc.close()
    finally:
        p.stop()
        s.stop()
        shutil.rmtree(base, ignore_errors=True)
    print_table("Universal Replicator benchmark",
                ("measure", "vspemu", "baseline / context (same run)", "ratio / target"), rows)


if __name__ == "__main__":
    main()
