"""Journals (Universal Replicator): create, list (basic / detail), change, expand, shrink, delete."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response, sync_work
from vspemu.errors import VspError
from vspemu.system.journals import COPY_SPEEDS, MAX_JOURNAL_VOLUMES, Journals
from vspemu.system.sessions import Session
from vspemu.system.storage import MAX_LDEV_ID

router = APIRouter(tags=["journals"])
LdevIdField = Field(ge=0, le=MAX_LDEV_ID)


class JournalCreate(Body):
    journalId: int
    ldevIds: list[int] | None = Field(default=None, min_length=1, max_length=MAX_JOURNAL_VOLUMES)
    startLdevId: int | None = Field(default=None, ge=0, le=MAX_LDEV_ID)
    endLdevId: int | None = Field(default=None, ge=0, le=MAX_LDEV_ID)
    mpBladeId: int | None = Field(default=None, ge=0, le=15)
    isCacheModeEnabled: bool | None = None


class MirrorUnitUpdate(Body):
    muNumber: int = Field(ge=0, le=3)
    copyPace: Literal["L", "M", "H"] | None = None
    pathBlockadeWatchInMinutes: int | None = Field(default=None, ge=0, le=60)


class JournalUpdate(Body):
    dataOverflowWatchInSeconds: int | None = Field(default=None, ge=0, le=600)
    isCacheModeEnabled: bool | None = None
    isInflowControlEnabled: bool | None = None
    copySpeed: int | None = None
    mirrorUnit: MirrorUnitUpdate | None = None


class LdevIdsParameters(Body):
    ldevIds: list[int] = Field(min_length=1, max_length=MAX_JOURNAL_VOLUMES)


class LdevIdsAction(Body):
    parameters: LdevIdsParameters


class MpBladeParameters(Body):
    mpBladeId: int


class MpBladeAction(Body):
    parameters: MpBladeParameters


def _ldev_ids(body: JournalCreate) -> list[int]:
    if body.ldevIds is not None:
        if body.startLdevId is not None or body.endLdevId is not None:
            raise VspError("UNSUPPORTED_PARAMETER", attribute="startLdevId/endLdevId (with ldevIds)")
        for i in body.ldevIds:
            if not 0 <= i <= MAX_LDEV_ID:
                raise VspError("INVALID_VALUE", attribute="ldevIds", value=i)
        return list(body.ldevIds)
    if body.startLdevId is None or body.endLdevId is None:
        raise VspError("MISSING_PARAMETER", attribute="ldevIds (or startLdevId and endLdevId)")
    if body.endLdevId < body.startLdevId or body.endLdevId - body.startLdevId + 1 > MAX_JOURNAL_VOLUMES:
        raise VspError("INVALID_VALUE", attribute="endLdevId", value=body.endLdevId,
                       cause=f"Specify a range of 1 to {MAX_JOURNAL_VOLUMES} LDEVs.")
    return list(range(body.startLdevId, body.endLdevId + 1))


def _id(journal_id: int) -> int:
    Journals.check_id(journal_id)
    return journal_id


async def _journal_job(request: Request, session: Session, journal_id: int, apply: Callable[[], object]
                       ) -> JSONResponse:
    """A change of one journal as a job (serialized with the other changes of that journal)."""

    def change() -> list[str]:
        apply()
        return [f"journals/{journal_id}"]

    return await job_response(request, session, sync_work(change), key=f"journal:{journal_id}")


@router.get("/journals")
async def list_journals(ctx: Ctx, _s: Auth, journalInfo: Literal["basic", "detail"] = "basic") -> dict[str, Any]:
    journals = ctx.journals
    out: list[dict[str, Any]] = []
    for j in journals.list():
        if journalInfo == "detail":
            out.append(journals.detail_view(j))
        else:
            out.extend(journals.basic_views(j))
    return data(out)


@router.get("/journals/{journalId}")
async def get_journal(journalId: int, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    j = ctx.journals.get(_id(journalId))
    return {**ctx.journals.basic_views(j)[0], **ctx.journals.detail_view(j)}


@router.post("/journals")
async def create_journal(request: Request, body: JournalCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    ldev_ids = _ldev_ids(body)
    ctx.journals.check_create(body.journalId, ldev_ids)

    def create() -> list[str]:
        j = ctx.journals.create(body.journalId, ldev_ids, body.mpBladeId)
        if body.isCacheModeEnabled is not None:
            ctx.journals.update(j.journal_id, cache_mode=body.isCacheModeEnabled)
        return [f"journals/{j.journal_id}"]

    return await job_response(request, session, sync_work(create), key="journals")


@router.api_route("/journals/{journalId}", methods=["PATCH", "PUT"])
async def update_journal(journalId: int, request: Request, body: JournalUpdate, ctx: Ctx,
                         session: Auth) -> JSONResponse:
    ctx.journals.get(_id(journalId))
    mu = body.mirrorUnit
    if body.copySpeed is not None and body.copySpeed not in COPY_SPEEDS:  # refuse before the job
        raise VspError("INVALID_VALUE", attribute="copySpeed", value=body.copySpeed,
                       cause=f"Specify one of {', '.join(map(str, COPY_SPEEDS))}.")
    return await _journal_job(request, session, journalId, lambda: ctx.journals.update(
        journalId, data_overflow_watch=body.dataOverflowWatchInSeconds, cache_mode=body.isCacheModeEnabled,
        inflow_control=body.isInflowControlEnabled, copy_speed=body.copySpeed,
        mu=mu.muNumber if mu else None, copy_pace=mu.copyPace if mu else None,
        path_blockade_watch=mu.pathBlockadeWatchInMinutes if mu else None))


@router.api_route("/journals/{journalId}/actions/expand/invoke", methods=["POST", "PUT"])
async def expand_journal(journalId: int, request: Request, body: LdevIdsAction, ctx: Ctx,
                         session: Auth) -> JSONResponse:
    ctx.journals.get(_id(journalId))
    ldev_ids = body.parameters.ldevIds
    for i in ldev_ids:
        ctx.system.get_ldev(i)
    return await _journal_job(request, session, journalId, lambda: ctx.journals.expand(journalId, ldev_ids))


@router.api_route("/journals/{journalId}/actions/shrink/invoke", methods=["POST", "PUT"])
async def shrink_journal(journalId: int, request: Request, body: LdevIdsAction, ctx: Ctx,
                         session: Auth) -> JSONResponse:
    ctx.journals.get(_id(journalId))
    ldev_ids = body.parameters.ldevIds
    return await _journal_job(request, session, journalId, lambda: ctx.journals.shrink(journalId, ldev_ids))


@router.api_route("/journals/{journalId}/actions/assign-mp-blade/invoke", methods=["POST", "PUT"])
async def assign_mp_blade(journalId: int, request: Request, body: MpBladeAction, ctx: Ctx,
                          session: Auth) -> JSONResponse:
    ctx.journals.get(_id(journalId))
    blade = body.parameters.mpBladeId
    return await _journal_job(request, session, journalId, lambda: ctx.journals.assign_mp_blade(journalId, blade))


@router.delete("/journals/{journalId}")
async def delete_journal(journalId: int, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    ctx.journals.get(_id(journalId))
    return await _journal_job(request, session, journalId, lambda: ctx.journals.delete(journalId))
