"""Scale: N TrueCopy pairs and N Universal Replicator pairs in one copy group each (issue 20).

Usage: python bench/scale_bench.py [--pairs 1000] [--baseline 10] [--idle-seconds 20] [--dir DIR]

Runs the same sequence twice, each time on two fresh linked systems: first with ``--baseline`` pairs per group
(the baseline column), then with ``--pairs``. For each run:

- creating the LDEVs through the REST API (2 per pair per side, 1 GiB thin each; reported on its own);
- creating every pair of a group with ``Job-Mode-Wait-Configuration-Change: NoWait`` (one client, one request
  after the other, as a playbook loop does; each answered when its job is Completed): the time until every
  create is answered, and until every pair of the group shows PAIR on both sides;
- group split and group resync (the resync until every pair is PAIR again);
- listing the group's pairs: ``GET remote-mirror-copygroups/{id}`` with Remote-Authorization (the object
  that lists a group's pairs; vspemu has no list form of ``remote-mirror-copypairs``, as the array documents
  none), its local-only form (``NotSpecified``), and ``GET remote-copypairs`` (every page of 500);
- resident memory of each system (VmRSS from /proc);
- the idle cost with every pair in PAIR and no host I/O: link bytes per second (``/metrics``,
  ``vspemu_link_sent_bytes`` of both systems) and CPU seconds per second of both system processes.

Every figure is printed with its target (where the issue sets one) and the baseline run's figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import print_table, start_linked

from vspemu.client import VspClient

MiB = 1 << 20


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def link_sent(c: VspClient) -> float:
    text = c.raw("GET", "vspemu/v1/metrics", headers=c.headers()).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vspemu_link_sent_bytes"))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def best_of(n: int, fn: Callable[[], Any]) -> float:
    return min(timed(fn) for _ in range(n))


class Run:
    def __init__(self, base: Path, serials: tuple[int, int], n: int) -> None:
        self.n = n
        self.p, self.s, self.pc, self.sc = start_linked(base, serials)
        self.fig: dict[str, float] = {}

    def stop(self) -> None:
        for sp in (self.p, self.s):
            sp.stop()

    def gid(self, cg: str) -> str:
        return f"{self.sc.storage_device_id},{cg},{cg}P_,{cg}S_"

    def statuses(self, cg: str) -> set[tuple[str, str]]:
        g = self.pc.get(f"remote-mirror-copygroups/{self.gid(cg)}", remote=self.sc)
        return {(p["pvolStatus"], p["svolStatus"]) for p in g["copyPairs"]}

    def wait_all_pair(self, cg: str, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.statuses(cg)) != {("PAIR", "PAIR")}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cg}: {got}")
            time.sleep(0.2)

    def ldevs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        t0 = time.monotonic()
        pv = [self.pc.create_ldev("1G") for _ in range(2 * self.n)]
        sv = [self.sc.create_ldev("1G") for _ in range(2 * self.n)]
        self.fig["ldev_create_s"] = time.monotonic() - t0
        for c in (self.pc, self.sc):
            c.create_journal(1, [c.create_ldev("4G")])
        pairs = list(zip(pv, sv, strict=True))
        return pairs[:self.n], pairs[self.n:]

    def create(self, cg: str, rtype: str, vols: list[tuple[int, int]]) -> None:
        t0 = time.monotonic()
        for i, (pv, sv) in enumerate(vols):
            body: dict[str, Any] = {
                "copyGroupName": cg, "copyPairName": f"p{i}", "replicationType": rtype,
                "remoteStorageDeviceId": self.sc.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                "isNewGroupCreation": i == 0, "fenceLevel": "ASYNC" if rtype == "UR" else "NEVER",
                "copyPace": 15}
            if rtype == "UR" and i == 0:
                body.update(muNumber=1, pvolJournalId=1, svolJournalId=1)
            job = self.pc.request("POST", "remote-mirror-copypairs", json=body, remote=self.sc, nowait=True,
                                  wait_completed=True)
            self.pc.wait_job(job, timeout=600)
        self.fig[f"{rtype}_create_answered_s"] = time.monotonic() - t0
        self.wait_all_pair(cg)
        self.fig[f"{rtype}_create_all_pair_s"] = time.monotonic() - t0

    def split_resync(self, cg: str, rtype: str) -> None:
        gid = self.gid(cg)
        params = {"parameters": {"replicationType": rtype}}
        self.fig[f"{rtype}_split_s"] = timed(lambda: self.pc.invoke(
            "PUT", f"remote-mirror-copygroups/{gid}/actions/split/invoke", params, remote=self.sc))
        assert self.statuses(cg) == {("PSUS", "SSUS")}, self.statuses(cg)

        def resync() -> None:
            self.pc.invoke("PUT", f"remote-mirror-copygroups/{gid}/actions/resync/invoke", params,
                           remote=self.sc, timeout=1800)
            self.wait_all_pair(cg)

        self.fig[f"{rtype}_resync_s"] = timed(resync)

    def lists(self, cg: str, rtype: str) -> None:
        gid = self.gid(cg)
        local = f"NotSpecified,{cg},{cg}P_,NotSpecified"
        self.fig[f"{rtype}_group_get_remote_s"] = best_of(3, lambda: self.pc.get(
            f"remote-mirror-copygroups/{gid}", remote=self.sc))
        self.fig[f"{rtype}_group_get_local_s"] = best_of(3, lambda: self.pc.get(f"remote-mirror-copygroups/{local}"))

    def local_pairs(self) -> None:
        def all_pages() -> None:
            head = 0
            while True:
                page = self.pc.get("remote-copypairs", headLdevId=head, count=500)["data"]
                if len(page) < 500:
                    return
                head = page[-1]["ldevId"] + 1

        self.fig["remote_copypairs_s"] = best_of(3, all_pages)

    def idle(self, seconds: float) -> None:
        time.sleep(3)  # past the copies' tail
        pids = (self.p.proc.pid, self.s.proc.pid)
        b0 = link_sent(self.pc) + link_sent(self.sc)
        c0 = sum(cpu_seconds(pid) for pid in pids)
        t0 = time.monotonic()
        time.sleep(seconds)
        c1 = sum(cpu_seconds(pid) for pid in pids)
        dt = time.monotonic() - t0
        b1 = link_sent(self.pc) + link_sent(self.sc)
        self.fig["idle_link_Bps"] = (b1 - b0) / dt
        self.fig["idle_cpu_pct"] = (c1 - c0) / dt * 100

    def rss(self) -> None:
        self.fig["rss_p_mib"] = rss_mib(self.p.proc.pid)
        self.fig["rss_s_mib"] = rss_mib(self.s.proc.pid)


def measure(base: Path, serials: tuple[int, int], n: int, idle_s: float) -> dict[str, float]:
    run = Run(base, serials, n)
    try:
        tc, ur = run.ldevs()
        run.create("tcg", "TC", tc)
        run.create("urg", "UR", ur)
        run.rss()
        run.idle(idle_s)
        run.lists("tcg", "TC")
        run.lists("urg", "UR")
        run.local_pairs()
        run.split_resync("tcg", "TC")
        run.split_resync("urg", "UR")
        rss = run.fig.pop("rss_p_mib"), run.fig.pop("rss_s_mib")
        run.rss()
        run.fig["rss_p_mib"] = max(rss[0], run.fig["rss_p_mib"])
        run.fig["rss_s_mib"] = max(rss[1], run.fig["rss_s_mib"])
        return run.fig
    finally:
        run.stop()


ROWS: list[tuple[str, str, str, str]] = [
    # (key, label, unit format, target)
    ("ldev_create_s", "create 2 LDEVs per pair per side (REST, 1 GiB thin)", "{:.1f} s", "(reported apart)"),
    ("TC_create_answered_s", "TC: every create (NoWait) answered", "{:.1f} s", "< 60 s"),
    ("TC_create_all_pair_s", "TC: ... and every pair PAIR", "{:.1f} s", ""),
    ("UR_create_answered_s", "UR: every create (NoWait) answered", "{:.1f} s", "< 60 s"),
    ("UR_create_all_pair_s", "UR: ... and every pair PAIR", "{:.1f} s", ""),
    ("TC_split_s", "TC: group split", "{:.2f} s", "< 10 s"),
    ("TC_resync_s", "TC: group resync until all PAIR", "{:.2f} s", "< 10 s"),
    ("UR_split_s", "UR: group split", "{:.2f} s", "< 10 s"),
    ("UR_resync_s", "UR: group resync until all PAIR", "{:.2f} s", "< 10 s"),
    ("TC_group_get_remote_s", "TC: GET copy group's pairs (Remote-Authorization)", "{:.3f} s", "< 1 s"),
    ("TC_group_get_local_s", "TC: GET copy group's pairs (NotSpecified)", "{:.3f} s", "< 1 s"),
    ("UR_group_get_remote_s", "UR: GET copy group's pairs (Remote-Authorization)", "{:.3f} s", "< 1 s"),
    ("UR_group_get_local_s", "UR: GET copy group's pairs (NotSpecified)", "{:.3f} s", "< 1 s"),
    ("remote_copypairs_s", "GET remote-copypairs, every page of 500", "{:.3f} s", "< 1 s"),
    ("rss_p_mib", "resident memory, P system (max seen)", "{:.0f} MiB", "< 500 MiB"),
    ("rss_s_mib", "resident memory, S system (max seen)", "{:.0f} MiB", "< 500 MiB"),
    ("idle_link_Bps", "idle: link bytes/s, both systems (all PAIR)", "{:.0f} B/s", "sublinear"),
    ("idle_cpu_pct", "idle: CPU of both system processes", "{:.1f} %", "sublinear"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--baseline", type=int, default=10)
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="vspemu-scalebench-"))
    try:
        small = measure(base / "small", (482001, 482002), args.baseline, args.idle_seconds)
        big = measure(base / "big", (482011, 482012), args.pairs, args.idle_seconds)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    rows = []
    for key, label, fmt, target in ROWS:
        ratio = f"{big[key] / small[key]:.1f}x" if small[key] else "-"
        rows.append((label, fmt.format(big[key]), target, fmt.format(small[key]), ratio))
    print_table(f"vspemu scale, {args.pairs} TC + {args.pairs} UR pairs",
                ("figure", f"{args.pairs} pairs per group", "target", f"baseline: {args.baseline} pairs",
                 "ratio"), rows)


if __name__ == "__main__":
    main()
