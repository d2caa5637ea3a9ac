"""GAD benchmarks (issue 18): host writes over NBD on a GAD pair in PAIR, on each side, vs unpaired volumes.

Usage: python bench/gad_bench.py [--size-gib 1] [--runtime 8] [--dir DIR]

Three server processes as in tests/test_gad.py: q (the quorum volume), p and s linked both ways, quorum disk 0
on q's LDEV, the S-VOL in a VSM with p's identity. fio (ioengine=nbd) on:
- the GAD P-VOL (a write goes to the P-VOL and the S-VOL before it is acknowledged);
- the GAD S-VOL (a write is sent to the P side, which writes both volumes in its order, then acknowledged);
- an unpaired volume of the same size on the same system as the baseline of each (measured in the same run);
- for context, a TrueCopy P-VOL between the same two systems (the synchronous mirror the GAD P side does),
  next to the P system's unpaired volume measured again right after it.
Workloads: 4 KiB random write at iodepth 1 (mean latency), 1 MiB sequential write at iodepth 8 (throughput).
Every measured region is written once first, so all runs overwrite cached pages (steady state).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchlib import cpu_row, fio, print_table

from vspemu.client import VspClient
from vspemu.lab import SystemProcess, link_systems

MiB = 1 << 20
EXT = 500  # the quorum volume's LDEV id on p and s (external volume)


def start(base: Path, systems: list[SystemProcess]) -> tuple[VspClient, VspClient, VspClient]:
    """q, p, s started into ``systems`` (the caller stops them, also if this raises); their clients."""
    for n, serial in (("q", 481801), ("p", 481802), ("s", 481803)):
        systems.append(SystemProcess(base / n, serial, extra_args=["--log-level", "warning"]))
        systems[-1].start()
    q, p, s = systems
    qc, pc, sc = q.client(), p.client(), s.client()
    link_systems(pc, sc)
    qldev = qc.create_ldev("16M")
    qc.add_lun(qldev)
    for c in (pc, sc):
        c.add_external_volume(EXT, qc, qldev, "127.0.0.1", q.nbd_port)
    pc.create_quorum_disk(0, sc, EXT)
    sc.create_quorum_disk(0, pc, EXT)
    sc.invoke("POST", "virtual-storages", {"resourceGroupName": "gad_vsm", "virtualSerialNumber": str(p.serial),
                                           "virtualModel": "VSP 5100H, 5500H"})
    return qc, pc, sc


def gad_pair(p: SystemProcess, s: SystemProcess, pc: VspClient, sc: VspClient, size: str) -> tuple[int, int]:
    """A GAD pair in PAIR (as hv_gad prepares and creates it, tests/test_gad.py)."""
    rg = next(int(g["resourceGroupId"]) for g in sc.get("resource-groups")["data"]
              if g["resourceGroupName"] == "gad_vsm")
    pv, sv = pc.create_ldev(size), sc.create_ldev(size)
    pc.add_lun(pv)
    sc.add_lun(sv)
    sc.invoke("POST", f"ldevs/{sv}/actions/unassign-virtual-ldevid/invoke", {"parameters": {"virtualLdevId": sv}})
    sc.invoke("POST", f"resource-groups/{rg}/actions/add-resource/invoke", {"parameters": {"ldevIds": [sv]}})
    sc.invoke("POST", f"ldevs/{sv}/actions/assign-virtual-ldevid/invoke", {"parameters": {"virtualLdevId": 65535}})
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": "bench", "copyPairName": "g1", "replicationType": "GAD",
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15, "doInitialCopy": True,
        "quorumDiskId": 0, "muNumber": 0}, remote=sc, timeout=600)
    pid = f"{s.storage_device_id},bench,benchP_,benchS_,g1"
    deadline = time.monotonic() + 600
    while (info := pc.get(f"remote-mirror-copypairs/{pid}", remote=sc))["pvolStatus"] != "PAIR":
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert (info["pvolStatus"], info["svolStatus"], info["pvolIOMode"], info["svolIOMode"]) == \
        ("PAIR", "PAIR", "Mirror", "Mirror"), info
    return pv, sv


def tc_pair(s: SystemProcess, pc: VspClient, sc: VspClient, size: str) -> int:
    """A TrueCopy pair in PAIR between the same systems: its P-VOL."""
    pv, sv = pc.create_ldev(size), sc.create_ldev(size)
    pc.add_lun(pv)
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": "tc", "copyPairName": "t1", "replicationType": "TC",
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=sc, timeout=600)
    deadline = time.monotonic() + 600
    pid = f"{s.storage_device_id},tc,tcP_,tcS_,t1"
    while (info := pc.get(f"remote-mirror-copypairs/{pid}", remote=sc))["pvolStatus"] != "PAIR":
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    return pv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-gadbench-"))
    size = f"{int(args.size_gib * 1024)}M"
    systems: list[SystemProcess] = []
    rows: list[tuple[str, ...]] = []
    try:
        qc, pc, sc = start(base, systems)
        _, p, s = systems
        pv, sv = gad_pair(p, s, pc, sc, size)
        solo_p, solo_s = pc.create_ldev(size), sc.create_ldev(size)
        pc.add_lun(solo_p)
        sc.add_lun(solo_s)
        tc = tc_pair(s, pc, sc, size)
        # (system, GAD volume, the unpaired baseline on the same system)
        sides = (("P-VOL", p, pv, solo_p), ("S-VOL", s, sv, solo_s))
        for _, sp, vol, solo in sides:
            for v in (solo, vol):
                fio(sp.nbd_port, v, "write", "1M", 8, size, runtime=0)
        fio(p.nbd_port, tc, "write", "1M", 8, size, runtime=0)
        pids = {"P": p.proc.pid, "S": s.proc.pid} if p.proc and s.proc else {}
        for label, rw, bs, depth in (("4 KiB rand write, iodepth 1", "randwrite", "4k", 1),
                                     ("1 MiB seq write, iodepth 8", "write", "1M", 8)):
            for name, sp, vol, solo in sides:
                base_r = fio(sp.nbd_port, solo, rw, bs, depth, size, runtime=args.runtime, pids=pids)
                gad_r = fio(sp.nbd_port, vol, rw, bs, depth, size, runtime=args.runtime, pids=pids)
                if bs == "4k":
                    rows.append((f"{label}, GAD {name}", f"{gad_r['lat_us']:.0f} us ({gad_r['iops']:.0f} IOPS)",
                                 f"unpaired {base_r['lat_us']:.0f} us ({base_r['iops']:.0f} IOPS)",
                                 f"{gad_r['lat_us'] / base_r['lat_us']:.2f}x latency"))
                else:
                    rows.append((f"{label}, GAD {name}", f"{gad_r['MiBps']:.0f} MiB/s",
                                 f"unpaired {base_r['MiBps']:.0f} MiB/s",
                                 f"{gad_r['MiBps'] / base_r['MiBps']:.2f}x"))
                    rows.append(cpu_row(f"{label}, GAD {name}", base_r, gad_r))
            # context: a TrueCopy P-VOL between the same two systems (the synchronous mirror GAD's P side is)
            tc_r = fio(p.nbd_port, tc, rw, bs, depth, size, runtime=args.runtime)
            base_r = fio(p.nbd_port, solo_p, rw, bs, depth, size, runtime=args.runtime)
            if bs == "4k":
                rows.append((f"{label}, TrueCopy P-VOL (context)", f"{tc_r['lat_us']:.0f} us",
                             f"unpaired {base_r['lat_us']:.0f} us",
                             f"{tc_r['lat_us'] / base_r['lat_us']:.2f}x latency"))
            else:
                rows.append((f"{label}, TrueCopy P-VOL (context)", f"{tc_r['MiBps']:.0f} MiB/s",
                             f"unpaired {base_r['MiBps']:.0f} MiB/s", f"{tc_r['MiBps'] / base_r['MiBps']:.2f}x"))
        pid = f"{s.storage_device_id},bench,benchP_,benchS_,g1"
        info = pc.get(f"remote-mirror-copypairs/{pid}", remote=sc)
        assert (info["pvolStatus"], info["svolStatus"]) == ("PAIR", "PAIR"), info  # still mirrored throughout
        for c in (qc, pc, sc):
            c.close()
    finally:
        for sp in systems:
            sp.stop()
        shutil.rmtree(base, ignore_errors=True)
    print_table("GAD benchmark", ("measure", "vspemu", "baseline (same run)", "ratio"), rows)


if __name__ == "__main__":
    main()
