"""Jobs: GET the record of an asynchronous request."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from vspemu.api.common import Auth, Ctx, data

router = APIRouter(tags=["jobs"])


@router.get("/jobs")
async def list_jobs(ctx: Ctx, _s: Auth, count: int = Query(default=100, ge=1, le=100000)) -> dict[str, Any]:
    jobs = ctx.jobs.list()
    return data([j.view() for j in reversed(jobs[-count:])])


@router.get("/jobs/{jobId}")
async def get_job(jobId: int, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return ctx.jobs.get(jobId).view()
