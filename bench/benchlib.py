"""What the benchmark scripts share: the machine line and the result table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from vspemu.client import VspClient
from vspemu.lab import SystemProcess, link_systems

MiB = 1 << 20


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print(f"# {title}, {datetime.date.today()}, {cpu_model()}, {os.cpu_count()} cores\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def fio(nbd_port: int, ldev: int, rw: str, bs: str, iodepth: int, size: str, runtime: int | None = 8,
        rate: str | None = None, offset: str = "0") -> dict[str, float]:
    """fio over NBD on an exported LDEV: time-based for ``runtime`` seconds, or the size written once
    (``runtime`` None or 0); write throughput (MiBps), IOPS and mean latency (lat_us)."""
    cmd = ["fio", "--name=b", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{nbd_port}/{ldev}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}", f"--offset={offset}", "--output-format=json"]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    if rate:
        cmd += [f"--rate={rate}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    return {"MiBps": job["bw_bytes"] / MiB, "iops": job["iops"], "lat_us": job["lat_ns"]["mean"] / 1000}


def start_linked(base: Path, serials: tuple[int, int]) -> tuple[SystemProcess, SystemProcess, VspClient, VspClient]:
    """Two storage-system processes under ``base`` (p, s), registered with each other: (p, s, pc, sc).
    Call ``stop()`` on both when done, also if this raises."""
    p = SystemProcess(base / "p", serials[0], extra_args=["--log-level", "warning"])
    s = SystemProcess(base / "s", serials[1], extra_args=["--log-level", "warning"])
    try:
        p.start()
        s.start()
        pc, sc = p.client(), s.client()
        link_systems(pc, sc)
    except BaseException:
        p.stop()  # (a no-op for one that did not start)
        s.stop()
        raise
    return p, s, pc, sc
