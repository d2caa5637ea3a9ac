"""Sessions: POST with Basic auth gives a token; every other call carries ``Authorization: Session``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from vspemu.api.common import Auth, Body, Ctx, basic_credentials, data
from vspemu.errors import VspError
from vspemu.jobs import iso
from vspemu.system.sessions import Session

router = APIRouter(tags=["sessions"])


class SessionCreate(Body):
    aliveTime: int | None = None
    authenticationTimeout: int | None = None


class SessionDelete(Body):
    force: bool | None = None


def view(s: Session) -> dict[str, Any]:
    return {
        "sessionId": s.session_id,
        "userId": s.user,
        "ipAddress": s.ip_address,
        "createdTime": iso(s.created),
        "lastAccessTime": iso(s.last_access),
    }


@router.post("/sessions")
async def create_session(request: Request, ctx: Ctx, body: SessionCreate | None = None) -> dict[str, Any]:
    user, password = basic_credentials(request)
    ip = request.client.host if request.client else ""
    logins = ctx.sessions.logins
    logins.check(user, ip)  # a backed-off address or user is refused here, without hashing
    if not await logins.verify(lambda: ctx.system.authenticate(user, password)):
        logins.failed(user, ip)
        raise VspError("AUTH_FAILED")
    logins.succeeded(user, ip)
    if body is not None and body.authenticationTimeout is not None and not (
        1 <= body.authenticationTimeout <= 900
    ):
        raise VspError("INVALID_VALUE", attribute="authenticationTimeout", value=body.authenticationTimeout)
    s = ctx.sessions.create(user, ip, body.aliveTime if body else None)
    return {"token": s.token, "sessionId": s.session_id}


@router.get("/sessions")
async def list_sessions(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return data([view(s) for s in ctx.sessions.list()])


@router.get("/sessions/{sessionId}")
async def get_session(sessionId: int, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return view(ctx.sessions.get(sessionId))


@router.delete("/sessions/{sessionId}", status_code=200)
async def delete_session(sessionId: int, ctx: Ctx, session: Auth, body: SessionDelete | None = None) -> Response:
    target = ctx.sessions.get(sessionId)
    if target.user != session.user and not (body and body.force):
        raise VspError("WRONG_STATE", detail="the session belongs to another user; specify force")
    ctx.sessions.delete(sessionId)
    return Response(status_code=200)
