"""``vspemu up`` / ``down`` / ``status``: a lab of 1 to 8 storage systems registered with each other.

``vspemu up`` starts every system (each its own ``vspemu serve`` process, data directory and ports), registers
them as ``--topology`` says with path group 0 both ways (CL3-A -> CL3-A, CL4-A -> CL4-A), writes
``<data dir>/lab.json`` and prints a summary. In the foreground (the default) it runs until Ctrl-C, SIGTERM or
``vspemu down``; with ``--detach`` it returns and leaves the lab running for ``vspemu down``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from vspemu.client import ApiError
from vspemu.lab import (
    TOPOLOGIES,
    Lab,
    free_port,
    process_alive,
    read_lab_state,
    retire_lab_state,
    start_console,
    stop_lab,
    topology_links,
)
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER

STATUS_PAGE = "/ConfigurationManager/vspemu/status"  # served by each system (vspemu.api.routes.status)
PASSWORD_ENV = "VSPEMU_PASSWORD"

console = Console(width=None if sys.stdout.isatty() else 200)  # full lines when piped or logged

DataDir = Annotated[Path, typer.Option(help="Data directory of the lab (one sub-directory per system).")]
PasswordFile = Annotated[Path | None, typer.Option(
    help="The password of every system's account, from this file (else $VSPEMU_PASSWORD, else the default). "
         "Given to the systems in their environment, never on their command line.")]


def _password(password_file: Path | None) -> str | None:
    from vspemu.cli.accounts import _account_password

    if password_file is not None:
        return _account_password(None, password_file)
    return os.environ.get(PASSWORD_ENV)


def _account(password_file: Path | None) -> str:
    if password_file is None and PASSWORD_ENV not in os.environ:
        return f"{DEFAULT_USER} / {DEFAULT_PASSWORD}"
    return f"{DEFAULT_USER} / (the password of {password_file or '$' + PASSWORD_ENV})"


def print_summary(state: dict[str, Any], account: str) -> None:
    """Every system (serial, URLs, ports, which systems it is registered with), the links, the export line."""
    table = Table(title=f"vspemu lab: {len(state['systems'])} systems, topology {state['topology']}")
    for col in ("#", "serial", "storageDeviceId", "REST", "host I/O (NBD)", "replication ports",
                "registered with", "data"):
        table.add_column(col)
    for s in state["systems"]:
        ports = s["linkPorts"]
        table.add_row(str(s["index"]), str(s["serial"]), s["storageDeviceId"], s["restUrl"],
                      f"nbd://{s['nbdHost']}:{s['nbdPort']}/<ldevId>",
                      ", ".join(f"{k}={v}" for k, v in ports.items()),
                      ", ".join(str(x) for x in s["registeredWith"]) or "-", s["dataDir"])
    console.print(table)
    console.print(f"Account on every system: {account}")
    for link in state["links"]:
        a, b = link["systems"]
        paths = ", ".join(f"{lp} -> {rp}" for lp, rp in link["paths"])
        console.print(f"Link {a} <-> {b}: registered with each other (mutual), path group {link['pathGroupId']} "
                      f"both ways ({paths}); remotepathGroupId "
                      + ", ".join(f"{gid} on {dev}" for dev, gid in link["remotepathGroupIds"].items()),
                      soft_wrap=True)
    certs = os.pathsep.join([s["cert"] for s in state["systems"]]
                            + ([state["console"]["cert"]] if state.get("console") else []))
    console.print(f"Clients verify TLS: export VSPEMU_CA_CERT={certs}", soft_wrap=True)
    for s in state["systems"]:  # the live status pages (log in with the account above)
        console.print(f"Status page ({s['serial']}): {s['restUrl']}{STATUS_PAGE}   metrics: {s['restUrl']}/metrics",
                      soft_wrap=True)
    lab_console = state.get("console")
    if lab_console:
        console.print(f"Lab status page (every system on one page; log in with the account above): "
                      f"{lab_console['url']}", soft_wrap=True)


def up(
    systems: Annotated[int, typer.Option(min=1, max=8, help="How many storage systems (1 to 8): serials "
                                         "410001, 410002, ...")] = 2,
    topology: Annotated[str, typer.Option(help="Which systems are registered with each other (path group 0 "
                                          "both ways on each link): pair (1-2, 3-4, ...), chain (1-2, 2-3, ...: "
                                          "3DC cascade), star (1-2, 1-3, ...: 3DC multi-target), mesh (every "
                                          "two), none.")] = "chain",
    data_dir: DataDir = Path("vspemu-data"),
    model: Annotated[str, typer.Option(help="Model of every system.")] = "VSP 5500H",
    host: Annotated[str, typer.Option(help="Address every service listens on.")] = "127.0.0.1",
    password_file: PasswordFile = None,
    free_ports: Annotated[bool, typer.Option(help="Free ports chosen at random instead of the fixed layout "
                                                  "(see lab.json or the summary).")] = False,
    console_page: Annotated[bool, typer.Option("--console/--no-console", help="Serve the lab status page (every "
                                               "system on one page) on --console-port.")] = True,
    console_port: Annotated[int, typer.Option(help="HTTPS port of the lab status page (with --free-ports: a free "
                                                   "one).")] = 8440,
    detach: Annotated[bool, typer.Option(help="Return once the lab is up and leave it running (stop it with "
                                              "`vspemu down`).")] = False,
) -> None:
    """Run a lab of storage systems (default: 410001 on :8443 and 410002 on :8444, registered with each other)
    until Ctrl-C, SIGTERM or `vspemu down`.

    System i (1-based) is serial 410000+i, REST https://HOST:8442+i, NBD 10808+i, replication ports
    CL3-A/CL4-A/CL3-B/CL4-B on 17001+100*(i-1) .. +3 (unless --free-ports)."""
    if topology not in TOPOLOGIES:
        raise typer.BadParameter(f"--topology: one of {', '.join(TOPOLOGIES)}")
    topology_links(systems, topology)
    old = read_lab_state(data_dir)
    if old is not None and any(process_alive(s.get("pid"), "serve") for s in old.get("systems", [])):
        console.print(f"[red]a lab is already running in {data_dir} (`vspemu status --data-dir {data_dir}`; "
                      f"`vspemu down --data-dir {data_dir}` stops it)[/red]")
        raise typer.Exit(1)
    try:
        lab = Lab(data_dir, systems, topology, model=model, host=host, free_ports=free_ports,
                  password=_password(password_file))
    except ValueError as e:  # an unknown model
        raise typer.BadParameter(str(e)) from None

    def stop(*_: object) -> None:
        raise KeyboardInterrupt  # also interrupts the start-up (waits, registrations)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = False
    done = False
    console_proc: subprocess.Popen[bytes] | None = None
    try:
        try:
            lab.start()
            lab_console = None
            state_path = lab.write_state(None if detach else os.getpid(), lab_console)
            if console_page:
                for attempt in range(3 if free_ports else 1):  # a free port may be taken before the console binds
                    try:
                        console_proc, lab_console = start_console(lab.data_dir, host,
                                                                  free_port() if free_ports else console_port)
                        break
                    except RuntimeError:
                        if attempt == (2 if free_ports else 0):
                            raise
                state_path = lab.write_state(None if detach else os.getpid(), lab_console)
        except (RuntimeError, TimeoutError, OSError, httpx.HTTPError, ApiError) as e:
            console.print(f"[red]the lab did not come up: {e}[/red]")
            raise typer.Exit(1) from None  # (after the finally below has stopped what started)
        print_summary(lab.state(None, lab_console), _account(password_file))
        console.print(f"Lab state: {state_path}")
        if detach:
            done = True
            console.print(f"Running in the background: `vspemu down --data-dir {data_dir}` stops it.")
            return
        console.print(f"Press Ctrl-C (or run `vspemu down --data-dir {data_dir}`) to stop every system.")
        while not failed:
            if console_proc is not None and console_proc.poll() is not None:
                console.print(f"[red]the lab console exited with code {console_proc.returncode}; see "
                              f"{lab.data_dir / 'console.log'}[/red]")
                failed = True
            for s in lab.systems:
                if s.proc is not None and s.proc.poll() is not None:
                    console.print(f"[red]storage {s.serial} exited with code {s.proc.returncode}; see "
                                  f"{s.log_path}[/red]")
                    failed = True
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if not done:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if console_proc is not None and console_proc.poll() is None:
                console_proc.terminate()
            lab.stop()
            if console_proc is not None:
                try:
                    console_proc.wait(10)
                except subprocess.TimeoutExpired:
                    console_proc.kill()
                    console_proc.wait()
            retire_lab_state(lab.data_dir)
            console.print("lab stopped")
    if failed or any(s.proc is not None and s.proc.returncode not in (0, -signal.SIGTERM) for s in lab.systems):
        raise typer.Exit(1)


def down(data_dir: DataDir = Path("vspemu-data")) -> None:
    """Stop the lab running in DATA_DIR (every system, its console, a foreground `vspemu up`)."""
    if read_lab_state(data_dir) is None:
        console.print(f"no lab running in {data_dir} (no {data_dir / 'lab.json'})")
        return
    for name in stop_lab(data_dir):
        console.print(f"stopped {name}")
    console.print("lab stopped")


def status(data_dir: DataDir = Path("vspemu-data"), password_file: PasswordFile = None) -> None:
    """The lab in DATA_DIR: each system's process, REST API and remote paths (exit code 1 if one is down)."""
    from vspemu.client import VspClient

    state = read_lab_state(data_dir)
    if state is None:
        console.print(f"no lab running in {data_dir} (no {data_dir / 'lab.json'})")
        raise typer.Exit(1)
    password = _password(password_file) or DEFAULT_PASSWORD
    table = Table(title=f"vspemu lab in {data_dir}: topology {state['topology']}")
    for col in ("#", "serial", "process", "REST", "remote storages", "path groups (status)"):
        table.add_column(col)
    all_up = True
    for s in state["systems"]:
        alive = process_alive(s.get("pid"), "serve", s["dataDir"])
        rest, remotes, groups = "-", "-", "-"
        if alive:
            try:
                with VspClient(s["restUrl"], password=password, verify=s["cert"], timeout=10) as c:
                    rest = "answers"
                    remotes = ", ".join(str(r["serialNumber"]) for r in c.get("remote-storages")["data"]
                                        if r.get("dkcType") == "Remote") or "-"
                    groups = ", ".join(f"{g['remotepathGroupId']} ({_paths(g)})"
                                       for g in c.get("remotepath-groups")["data"]) or "-"
            except Exception as e:  # noqa: BLE001 - shown, not raised: the next system is still reported
                rest = f"[red]{type(e).__name__}: {e}[/red]"
                all_up = False
        else:
            all_up = False
        table.add_row(str(s["index"]), str(s["serial"]),
                      f"pid {s.get('pid')} running" if alive else "[red]not running[/red]",
                      rest if alive else "-", remotes, groups)
    console.print(table)
    lab_console = state.get("console")
    if lab_console:
        console.print(f"Lab status page: {lab_console['url']} "
                      + ("(running)" if process_alive(lab_console.get("pid"), "vspemu.console") else
                         "[red](not running)[/red]"), soft_wrap=True)
    if not all_up:
        raise typer.Exit(1)


def _paths(group: dict[str, Any]) -> str:
    return "/".join(str(p.get("pathStatus", "?")) for p in group.get("remotePaths", []))


__all__ = ["down", "status", "up"]
