"""Observability routes (vspemu-private): Prometheus ``/metrics`` and the live status page with its JSON.

``/metrics`` (also ``/ConfigurationManager/vspemu/v1/metrics``) takes a session token (``Authorization:
Session``) or a user's credentials (``Authorization: Basic``, what Prometheus scrapers send; checked like a
login, with its backoff). The status page itself is static (HTML, JS, CSS, no data); the page logs in with the
sessions route and polls ``/ConfigurationManager/vspemu/v1/status`` (session token) every second.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vspemu.api.common import Auth, Ctx, authenticate, basic_credentials, ctx_of
from vspemu.context import StorageContext
from vspemu.errors import VspError
from vspemu.metrics import Metrics, active_faults, fault_target, mirror_lag, pair_progress

STATUS_PAGE = "/ConfigurationManager/vspemu/status"
PRIVATE = "/ConfigurationManager/vspemu/v1"

router = APIRouter(tags=["observability"])

# the page's files: fixed names only (no path from the request reaches the file system)
_STATIC = {"status.js": "text/javascript; charset=utf-8", "status.css": "text/css; charset=utf-8"}
# a strict policy: only our own script and style; nothing inline, no framing
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(name: str) -> bytes:
    return resources.files("vspemu.api").joinpath("static", name).read_bytes()


async def _metrics_auth(request: Request) -> None:
    scheme = request.headers.get("authorization", "").partition(" ")[0].lower()
    ctx = ctx_of(request)
    if scheme != "basic":
        authenticate(request)  # a session token, else 401
        return
    user, password = basic_credentials(request)
    ip = request.client.host if request.client else ""
    ctx.sessions.logins.check(user, ip)
    if not await ctx.sessions.logins.verify(lambda: ctx.system.authenticate(user, password)):
        ctx.sessions.logins.failed(user, ip)
        raise VspError("AUTH_FAILED")
    ctx.sessions.logins.succeeded(user, ip)


async def metrics(request: Request) -> Response:
    await _metrics_auth(request)
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


router.add_api_route("/metrics", metrics, methods=["GET"], response_class=Response,
                     summary="Prometheus metrics (session token or Basic auth)")
router.add_api_route(f"{PRIVATE}/metrics", metrics, methods=["GET"], response_class=Response,
                     summary="Prometheus metrics (session token or Basic auth)")


@router.get(STATUS_PAGE, include_in_schema=False)
async def status_page() -> Response:
    return Response(_static("status.html"), media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


@router.get(f"{STATUS_PAGE}/{{name}}", include_in_schema=False)
async def status_file(name: str) -> Response:
    media = _STATIC.get(name)
    if media is None:
        raise VspError("NOT_FOUND", object_id=f"file {name}")
    return Response(_static(name), media_type=media, headers=_PAGE_HEADERS)


@router.get(f"{PRIVATE}/status")
async def status(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """What the status page shows: this system's copy groups and pairs, journals, remote paths, faults."""
    return snapshot(ctx)


def snapshot(ctx: StorageContext) -> dict[str, Any]:
    system = ctx.system
    out: dict[str, Any] = {"storageDeviceId": system.storage_device_id, "serial": system.serial,
                           "model": getattr(system, "model", ""), "time": time.time(),
                           "copyGroups": [], "journals": [], "pathGroups": [], "faults": []}
    rep = ctx.replication
    if rep is not None:
        for group in sorted(list(rep.groups.values()), key=lambda g: g.name):
            pairs = []
            for pair in sorted(rep.group_pairs(group.name), key=lambda p: p.name):
                percent, dirty = pair_progress(rep, pair)
                pvol, svol = ((pair.status, pair.peer_status) if pair.role == "P"
                              else (pair.peer_status, pair.status))
                pairs.append({"name": pair.name, "role": pair.role, "localLdevId": pair.local_ldev,
                              "remoteLdevId": pair.remote_ldev, "status": pair.status,
                              "peerStatus": pair.peer_status, "pvolStatus": pvol, "svolStatus": svol,
                              "copyProgressPercent": percent, "dirtyBytes": dirty})
            lag = mirror_lag(rep, group)
            out["copyGroups"].append({
                "name": group.name, "replicationType": group.replication_type, "role": group.role,
                "remoteStorageDeviceId": group.remote_device_id, "pathGroupId": group.path_group_id,
                "localDeviceGroupName": group.local_dg, "remoteDeviceGroupName": group.remote_dg,
                "muNumber": group.mu_number, "localJournalId": group.local_journal_id,
                "remoteJournalId": group.remote_journal_id,
                "lagSeconds": lag.get("lagSeconds"), "qCount": lag.get("qCount"), "pairs": pairs})
    for journal in ctx.journals.list():
        mj = rep.ur.masters.get(journal.journal_id) if rep is not None else None
        capacity = mj.capacity if mj is not None else ctx.journals.capacity_blocks(journal) * 512
        out["journals"].append({
            "journalId": journal.journal_id, "usedBytes": mj.used if mj is not None else 0,
            "capacityBytes": capacity, "usagePercent": mj.usage_rate() if mj is not None else journal.usage_rate,
            "qCount": journal.q_count,
            "mirrors": [{"muNumber": m.mu_number, "status": m.journal_status, "qCount": m.q_count}
                        for m in journal.mirrors if m.journal_status != "SMPL"]})
    if ctx.link is not None:
        for pg in sorted(list(ctx.link.groups.values()), key=lambda g: (g.remote_device_id, g.path_group_id)):
            out["pathGroups"].append({"remoteStorageDeviceId": pg.remote_device_id, "pathGroupId": pg.path_group_id,
                                      "status": pg.status, "paths": pg.view()})
    for doc in active_faults(ctx):
        out["faults"].append({"faultId": doc.get("faultId"), "kind": doc.get("kind"), "target": fault_target(doc),
                              "since": doc.get("createdAt")})
    return out


def install(app: Any, ctx: StorageContext) -> None:
    """The metrics registry of the app (the REST middleware and the routes use it) and the routes."""
    app.state.metrics = Metrics(ctx)
    app.include_router(router)


class RestMetrics:
    """Pure ASGI middleware: counts REST requests by method, route template and status, and times them.

    The route is the matched route's path template (e.g. ``.../ldevs/{objectId}``), so the label set stays
    bounded; a request that matched no route is counted under ``unmatched``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before answering, the server answers 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = route_template(scope)
            method = str(scope.get("method", ""))
            if method not in _METHODS:
                method = "other"
            metrics: Metrics | None = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
            if metrics is not None:
                metrics.rest_requests.labels(method, template, str(status)).inc()
                metrics.rest_seconds.labels(method, template).observe(time.perf_counter() - start)


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def route_template(scope: Scope) -> str:
    """The full path template of the matched route (routers are included under prefixes whose only parameter
    is the storage device id; the route object knows only its own part)."""
    route = scope.get("route")
    tail = getattr(route, "path", None)
    if not isinstance(tail, str) or not tail:
        return "unmatched"
    path = str(scope.get("path", ""))
    have, want = path.strip("/").split("/"), tail.strip("/").split("/")
    extra = len(have) - len(want)
    if extra <= 0:
        return tail
    device = (scope.get("path_params") or {}).get("storageDeviceId")
    prefix = ["{storageDeviceId}" if device is not None and seg == device else seg for seg in have[:extra]]
    return "/" + "/".join(prefix) + tail
