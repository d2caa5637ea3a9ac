"""3DC multi-target benchmark: what a UR mirror beside a TrueCopy pair costs the host.

Usage: python bench/tdc_bench.py [--dir DIR] [--runtime 8]

Three storage-system processes: the primary, a near site (TrueCopy) and a far site (UR). fio over NBD on
four volumes of the primary, measured in the same run: an unpaired one (the baseline), a P-VOL in a
TrueCopy pair only, one in a UR mirror only, and one in a TrueCopy pair and that UR mirror (3DC
multi-target). Rows: 4 KiB random write latency at iodepth 1 and 1 MiB sequential write throughput at
iodepth 8, with CPU per MiB.
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


def create(pc: VspClient, rc: VspClient, group: str, rtype: str, pv: int, sv: int, new: bool = True) -> None:
    body = {"copyGroupName": group, "copyPairName": f"p{pv}", "replicationType": rtype,
            "remoteStorageDeviceId": rc.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": new}
    if rtype == "TC":
        body.update(fenceLevel="NEVER", copyPace=15)
    else:
        body.update(fenceLevel="ASYNC")
        if new:
            body.update(muNumber=1, pvolJournalId=1, svolJournalId=1)
    pc.invoke("POST", "remote-mirror-copypairs", body, remote=rc, timeout=3600)
    deadline = time.monotonic() + 3600  # the job ends with the pair created; its initial copy goes on
    gid = f"{rc.storage_device_id},{group},{group}P_,{group}S_"
    while {x["pvolStatus"] for x in pc.get(f"remote-mirror-copygroups/{gid}", remote=rc)["copyPairs"]} != {"PAIR"}:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{group} did not reach PAIR")
        time.sleep(0.05)


def wait_drained(pc: VspClient, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while any(x["qCount"] for x in pc.get("journals", journalInfo="basic")["data"] if x["journalId"] == 1):
        if time.monotonic() > deadline:
            raise TimeoutError("the UR mirror did not drain")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--runtime", type=int, default=8)
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-tdcbench-"))
    systems = [SystemProcess(base / name, serial, extra_args=["--log-level", "warning"])
               for name, serial in (("p", 483001), ("near", 483002), ("far", 483003))]
    rows: list[tuple[str, str, str, str]] = []
    try:
        for s in systems:
            s.start()
        p, near, far = systems
        pc, nc, fc = (s.client() for s in systems)
        link_systems(pc, nc)
        link_systems(pc, fc)
        for c in (pc, fc):
            c.create_journal(1, [c.create_ldev("3G")])
        solo, tc_only, ur_only, both = (pc.create_ldev("4G") for _ in range(4))
        for v in (solo, tc_only, ur_only, both):
            pc.add_lun(v)
        create(pc, nc, "tc1", "TC", tc_only, nc.create_ldev("4G"))
        create(pc, nc, "tc2", "TC", both, nc.create_ldev("4G"))
        create(pc, fc, "ur2", "UR", both, fc.create_ldev("4G"))
        create(pc, fc, "ur2", "UR", ur_only, fc.create_ldev("4G"), new=False)
        # the measured regions written once first, through the pairs (as in tc_bench.py): every run overwrites
        # cached pages on every site instead of some runs paying for first-touch page allocation
        for v in (solo, tc_only, ur_only, both):
            fio(p.nbd_port, v, "write", "1M", 8, "2G", runtime=0)
            wait_drained(pc)
        pids = {"P": p.proc.pid, "near": near.proc.pid, "far": far.proc.pid}
        for label, rw, bs, depth in (("4 KiB rand write, iodepth 1", "randwrite", "4k", 1),
                                     ("1 MiB seq write, iodepth 8", "write", "1M", 8)):
            base_r = fio(p.nbd_port, solo, rw, bs, depth, "2G", runtime=args.runtime, pids=pids)
            runs = []
            for name, vol in (("TrueCopy P-VOL", tc_only), ("UR P-VOL", ur_only),
                              ("TrueCopy + UR P-VOL (3DC)", both)):
                runs.append((name, fio(p.nbd_port, vol, rw, bs, depth, "2G", runtime=args.runtime, pids=pids)))
                wait_drained(pc)
            for name, r in runs:
                if bs == "4k":
                    rows.append((f"{label}, {name}", f"{r['lat_us']:.0f} us ({r['iops']:.0f} IOPS)",
                                 f"unpaired {base_r['lat_us']:.0f} us", f"{r['lat_us'] / base_r['lat_us']:.2f}x"))
                else:
                    rows.append((f"{label}, {name}", f"{r['MiBps']:.0f} MiB/s",
                                 f"unpaired {base_r['MiBps']:.0f} MiB/s", f"{r['MiBps'] / base_r['MiBps']:.2f}x"))
            if bs != "4k":
                for name, r in runs:
                    rows.append(cpu_row(f"1 MiB, {name}", base_r, r))
        for c in (pc, nc, fc):
            c.close()
    finally:
        for s in systems:
            s.stop()
        shutil.rmtree(base, ignore_errors=True)
    print_table("3DC multi-target benchmark", ("measure", "vspemu", "baseline (same run)", "ratio"), rows)


if __name__ == "__main__":
    main()
