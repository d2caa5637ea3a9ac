"""One storage system process: REST over HTTPS, NBD host I/O (and later the replication ports)."""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from vspemu.api.app import create_app
from vspemu.certs import ensure_certificate
from vspemu.context import StorageContext
from vspemu.jobs import Jobs
from vspemu.system.sessions import Sessions
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER, StorageSystem

log = logging.getLogger("vspemu")


@dataclass
class ServerConfig:
    serial: int
    data_dir: Path
    rest_host: str = "127.0.0.1"
    rest_port: int = 8443
    nbd_host: str = "127.0.0.1"
    nbd_port: int | None = 10809
    model: str = "VSP 5500H"
    user: str = DEFAULT_USER
    password: str = DEFAULT_PASSWORD
    cert: Path | None = None
    key: Path | None = None
    pool_capacity: int | None = None


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def build_context(cfg: ServerConfig) -> StorageContext:
    system = StorageSystem(cfg.data_dir, cfg.serial, cfg.model, cfg.user, cfg.password, cfg.pool_capacity)
    return StorageContext(system=system, sessions=Sessions(), jobs=Jobs(), rest_host=cfg.rest_host,
                          rest_port=cfg.rest_port, nbd_host=cfg.nbd_host, nbd_port=cfg.nbd_port)


async def serve(cfg: ServerConfig) -> None:
    raise_fd_limit()
    ctx = build_context(cfg)
    cert = cfg.cert or cfg.data_dir / "tls" / "server.crt"
    key = cfg.key or cfg.data_dir / "tls" / "server.key"
    if cfg.cert is None or cfg.key is None:
        ensure_certificate(cert, key, f"vspemu-{ctx.system.serial}", [cfg.rest_host])
    app = create_app(ctx)
    config = uvicorn.Config(app, host=cfg.rest_host, port=cfg.rest_port, ssl_certfile=str(cert),
                            ssl_keyfile=str(key), log_level="warning", access_log=False,
                            lifespan="off", timeout_keep_alive=30,
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    nbd = None
    if cfg.nbd_port is not None:
        from vspemu.volumes.nbd import NbdServer

        nbd = NbdServer(ctx.system.exported_volume, ctx.system.export_names)
        await nbd.start(cfg.nbd_host, cfg.nbd_port)
    log.info("storage %s (serial %s) REST https://%s:%s NBD %s", ctx.system.storage_device_id,
             ctx.system.serial, cfg.rest_host, cfg.rest_port,
             f"nbd://{cfg.nbd_host}:{cfg.nbd_port}" if nbd else "off")
    try:
        await server.serve()
    finally:
        if nbd is not None:
            await nbd.close()
        ctx.system.close()


def run(cfg: ServerConfig) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))
