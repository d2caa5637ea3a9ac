"""``vspemu fault``: faults on demand on a running system (docs/faults-on-demand.md).

    vspemu fault add path --local-port CL3-A --remote-serial 410002 --remote-port CL3-B
    vspemu fault add path-group --remote-serial 410002 [--path-group 0]
    vspemu fault add path-delay --remote-serial 410002 [--path-group 0] [--latency-ms 50] [--bandwidth 10]
    vspemu fault add journal-full --journal 1
    vspemu fault add ldev-eio --ldev 10
    vspemu fault add system-stop
    vspemu fault list
    vspemu fault clear [FAULT_ID | --all]

``--system`` is the REST URL of the system (default https://127.0.0.1:8443, or VSPEMU_SYSTEM). TLS as for
``vspemu pair`` (``--ca-cert`` / ``--insecure``). Exit codes: 0 done, 2 refused or unreachable, 3 bad usage.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from vspemu.cli.pair import CaCert, Insecure, tls_setting
from vspemu.client import ApiError, VspClient
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER

app = typer.Typer(help="Faults on demand: take paths down, slow them, fill a journal, fail an LDEV, stop a "
                       "system.", no_args_is_help=True, add_completion=False)
console = Console(highlight=False, width=200)
err_console = Console(stderr=True, highlight=False)

System = Annotated[str, typer.Option("--system", "-s", help="REST URL of the system.", envvar="VSPEMU_SYSTEM")]
User = Annotated[str, typer.Option("--user", "-u", help="Account on the system.")]
Password = Annotated[str, typer.Option("--password", "-p", help="Password of that account.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DEFAULT_SYSTEM = "https://127.0.0.1:8443"


def _run(url: str, user: str, password: str, insecure: bool, ca_cert: str | None, fn: Any) -> Any:
    try:
        with VspClient(url, user, password, timeout=60.0, verify=tls_setting(insecure, ca_cert)) as c:
            return fn(c)
    except ApiError as e:
        body = e.body or {}
        err_console.print(f"refused: {body.get('messageId', e.status)} {body.get('message', '')} "
                          f"{body.get('cause', '')}".strip())
        raise typer.Exit(2) from None
    except httpx.HTTPError as e:
        err_console.print(f"cannot reach {url}: {e}")
        raise typer.Exit(2) from None


def _show(faults: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps(faults))
        return
    table = Table("id", "kind", "target", "since")
    for f in faults:
        target = ", ".join(f"{k}={v}" for k, v in f.items() if k not in ("faultId", "kind", "createdAt"))
        table.add_row(str(f["faultId"]), f["kind"], target, f.get("createdAt", ""))
    console.print(table)


@app.command("add")
def add(kind: Annotated[str, typer.Argument(help="path, path-group, path-delay, journal-full, ldev-eio, "
                                                 "system-stop")],
        local_port: Annotated[str | None, typer.Option("--local-port")] = None,
        remote_serial: Annotated[int | None, typer.Option("--remote-serial")] = None,
        remote_port: Annotated[str | None, typer.Option("--remote-port")] = None,
        path_group: Annotated[int | None, typer.Option("--path-group")] = None,
        latency_ms: Annotated[int | None, typer.Option("--latency-ms")] = None,
        bandwidth: Annotated[float | None, typer.Option("--bandwidth", help="MiB/s")] = None,
        journal: Annotated[int | None, typer.Option("--journal")] = None,
        ldev: Annotated[int | None, typer.Option("--ldev")] = None,
        system: System = DEFAULT_SYSTEM, user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
        insecure: Insecure = False, ca_cert: CaCert = None, as_json: AsJson = False) -> None:
    """Put a fault in force; prints it (with its id)."""
    fields = {"localPortId": local_port, "remoteSerialNumber": remote_serial, "remotePortId": remote_port,
              "pathGroupId": path_group, "latencyMs": latency_ms, "bandwidthMiBps": bandwidth,
              "journalId": journal, "ldevId": ldev}
    fault = _run(system, user, password, insecure, ca_cert, lambda c: c.add_fault(kind, **fields))
    _show([fault], as_json)


@app.command("list")
def list_(system: System = DEFAULT_SYSTEM, user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
          insecure: Insecure = False, ca_cert: CaCert = None, as_json: AsJson = False) -> None:
    """The faults in force."""
    _show(_run(system, user, password, insecure, ca_cert, lambda c: c.faults()), as_json)


@app.command("clear")
def clear(fault_id: Annotated[int | None, typer.Argument(help="The fault to clear.")] = None,
          all_: Annotated[bool, typer.Option("--all", help="Clear every fault.")] = False,
          system: System = DEFAULT_SYSTEM, user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
          insecure: Insecure = False, ca_cert: CaCert = None, as_json: AsJson = False) -> None:
    """Clear one fault (by id) or every fault (--all)."""
    if (fault_id is None) == (not all_):
        err_console.print("give a fault id or --all")
        raise typer.Exit(3)
    if all_:
        cleared = _run(system, user, password, insecure, ca_cert, lambda c: c.clear_faults())
    else:
        cleared = [_run(system, user, password, insecure, ca_cert, lambda c: c.clear_fault(fault_id))]
    _show(cleared, as_json)
