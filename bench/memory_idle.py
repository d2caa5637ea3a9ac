"""Resident size of an idle storage system holding N LDEVs (issue: under 150 MiB with 1,000).

Usage: python bench/memory_idle.py [--ldevs 1000] [--dir /tmp/x]
Prints a table: RSS at start, after creating the LDEVs and mapping every one of them, and after reading
them all back once (GET list), with the baseline of the same process with no LDEV.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

from vspemu.lab import SystemProcess

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ldevs", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-bench-"))
    system = SystemProcess(base / "sys", 499001).start()
    try:
        time.sleep(1)
        rss0 = system.rss_bytes()
        clients = [system.client() for _ in range(8)]
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: clients[i % 8].create_ldev("1T"), range(args.ldevs)))
            list(pool.map(lambda i: clients[i % 8].add_lun(ids[i], "CL1-A" if i < 2000 else "CL2-A"), range(len(ids))))
        create_s = time.monotonic() - t0
        time.sleep(1)
        rss1 = system.rss_bytes()
        for head in range(0, args.ldevs, 500):
            clients[0].get("ldevs", ldevOption="defined", headLdevId=head, count=500)
        time.sleep(1)
        rss2 = system.rss_bytes()
        for c in clients:
            c.close()
    finally:
        system.stop()
    print(f"# vspemu idle memory, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores")
    print(f"| state | RSS (MiB) |\n|---|---|\n| empty system (baseline) | {rss0 / MiB:.1f} |")
    print(f"| {args.ldevs} LDEVs of 1 TiB, each with an LU path | {rss1 / MiB:.1f} |")
    print(f"| after listing them all | {rss2 / MiB:.1f} |")
    print(
        f"created and mapped {args.ldevs} LDEVs in {create_s:.1f} s "
        f"({args.ldevs * 2 / create_s:.0f} jobs/s); growth {(rss2 - rss0) / MiB:.1f} MiB over the baseline"
    )


if __name__ == "__main__":
    main()
