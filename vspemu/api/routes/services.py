"""Services: the resource-group lock (accept PUT and POST, as clients send both)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, job_response

router = APIRouter(tags=["services"])


class LockParameters(Body):
    waitTime: int = Field(default=0, ge=0, le=7200)


class LockBody(Body):
    parameters: LockParameters | None = None


@router.api_route("/services/resource-group-service/actions/lock/invoke", methods=["PUT", "POST"])
async def lock(request: Request, ctx: Ctx, session: Auth, body: LockBody | None = None) -> JSONResponse:
    wait = body.parameters.waitTime if body and body.parameters else 0

    async def work() -> list[str]:
        await ctx.sessions.lock.acquire(session.session_id, wait)
        return []

    return await job_response(request, session, work)


@router.api_route("/services/resource-group-service/actions/unlock/invoke", methods=["PUT", "POST"])
async def unlock(request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    async def work() -> list[str]:
        await ctx.sessions.lock.release(session.session_id)
        return []

    return await job_response(request, session, work)


@router.api_route("/services/storage-cache-service/actions/refresh/invoke", methods=["PUT", "POST"])
async def refresh_cache(request: Request, session: Auth) -> JSONResponse:
    async def work() -> list[str]:
        return []  # vspemu has no configuration cache: always fresh

    return await job_response(request, session, work)


