"""``vspemu pair``: CCI-style TrueCopy / Universal Replicator pair commands over the REST API.

The commands follow CCI (paircreate, pairsplit, pairresync, pairsplit -S, pairdisplay, pairevtwait,
horctakeover) but talk to the arrays' REST API through the SDK, so they work against vspemu and real VSPs:

    vspemu pair create -g G -d P --pvol 10 --svol 20 [--type TC|UR] [-f NEVER] [-c 15] [--jp 1 --js 2 --mu 1]
    vspemu pair split -g G [-d P] [-rw | -RS]
    vspemu pair resync -g G [-d P] [--swaps | --swapp]
    vspemu pair delete -g G [-d P]
    vspemu pair display -g G [-d P]
    vspemu pair wait -g G [-d P] -s pair --timeout 60
    vspemu pair takeover -g G [-d P] [--mode auto|forceSplit]

``--primary`` is the system that holds the P-VOLs (the one the copy group was created on) and
``--secondary`` the other one; both default to the lab (https://127.0.0.1:8443 and :8444).

TLS: the servers' certificates are verified. Trust a system's own certificate with ``--ca-cert FILE``
(before the command: ``vspemu pair --ca-cert P.crt:S.crt display ...``) or ``VSPEMU_CA_CERT`` (files separated
by ``os.pathsep``; ``vspemu up`` prints the line to export); ``--insecure`` / ``VSPEMU_INSECURE=1`` skips
verification.

Exit codes: 0 done (for ``wait``: the status was reached); 1 timed out (``wait``, or ``create``/``resync``
waiting for PAIR); 2 the array refused the request (its messageId and message are printed), a pair went
to PSUE/PFUS while waiting, or an array could not be reached; 3 bad usage (e.g. the group does not exist).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import httpx
import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from vspemu.client import ApiError, Verify, VspClient
from vspemu.replication.states import SUSPENDED_BY_ERROR
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER

EXIT_OK, EXIT_TIMEOUT, EXIT_ERROR, EXIT_USAGE = 0, 1, 2, 3
PRIMARY_URL = "https://127.0.0.1:8443"
SECONDARY_URL = "https://127.0.0.1:8444"
NOT_SPECIFIED = "NotSpecified"

app = typer.Typer(help="CCI-style TrueCopy / Universal Replicator pair commands (paircreate, pairsplit, "
                       "pairresync, pairdisplay, pairevtwait, horctakeover) over the REST API.",
                  no_args_is_help=True, add_completion=False)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class RepType(StrEnum):
    TC = "TC"
    UR = "UR"


class Fence(StrEnum):
    NEVER = "NEVER"
    DATA = "DATA"
    STATUS = "STATUS"
    ASYNC = "ASYNC"


class WaitStatus(StrEnum):
    pair = "pair"
    copy = "copy"
    psus = "psus"
    ssus = "ssus"
    ssws = "ssws"
    psue = "psue"
    pfus = "pfus"
    smpl = "smpl"


class TakeoverMode(StrEnum):
    auto = "auto"
    forceSplit = "forceSplit"


# -- options shared by the commands ---------------------------------------------------------------------------
Primary = Annotated[str, typer.Option("--primary", help="REST URL of the primary (P-VOL) system.",
                                      envvar="VSPEMU_PRIMARY")]
Secondary = Annotated[str, typer.Option("--secondary", help="REST URL of the secondary (S-VOL) system.",
                                        envvar="VSPEMU_SECONDARY")]
User = Annotated[str, typer.Option("--user", "-u", help="Account on both systems.")]
Password = Annotated[str, typer.Option("--password", "-p", help="Password of that account.")]
Group = Annotated[str, typer.Option("-g", "--group", help="Copy group name.")]
PairName = Annotated[str | None, typer.Option("-d", "--pair", help="Copy pair name (default: every pair of "
                                                                   "the group).")]
NoWait = Annotated[bool, typer.Option("--nowait", help="Return once the array accepted the change; do not "
                                                       "wait for the copy.")]
Timeout = Annotated[float, typer.Option("--timeout", "-t", help="Seconds to wait for the pair status.")]


Insecure = Annotated[bool, typer.Option("--insecure", envvar="VSPEMU_INSECURE",
                                         help="Do not verify the servers' TLS certificates.")]
CaCert = Annotated[str | None, typer.Option("--ca-cert", envvar="VSPEMU_CA_CERT",
                                            help="Certificate file(s) to trust, separated by the path separator "
                                                 "(a vspemu system's is <data dir>/tls/server.crt).")]


def tls_setting(insecure: bool, ca_cert: str | None) -> Verify:
    """``verify`` for the SDK from --insecure / --ca-cert."""
    if insecure:
        return False
    return ca_cert or True


_tls: dict[str, Verify] = {"verify": True}


@app.callback()
def tls_options(insecure: Insecure = False, ca_cert: CaCert = None) -> None:
    """CCI-style TrueCopy / Universal Replicator pair commands over the REST API."""
    _tls["verify"] = tls_setting(insecure, ca_cert)


class PairCommandError(Exception):
    """A refusal worth one line on the terminal and an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Arrays:
    """Clients of the two systems, logged in on first use."""

    primary_url: str
    secondary_url: str
    user: str
    password: str
    _p: VspClient | None = None
    _s: VspClient | None = None
    verify: Verify = True

    def _login(self, url: str) -> VspClient:
        try:
            return VspClient(url, self.user, self.password, timeout=120.0, verify=self.verify)
        except httpx.HTTPError as e:
            raise PairCommandError(f"cannot reach {url}: {e}") from e

    @property
    def p(self) -> VspClient:
        if self._p is None:
            self._p = self._login(self.primary_url)
        return self._p

    @property
    def s(self) -> VspClient:
        if self._s is None:
            self._s = self._login(self.secondary_url)
        return self._s

    def close(self) -> None:
        for c in (self._p, self._s):
            if c is not None:
                c.close()

    # -- copy groups and ids ------------------------------------------------------------------------------
    def group(self, name: str, side: str = "p") -> dict[str, Any]:
        """The copy group ``name`` as the primary (``side="p"``) or the secondary sees it."""
        local, remote = (self.p, self.s) if side == "p" else (self.s, self.p)
        groups = local.get("remote-mirror-copygroups", remote=remote,
                           remoteStorageDeviceId=remote.storage_device_id)["data"]
        for g in groups:
            if g["copyGroupName"] == name:
                return g  # type: ignore[no-any-return]
        where = local.base_url
        raise PairCommandError(f"copy group {name} does not exist on {where} (to {remote.base_url})", EXIT_USAGE)

    def group_detail(self, name: str, side: str = "p") -> dict[str, Any]:
        local, remote = (self.p, self.s) if side == "p" else (self.s, self.p)
        gid = self.group(name, side)["remoteMirrorCopyGroupId"]
        return local.get(f"remote-mirror-copygroups/{gid}", remote=remote)  # type: ignore[no-any-return]

    def object_path(self, group: str, pair: str | None, side: str = "p") -> str:
        """``remote-mirror-copypairs/{id}`` or ``remote-mirror-copygroups/{id}`` as ``side`` sees them."""
        gid = self.group(group, side)["remoteMirrorCopyGroupId"]
        if pair is None:
            return f"remote-mirror-copygroups/{gid}"
        return f"remote-mirror-copypairs/{gid},{pair}"

    def pairs(self, group: str, pair: str | None = None) -> list[dict[str, Any]]:
        """The pairs of a group (or one pair) as the primary sees them; [] when the group is gone."""
        local, remote = self.p, self.s
        groups = local.get("remote-mirror-copygroups", remote=remote,
                           remoteStorageDeviceId=remote.storage_device_id)["data"]
        found = [g for g in groups if g["copyGroupName"] == group]
        if not found:
            return []
        try:
            detail = local.get(f"remote-mirror-copygroups/{found[0]['remoteMirrorCopyGroupId']}", remote=remote)
        except ApiError as e:
            if e.status == 404:
                return []
            raise
        return [x for x in detail.get("copyPairs", []) if pair is None or x["copyPairName"] == pair]

    def replication_type(self, group: str, pair: str | None) -> str:
        pairs = self.pairs(group, pair)
        if not pairs:
            what = f"pair {group}/{pair}" if pair else f"copy group {group}"
            raise PairCommandError(f"{what} does not exist", EXIT_USAGE)
        return str(pairs[0].get("replicationType", "TC"))


@contextmanager
def arrays(primary: str, secondary: str, user: str, password: str) -> Iterator[Arrays]:
    a = Arrays(primary, secondary, user, password, verify=_tls["verify"])
    try:
        yield a
    finally:
        a.close()


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def report_api_error(e: ApiError) -> typer.Exit:
    body = e.body or {}
    mid = body.get("messageId") or e.message_id or f"HTTP {e.status}"
    err_console.print(f"[red]{mid}[/red] {body.get('message') or e.message}")
    for key in ("cause", "solution"):
        if body.get(key):
            err_console.print(f"  {key}: {body[key]}")
    return typer.Exit(EXIT_ERROR)


def run(fn: Callable[[], int | None]) -> None:
    """Run a command body; map the SDK's errors to messages and exit codes."""
    try:
        code = fn()
    except ApiError as e:
        raise report_api_error(e) from None
    except PairCommandError as e:
        raise fail(str(e), e.code) from None
    except httpx.HTTPError as e:
        raise fail(f"connection failed: {e}") from None
    if code:
        raise typer.Exit(code)


def statuses_line(pairs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{x['copyPairName']} {x['pvolStatus']}/{x['svolStatus']}" for x in pairs) or "no pairs"


# -- waiting ------------------------------------------------------------------------------------------------
def status_reached(pairs: list[dict[str, Any]], target: str) -> bool:
    """pairevtwait semantics: every pair shows ``target`` (``pair``: on both volumes; ``smpl``: no pair)."""
    t = target.upper()
    if t == "SMPL":
        return not pairs
    if not pairs:
        return False
    if t == "PAIR":
        return all(x["pvolStatus"] == "PAIR" and x["svolStatus"] == "PAIR" for x in pairs)
    if t in ("SSUS", "SSWS"):
        return all(x["svolStatus"] == t for x in pairs)
    return all(t in (x["pvolStatus"], x["svolStatus"]) for x in pairs)


FAILED_STATES = SUSPENDED_BY_ERROR  # (the pair state tables, vspemu.replication.states)


def finish(a: Arrays, group: str, pair: str | None, nowait: bool, timeout: float) -> int:
    """After a create or resync: wait for PAIR (with the progress bar) unless --nowait, then show the statuses."""
    code = EXIT_OK if nowait else wait_for_pair(a, group, pair, timeout)
    console.print(statuses_line(a.pairs(group, pair)))
    return code


def wait_for_pair(a: Arrays, group: str, pair: str | None, timeout: float, show_progress: bool = True,
                  interval: float = 0.2) -> int:
    """Wait until every selected pair is PAIR on both sides; a progress bar follows copyProgressRate.

    Returns an exit code: 0 PAIR, 1 timeout, 2 a pair suspended by error (or vanished)."""
    deadline = time.monotonic() + timeout
    sizes: dict[int, int] = {}
    tasks: dict[str, TaskID] = {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                        console=console, transient=False, disable=not show_progress)
    with progress:
        while True:
            pairs = a.pairs(group, pair)
            if not pairs:
                progress.stop()
                err_console.print(f"[red]error:[/red] {group}{'/' + pair if pair else ''} does not exist")
                return EXIT_ERROR
            for x in pairs:
                name = x["copyPairName"]
                pv = int(x["pvolLdevId"])
                if pv not in sizes:
                    owner = a.p if x["pvolStorageDeviceId"] == a.p.storage_device_id else a.s
                    sizes[pv] = int(owner.get(f"ldevs/{pv}")["blockCapacity"]) * 512
                if name not in tasks:
                    tasks[name] = progress.add_task(f"{group}/{name}", total=sizes[pv])
                rate = int(x.get("copyProgressRate", -1))
                done = x["pvolStatus"] == "PAIR" and x["svolStatus"] == "PAIR"
                pct = 100 if done else max(rate, 0)
                progress.update(tasks[name], completed=sizes[pv] * pct // 100,
                                description=f"{group}/{name} {x['pvolStatus']}/{x['svolStatus']}")
            if status_reached(pairs, "pair"):
                return EXIT_OK
            bad = [x for x in pairs if x["pvolStatus"] in FAILED_STATES or x["svolStatus"] in FAILED_STATES]
            if bad:
                progress.stop()
                err_console.print(f"[red]error:[/red] suspended by error: {statuses_line(bad)}")
                return EXIT_ERROR
            if time.monotonic() > deadline:
                progress.stop()
                err_console.print(f"[yellow]timeout:[/yellow] not PAIR after {timeout:g} s: {statuses_line(pairs)}")
                return EXIT_TIMEOUT
            time.sleep(interval)


# -- commands ---------------------------------------------------------------------------------------------------
@app.command()
def create(
    group: Group,
    pair: Annotated[str, typer.Option("-d", "--pair", help="Copy pair name.")],
    pvol: Annotated[int, typer.Option("--pvol", help="P-VOL LDEV id (on the primary).")],
    svol: Annotated[int, typer.Option("--svol", help="S-VOL LDEV id (on the secondary, same size).")],
    rep_type: Annotated[RepType, typer.Option("--type", help="TC (TrueCopy) or UR (Universal Replicator).",
                                              case_sensitive=False)] = RepType.TC,
    fence: Annotated[Fence | None, typer.Option("-f", "--fence", help="Fence level (TC: NEVER, DATA, STATUS; "
                                                                      "UR: ASYNC).", case_sensitive=False)] = None,
    copy_pace: Annotated[int | None, typer.Option("-c", "--copy-pace", min=1, max=15,
                                                  help="Tracks per copy cycle (1-15; TC).")] = None,
    jp: Annotated[int | None, typer.Option("--jp", help="Master journal id (UR, on the primary).")] = None,
    js: Annotated[int | None, typer.Option("--js", help="Restore journal id (UR, on the secondary).")] = None,
    mu: Annotated[int | None, typer.Option("--mu", min=0, max=3, help="Mirror unit (UR).")] = None,
    path_group: Annotated[int | None, typer.Option("--path-group", help="Remote path group id.")] = None,
    no_copy: Annotated[bool, typer.Option("--nocopy", help="Create without the initial copy.")] = False,
    nowait: NoWait = False,
    timeout: Timeout = 3600.0,
    primary: Primary = PRIMARY_URL, secondary: Secondary = SECONDARY_URL,
    user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
) -> None:
    """paircreate: create a pair (and its copy group if new); show the initial copy's progress until PAIR."""

    def body() -> int:
        with arrays(primary, secondary, user, password) as a:
            ur = rep_type == RepType.UR
            existing = [g for g in a.p.get("remote-mirror-copygroups", remote=a.s,
                                           remoteStorageDeviceId=a.s.storage_device_id)["data"]
                        if g["copyGroupName"] == group]
            req: dict[str, Any] = {
                "copyGroupName": group, "copyPairName": pair, "replicationType": rep_type.value,
                "remoteStorageDeviceId": a.s.storage_device_id, "pvolLdevId": pvol, "svolLdevId": svol,
                "isNewGroupCreation": not existing,
                "fenceLevel": (fence.value if fence else ("ASYNC" if ur else "NEVER")),
            }
            if not ur:
                req["copyPace"] = copy_pace or 3
            if ur and not existing:
                if jp is None or js is None:
                    raise PairCommandError("a new UR copy group needs --jp and --js (journal ids)", EXIT_USAGE)
                req.update(pvolJournalId=jp, svolJournalId=js, muNumber=1 if mu is None else mu)
            if path_group is not None:
                req["pathGroupId"] = path_group
            if no_copy:
                req["doInitialCopy"] = False
            a.p.invoke("POST", "remote-mirror-copypairs", req, remote=a.s, nowait=True)
            console.print(f"paircreate {group}/{pair}: {rep_type.value} P-VOL {pvol} -> S-VOL {svol} accepted"
                          f"{' (new copy group)' if not existing else ''}")
            return finish(a, group, pair, nowait, timeout)

    run(body)


@app.command()
def split(
    group: Group,
    pair: PairName = None,
    rw: Annotated[bool, typer.Option("-rw", "--rw", help="Make the S-VOL writable (svolAccessMode rw).")] = False,
    swap: Annotated[bool, typer.Option("-RS", "--swap", help="Swap split (SSWS): sent to the secondary, whose "
                                                            "S-VOLs take over.")] = False,
    primary: Primary = PRIMARY_URL, secondary: Secondary = SECONDARY_URL,
    user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
) -> None:
    """pairsplit: suspend the pair (PSUS/SSUS); -rw S-VOL read-write; -RS swap split on the secondary."""
    if rw and swap:
        raise fail("-rw and -RS exclude each other", EXIT_USAGE)

    def body() -> int:
        with arrays(primary, secondary, user, password) as a:
            rtype = a.replication_type(group, pair)
            params: dict[str, Any] = {"replicationType": rtype}
            if swap:
                params["svolOperationMode"] = "SSWS"
                path = a.object_path(group, pair, side="s")
                a.s.invoke("PUT", f"{path}/actions/split/invoke", {"parameters": params}, remote=a.p, nowait=True)
            else:
                if rw:
                    params["svolAccessMode"] = "rw"
                path = a.object_path(group, pair)
                a.p.invoke("PUT", f"{path}/actions/split/invoke", {"parameters": params}, remote=a.s, nowait=True)
            console.print(f"pairsplit{' -RS' if swap else ' -rw' if rw else ''} {group}"
                          f"{'/' + pair if pair else ''}: {statuses_line(a.pairs(group, pair))}")
            return EXIT_OK

    run(body)


@app.command()
def resync(
    group: Group,
    pair: PairName = None,
    swaps: Annotated[bool, typer.Option("--swaps", help="Swap resync from the S-VOL side (sent to the "
                                                        "secondary): its volumes become the P-VOLs.")] = False,
    swapp: Annotated[bool, typer.Option("--swapp", help="Swap resync from the P-VOL side (sent to the primary): "
                                                        "the other side's volumes become the P-VOLs.")] = False,
    copy_pace: Annotated[int | None, typer.Option("-c", "--copy-pace", min=1, max=15)] = None,
    fence: Annotated[Fence | None, typer.Option("-f", "--fence", case_sensitive=False)] = None,
    nowait: NoWait = False,
    timeout: Timeout = 3600.0,
    primary: Primary = PRIMARY_URL, secondary: Secondary = SECONDARY_URL,
    user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
) -> None:
    """pairresync: copy the differences and go back to PAIR (progress bar unless --nowait)."""
    if swaps and swapp:
        raise fail("--swaps and --swapp exclude each other", EXIT_USAGE)

    def body() -> int:
        with arrays(primary, secondary, user, password) as a:
            rtype = a.replication_type(group, pair)
            params: dict[str, Any] = {"replicationType": rtype}
            if swaps or swapp:
                params["doSwapSvol"] = True
            if copy_pace is not None:
                params["copyPace"] = copy_pace
            if fence is not None:
                params["fenceLevel"] = fence.value
            if swaps:
                path = a.object_path(group, pair, side="s")
                a.s.invoke("PUT", f"{path}/actions/resync/invoke", {"parameters": params}, remote=a.p, nowait=True)
            else:
                path = a.object_path(group, pair)
                a.p.invoke("PUT", f"{path}/actions/resync/invoke", {"parameters": params}, remote=a.s, nowait=True)
            flag = " -swaps" if swaps else " -swapp" if swapp else ""
            console.print(f"pairresync{flag} {group}{'/' + pair if pair else ''} accepted")
            if swaps or swapp:
                # the roles are reversed now: the old secondary is the primary
                a = Arrays(a.secondary_url, a.primary_url, a.user, a.password, a._s, a._p, a.verify)
            return finish(a, group, pair, nowait, timeout)

    run(body)


@app.command()
def delete(
    group: Group,
    pair: PairName = None,
    primary: Primary = PRIMARY_URL, secondary: Secondary = SECONDARY_URL,
    user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
) -> None:
    """pairsplit -S: delete the pair (or every pair of the group, and the group); both volumes become SMPL."""

    def body() -> int:
        with arrays(primary, secondary, user, password) as a:
            path = a.object_path(group, pair)
            a.p.invoke("DELETE", path, remote=a.s)
            console.print(f"pairsplit -S {group}{'/' + pair if pair else ''}: deleted (SMPL)")
            return EXIT_OK

    run(body)


def display_rows(a: Arrays, pairs: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """pairdisplay rows: for each pair the local (--primary) side L, then the remote side R."""
    rows: list[tuple[str, ...]] = []
    local_id = a.p.storage_device_id
    serial = {local_id: str(a.p.get("storages")["data"][0]["serialNumber"]),
              a.s.storage_device_id: str(a.s.get("storages")["data"][0]["serialNumber"])}
    for x in pairs:
        p_local = x["pvolStorageDeviceId"] == local_id
        rate = int(x.get("copyProgressRate", -1))
        active = "COPY" in (x["pvolStatus"], x["svolStatus"])
        pct = str(max(rate, 0)) if active else "100"
        sides = [("P", x["pvolStorageDeviceId"], x["pvolLdevId"], x["pvolStatus"], x["svolLdevId"]),
                 ("S", x["svolStorageDeviceId"], x["svolLdevId"], x["svolStatus"], x["pvolLdevId"])]
        if not p_local:
            sides.reverse()
        for lr, (ps, dev, ldev, status, peer) in zip(("L", "R"), sides, strict=True):
            rows.append((x["copyGroupName"], x["copyPairName"], lr, serial.get(dev, dev), str(ldev), f"{ps}-VOL",
                         status, str(x.get("fenceLevel", "")), pct, str(peer)))
    return rows


@app.command()
def display(
    group: Group,
    pair: PairName = None,
    primary: Primary = PRIMARY_URL, secondary: Secondary = SECONDARY_URL,
    user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
) -> None:
    """pairdisplay: one row per volume of each pair (L = the --primary system, R = the other)."""

    def body() -> int:
        with arrays(primary, secondary, user, password) as a:
            pairs = a.pairs(group, pair)
            if not pairs:
                raise PairCommandError(f"{group}{'/' + pair if pair else ''} does not exist", EXIT_USAGE)
            table = Table(title=f"pairdisplay -g {group}{' -d ' + pair if pair else ''}", box=box.SIMPLE_HEAD)
            rows = display_rows(a, pairs)
            cols = ("Group", "PairVol", "L/R", "Serial#", "LDEV#", "P/S", "Status", "Fence", "%", "P-LDEV#")
            for i, col in enumerate(cols):
                width = max([len(col), *(len(r[i]) for r in rows)])
                table.add_column(col, justify="right" if col in ("LDEV#", "%", "P-LDEV#", "Serial#") else "left",
                                 no_wrap=True, min_width=width)
            for row in rows:
                table.add_row(*row)
            console.print(table, width=max(console.width, 100), crop=False)  # never fold the columns, even when piped
            return EXIT_OK

    run(body)


@app.command()
def wait(
    group: Group,
    pair: PairName = None,
    status: Annotated[WaitStatus, typer.Option("-s", "--status", case_sensitive=False,
                                               help="The status to wait for.")] = WaitStatus.pair,
    timeout: Timeout = 60.0,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between polls.")] = 0.2,
    primary: Primary = PRIMARY_URL, secondary: Secondary = SECONDARY_URL,
    user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
) -> None:
    """pairevtwait: wait until every selected pair shows the status. Exit 0 reached, 1 timeout, 2 error."""

    def body() -> int:
        with arrays(primary, secondary, user, password) as a:
            deadline = time.monotonic() + timeout
            while True:
                pairs = a.pairs(group, pair)
                if status_reached(pairs, status.value):
                    console.print(f"pairevtwait {group}: {status.value.upper()} reached ({statuses_line(pairs)})")
                    return EXIT_OK
                if not pairs:
                    raise PairCommandError(f"{group}{'/' + pair if pair else ''} does not exist")
                if status.value.upper() not in FAILED_STATES and any(
                        x["pvolStatus"] in FAILED_STATES or x["svolStatus"] in FAILED_STATES for x in pairs):
                    raise PairCommandError(f"suspended by error while waiting: {statuses_line(pairs)}")
                if time.monotonic() > deadline:
                    err_console.print(f"[yellow]timeout:[/yellow] {status.value.upper()} not reached after "
                                      f"{timeout:g} s: {statuses_line(pairs)}")
                    return EXIT_TIMEOUT
                time.sleep(interval)

    run(body)


@app.command()
def takeover(
    group: Group,
    pair: PairName = None,
    mode: Annotated[TakeoverMode, typer.Option("--mode", help="auto or forceSplit.")] = TakeoverMode.auto,
    secondary: Secondary = SECONDARY_URL,
    user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
) -> None:
    """horctakeover: on the secondary alone (the primary may be down), the S-VOLs take over (SSWS)."""

    def body() -> int:
        with arrays(PRIMARY_URL, secondary, user, password) as a:
            found = [g for g in a.s.get("remote-mirror-copygroups")["data"] if g["copyGroupName"] == group]
            if not found:
                raise PairCommandError(f"copy group {group} does not exist on {secondary}", EXIT_USAGE)
            gid = f"{NOT_SPECIFIED},{group},{found[0]['localDeviceGroupName']},{NOT_SPECIFIED}"
            path = f"remote-mirror-copypairs/{gid},{pair}" if pair else f"remote-mirror-copygroups/{gid}"
            a.s.invoke("POST", f"{path}/actions/takeover/invoke", {"parameters": {"mode": mode.value}})
            view = a.s.get(path)
            pairs = view.get("copyPairs", [view]) if pair is None else [view]
            console.print(f"horctakeover ({mode.value}) {group}{'/' + pair if pair else ''}: "
                          f"{statuses_line(pairs)}")
            return EXIT_OK

    run(body)
