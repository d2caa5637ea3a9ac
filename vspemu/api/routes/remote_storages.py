"""Remote storage registration (remote-storages), the Remote-Authorization check, and the vspemu-private
routes the link needs (link info, peer records, port on/offline, link self-test).

``RemoteToken`` + :func:`check_remote_auth` is the reusable Remote-Authorization check: declare
``remote_token: RemoteToken`` on a route (missing header -> 400 KART40060-E), then
``await check_remote_auth(ctx, remote_storage_device_id, remote_token)`` before submitting the job (invalid
token -> 401 KART40061-E; unreachable remote -> 412 KART40065-E). Nothing changes when either fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response
from vspemu.context import StorageContext
from vspemu.errors import VspError, not_found
from vspemu.replication.wire import ECHO, PATH_STATUS_TEXT, LinkError
from vspemu.system.remotes import Remotes, RemoteStorage

router = APIRouter(tags=["remote-storages"])
private_router = APIRouter(tags=["vspemu-private"])


# -- Remote-Authorization --------------------------------------------------------------------------------
def remote_token(request: Request) -> str:
    """The token of ``Remote-Authorization: Session <token>``; 400 when the header is missing or malformed."""
    header = request.headers.get("remote-authorization", "").strip()
    scheme, _, token = header.partition(" ")
    if not header:
        raise VspError("REMOTE_AUTH_MISSING")
    if scheme.lower() != "session" or not token.strip():
        raise VspError("REMOTE_AUTH_MISSING", cause="The Remote-Authorization header must be 'Session <token>'.")
    return token.strip()


RemoteToken = Annotated[str, Depends(remote_token)]


def remotes_of(ctx: StorageContext) -> Remotes:
    if ctx.remotes is None:
        raise VspError("INTERNAL", detail="this storage system runs without replication ports")
    return ctx.remotes


async def check_remote_auth(ctx: StorageContext, remote_storage_device_id: str, token: str) -> RemoteStorage:
    """Check a Remote-Authorization token against a registered remote system's REST API."""
    return await remotes_of(ctx).verify_token(remote_storage_device_id, token)


# -- remote-storages -------------------------------------------------------------------------------------
class RemoteStorageCreate(Body):
    storageDeviceId: str = Field(min_length=12, max_length=12)
    restServerIp: str = Field(min_length=1, max_length=255)
    restServerPort: int = Field(default=443, ge=1, le=65535)
    isMutualDiscovery: bool = True


def split_rest_address(ip: str, port: int) -> tuple[str, int]:
    """``restServerIp`` may carry a port ("127.0.0.1:8444", "[::1]:8444"): the Ansible collection sends its
    connection address verbatim there when the playbook gives no ``rest_server_ip``. The port in the address
    then wins over ``restServerPort`` (which the collection sets to 443)."""
    if ip.startswith("[") and "]:" in ip:
        host, _, tail = ip[1:].partition("]:")
        return (host, int(tail)) if tail.isascii() and tail.isdigit() and 0 < int(tail) < 65536 else (ip, port)
    host, sep, tail = ip.rpartition(":")
    if sep and host and ":" not in host and tail.isascii() and tail.isdigit() and 0 < int(tail) < 65536:
        return host, int(tail)
    return ip, port


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$", re.ASCII)


def check_rest_host(host: str) -> None:
    """``restServerIp`` must be an IP address or a host name (400 KART40039-E otherwise, before any use)."""
    try:
        ipaddress.ip_address(host)
        if "%" in host:
            raise ValueError(host)  # a scoped IPv6 address cannot go into a URL
    except ValueError:
        if not _HOST_NAME.match(host):
            raise VspError("INVALID_VALUE", attribute="restServerIp", value=host,
                           cause="Specify an IP address or a host name.") from None


class RemoteStorageDelete(Body):
    isMutualDeletion: bool = True


def local_view(ctx: StorageContext) -> dict[str, Any]:
    s = ctx.system
    return {"storageDeviceId": s.storage_device_id, "dkcType": "Local", "restServerIp": ctx.rest_host,
            "restServerPort": ctx.rest_port, "model": s.model, "serialNumber": s.serial,
            "communicationModes": [{"communicationMode": "lanConnectionMode"}], "isSecure": True}


def remote_view(peer: RemoteStorage) -> dict[str, Any]:
    return {"storageDeviceId": peer.storage_device_id, "dkcType": "Remote", "restServerIp": peer.rest_server_ip,
            "restServerPort": peer.rest_server_port, "model": peer.model, "serialNumber": peer.serial,
            "communicationModes": [{"communicationMode": "lanConnectionMode"}], "isSecure": True}


@router.get("/remote-storages")
async def list_remote_storages(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return data([local_view(ctx), *(remote_view(p) for p in remotes_of(ctx).registered())])


@router.get("/remote-storages/{remoteStorageDeviceId}")
async def get_remote_storage(remoteStorageDeviceId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    if remoteStorageDeviceId == ctx.system.storage_device_id:
        return local_view(ctx)
    return remote_view(remotes_of(ctx).get(remoteStorageDeviceId))


@router.post("/remote-storages")
async def register_remote_storage(request: Request, body: RemoteStorageCreate, ctx: Ctx, session: Auth,
                                  token: RemoteToken) -> JSONResponse:
    remotes = remotes_of(ctx)
    ip, port = split_rest_address(body.restServerIp, body.restServerPort)
    check_rest_host(ip)
    # every refusal (bad token, unreachable, itself, another system, already registered) answers here
    await remotes.check_registration(body.storageDeviceId, ip, port, token)

    async def work() -> list[str]:
        peer = await remotes.register(body.storageDeviceId, ip, port, token, body.isMutualDiscovery)
        return [f"remote-storages/{peer.storage_device_id}"]

    return await job_response(request, session, work, key="remote-storages")


@router.delete("/remote-storages/{remoteStorageDeviceId}")
async def delete_remote_storage(remoteStorageDeviceId: str, request: Request, ctx: Ctx, session: Auth,
                                token: RemoteToken, body: RemoteStorageDelete | None = None) -> JSONResponse:
    remotes = remotes_of(ctx)
    if remoteStorageDeviceId == ctx.system.storage_device_id:
        raise VspError("REMOTE_IS_SELF", device=remoteStorageDeviceId)
    remotes.get(remoteStorageDeviceId)
    mutual = body.isMutualDeletion if body is not None else True
    try:
        await remotes.verify_token(remoteStorageDeviceId, token)
    except VspError as e:
        if mutual or e.key != "REMOTE_UNREACHABLE":
            raise  # an unreachable remote can only be forgotten locally (isMutualDeletion false)

    async def work() -> list[str]:
        await remotes.unregister(remoteStorageDeviceId, token, mutual)
        return [f"remote-storages/{remoteStorageDeviceId}"]

    return await job_response(request, session, work, key="remote-storages")


# -- vspemu-private: what another vspemu system (or a test) needs ----------------------------------------
class LinkPortModel(Body):
    portId: str
    host: str | None = None
    port: int = Field(ge=1, le=65535)
    enabled: bool = True


class PeerDoc(Body):
    storageDeviceId: str = Field(min_length=12, max_length=12)
    serialNumber: int
    model: str = ""
    restServerIp: str = Field(default="", max_length=255, pattern=r"^[A-Za-z0-9._:-]*$")
    restServerPort: int = Field(default=443, ge=1, le=65535)
    secret: str = Field(min_length=64, max_length=128, pattern=r"^(?:[0-9a-f]{2})+$")
    linkPorts: list[LinkPortModel] = Field(default=[], max_length=16)
    isMutualDiscovery: bool = False
    nonce: str = Field(default="", max_length=64)
    rekeyProof: str = Field(default="", max_length=64)


class NonceRequest(Body):
    storageDeviceId: str = Field(min_length=12, max_length=12)


class ConfirmRequest(Body):
    storageDeviceId: str = Field(min_length=12, max_length=12)
    nonce: str = Field(min_length=1, max_length=64)


class ForgetDoc(Body):
    isMutualDeletion: bool = False
    checkOnly: bool = False
    nonce: str = Field(default="", max_length=64)
    proof: str = Field(default="", max_length=64)


class PortState(Body):
    enabled: bool


class LinkTest(Body):
    remoteSerialNumber: int
    pathGroupId: int = Field(ge=0, le=255)
    size: int = Field(default=4096, ge=0, le=64 << 20)
    count: int = Field(default=1, ge=1, le=100000)
    concurrency: int = Field(default=1, ge=1, le=1024)
    timeout: float | None = Field(default=None, gt=0, le=600)


@private_router.get("/link")
async def link_info(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """This system's identity and replication-port addresses."""
    return remotes_of(ctx).link_info()


@private_router.post("/link-peers/nonces")
async def link_peer_nonce(body: NonceRequest, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """Step 1 of a registration by ``storageDeviceId``: a single-use, short-lived nonce bound to that id."""
    return {"nonce": remotes_of(ctx).issue_nonce(body.storageDeviceId)}


@private_router.post("/link-peers")
async def put_peer(request: Request, body: PeerDoc, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """The registering system hands over the link secret (and registers itself when mutual), with the nonce;
    accepted only when the registering system confirms the registration (see Remotes.accept_peer)."""
    remotes = remotes_of(ctx)
    client_ip = request.client.host if request.client else ""
    doc = body.model_dump()
    await remotes.accept_peer(doc, client_ip)
    return remotes.link_info()


@private_router.post("/registrations/confirm")
async def confirm_registration(body: ConfirmRequest, ctx: Ctx) -> dict[str, Any]:
    """No session: the target of a registration this system runs asks for its proof (an HMAC of the secret
    being handed over). Answers only while that registration, with that nonce, is in progress."""
    return remotes_of(ctx).confirm(body.storageDeviceId, body.nonce)


@private_router.post("/link-peers/{storageDeviceId}/forget")
async def forget_peer(storageDeviceId: str, body: ForgetDoc, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return remotes_of(ctx).forget_peer(storageDeviceId, body.isMutualDeletion, body.checkOnly, body.nonce,
                                       body.proof)


@private_router.get("/link/paths")
async def link_paths(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """Diagnostics: every path with its status, its text and the reason of the last failure."""
    remotes = remotes_of(ctx)
    assert ctx.link is not None
    out = []
    for cfg in remotes.groups.values():
        group = ctx.link.path_group(cfg.remote_serial, cfg.path_group_id)
        for p in group.paths.values() if group else ():
            out.append({"remotepathGroupId": cfg.object_id, **p.view(),
                        "pathStatusText": PATH_STATUS_TEXT.get(p.status, "")})
    peers = [{"storageDeviceId": p.storage_device_id, "registered": p.registered} for p in remotes.peers.values()]
    return {"data": out, "rejectedConnections": ctx.link.rejected_connections, "peers": peers}


@private_router.put("/link-ports/{portId}")
async def set_link_port(portId: str, body: PortState, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """Take a replication port offline (listener closed, connections dropped) or online again."""
    assert ctx.link is not None
    if portId not in ctx.link.ports:
        raise not_found("replication port", portId)
    await ctx.link.set_port_enabled(portId, body.enabled)
    return remotes_of(ctx).link_info()


@private_router.post("/link-test")
async def link_test(body: LinkTest, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """Self-test: ``count`` echo calls of ``size`` random bytes, ``concurrency`` at a time, on a path group."""
    assert ctx.link is not None
    group = ctx.link.path_group(body.remoteSerialNumber, body.pathGroupId)
    if group is None:
        raise not_found("remote path group", f"{body.remoteSerialNumber},*,{body.pathGroupId}")
    payload = os.urandom(body.size)
    digest = hashlib.sha256(payload).hexdigest()
    slots = asyncio.Semaphore(body.concurrency)
    by_port: dict[str, int] = {}
    errors: list[str] = []
    ok = 0

    async def one() -> None:
        nonlocal ok
        async with slots:
            try:
                header, echoed = await group.call(ECHO, {}, payload, body.timeout)
            except LinkError as e:
                errors.append(f"{type(e).__name__}: {e}")
                return
            if header.get("sha256") != digest or echoed != payload:
                errors.append("the echoed payload differs")
                return
            ok += 1
            port = str(header.get("port"))
            by_port[port] = by_port.get(port, 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(body.count)))
    seconds = time.monotonic() - start
    return {"calls": body.count, "succeeded": ok, "failed": len(errors), "errors": errors[:10],
            "seconds": round(seconds, 3), "bytes": ok * body.size * 2, "remotePorts": by_port}
