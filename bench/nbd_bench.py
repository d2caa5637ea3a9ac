"""Benchmark the vspemu NBD server against ``nbdkit file`` with fio (ioengine=nbd). Not a test.

    python bench/nbd_bench.py [--dir /tmp/nbd-bench] [--size-mib 1024] [--runtime 10] [--repeat 1]

Both servers serve an equal, pre-filled file in the same directory; every fio job runs with the same
parameters against each server (alternating), and the table shows the median of ``--repeat`` runs and the
ratio vspemu / nbdkit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import cpu_model

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    title: str
    rw: str
    bs: str
    iodepth: int
    metric: str  # "bw" (MiB/s) or "iops"


JOBS = [
    Job("1 MiB seq write, iodepth 8", "write", "1M", 8, "bw"),
    Job("1 MiB seq read, iodepth 8", "read", "1M", 8, "bw"),
    Job("4 KiB rand write, iodepth 1", "randwrite", "4k", 1, "iops"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def prefill(path: Path, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def start_vspemu(path: Path, size: int, pin: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [*pin, sys.executable, "-m", "vspemu.volumes.nbd_main", "--file", str(path), "--size", str(size)]
    proc = subprocess.Popen([*cmd, "--port", str(port), "--name", "0"], cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, f"nbd://127.0.0.1:{port}/0"


def start_nbdkit(path: Path, pin: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([*pin, "nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(path)])
    wait_port(port, proc)
    return proc, f"nbd://127.0.0.1:{port}/"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fio(uri: str, job: Job, runtime: int, pin: list[str], pid: int) -> dict[str, float]:
    cmd = [
        *pin,
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--runtime={runtime}",
        "--time_based",
        "--ramp_time=1",
        "--randrepeat=0",
        "--output-format=json",
    ]
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    cpu = cpu_seconds(pid) - cpu0
    result = json.loads(out[out.index("{") :])["jobs"][0]
    side = result["read" if job.rw == "read" else "write"]
    ios = side["total_ios"] or 1  # (the ramp is not counted in total_ios, but its CPU is: a small bias)
    return {
        "bw": side["bw_bytes"] / (1 << 20),
        "iops": side["iops"],
        "lat_us": side["lat_ns"]["mean"] / 1000,
        "cpu_us": cpu / ios * 1e6,  # server CPU per request
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/nbd-bench")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per job and server (median is shown)")
    parser.add_argument(
        "--pin",
        choices=["none", "split", "same"],
        default="none",
        help="CPU placement: none (the scheduler decides), split (servers on CPU 0, fio on CPU 1), same (all on CPU 0)",
    )
    args = parser.parse_args()
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mib << 20
    files = {"vspemu": work / "vspemu.img", "nbdkit": work / "nbdkit.img"}
    server_pin = [] if args.pin == "none" else ["taskset", "-c", "0"]
    fio_pin = {"none": [], "split": ["taskset", "-c", "1"], "same": ["taskset", "-c", "0"]}[args.pin]
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for path in files.values():
            prefill(path, size)
        servers["vspemu"] = start_vspemu(files["vspemu"], size, server_pin)
        servers["nbdkit"] = start_nbdkit(files["nbdkit"], server_pin)
        for job in JOBS:
            for _ in range(args.repeat):
                for name, (proc, uri) in servers.items():
                    results.setdefault((job.title, name), []).append(run_fio(uri, job, args.runtime, fio_pin, proc.pid))
    finally:
        for proc, _uri in servers.values():
            proc.terminate()
            proc.wait()
        for path in files.values():
            path.unlink(missing_ok=True)

    def med(job: Job, name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(job.title, name)])

    print(f"date: {datetime.date.today().isoformat()}   nproc: {os.cpu_count()}   cpu: {cpu_model()}")
    print(f"load average before the run: {load}")
    print(
        f"python {platform.python_version()}, fio runtime {args.runtime}s x {args.repeat} (median), "
        f"files in {args.dir}, CPU placement: {args.pin}"
    )
    print()
    print("| test | vspemu | nbdkit file | ratio | server CPU per request, vspemu / nbdkit |")
    print("|---|---|---|---|---|")
    for job in JOBS:
        v, n = med(job, "vspemu", job.metric), med(job, "nbdkit", job.metric)
        cpu = f"{med(job, 'vspemu', 'cpu_us'):.0f} us / {med(job, 'nbdkit', 'cpu_us'):.0f} us"
        if job.metric == "bw":
            print(f"| {job.title} | {v:.0f} MiB/s | {n:.0f} MiB/s | {v / n:.2f} | {cpu} |")
        else:
            vl, nl = med(job, "vspemu", "lat_us"), med(job, "nbdkit", "lat_us")
            print(f"| {job.title} | {v:.0f} IOPS ({vl:.1f} us) | {n:.0f} IOPS ({nl:.1f} us) | {v / n:.2f} | {cpu} |")


if __name__ == "__main__":
    main()
