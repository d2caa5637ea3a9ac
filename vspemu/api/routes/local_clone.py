"""ShadowImage pairs and groups (local-clone-copypairs, local-clone-copygroups).

Ids as on the array: a group ``{copyGroupName},{pvolDeviceGroupName},{svolDeviceGroupName}``, a pair the
group id and ``,{copyPairName}`` (commas may come raw or as ``%2C``). Every change is a job; a request the
array would refuse is refused before the job is made (and changes nothing). Split, resync and restore accept
PUT and POST. A split's job completes when the S-VOL holds the whole split image (PSUS); a create, resync or
restore job when the copy is done (PAIR), or, with ``Job-Mode-Wait-Configuration-Change: NoWait``, as soon as
the copy has started (COPY / RCPY): the client then polls the pair's status for PAIR.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response
from vspemu.context import StorageContext
from vspemu.errors import VspError
from vspemu.localcopy.shadowimage import ShadowImages
from vspemu.localcopy.shadowimage_model import SiPair, group_view, pair_view
from vspemu.replication.peer_headers import check_name
from vspemu.system.storage import MAX_LDEV_ID

router = APIRouter(tags=["local copy"])
private_router = APIRouter(tags=["vspemu"])  # vspemu-private: what tests and benchmarks measure


class PairCreate(Body):
    copyGroupName: str = Field(min_length=1, max_length=29)
    copyPairName: str = Field(min_length=1, max_length=31)
    replicationType: Literal["SI"] | None = None
    pvolLdevId: int = Field(ge=0, le=MAX_LDEV_ID)
    svolLdevId: int = Field(ge=0, le=MAX_LDEV_ID)
    pvolDeviceGroupName: str | None = Field(default=None, min_length=1, max_length=31)
    svolDeviceGroupName: str | None = Field(default=None, min_length=1, max_length=31)
    isNewGroupCreation: bool | None = None
    copyPace: int | None = Field(default=None, ge=1, le=15)
    autoSplit: bool | None = None
    pvolMuNumber: int | None = Field(default=None, ge=0, le=2)
    isConsistencyGroup: bool | None = None
    consistencyGroupId: int | None = Field(default=None, ge=0, le=255)
    quickMode: bool | None = None
    isDataReductionForceCopy: bool | None = None
    copyMode: Literal["NotSynchronized"] | None = None


class ActionParameters(Body):
    copyPace: int | None = Field(default=None, ge=1, le=15)
    quickMode: bool | None = None
    forceCopy: bool | None = None


class ActionBody(Body):
    parameters: ActionParameters | None = None


def wants_nowait(request: Request) -> bool:
    return request.headers.get("job-mode-wait-configuration-change", "").strip().lower() == "nowait"


def si_of(ctx: StorageContext) -> ShadowImages:
    if ctx.shadow_images is None:
        raise VspError("INTERNAL", detail="this storage system runs without ShadowImage")
    return ctx.shadow_images


def _split_id(object_id: str, parts: int) -> list[str]:
    items = object_id.replace("%2C", ",").replace("%2c", ",").split(",")
    if len(items) != parts or not all(items):
        raise VspError("INVALID_OBJECT_ID", object_id=object_id)
    return items


def _pair(ctx: StorageContext, pair_id: str) -> SiPair:
    return si_of(ctx).get(",".join(_split_id(pair_id, 4)))


def _group(ctx: StorageContext, group_id: str) -> tuple[str, list[SiPair]]:
    gid = ",".join(_split_id(group_id, 3))
    pairs = si_of(ctx).group_pairs(gid)
    if not pairs:
        raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"local copy group {group_id}")
    return gid, pairs


def _view(ctx: StorageContext, pair: SiPair) -> dict[str, Any]:
    si = si_of(ctx)
    view = pair_view(pair, si.progress(pair), ctx.system.storage_device_id)
    view["pvolStatus"] = view["svolStatus"] = si.shown_status(pair)
    return view


def _pair_url(pair: SiPair) -> str:
    return f"local-clone-copypairs/{pair.pair_id}"


# -- create -------------------------------------------------------------------------------------------------
@router.post("/local-clone-copypairs")
async def create_pair(request: Request, body: PairCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    si = si_of(ctx)
    check_name("copyGroupName", body.copyGroupName, 29)
    check_name("copyPairName", body.copyPairName)
    for attr, dg in (("pvolDeviceGroupName", body.pvolDeviceGroupName),
                     ("svolDeviceGroupName", body.svolDeviceGroupName)):
        if dg is not None:
            check_name(attr, dg)
    if body.copyMode is not None:
        raise VspError("WRONG_STATE", detail="copyMode NotSynchronized (volume migration) is not supported")
    ctg = body.consistencyGroupId if body.isConsistencyGroup else None
    if body.isConsistencyGroup and ctg is None:
        ctg = 0
    if body.isConsistencyGroup and body.autoSplit:
        raise VspError("INVALID_VALUE", attribute="autoSplit", value=True,
                       cause="A pair in a consistency group cannot be created with autoSplit.")

    def check() -> SiPair:
        return si.check_create(body.copyGroupName, body.copyPairName, body.pvolLdevId, body.svolLdevId,
                               body.pvolDeviceGroupName, body.svolDeviceGroupName, body.isNewGroupCreation,
                               body.pvolMuNumber, body.copyPace)

    check()

    nowait = wants_nowait(request)

    async def work() -> list[str]:
        pair = si.create(check(), ctg, bool(body.autoSplit))
        if not nowait:
            await si.wait_copied([pair])
        return [_pair_url(pair)]

    return await job_response(request, session, work, key="local-clone")


# -- get ----------------------------------------------------------------------------------------------------
@router.get("/local-clone-copypairs")
async def list_pairs(ctx: Ctx, _s: Auth, localCloneCopyGroupId: str | None = Query(default=None, max_length=200),
                     pvolLdevId: int | None = Query(default=None, ge=0, le=MAX_LDEV_ID),
                     svolLdevId: int | None = Query(default=None, ge=0, le=MAX_LDEV_ID),
                     refresh: bool | None = None) -> dict[str, Any]:
    si = si_of(ctx)
    pairs = sorted(si.pairs.values(), key=lambda p: (p.group_id, p.name))
    if localCloneCopyGroupId is not None:
        gid = ",".join(_split_id(localCloneCopyGroupId, 3))
        pairs = [p for p in pairs if p.group_id == gid]
    if pvolLdevId is not None:
        pairs = [p for p in pairs if p.pvol == pvolLdevId]
    if svolLdevId is not None:
        pairs = [p for p in pairs if p.svol == svolLdevId]
    return data([_view(ctx, p) for p in pairs])


@router.get("/local-clone-copypairs/{pairId}")
async def get_pair(pairId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return _view(ctx, _pair(ctx, pairId))


@router.get("/local-clone-copygroups")
async def list_groups(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    si = si_of(ctx)
    return data([group_view(g, si.group_pairs(g), ctx.system.storage_device_id) for g in si.group_ids()])


@router.get("/local-clone-copygroups/{groupId}")
async def get_group(groupId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    gid, pairs = _group(ctx, groupId)
    view = group_view(gid, pairs, ctx.system.storage_device_id)
    view["copyPairs"] = [_view(ctx, p) for p in pairs]
    return view


# -- actions ------------------------------------------------------------------------------------------------
async def _act(request: Request, ctx: StorageContext, session: Any, op: str, pairs: list[SiPair], url: str,
               p: ActionParameters | None) -> JSONResponse:
    si = si_of(ctx)
    pace = p.copyPace if p is not None else None
    quick = bool(p.quickMode) if p is not None else False
    if op == "restore":
        si.check_restore(pairs)
    else:
        si.check(pairs, op)

    nowait = wants_nowait(request)

    async def work() -> list[str]:
        live = [si.get(x.pair_id) for x in pairs]
        if op == "split":
            si.split(live)
            await si.wait_drained(live)
        elif op == "resync":
            si.resync(live, pace, quick)
            if not nowait:
                await si.wait_copied(live)
        elif op == "restore":
            si.restore(live, pace)
            if not nowait:
                await si.wait_copied(live)
        else:
            si.delete(live)
        return [url]

    return await job_response(request, session, work, key="local-clone")


@router.api_route("/local-clone-copypairs/{pairId}/actions/split/invoke", methods=["PUT", "POST"])
async def split_pair(pairId: str, request: Request, ctx: Ctx, session: Auth,
                     body: ActionBody | None = None) -> JSONResponse:
    pair = _pair(ctx, pairId)
    return await _act(request, ctx, session, "split", [pair], _pair_url(pair), body.parameters if body else None)


@router.api_route("/local-clone-copypairs/{pairId}/actions/resync/invoke", methods=["PUT", "POST"])
async def resync_pair(pairId: str, request: Request, ctx: Ctx, session: Auth,
                      body: ActionBody | None = None) -> JSONResponse:
    pair = _pair(ctx, pairId)
    return await _act(request, ctx, session, "resync", [pair], _pair_url(pair), body.parameters if body else None)


@router.api_route("/local-clone-copypairs/{pairId}/actions/restore/invoke", methods=["PUT", "POST"])
async def restore_pair(pairId: str, request: Request, ctx: Ctx, session: Auth,
                       body: ActionBody | None = None) -> JSONResponse:
    pair = _pair(ctx, pairId)
    return await _act(request, ctx, session, "restore", [pair], _pair_url(pair), body.parameters if body else None)


@router.delete("/local-clone-copypairs/{pairId}")
async def delete_pair(pairId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    pair = _pair(ctx, pairId)
    return await _act(request, ctx, session, "delete", [pair], _pair_url(pair), None)


@router.api_route("/local-clone-copygroups/{groupId}/actions/split/invoke", methods=["PUT", "POST"])
async def split_group(groupId: str, request: Request, ctx: Ctx, session: Auth,
                      body: ActionBody | None = None) -> JSONResponse:
    gid, pairs = _group(ctx, groupId)
    return await _act(request, ctx, session, "split", pairs, f"local-clone-copygroups/{gid}",
                      body.parameters if body else None)


@router.api_route("/local-clone-copygroups/{groupId}/actions/resync/invoke", methods=["PUT", "POST"])
async def resync_group(groupId: str, request: Request, ctx: Ctx, session: Auth,
                       body: ActionBody | None = None) -> JSONResponse:
    gid, pairs = _group(ctx, groupId)
    return await _act(request, ctx, session, "resync", pairs, f"local-clone-copygroups/{gid}",
                      body.parameters if body else None)


@router.api_route("/local-clone-copygroups/{groupId}/actions/restore/invoke", methods=["PUT", "POST"])
async def restore_group(groupId: str, request: Request, ctx: Ctx, session: Auth,
                        body: ActionBody | None = None) -> JSONResponse:
    gid, pairs = _group(ctx, groupId)
    return await _act(request, ctx, session, "restore", pairs, f"local-clone-copygroups/{gid}",
                      body.parameters if body else None)


@router.delete("/local-clone-copygroups/{groupId}")
async def delete_group(groupId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    gid, pairs = _group(ctx, groupId)
    return await _act(request, ctx, session, "delete", pairs, f"local-clone-copygroups/{gid}", None)


@private_router.get("/local-clone/stats")
async def stats(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """Per pair: tracks the last copy copied, copy-on-write fetches after splits, marked tracks."""
    return {"pairs": si_of(ctx).stats()}
