"""TrueCopy and Universal Replicator 1 MiB PAIR writes against the floor of their design, in the same run.

Usage: python bench/mirror_ratio.py [--repeat 3] [--runtime 6] [--floor-gib 2] [--cipher none] [--deferred 2]
       [--dir DIR]

Issue 20's target: a 1 MiB sequential write (iodepth 8) on a PAIR P-VOL reaches at least 0.9x of what
``bench/mirror_floor.py`` measures for the same design on the same machine in the same run:

- TrueCopy: ``mirror_floor``'s "mirrored, with copies" chain (client -> primary -> secondary, blocking
  sockets, no vspemu code) as a share of its "primary alone"; vspemu: fio on a TC PAIR P-VOL as a share of
  fio on an unpaired volume of the same system.
- Universal Replicator: ``mirror_floor``'s "primary writing a journal copy too" chain as a share of "primary
  alone"; vspemu: fio on a UR PAIR P-VOL (one mirror) as a share of the unpaired volume.
- With vspemu's link sealed (the default), TrueCopy also against ``mirror_floor``'s "sealed" chain (the same
  chain with each forwarded MiB sealed with AES-256-GCM, as vspemu's link does): the floor of the design as
  shipped. The issue's figure is the first, against the floor in clear.

Each round measures the three floor chains and the three fio runs one after the other (the floor's processes
and the two storage systems are never busy at the same time); the figures are the medians over the rounds,
with the range. The measured regions of every volume are written once first (cached pages: steady state),
the journal volumes are written once before they become journals, and the UR journal is drained before each UR
run. The floor's link is in clear; vspemu's is sealed (AES-256-GCM) unless ``--cipher none``.

With ``--deferred N`` (seconds, 0 to leave it out) each round also runs fio for N seconds on the UR P-VOL with the
secondary stopped (SIGSTOP) and, for its baseline, on the unpaired volume for as long: the floor's UR chain is
"what a UR primary could reach at best if the transfer to the secondary cost nothing at all during the run", and
this is vspemu's UR under that premise (the journal must hold the whole run: a few seconds with the 5 GiB journal).

For the context the table also gives each mirrored run against the floor's chain in MiB/s, and vspemu's unpaired
volume against the floor's primary alone: the target's ratio divides by the unpaired figure, so the faster vspemu's
unpaired path (fio over NBD on uvloop, a write completed inside the receive callback) is against the floor's
(a blocking Python loop), the higher the bar.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mirror_floor
from benchlib import fio, print_table, start_linked

from vspemu.client import VspClient

MiB = 1 << 20
GiB = 1 << 30
# (name of the comparison, vspemu's run, the floor chain of its design, that chain's label)
DESIGNS = (("TC", "TC", "copy", "mirrored, with copies"),
           ("TC sealed", "TC", "sealed", "mirrored, with copies, sealed as vspemu's link"),
           ("UR", "UR", "journal", "primary writing a journal copy too"))


def _drained(pc: VspClient, group: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = pc.raw("GET", "vspemu/v1/replication/stats", headers=pc.headers()).json()["mirrors"][group]
        if not st["qCount"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(group)
        time.sleep(0.05)


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=6, help="seconds of each fio run")
    ap.add_argument("--floor-gib", type=float, default=2.0, help="GiB written by each floor chain")
    ap.add_argument("--cipher", default=None, help="VSPEMU_LINK_CIPHER of both systems (default: theirs, sealed)")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--deferred", type=int, default=2,
                    help="seconds of a UR run with the secondary stopped (the floor's premise); 0: none")
    args = ap.parse_args()
    if args.cipher:
        os.environ["VSPEMU_LINK_CIPHER"] = args.cipher
    sealed = os.environ.get("VSPEMU_LINK_CIPHER", "aes-256-gcm") != "none"
    designs = [d for d in DESIGNS if sealed or d[2] != "sealed"]
    floor_modes = ["alone"] + [d[2] for d in designs]
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-ratio-"))
    p, s, pc, sc = start_linked(base / "sys", (483001, 483002))
    floor_dir = base / "floor"
    floor_dir.mkdir()
    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[dict[str, float]]] = {}
    try:
        for c, system in ((pc, p), (sc, s)):
            # the journal volume written once before it becomes one: its pages cached, as mirror_floor's journal
            # file is (with entries by reference it is written only when an overwrite protects an entry, so in
            # a short run every such write would go to a page never used before; on this VM such a page costs
            # a fault in the host too, about 2 ms per MiB: a cost of a fresh machine, not of the design)
            jvol = c.create_ldev("5G")
            lun = c.add_lun(jvol)
            fio(system.nbd_port, jvol, "write", "1M", 8, "5G", runtime=0)
            c.delete_lun(lun)
            c.create_journal(1, [jvol])
        solo = pc.create_ldev("4G")
        tp, ts = pc.create_ldev("4G"), sc.create_ldev("4G")
        up, us = pc.create_ldev("4G"), sc.create_ldev("4G")
        for ldev in (solo, tp, up):
            pc.add_lun(ldev)
        common = {"remoteStorageDeviceId": sc.storage_device_id, "isNewGroupCreation": True}
        pc.invoke("POST", "remote-mirror-copypairs", {
            **common, "copyGroupName": "tc", "copyPairName": "t", "replicationType": "TC", "pvolLdevId": tp,
            "svolLdevId": ts, "fenceLevel": "NEVER", "copyPace": 15}, remote=sc, timeout=3600)
        pc.invoke("POST", "remote-mirror-copypairs", {
            **common, "copyGroupName": "ur", "copyPairName": "u", "replicationType": "UR", "pvolLdevId": up,
            "svolLdevId": us, "fenceLevel": "ASYNC", "muNumber": 0, "pvolJournalId": 1, "svolJournalId": 1},
            remote=sc, timeout=3600)
        for ldev in (solo, tp, up):  # every measured region written once: all runs overwrite cached pages
            fio(p.nbd_port, ldev, "write", "1M", 8, "2G", runtime=0)
        _drained(pc, "ur")
        assert p.proc is not None and s.proc is not None
        pids = {"P": p.proc.pid, "S": s.proc.pid}
        total = int(args.floor_gib * GiB)
        for _ in range(args.repeat):
            for mode in floor_modes:
                runs.setdefault(f"floor {mode}", []).append(mirror_floor.run(mode, total, MiB, 8, floor_dir)["MiBps"])
            for name, ldev in (("unpaired", solo), ("TC", tp), ("UR", up)):
                if name == "UR":
                    _drained(pc, "ur")
                r = fio(p.nbd_port, ldev, "write", "1M", 8, "2G", runtime=args.runtime, pids=pids)
                runs.setdefault(name, []).append(r["MiBps"])
                cpu.setdefault(name, []).append(r["cpu"])
            _drained(pc, "ur")
            if args.deferred:  # the transfer deferred past the run: the secondary stopped while fio writes
                short = fio(p.nbd_port, solo, "write", "1M", 8, "2G", runtime=args.deferred, pids=pids)
                s.pause()
                try:
                    r = fio(p.nbd_port, up, "write", "1M", 8, "2G", runtime=args.deferred, pids={"P": pids["P"]})
                finally:
                    s.resume()
                _drained(pc, "ur")
                runs.setdefault("UR deferred", []).append(r["MiBps"])
                cpu.setdefault("UR deferred", []).append(r["cpu"])
                runs.setdefault("UR deferred ratio", []).append(r["MiBps"] / short["MiBps"])
            a, f = runs["floor alone"][-1], runs["unpaired"][-1]
            for kind, run, floor_mode, _ in designs:
                runs.setdefault(f"floor {kind}", []).append(runs[f"floor {floor_mode}"][-1] / a)
                runs.setdefault(f"{kind} ratio", []).append(runs[run][-1] / f)
                runs.setdefault(f"{kind} of floor", []).append(runs[f"{kind} ratio"][-1] / runs[f"floor {kind}"][-1])
                runs.setdefault(f"{kind} of floor MiB/s", []).append(runs[run][-1] / runs[f"floor {floor_mode}"][-1])
            if args.deferred:  # against the same floor ratio as UR's
                runs.setdefault("UR deferred of floor", []).append(runs["UR deferred ratio"][-1] / runs["floor UR"][-1])
            print(" ".join(f"{k}={v[-1]:.2f}" for k, v in runs.items()), flush=True)
        pc.close()
        sc.close()
    finally:
        p.stop()
        s.stop()
        shutil.rmtree(base, ignore_errors=True)

    def med(key: str) -> float:
        return statistics.median(runs[key])

    def cpu_text(name: str) -> str:
        keys = cpu[name][0].keys()
        return ", ".join(f"{k} {statistics.median(c[k] for c in cpu[name]) * 1000:.2f}" for k in keys)

    rows: list[tuple[str, ...]] = []
    for kind, run, floor_mode, label in designs:
        fk, rk, ok = f"floor {kind}", f"{kind} ratio", f"{kind} of floor"
        rows.append((f"floor ({label}) vs primary alone",
                     f"{med('floor ' + floor_mode):.0f} vs {med('floor alone'):.0f} MiB/s",
                     f"{med(fk):.2f}x ({_spread(runs[fk])})", ""))
        rows.append((f"{run} PAIR P-VOL vs unpaired, 1 MiB iodepth 8",
                     f"{med(run):.0f} vs {med('unpaired'):.0f} MiB/s", f"{med(rk):.2f}x ({_spread(runs[rk])})",
                     f"{med(ok):.2f}x of the floor ({_spread(runs[ok])})"
                     + ("; target >= 0.9x" if floor_mode != "sealed" else "; the design as shipped")))
        rows.append((f"{run} PAIR P-VOL vs the floor's chain, in MiB/s (not the target: for the context)",
                     f"{med(run):.0f} vs {med('floor ' + floor_mode):.0f} MiB/s",
                     f"{med(kind + ' of floor MiB/s'):.2f}x ({_spread(runs[kind + ' of floor MiB/s'])})",
                     f"unpaired vs the floor's primary alone: {med('unpaired') / med('floor alone'):.2f}x"))
        if kind == run:
            rows.append((f"{run}: CPU ms per MiB (median)", cpu_text(run), f"unpaired: {cpu_text('unpaired')}", ""))
    if args.deferred:
        k = "UR deferred"
        rows.append((f"UR PAIR P-VOL, secondary stopped during the run ({args.deferred} s), vs unpaired as long",
                     f"{med(k):.0f} MiB/s", f"{med(k + ' ratio'):.2f}x ({_spread(runs[k + ' ratio'])})",
                     f"{med(k + ' of floor'):.2f}x of the floor ({_spread(runs[k + ' of floor'])}): its premise"))
        rows.append(("UR, secondary stopped: CPU ms per MiB (median)", cpu_text(k), "", ""))
    print_table(f"Mirrored 1 MiB writes against the floor of their design, median of {args.repeat} rounds",
                ("measure", "MiB/s", "ratio (range)", "against the floor (range)"), rows)


if __name__ == "__main__":
    main()
