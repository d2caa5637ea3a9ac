"""What the benchmark scripts share: the machine line and the result table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any

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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU time of the whole machine, every core, idle and iowait excluded."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def fio(nbd_port: int, ldev: int, rw: str, bs: str, iodepth: int, size: str, runtime: int | None = 8,
        rate: str | None = None, offset: str = "0", pids: dict[str, int] | None = None) -> dict[str, Any]:
    """fio over NBD on an exported LDEV: time-based for ``runtime`` seconds, or the size written once
    (``runtime`` None or 0); write throughput (MiBps), IOPS and mean latency (lat_us). With ``pids``
    (name -> process id, e.g. the storage systems) also "cpu": CPU seconds per MiB written, for fio, each of
    those processes, everything else on the machine ("other") and in all ("all")."""
    cmd = ["fio", "--name=b", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{nbd_port}/{ldev}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}", f"--offset={offset}", "--output-format=json"]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    if rate:
        cmd += [f"--rate={rate}"]
    pids = pids or {}
    before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    children, busy = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    used = {name: _cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used["fio"] = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    total = _busy_seconds() - busy
    job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    mib = job["io_bytes"] / MiB
    cpu = {name: t / mib for name, t in used.items()} if mib else {}
    if mib:
        cpu["other"] = max(0.0, total - sum(used.values())) / mib
        cpu["all"] = total / mib
    return {"MiBps": job["bw_bytes"] / MiB, "iops": job["iops"], "lat_us": job["lat_ns"]["mean"] / 1000,
            "cpu": cpu}


def cpu_row(label: str, base: dict[str, Any], paired: dict[str, Any]) -> tuple[str, str, str, str]:
    """A table row: CPU milliseconds per MiB written by process, paired vs unpaired, and the throughput
    ratio the machine could reach at most if every core were busy with the paired run's work."""
    def per_mib(r: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v * 1000:.2f}" for k, v in r["cpu"].items())

    cores = os.cpu_count() or 1
    ceiling = cores / paired["cpu"]["all"] if paired["cpu"].get("all") else float("inf")
    return (f"{label}: CPU ms per MiB", f"{per_mib(paired)}", f"unpaired {per_mib(base)}",
            f"at most {ceiling / base['MiBps']:.2f}x on {cores} cores")


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
