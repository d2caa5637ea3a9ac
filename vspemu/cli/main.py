"""The ``vspemu`` command: run storage systems (``serve``, ``up``)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vspemu.cli.demo import demo
from vspemu.cli.fault import app as fault_app
from vspemu.cli.pair import app as pair_app
from vspemu.cli.verify import verify
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER, storage_device_id

STATUS_PAGE = "/ConfigurationManager/vspemu/status"  # served by each system (vspemu.api.routes.status)

app = typer.Typer(help="vspemu: Hitachi VSP storage systems in software, with TrueCopy and Universal "
                       "Replicator.", no_args_is_help=True, add_completion=False)
console = Console(width=None if sys.stdout.isatty() else 200)  # full lines when piped or logged
app.add_typer(pair_app, name="pair")
app.add_typer(fault_app, name="fault")
app.command()(demo)
app.command()(verify)

PASSWORD_ENV = "VSPEMU_PASSWORD"

LAB = [  # (role, serial, REST port, NBD port, first replication-link port)
    ("primary", 410001, 8443, 10809, 17001),
    ("secondary", 410002, 8444, 10810, 17101),
]


@app.command()
def serve(
    ctx: typer.Context,
    serial: Annotated[int, typer.Option(help="Serial number of this storage system.")],
    data_dir: Annotated[Path, typer.Option(help="Where configuration and volume data live.")],
    rest_port: Annotated[int, typer.Option(help="HTTPS port of the REST API.")] = 8443,
    rest_host: Annotated[str, typer.Option(help="Address the REST API listens on.")] = "127.0.0.1",
    nbd_port: Annotated[int, typer.Option(help="NBD port for host I/O (0 = off).")] = 10809,
    nbd_host: Annotated[str, typer.Option(help="Address the NBD server listens on.")] = "127.0.0.1",
    model: Annotated[str, typer.Option(help="Model name, e.g. 'VSP 5500H'.")] = "VSP 5500H",
    user: Annotated[str, typer.Option(help="Account created at first start.")] = DEFAULT_USER,
    password: Annotated[str | None, typer.Option(
        help="Password of that account (stored hashed). Visible to every user in the process list (ps): "
             "prefer --password-file or the environment variable.", envvar=PASSWORD_ENV,
        show_default=DEFAULT_PASSWORD)] = None,
    password_file: Annotated[Path | None, typer.Option(
        help="Read the password of that account from this file (its first line; keep it 0600).")] = None,
    cert: Annotated[Path | None, typer.Option(help="TLS certificate (default: self-signed, made once).")] = None,
    key: Annotated[Path | None, typer.Option(help="TLS private key for --cert.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    link_host: Annotated[str | None, typer.Option(help="Address the replication ports listen on "
                                                       "(default: --rest-host).")] = None,
    link_port_base: Annotated[int | None, typer.Option(help="Replication port i (CL3-A, CL4-A, CL3-B, CL4-B) "
                                                            "listens on TCP port BASE+i.")] = None,
    link_ports: Annotated[str | None, typer.Option(help="Comma-separated TCP ports of CL3-A,CL4-A,CL3-B,CL4-B "
                                                        "(default: free ports chosen once and kept).")] = None,
    min_remote_io_timeout: Annotated[int, typer.Option(help="Lowest timeoutValueForRemoteIOInSeconds accepted "
                                                            "(the array's is 10; lower only for fast tests).")] = 10,
    nbd_max_connections: Annotated[int, typer.Option(help="NBD connections at most, server-wide.")] = 256,
    nbd_max_connections_per_client: Annotated[int, typer.Option(help="NBD connections at most per client "
                                                                     "address.")] = 64,
    nbd_handshake_timeout: Annotated[float, typer.Option(help="Seconds an NBD client has to finish option "
                                                              "negotiation (0 = no limit).")] = 10.0,
    nbd_idle_timeout: Annotated[float, typer.Option(help="Seconds an NBD connection may send nothing (and read "
                                                         "no reply) before it is closed (0 = never).")] = 600.0,
    nbd_buffer_budget: Annotated[int, typer.Option(help="MiB of NBD request payloads and unsent replies held "
                                                        "at most, server-wide (at least 32).")] = 256,
    nbd_stall_timeout: Annotated[float, typer.Option(help="Seconds an NBD connection that does not read its "
                                                          "replies may hold buffers others wait for.")] = 30.0,
) -> None:
    """Run one storage system in this process."""
    from vspemu.server import ServerConfig, run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if (cert is None) != (key is None):
        raise typer.BadParameter("--cert and --key go together")
    source = ctx.get_parameter_source("password")  # (typer's own click: compared by name)
    if password_file is not None and source is not None and source.name == "COMMANDLINE":
        raise typer.BadParameter("give --password or --password-file, not both")
    password = _account_password(password, password_file)
    ports = None
    if link_ports:
        try:
            ports = [int(x) for x in link_ports.split(",")]
        except ValueError:
            raise typer.BadParameter("--link-ports takes four comma-separated numbers") from None
        if len(ports) != 4:
            raise typer.BadParameter("--link-ports takes four comma-separated numbers")
    if min_remote_io_timeout < 1:
        raise typer.BadParameter("--min-remote-io-timeout must be at least 1")
    from vspemu.volumes.nbd import NbdLimits

    try:
        nbd_limits = NbdLimits(nbd_max_connections, nbd_max_connections_per_client, nbd_handshake_timeout,
                               nbd_idle_timeout, nbd_buffer_budget << 20, nbd_stall_timeout)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    run(ServerConfig(serial=serial, data_dir=data_dir, rest_host=rest_host, rest_port=rest_port,
                     nbd_host=nbd_host, nbd_port=nbd_port or None, model=model, user=user, password=password,
                     cert=cert, key=key, link_host=link_host, link_ports=ports, link_port_base=link_port_base,
                     min_remote_io_timeout=min_remote_io_timeout,
                     nbd_limits=nbd_limits))


def _account_password(password: str | None, password_file: Path | None) -> str:
    """--password-file, else --password / $VSPEMU_PASSWORD, else the default account password."""
    if password_file is None:
        return DEFAULT_PASSWORD if password is None else password
    try:
        lines = password_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"--password-file {password_file}: {e}") from None
    if not lines or not lines[0]:
        raise typer.BadParameter(f"--password-file {password_file}: the first line is empty")
    if password_file.stat().st_mode & 0o077:
        logging.getLogger("vspemu").warning("the password file %s is readable by other users", password_file)
    return lines[0]


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Data directory of the lab.")] = Path("vspemu-data"),
    model: Annotated[str, typer.Option(help="Model of both systems.")] = "VSP 5500H",
    host: Annotated[str, typer.Option(help="Address every service listens on.")] = "127.0.0.1",
    password_file: Annotated[Path | None, typer.Option(
        help="The password of both systems' account, from this file (else $VSPEMU_PASSWORD, else the "
             "default). Given to the systems in their environment, never on their command line.")] = None,
) -> None:
    """Run the two-system lab (primary 410001 on :8443, secondary 410002 on :8444) until Ctrl-C.

    Replication ports: primary 17001-17004, secondary 17101-17104."""
    procs: list[subprocess.Popen[bytes]] = []
    table = Table(title="vspemu lab")
    for col in ("role", "storageDeviceId", "REST", "host I/O (NBD)", "replication ports", "account", "data"):
        table.add_column(col)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    env = dict(os.environ)
    if password_file is not None:
        env[PASSWORD_ENV] = _account_password(None, password_file)
    account = f"{DEFAULT_USER} / " + (DEFAULT_PASSWORD if PASSWORD_ENV not in env else
                                      f"(the password of {password_file or '$' + PASSWORD_ENV})")
    try:
        for role, serial, rest_port, nbd_port, link_base in LAB:
            d = data_dir / str(serial)
            cmd = [sys.executable, "-m", "vspemu", "serve", "--serial", str(serial), "--data-dir", str(d),
                   "--rest-port", str(rest_port), "--rest-host", host, "--nbd-port", str(nbd_port),
                   "--nbd-host", host, "--model", model, "--log-level", "warning",
                   "--link-port-base", str(link_base)]
            procs.append(subprocess.Popen(cmd, start_new_session=True, env=env))
            if not _wait_port(host, rest_port, procs[-1]):
                console.print(f"[red]the {role} system did not start (port {rest_port} in use?)[/red]")
                raise typer.Exit(1)
            table.add_row(role, storage_device_id(model, serial), f"https://{host}:{rest_port}",
                          f"nbd://{host}:{nbd_port}/<ldevId>",
                          f"CL3-A/CL4-A/CL3-B/CL4-B = {link_base}-{link_base + 3}",
                          account, str(d))
        console.print(table)
        certs = os.pathsep.join(str((data_dir / str(serial) / "tls" / "server.crt").resolve()) for _, serial, *_ in LAB)
        console.print(f"Clients verify TLS: export VSPEMU_CA_CERT={certs}", soft_wrap=True)
        for role, _serial, rest_port, *_ in LAB:  # the live status pages (log in with the account above)
            console.print(f"Status page ({role}): https://{host}:{rest_port}{STATUS_PAGE}   "
                          f"metrics: https://{host}:{rest_port}/metrics", soft_wrap=True)
        console.print("Press Ctrl-C to stop both systems.")
        while not stopping:
            for p in procs:
                if p.poll() is not None:
                    console.print(f"[red]a storage system exited with code {p.returncode}[/red]")
                    stopping = True
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        console.print("lab stopped")
    if any(p.returncode not in (0, -signal.SIGTERM) for p in procs):
        raise typer.Exit(1)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
