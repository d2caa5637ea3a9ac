"""The ``vspemu`` command: run storage systems (``serve``, ``up``)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from vspemu.cli.accounts import _account_password
from vspemu.cli.demo import demo
from vspemu.cli.fault import app as fault_app
from vspemu.cli.lab import down, status, up
from vspemu.cli.pair import app as pair_app
from vspemu.cli.verify import verify
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER

STATUS_PAGE = "/ConfigurationManager/vspemu/status"  # served by each system (vspemu.api.routes.status)

app = typer.Typer(help="vspemu: Hitachi VSP storage systems in software, with TrueCopy and Universal "
                       "Replicator.", no_args_is_help=True, add_completion=False)
console = Console(width=None if sys.stdout.isatty() else 200)  # full lines when piped or logged
app.add_typer(pair_app, name="pair")
app.add_typer(fault_app, name="fault")
app.command()(demo)
app.command()(verify)
app.command()(up)
app.command()(down)
app.command()(status)

PASSWORD_ENV = "VSPEMU_PASSWORD"

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


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
