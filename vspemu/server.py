"""One storage system process: REST over HTTPS, NBD host I/O and the replication ports (the link)."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import stat
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from vspemu.api.app import create_app
from vspemu.certs import ensure_certificate
from vspemu.context import StorageContext
from vspemu.jobs import Jobs
from vspemu.localcopy.shadowimage import ShadowImages
from vspemu.localcopy.snapshot import Snapshots
from vspemu.replication.engine import Replication
from vspemu.replication.link import Link
from vspemu.system.faults import Faults
from vspemu.system.quorum import QuorumDisks
from vspemu.system.remotes import MIN_TIMEOUT_FOR_REMOTE_IO, Remotes
from vspemu.system.sessions import Sessions
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER, REPLICATION_PORTS, StorageSystem
from vspemu.volumes.nbd import NbdLimits

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
    # replication ports: explicit TCP ports (one per CL3-A, CL4-A, CL3-B, CL4-B), or base + i, or (default)
    # free ports chosen at the first start and kept in the configuration for later starts
    link_host: str | None = None
    link_ports: list[int] | None = None
    link_port_base: int | None = None
    min_remote_io_timeout: int = MIN_TIMEOUT_FOR_REMOTE_IO
    nbd_limits: NbdLimits = field(default_factory=NbdLimits)  # connections, timeouts, buffers (docs/nbd.md)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def private_data_dir(data_dir: Path) -> None:
    """The data directory holds link secrets, password hashes, the TLS key and every volume: only the
    system's own user may read it. Made 0700 (tightened if it exists), everything in it 0600 / 0700."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in [data_dir, *data_dir.rglob("*")]:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            continue
        want = 0o700 if stat.S_ISDIR(st.st_mode) else stat.S_IMODE(st.st_mode) & 0o600
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(path, want)


def build_context(cfg: ServerConfig) -> StorageContext:
    private_data_dir(cfg.data_dir)
    system = StorageSystem(cfg.data_dir, cfg.serial, cfg.model, cfg.user, cfg.password, cfg.pool_capacity)
    ctx = StorageContext(system=system, sessions=Sessions(), jobs=Jobs(), rest_host=cfg.rest_host,
                         rest_port=cfg.rest_port, nbd_host=cfg.nbd_host, nbd_port=cfg.nbd_port)
    link = Link(system.storage_device_id, system.serial, lambda _d: None, lambda _d, _p: None,
                host=cfg.link_host or cfg.rest_host, ports=link_port_plan(cfg, system))
    ctx.link = link
    ctx.remotes = Remotes(system, link, cfg.rest_host, cfg.rest_port, cfg.min_remote_io_timeout)
    ctx.replication = Replication(system, link, ctx.remotes, cfg.data_dir, ctx.journals)
    ctx.faults = Faults(system, link, ctx.replication, ctx.journals)
    ctx.snapshots = Snapshots(system, cfg.data_dir, ctx.replication)
    remotes = ctx.remotes
    ctx.quorum = QuorumDisks(system, lambda serial: (p.storage_type_id if (p := remotes.by_serial(serial)) else None))
    ctx.replication.gad.attach_quorum(ctx.quorum)  # GAD pairs use the quorum disks
    ctx.shadow_images = ShadowImages(system, cfg.data_dir, ctx.replication)
    return ctx


def link_port_plan(cfg: ServerConfig, system: StorageSystem) -> dict[str, int]:
    if cfg.link_ports:
        if len(cfg.link_ports) != len(REPLICATION_PORTS):
            raise ValueError(f"give {len(REPLICATION_PORTS)} link ports ({', '.join(REPLICATION_PORTS)})")
        return dict(zip(REPLICATION_PORTS, cfg.link_ports, strict=True))
    if cfg.link_port_base is not None:
        return {p: cfg.link_port_base + i for i, p in enumerate(REPLICATION_PORTS)}
    saved = system.store.get("system", "link_ports") or {}
    return {p: int(saved.get(p, 0)) for p in REPLICATION_PORTS}


async def start_link(cfg: ServerConfig, ctx: StorageContext) -> None:
    assert ctx.link is not None and ctx.remotes is not None
    explicit = bool(cfg.link_ports) or cfg.link_port_base is not None
    try:
        await ctx.link.start()
    except OSError:
        if explicit:
            raise
        await ctx.link.close()  # a saved port is taken now: choose new free ones
        ctx.link.ports = dict.fromkeys(REPLICATION_PORTS, 0)
        await ctx.link.start()
    if not explicit:
        ctx.system.store.put("system", "link_ports", dict(ctx.link.ports))
    await ctx.remotes.start()


async def serve(cfg: ServerConfig) -> None:
    raise_fd_limit()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # calls to remote systems: no line per request
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

        nbd = NbdServer(ctx.system.exported_volume, ctx.system.export_names, cfg.nbd_limits)
        await nbd.start(cfg.nbd_host, cfg.nbd_port)
    await start_link(cfg, ctx)
    assert ctx.link is not None and ctx.replication is not None
    ctx.replication.start()
    assert ctx.faults is not None
    ctx.faults.apply()  # the faults in force before the restart are in force again
    assert ctx.quorum is not None
    ctx.quorum.start()  # quorum disks: heartbeat to the quorum volumes (vspemu.system.quorum)
    if ctx.shadow_images is not None:
        ctx.shadow_images.start()  # ShadowImage copies under way before a restart go on
    log.info("storage %s (serial %s) REST https://%s:%s NBD %s link %s", ctx.system.storage_device_id,
             ctx.system.serial, cfg.rest_host, cfg.rest_port,
             f"nbd://{cfg.nbd_host}:{cfg.nbd_port}" if nbd else "off",
             " ".join(f"{p}={h}:{n}" for p, (h, n) in ctx.link.addresses().items()))
    try:
        await server.serve()
    finally:
        await ctx.quorum.close()
        if ctx.shadow_images is not None:
            await ctx.shadow_images.close()
        await ctx.replication.close()
        await ctx.link.close()
        if nbd is not None:
            await nbd.close()
        ctx.system.close()


def run(cfg: ServerConfig) -> None:
    os.umask(0o077)  # every file this process creates is 0600 from its creation (SQLite's -wal/-shm too)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))
