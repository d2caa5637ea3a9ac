"""Resync after overwriting 1 % of the tracks, in the form of the independent harness of issue 20.

Usage: python bench/resync_harness.py [--size-gib 2] [--runs 3] [--dir DIR]

The harness's steps, each with a separate client, all timed from outside the systems:
1. a TC pair of two ``size`` volumes, the P-VOL full of random data; the initial copy is timed from the
   create request (no NoWait header) until its job is Completed and both sides show PAIR;
2. split; ``qemu-io`` (its own process, its own NBD connection) overwrites 4 KiB in 1 % of the 256 KiB
   tracks of the P-VOL;
3. resync without NoWait, timed from the request until the job is Completed and both sides show PAIR.
Each step prints its figure next to the full copy measured in the same run (target: resync at most 5 %).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import print_table, start_linked  # noqa: E402
from tc_bench import fill  # noqa: E402

from vspemu.client import VspClient  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TRACK = 256 << 10


def until_completed_and_pair(pc: VspClient, sc: VspClient, job: dict[str, Any], group: str) -> dict[str, float]:
    """Poll the job (as a client without NoWait does, at 10 ms), then both sides' pair status; the moments
    (monotonic seconds) the job was seen Completed and both sides were seen in PAIR."""
    while job.get("status") != "Completed":
        time.sleep(0.01)
        job = pc.job(job["jobId"])
    completed = time.monotonic()
    if job.get("state") != "Succeeded":
        raise RuntimeError(job)
    gid_p = f"{sc.storage_device_id},{group},{group}P_,{group}S_"
    gid_s = f"{pc.storage_device_id},{group},{group}S_,{group}P_"
    while True:
        gp = pc.get(f"remote-mirror-copygroups/{gid_p}", remote=sc)
        gs = sc.get(f"remote-mirror-copygroups/{gid_s}", remote=pc)
        if all(p["pvolStatus"] == "PAIR" and p["svolStatus"] == "PAIR" for p in gp["copyPairs"] + gs["copyPairs"]):
            return {"completed": completed, "pair": time.monotonic()}
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-resync-"))
    size = int(args.size_gib * GiB)
    p, s, pc, sc = start_linked(base, (482001, 482002))
    rows: list[tuple[str, str, str, str]] = []
    try:
        pv, sv = pc.create_ldev(f"{size // MiB}M"), sc.create_ldev(f"{size // MiB}M")
        pc.add_lun(pv)
        sc.add_lun(sv)
        fill(p.nbd_port, pv, size)
        group = "h"
        t0 = time.monotonic()
        job = pc.request("POST", "remote-mirror-copypairs", json={
            "copyGroupName": group, "copyPairName": "p", "replicationType": "TC",
            "remoteStorageDeviceId": sc.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=sc)
        full = until_completed_and_pair(pc, sc, job, group)["pair"] - t0
        rows.append((f"initial copy, {args.size_gib:g} GiB random", f"{full:.3f} s", "-", "-"))
        gid = f"{sc.storage_device_id},{group},{group}P_,{group}S_"
        ntracks = size // TRACK
        rng = random.Random(20)
        for run in range(args.runs):
            pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/split/invoke",
                      {"parameters": {"replicationType": "TC"}}, remote=sc)
            changed = rng.sample(range(ntracks), max(1, ntracks // 100))
            cmds: list[str] = []
            for t in changed:
                cmds += ["-c", f"write -P {run + 1} {t * TRACK + rng.randrange(0, TRACK - 4096, 512)} 4k"]
            subprocess.run(["qemu-io", "-f", "raw", *cmds, f"nbd://127.0.0.1:{p.nbd_port}/{pv}"],
                           check=True, capture_output=True)
            t0 = time.monotonic()
            job = pc.request("PUT", f"remote-mirror-copygroups/{gid}/actions/resync/invoke",
                             json={"parameters": {"replicationType": "TC"}}, remote=sc)
            answered = time.monotonic() - t0
            seen = until_completed_and_pair(pc, sc, job, group)
            stats = pc.raw("GET", "vspemu/v1/replication/stats", headers=pc.headers()).json()["pairs"]
            sent = stats[f"{group}/p"]["tracksSentLastCopy"]
            total = seen["pair"] - t0
            rows.append((f"resync {run + 1}, {len(changed)} tracks overwritten by qemu-io ({sent} sent)",
                         f"{total:.3f} s (answer {answered:.3f}, Completed {seen['completed'] - t0:.3f})",
                         f"full copy {full:.3f} s", f"{total / full * 100:.1f}% of full"))
    finally:
        p.stop()
        s.stop()
    print_table("Resync in the harness's form (issue 20)", ("measure", "vspemu", "baseline (same run)", "ratio"),
                rows)
    if not args.dir:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
