"""``vspemu demo``: the seed workflow with real data on a running lab (``vspemu up``).

Steps: log in to both systems; register the secondary on the primary (if not yet); path group 0 in both
directions (if missing); fresh volumes (+ LUNs) with random data written to the P-VOL over NBD; journals for
UR; then a TrueCopy pair: create (progress bar), get, split, write, resync, split for the check, compare the
S-VOL and P-VOL data (sha256 over NBD), delete; then the same with Universal Replicator. A UR failure is
reported and does not fail the demo. Then a failover rehearsal with faults on demand (:func:`rehearsal`):
a TC pair in PAIR with a host writing, the primary's path group to the secondary cut (a ``path-group``
fault), the pair goes PSUE, the secondary takes over (SSWS) and holds every write acknowledged while PAIR,
the fault is cleared, a swap resync makes the old secondary the primary, and ``verify`` proves 0 differing
tracks. Every run uses new LDEVs and copy-group names, so it can run again on the same lab. Exit 0 when
every data check that ran matched (TC and the rehearsal at least), 1 otherwise, 2 when the lab could not be
prepared.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Annotated, Any

import httpx
import typer

from vspemu.cli.pair import (
    PRIMARY_URL,
    SECONDARY_URL,
    Arrays,
    CaCert,
    Insecure,
    PairCommandError,
    console,
    statuses_line,
    tls_setting,
    wait_for_pair,
)
from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER

MiB = 1 << 20
CHECK_LINE = "final check"
DR = "DR"  # the failover rehearsal's key in the results
STATUS_PAGE = "/ConfigurationManager/vspemu/status"


def _nbd(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


def _step(text: str) -> None:
    console.print(f"[bold cyan]>[/bold cyan] {text}", soft_wrap=True)


def _fill(addr: tuple[str, int], ldev: int, size: int) -> None:
    with NbdClient(addr[0], addr[1], str(ldev)) as c:
        for off in range(0, size, 4 * MiB):
            c.write(off, os.urandom(min(4 * MiB, size - off)))
        c.flush()


def _sha256(addr: tuple[str, int], ldev: int, size: int) -> str:
    h = hashlib.sha256()
    with NbdClient(addr[0], addr[1], str(ldev)) as c:
        for off in range(0, size, 4 * MiB):
            h.update(c.read(off, min(4 * MiB, size - off)))
    return h.hexdigest()


def _free_journal_id(c: VspClient) -> int:
    used = {int(j["journalId"]) for j in c.get("journals")["data"]}
    return next(i for i in range(256) if i not in used)


def prepare_link(a: Arrays) -> None:
    """Register the secondary on the primary (mutual) and make path group 0 both ways, if not there yet."""
    p, s = a.p, a.s
    registered = {r["storageDeviceId"] for r in p.get("remote-storages")["data"] if r.get("dkcType") == "Remote"}
    if s.storage_device_id in registered:
        _step(f"remote storage {s.storage_device_id} already registered on {p.storage_device_id}")
    else:
        p.register_remote(s, mutual=True)
        _step(f"registered {s.storage_device_id} on {p.storage_device_id} (mutual)")
    for local, remote in ((p, s), (s, p)):
        serial = int(remote.get("storages")["data"][0]["serialNumber"])
        groups = {g["remotepathGroupId"]: g for g in local.get("remotepath-groups")["data"]}
        gid = next((k for k, g in groups.items() if int(g["remoteSerialNumber"]) == serial
                    and int(g["pathGroupId"]) == 0), None)
        if gid is None:
            gid = local.create_path_group(remote, 0, "CL3-A", "CL3-A")
            local.add_remote_path(gid, "CL4-A", "CL4-A")
            _step(f"path group {gid} created on {local.storage_device_id} (CL3-A, CL4-A)")
        waited = local.wait_path_status(gid, "NML_01", 30)
        _step(f"path group {gid} on {local.storage_device_id}: paths {local.path_statuses(gid)} "
              f"(waited {waited:.1f} s)")


def run_pair(a: Arrays, rep: str, size: str, nbd_p: tuple[str, int], nbd_s: tuple[str, int],
             tag: str) -> tuple[str, str]:
    """One pair's lifecycle; returns (P-VOL sha256, S-VOL sha256) taken while split."""
    p, s = a.p, a.s
    pv = p.create_ldev(size, label=f"demo-{rep}-P")
    p.add_lun(pv)
    sv = s.create_ldev(size, label=f"demo-{rep}-S")
    s.add_lun(sv)
    nbytes = int(p.get(f"ldevs/{pv}")["blockCapacity"]) * 512
    _fill(nbd_p, pv, nbytes)
    _step(f"{rep}: P-VOL {pv} on {p.storage_device_id} ({size}, random data written over NBD), "
          f"S-VOL {sv} on {s.storage_device_id}")
    group, name = f"demo_{rep.lower()}_{tag}", "pair1"
    body: dict[str, Any] = {"copyGroupName": group, "copyPairName": name, "replicationType": rep,
                            "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                            "isNewGroupCreation": True}
    if rep == "TC":
        body.update(fenceLevel="NEVER", copyPace=15)
    else:
        jp = p.create_ldev("1G", label="demo-jnl")
        js = s.create_ldev("1G", label="demo-jnl")
        jid_p, jid_s = _free_journal_id(p), _free_journal_id(s)
        p.create_journal(jid_p, [jp])
        s.create_journal(jid_s, [js])
        _step(f"UR: journal {jid_p} (LDEV {jp}) on the primary, journal {jid_s} (LDEV {js}) on the secondary")
        body.update(fenceLevel="ASYNC", muNumber=1, pvolJournalId=jid_p, svolJournalId=jid_s)
    job = p.invoke("POST", "remote-mirror-copypairs", body, remote=s, nowait=True)
    pair_id = VspClient.resource_id(job)
    _step(f"{rep}: create {pair_id}: job {job['jobId']} {job['state']}")
    if wait_for_pair(a, group, name, timeout=600) != 0:
        raise RuntimeError(f"{rep}: the initial copy did not reach PAIR")
    path = f"remote-mirror-copypairs/{pair_id}"
    info = p.get(path, remote=s)
    _step(f"{rep}: get: pvol {info['pvolStatus']} / svol {info['svolStatus']}, fence {info['fenceLevel']}")

    def split() -> None:
        p.invoke("PUT", f"{path}/actions/split/invoke", {"parameters": {"replicationType": rep}}, remote=s,
                 nowait=True)

    split()
    _step(f"{rep}: split: {statuses_line(a.pairs(group, name))}")
    with NbdClient(nbd_p[0], nbd_p[1], str(pv)) as c:
        for i in range(8):
            c.write((i * nbytes) // 8, os.urandom(64 * 1024))
        c.flush()
    _step(f"{rep}: wrote 8 x 64 KiB to the P-VOL while split")
    p.invoke("PUT", f"{path}/actions/resync/invoke", {"parameters": {"replicationType": rep}}, remote=s,
             nowait=True)
    if wait_for_pair(a, group, name, timeout=600) != 0:
        raise RuntimeError(f"{rep}: the resync did not reach PAIR")
    _step(f"{rep}: resync: {statuses_line(a.pairs(group, name))}")
    split()
    digests = _sha256(nbd_p, pv, nbytes), _sha256(nbd_s, sv, nbytes)
    _step(f"{rep}: split for the check: {statuses_line(a.pairs(group, name))}")
    p.invoke("DELETE", path, remote=s)
    left = a.pairs(group, name)
    _step(f"{rep}: delete: {'SMPL on both sides' if not left else statuses_line(left)}")
    return digests


def _wait(what: str, check: Any, timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something true; RuntimeError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"rehearsal: {what} not reached after {timeout:g} s")
        time.sleep(0.2)


def _serial(c: VspClient) -> int:
    return int(c.get("storages")["data"][0]["serialNumber"])


def _path_group_id(local: VspClient, remote_serial: int) -> str:
    for g in local.get("remotepath-groups")["data"]:
        if int(g["remoteSerialNumber"]) == remote_serial and int(g["pathGroupId"]) == 0:
            return str(g["remotepathGroupId"])
    raise RuntimeError(f"rehearsal: no path group 0 to serial {remote_serial} on {local.storage_device_id}")


def rehearsal(a: Arrays, size: str, nbd_p: tuple[str, int], nbd_s: tuple[str, int], tag: str) -> bool:
    """A failover rehearsal with faults on demand; True when the S-VOL held every write acknowledged while
    the pair was PAIR and the verify after the swap resync found 0 differing tracks. The fault is always
    cleared (and the pair deleted) before returning."""
    p, s = a.p, a.s
    pv = p.create_ldev(size, label="demo-DR-P")
    p.add_lun(pv)
    sv = s.create_ldev(size, label="demo-DR-S")
    s.add_lun(sv)
    nbytes = int(p.get(f"ldevs/{pv}")["blockCapacity"]) * 512
    _fill(nbd_p, pv, nbytes)
    group, name = f"demo_dr_{tag}", "pair1"
    _step(f"DR: failover rehearsal: P-VOL {pv} on {p.storage_device_id}, S-VOL {sv} on {s.storage_device_id}; "
          f"watch it on {p.base_url}{STATUS_PAGE} and {s.base_url}{STATUS_PAGE}")
    job = p.invoke("POST", "remote-mirror-copypairs",
                   {"copyGroupName": group, "copyPairName": name, "replicationType": "TC",
                    "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
                    "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=s, nowait=True)
    pair_id = VspClient.resource_id(job)
    if wait_for_pair(a, group, name, timeout=600) != 0:
        raise RuntimeError("DR: the initial copy did not reach PAIR")
    _step(f"DR: pair {pair_id} (fence NEVER): {statuses_line(a.pairs(group, name))}")
    # the host writes while PAIR: TrueCopy acknowledges a write only once the S-VOL holds it
    with NbdClient(nbd_p[0], nbd_p[1], str(pv)) as c:
        for i in range(16):
            c.write((i * nbytes) // 16 + 4096, os.urandom(64 * 1024))
        c.flush()
    acked = _sha256(nbd_p, pv, nbytes)
    _step(f"DR: host wrote 16 x 64 KiB while PAIR, all acknowledged; P-VOL sha256 {acked[:16]}...")
    fault: dict[str, Any] | None = None
    s_serial = _serial(s)
    swapped = False
    try:
        fault = p.add_fault("path-group", remoteSerialNumber=s_serial, pathGroupId=0)
        gid = _path_group_id(p, s_serial)
        _wait("paths down", lambda: all(st != "NML_01" for st in p.path_statuses(gid)))
        _step(f"DR: fault {fault['faultId']} in force: path-group 0 from {p.storage_device_id} to serial "
              f"{s_serial} cut; paths {p.path_statuses(gid)}")
        # the host goes on writing: with fence NEVER the write is accepted and the pair suspends by error
        with NbdClient(nbd_p[0], nbd_p[1], str(pv)) as c:
            c.write(0, os.urandom(64 * 1024))
            c.flush()
        pairs = _wait("PSUE", lambda: (x := a.pairs(group, name)) and x[0]["pvolStatus"] == "PSUE" and x)
        _step(f"DR: host write after the cut accepted (fence NEVER), the pair suspended by error: "
              f"{statuses_line(pairs)}")
        # horctakeover on the secondary alone (SVOL takeover): the S-VOL becomes writable (SSWS)
        s_dg = a.group(group, side="s")["localDeviceGroupName"]
        ns = f"NotSpecified,{group},{s_dg},NotSpecified,{name}"
        s.invoke("POST", f"remote-mirror-copypairs/{ns}/actions/takeover/invoke",
                 {"parameters": {"mode": "forceSplit"}})
        svol = s.get(f"remote-mirror-copypairs/{ns}")["svolStatus"]
        _step(f"DR: takeover (forceSplit) on {s.storage_device_id}: S-VOL {svol}")
        if svol != "SSWS":
            raise RuntimeError(f"DR: the S-VOL is {svol} after the takeover, not SSWS")
        held = _sha256(nbd_s, sv, nbytes)
        same = held == acked
        _step(f"DR: S-VOL sha256 {held[:16]}... {'equals' if same else 'DIFFERS from'} the P-VOL's after "
              f"the writes acknowledged while PAIR: {'no acknowledged write lost' if same else 'WRITES LOST'}")
        with NbdClient(nbd_s[0], nbd_s[1], str(sv)) as c:  # the application runs at the recovery site
            c.write(nbytes // 2, os.urandom(64 * 1024))
            c.flush()
        _step("DR: the recovery site wrote 64 KiB to the S-VOL (SSWS)")
        p.clear_fault(fault["faultId"])
        fault = None
        _wait("paths up", lambda: all(st == "NML_01" for st in p.path_statuses(gid)))
        _step(f"DR: fault cleared: paths {p.path_statuses(gid)}")
        # swap resync from the secondary: it becomes the primary and copies its differences back
        sid = a.group(group, side="s")["remoteMirrorCopyGroupId"] + f",{name}"
        s.invoke("PUT", f"remote-mirror-copypairs/{sid}/actions/resync/invoke",
                 {"parameters": {"replicationType": "TC", "doSwapSvol": True}}, remote=p)
        swapped = True
        info = _wait("PAIR after the swap resync",
                     lambda: (x := s.get(f"remote-mirror-copypairs/{sid}", remote=p))
                     and (x["pvolStatus"], x["svolStatus"]) == ("PAIR", "PAIR") and x, timeout=600)
        _step(f"DR: swap resync: P-VOL {info['pvolLdevId']} on {info['pvolStorageDeviceId']} -> S-VOL "
              f"{info['svolLdevId']} on {info['svolStorageDeviceId']}: {info['pvolStatus']}/{info['svolStatus']}")
        report = s.verify(sid, remote=p)
        differing = int(report["differingTrackCount"])
        _step(f"DR: verify (per-track checksums on both sides): {differing} differing tracks")
        return same and differing == 0
    finally:
        if fault is not None:
            p.clear_fault(fault["faultId"])
        if swapped:
            sid = a.group(group, side="s")["remoteMirrorCopyGroupId"] + f",{name}"
            s.invoke("DELETE", f"remote-mirror-copypairs/{sid}", remote=p)
        else:
            try:
                p.invoke("DELETE", f"remote-mirror-copypairs/{pair_id}", remote=s)
            except ApiError as e:
                console.print(f"[yellow]DR: the rehearsal pair was not deleted:[/yellow] {e.message_id} {e.message}")
        _step(f"DR: pair deleted; faults in force on {p.storage_device_id}: {len(p.faults())}")


def demo(
    primary: Annotated[str, typer.Option("--primary", help="REST URL of the primary.")] = PRIMARY_URL,
    secondary: Annotated[str, typer.Option("--secondary", help="REST URL of the secondary.")] = SECONDARY_URL,
    primary_nbd: Annotated[str, typer.Option(help="NBD address of the primary.")] = "127.0.0.1:10809",
    secondary_nbd: Annotated[str, typer.Option(help="NBD address of the secondary.")] = "127.0.0.1:10810",
    user: Annotated[str, typer.Option("--user", "-u")] = DEFAULT_USER,
    password: Annotated[str, typer.Option("--password", "-p")] = DEFAULT_PASSWORD,
    size: Annotated[str, typer.Option(help="Size of each volume.")] = "64M",
    skip_ur: Annotated[bool, typer.Option("--skip-ur", help="TrueCopy only.")] = False,
    skip_rehearsal: Annotated[bool, typer.Option("--skip-rehearsal",
                                                 help="No failover rehearsal (faults on demand).")] = False,
    insecure: Insecure = False,
    ca_cert: CaCert = None,
) -> None:
    """Run the seed workflow (TrueCopy, then Universal Replicator) with real data on a running lab."""
    a = Arrays(primary, secondary, user, password, verify=tls_setting(insecure, ca_cert))
    nbd_p, nbd_s = _nbd(primary_nbd), _nbd(secondary_nbd)
    tag = time.strftime("%H%M%S") + os.urandom(2).hex()
    results: dict[str, str] = {}
    try:
        try:
            for c in (a.p, a.s):
                info = c.get("storages")["data"][0]
                _step(f"logged in to {c.base_url}: {info['model']} serial {info['serialNumber']} "
                      f"({info['storageDeviceId']})")
            prepare_link(a)
        except (ApiError, httpx.HTTPError, TimeoutError, PairCommandError) as e:
            console.print(f"[red]the lab could not be prepared:[/red] {e}")
            raise typer.Exit(2) from None
        for rep in ("TC",) if skip_ur else ("TC", "UR"):
            try:
                pd, sd = run_pair(a, rep, size, nbd_p, nbd_s, tag)
            except (ApiError, httpx.HTTPError, TimeoutError, RuntimeError) as e:
                what = f"{e.message_id} {e.message}" if isinstance(e, ApiError) else str(e)
                console.print(f"[yellow]{rep} failed:[/yellow] {what}")
                results[rep] = "FAILED"
                if rep == "TC":
                    break
                continue
            results[rep] = "OK" if pd == sd else "MISMATCH"
            console.print(f"{rep}: P-VOL sha256 {pd}\n{rep}: S-VOL sha256 {sd}", soft_wrap=True)
        if not skip_rehearsal and results.get("TC") == "OK":
            try:
                results[DR] = "OK" if rehearsal(a, size, nbd_p, nbd_s, tag) else "MISMATCH"
            except (ApiError, httpx.HTTPError, TimeoutError, RuntimeError, PairCommandError) as e:
                what = f"{e.message_id} {e.message}" if isinstance(e, ApiError) else str(e)
                console.print(f"[red]DR rehearsal failed:[/red] {what}", soft_wrap=True)
                results[DR] = "FAILED"
    finally:
        a.close()
    line = ", ".join(f"{rep} {res}" for rep, res in results.items())
    tc_ok = results.get("TC") == "OK"
    ok = tc_ok and results.get(DR, "OK") == "OK" and all(v in ("OK", "FAILED") for v in results.values())
    style = "green" if ok else "red"
    console.print(f"[{style}]{CHECK_LINE}: S-VOL data {'equals' if ok else 'DIFFERS from'} P-VOL data "
                  f"(sha256 over NBD): {line}[/{style}]", soft_wrap=True)
    if results.get("UR") == "FAILED":
        console.print("[yellow]Universal Replicator failed (reported above); TrueCopy is checked.[/yellow]")
    if results.get(DR) in ("FAILED", "MISMATCH"):
        console.print("[red]the failover rehearsal did not prove the copy (reported above).[/red]")
    if not ok:
        raise typer.Exit(1)
