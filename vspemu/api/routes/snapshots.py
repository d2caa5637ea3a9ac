"""Thin Image snapshots (snapshots, snapshot-groups, snapshot-replications, snapshot-family).

Ids as on the array: a snapshot is ``{pvolLdevId},{muNumber}`` (the comma may come as ``%2C``), a snapshot
group is its name (``snapshotGroupId`` = ``snapshotGroupName``). Every change is a job; the request is checked
before the job is submitted, so a refused request changes nothing. Actions accept PUT and POST.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from vspemu.api.common import Auth, Body, Ctx, data, job_response
from vspemu.context import StorageContext
from vspemu.errors import VspError, invalid
from vspemu.localcopy.snapshot import Snapshots
from vspemu.localcopy.snapshot_model import MAX_MU, Snapshot, view
from vspemu.replication.peer_headers import check_name
from vspemu.system.pools import MAX_POOL_ID
from vspemu.system.storage import MAX_LDEV_ID

router = APIRouter(tags=["snapshots"])
LdevId = Field(ge=0, le=MAX_LDEV_ID)


class SnapshotCreate(Body):
    pvolLdevId: int = LdevId
    snapshotPoolId: int | None = Field(default=None, ge=0, le=MAX_POOL_ID)
    poolId: int | None = Field(default=None, ge=0, le=MAX_POOL_ID)
    snapshotGroupName: str = Field(min_length=1, max_length=32)
    muNumber: int | None = Field(default=None, ge=0, le=MAX_MU)
    svolLdevId: int | None = Field(default=None, ge=0, le=MAX_LDEV_ID)
    isConsistencyGroup: bool | None = None
    autoSplit: bool | None = None
    canCascade: bool | None = None
    isClone: bool | None = None
    isDataReductionForceCopy: bool | None = None
    copySpeed: str | None = Field(default=None, max_length=16)
    clonesAutomation: bool | None = None
    retentionPeriod: int | None = Field(default=None, ge=0, le=8760)


class AssignParameters(Body):
    svolLdevId: int = LdevId


class AssignBody(Body):
    parameters: AssignParameters


class RestoreParameters(Body):
    autoSplit: bool | None = None


class RestoreBody(Body):
    parameters: RestoreParameters | None = None


class CloneParameters(Body):
    copySpeed: str | None = Field(default=None, max_length=16)


class CloneBody(Body):
    parameters: CloneParameters | None = None


def snaps_of(ctx: StorageContext) -> Snapshots:
    if ctx.snapshots is None:
        raise VspError("INTERNAL", detail="this storage system runs without snapshots")
    return ctx.snapshots


def parse_id(ctx: StorageContext, snapshot_id: str) -> Snapshot:
    items = snapshot_id.replace("%2C", ",").replace("%2c", ",").split(",")
    if len(items) != 2 or not all(x.isascii() and x.isdigit() and len(x) <= 5 for x in items):
        raise VspError("INVALID_OBJECT_ID", object_id=snapshot_id)
    return snaps_of(ctx).get(int(items[0]), int(items[1]))


def url(s: Snapshot) -> str:
    return f"snapshots/{s.pvol},{s.mu}"


# -- create, list, get, delete ---------------------------------------------------------------------------------
@router.post("/snapshots")
async def create(request: Request, body: SnapshotCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    snaps = snaps_of(ctx)
    check_name("snapshotGroupName", body.snapshotGroupName, 32)
    pool_id = body.snapshotPoolId if body.snapshotPoolId is not None else body.poolId
    if pool_id is None:
        raise VspError("MISSING_PARAMETER", attribute="snapshotPoolId")
    if body.isClone and body.svolLdevId is None:
        raise VspError("MISSING_PARAMETER", attribute="svolLdevId")
    snaps.check_create(body.pvolLdevId, body.muNumber, pool_id, body.snapshotGroupName, body.svolLdevId,
                       bool(body.isClone))
    clone_now = bool(body.isClone and body.clonesAutomation)

    async def work() -> list[str]:
        s = snaps.create(body.pvolLdevId, body.muNumber, pool_id, body.snapshotGroupName, svol=body.svolLdevId,
                         consistency_group=bool(body.isConsistencyGroup), can_cascade=bool(body.canCascade),
                         is_clone=bool(body.isClone), auto_split=bool(body.autoSplit) or clone_now)
        if clone_now:
            snaps.background(snaps.clone(s))
        return [url(s)]

    return await job_response(request, session, work, key="snapshots")


def _listing(ctx: StorageContext, pvolLdevId: int | None, svolLdevId: int | None, muNumber: int | None,
             snapshotGroupName: str | None) -> dict[str, Any]:
    out = []
    for s in snaps_of(ctx).listing(pvolLdevId, muNumber):
        if svolLdevId is not None and s.svol != svolLdevId:
            continue
        if snapshotGroupName is not None and s.group != snapshotGroupName:
            continue
        item = view(s, ctx.system)
        if svolLdevId is not None and pvolLdevId is None:
            item["primaryOrSecondary"] = "S-VOL"  # the array answers as seen from the volume asked about
        out.append(item)
    return data(out)


@router.get("/snapshots")
async def list_snapshots(ctx: Ctx, _s: Auth, pvolLdevId: int | None = Query(default=None, ge=0, le=MAX_LDEV_ID),
                         svolLdevId: int | None = Query(default=None, ge=0, le=MAX_LDEV_ID),
                         muNumber: int | None = Query(default=None, ge=0, le=MAX_MU),
                         snapshotGroupName: str | None = Query(default=None, max_length=32),
                         detailInfoType: str | None = Query(default=None, max_length=64)) -> dict[str, Any]:
    return _listing(ctx, pvolLdevId, svolLdevId, muNumber, snapshotGroupName)


@router.get("/snapshot-replications")
async def list_replications(ctx: Ctx, _s: Auth,
                            pvolLdevId: int | None = Query(default=None, ge=0, le=MAX_LDEV_ID),
                            svolLdevId: int | None = Query(default=None, ge=0, le=MAX_LDEV_ID),
                            muNumber: int | None = Query(default=None, ge=0, le=MAX_MU),
                            snapshotGroupName: str | None = Query(default=None, max_length=32)) -> dict[str, Any]:
    return _listing(ctx, pvolLdevId, svolLdevId, muNumber, snapshotGroupName)


@router.get("/snapshot-family")
async def snapshot_family(ctx: Ctx, _s: Auth, ldevId: int = Query(ge=0, le=MAX_LDEV_ID)) -> dict[str, Any]:
    """The volumes related to an LDEV by snapshots: the LDEV itself as P-VOL and its snapshots' S-VOLs."""
    out: list[dict[str, Any]] = []
    for s in snaps_of(ctx).snaps.values():
        if ldevId not in (s.pvol, s.svol):
            continue
        if not out or all(x["ldevId"] != s.pvol for x in out):
            out.append({"ldevId": s.pvol, "primaryOrSecondary": "P-VOL", "poolId": s.pool_id,
                        "isVirtualCloneVolume": False, "isVirtualCloneParentVolume": False})
        if s.svol is not None:
            out.append({"ldevId": s.svol, "parentLdevId": s.pvol, "snapshotGroupName": s.group,
                        "primaryOrSecondary": "S-VOL", "status": s.status, "muNumber": s.mu, "poolId": s.pool_id,
                        "isVirtualCloneVolume": False, "isVirtualCloneParentVolume": False})
    return data(out)


@router.get("/snapshots/{snapshotId}")
async def get_snapshot(snapshotId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return view(parse_id(ctx, snapshotId), ctx.system)


@router.delete("/snapshots/{snapshotId}")
async def delete_snapshot(snapshotId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    s = parse_id(ctx, snapshotId)
    snaps = snaps_of(ctx)
    snaps.check_delete([s])

    async def work() -> list[str]:
        snaps.delete([s])
        return [url(s)]

    return await job_response(request, session, work, key="snapshots")


# -- actions on one snapshot -------------------------------------------------------------------------------
async def _body(request: Request) -> dict[str, Any] | None:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise VspError("MALFORMED_BODY") from None
    if not isinstance(doc, dict):
        raise VspError("MALFORMED_BODY")
    return doc


def _model(model: type[Body], doc: dict[str, Any] | None) -> Any:
    try:
        return model.model_validate(doc or {})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise invalid(where or "body", str(err.get("input"))[:64], err.get("msg")) from None


async def _action(request: Request, ctx: StorageContext, session: Any, snaps: Snapshots, target: list[Snapshot],
                  action: str, urls: list[str]) -> JSONResponse:
    doc = await _body(request)
    if action == "split":
        snaps.check_split(target)

        async def work() -> list[str]:
            snaps.split(target)
            return urls
    elif action == "resync":
        snaps.check_resync(target)

        async def work() -> list[str]:
            snaps.resync(target)
            return urls
    elif action == "restore":
        params = _model(RestoreBody, doc).parameters
        auto_split = bool(params is not None and params.autoSplit)
        for s in target:
            snaps.check_restore(s)

        async def work() -> list[str]:
            for s in target:
                await snaps.restore(s, auto_split)
            return urls
    elif action == "assign-volume":
        if len(target) != 1:
            raise VspError("URL_NOT_FOUND", url=request.url.path)
        svol = _model(AssignBody, doc).parameters.svolLdevId
        snaps.check_assign(target[0], svol)

        async def work() -> list[str]:
            snaps.assign(target[0], svol)
            return urls
    elif action == "unassign-volume":
        snaps.check_unassign(target)

        async def work() -> list[str]:
            for s in target:
                snaps.unassign(s)
            return urls
    elif action == "clone":
        _model(CloneBody, doc)
        for s in target:
            snaps.check_clone(s)

        async def work() -> list[str]:
            for s in target:
                await snaps.clone(s)
            return urls
    else:
        raise VspError("URL_NOT_FOUND", url=request.url.path)
    return await job_response(request, session, work, key="snapshots")


ACTIONS = ("split", "resync", "restore", "assign-volume", "unassign-volume", "clone")


@router.post("/snapshots/{snapshotId}/actions/{action}/invoke")
@router.put("/snapshots/{snapshotId}/actions/{action}/invoke", include_in_schema=False)
async def snapshot_action(snapshotId: str, action: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    if action not in ACTIONS:
        raise VspError("URL_NOT_FOUND", url=request.url.path)
    s = parse_id(ctx, snapshotId)
    return await _action(request, ctx, session, snaps_of(ctx), [s], action, [url(s)])


# -- snapshot groups -----------------------------------------------------------------------------------------
@router.get("/snapshot-groups")
async def list_groups(ctx: Ctx, _s: Auth, snapshotGroupName: str | None = Query(default=None, max_length=32),
                      detailInfoType: str | None = Query(default=None, max_length=64)) -> dict[str, Any]:
    names = [n for n in snaps_of(ctx).groups() if snapshotGroupName is None or n == snapshotGroupName]
    return data([{"snapshotGroupName": n, "snapshotGroupId": n} for n in names])


@router.get("/snapshot-groups/{groupId}")
async def get_group(groupId: str, ctx: Ctx, _s: Auth,
                    detailInfoType: str | None = Query(default=None, max_length=64)) -> dict[str, Any]:
    snaps = snaps_of(ctx).of_group(groupId)
    return {"snapshotGroupName": groupId, "snapshotGroupId": groupId,
            "snapshots": [view(s, ctx.system) for s in snaps]}


@router.delete("/snapshot-groups/{groupId}")
async def delete_group(groupId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    snaps = snaps_of(ctx)
    target = snaps.of_group(groupId)
    snaps.check_delete(target)

    async def work() -> list[str]:
        snaps.delete(target)
        return [f"snapshot-groups/{groupId}"]

    return await job_response(request, session, work, key="snapshots")


GROUP_ACTIONS = ("split", "resync", "restore", "clone")


@router.post("/snapshot-groups/{groupId}/actions/{action}/invoke")
@router.put("/snapshot-groups/{groupId}/actions/{action}/invoke", include_in_schema=False)
async def group_action(groupId: str, action: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    if action not in GROUP_ACTIONS:
        raise VspError("URL_NOT_FOUND", url=request.url.path)
    snaps = snaps_of(ctx)
    target = snaps.of_group(groupId)
    return await _action(request, ctx, session, snaps, target, action, [f"snapshot-groups/{groupId}"])
