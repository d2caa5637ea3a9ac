"""TrueCopy / Universal Replicator pairs and copy groups (remote-mirror-copypairs, -copygroups, remote-copypairs).

Object ids are seen from the system that answers: ``{remoteStorageDeviceId},{copyGroupName},
{localDeviceGroupName},{remoteDeviceGroupName}[,{copyPairName}]``; commas may come raw or as ``%2C``;
``NotSpecified`` may replace the remote storage id and the remote device group, and then no
Remote-Authorization is needed -- only where the array allows it: GETs (a local-only view), a takeover, and
a swap (split with ``svolOperationMode: SSWS``, resync with ``doSwapSvol``) sent to the system that holds the
S-VOLs. A split, resync or delete that changes the remote side needs the remote id and Remote-Authorization
(400 KART40060-E with a NotSpecified id).

Actions accept PUT and POST (clients send both). Pair-level split and resync of a Universal Replicator
pair act on its whole mirror (the copy group), as the array operates UR in units of mirrors.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response
from vspemu.api.routes.remote_storages import check_remote_auth
from vspemu.context import StorageContext
from vspemu.errors import VspError
from vspemu.replication import gad_model
from vspemu.replication.engine import Replication
from vspemu.replication.model import NOT_SPECIFIED, CopyGroup, Pair, group_view, pair_view
from vspemu.replication.peer_headers import check_name
from vspemu.system.storage import MAX_LDEV_ID, storage_type_id

router = APIRouter(tags=["remote copy"])
NOWAIT = "job-mode-wait-configuration-change"


class PairCreate(Body):
    copyGroupName: str = Field(min_length=1, max_length=29)
    copyPairName: str = Field(min_length=1, max_length=31)
    replicationType: Literal["TC", "UR", "GAD"]
    remoteStorageDeviceId: str = Field(min_length=12, max_length=12)
    pvolLdevId: int = Field(ge=0, le=MAX_LDEV_ID)
    svolLdevId: int = Field(ge=0, le=MAX_LDEV_ID)
    isNewGroupCreation: bool
    localDeviceGroupName: str | None = Field(default=None, min_length=1, max_length=31)
    remoteDeviceGroupName: str | None = Field(default=None, min_length=1, max_length=31)
    fenceLevel: Literal["NEVER", "DATA", "STATUS", "ASYNC"] | None = None
    copyPace: int | None = Field(default=None, ge=1, le=15)
    isConsistencyGroup: bool | None = None
    consistencyGroupId: int | None = Field(default=None, ge=0, le=255)
    muNumber: int | None = Field(default=None, ge=0, le=3)
    pvolJournalId: int | None = Field(default=None, ge=0, le=255)
    svolJournalId: int | None = Field(default=None, ge=0, le=255)
    pathGroupId: int | None = Field(default=None, ge=0, le=255)
    doInitialCopy: bool | None = None
    isDataReductionForceCopy: bool | None = None
    doDeltaResyncSuspend: bool | None = None
    quorumDiskId: int | None = Field(default=None, ge=0, le=31)  # GAD only
    isAluaEnabled: bool | None = None  # GAD only: the ALUA attribute of both volumes (hv_gad's set_alua_mode)


class SplitParameters(Body):
    replicationType: Literal["TC", "UR", "GAD"]
    svolAccessMode: Literal["r", "rw"] | None = None
    svolOperationMode: Literal["SSWS"] | None = None
    doPvolWriteProtect: bool | None = None
    doDataSuspend: bool | None = None


class ResyncParameters(Body):
    replicationType: Literal["TC", "UR", "GAD"]
    doSwapSvol: bool | None = None
    copyPace: int | None = Field(default=None, ge=1, le=15)
    fenceLevel: Literal["NEVER", "DATA", "STATUS"] | None = None
    isConsistencyGroup: bool | None = None
    consistencyGroupId: int | None = Field(default=None, ge=0, le=255)
    doFailback: bool | None = None
    failbackMuNumber: int | None = Field(default=None, ge=0, le=3)
    svolAccessMode: Literal["r", "rw"] | None = None


class TakeoverParameters(Body):
    mode: Literal["auto", "forceSplit"] | None = None


class SplitBody(Body):
    parameters: SplitParameters


class ResyncBody(Body):
    parameters: ResyncParameters


class TakeoverBody(Body):
    parameters: TakeoverParameters | None = None


def engine_of(ctx: StorageContext) -> Replication:
    if ctx.replication is None:
        raise VspError("INTERNAL", detail="this storage system runs without replication")
    return ctx.replication


def parse_id(ctx: StorageContext, object_id: str, parts: int) -> tuple[CopyGroup, str | None, bool]:
    """(group, pair name, remote part given) for a group (4 parts) or pair (5 parts) id of this system."""
    items = object_id.replace("%2C", ",").replace("%2c", ",").split(",")
    if len(items) != parts or not all(items):
        raise VspError("INVALID_OBJECT_ID", object_id=object_id)
    remote, cg, ldg, rdg = items[:4]
    group = engine_of(ctx).groups.get(cg)
    if (group is None or ldg != group.local_dg or rdg not in (NOT_SPECIFIED, group.remote_dg)
            or remote not in (NOT_SPECIFIED, group.remote_device_id)):
        what = "copy pair" if parts == 5 else "copy group"
        raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"{what} {object_id}")
    return group, (items[4] if parts == 5 else None), remote != NOT_SPECIFIED


def refuse_not_specified(group: CopyGroup, op: str, swap_on_s_side: bool = False) -> None:
    """A ``NotSpecified`` id skips Remote-Authorization: refuse it on an operation that changes the remote
    side, except a swap sent to the S-VOL side (as the array allows)."""
    if swap_on_s_side and group.role == "S":
        return
    raise VspError("REMOTE_AUTH_MISSING",
                   cause=f"A {op} changes the remote storage system: specify its storageDeviceId and remote "
                         "device group in the object ID (not NotSpecified) and send Remote-Authorization.")


async def authorize_change(request: Request, ctx: StorageContext, group: CopyGroup, remote: bool, op: str,
                           swap_on_s_side: bool = False) -> None:
    """An operation that changes the pair on both sides: Remote-Authorization for a full id, and a
    ``NotSpecified`` id only where the array allows it (:func:`refuse_not_specified`)."""
    if remote:
        await remote_auth(request, ctx, group.remote_device_id)
    else:
        refuse_not_specified(group, op, swap_on_s_side)


async def remote_auth(request: Request, ctx: StorageContext, remote_device_id: str) -> None:
    header = request.headers.get("remote-authorization", "").strip()
    scheme, _, token = header.partition(" ")
    if not header or scheme.lower() != "session" or not token.strip():
        raise VspError("REMOTE_AUTH_MISSING")
    await check_remote_auth(ctx, remote_device_id, token.strip())


def wants_nowait(request: Request) -> bool:
    return request.headers.get(NOWAIT, "").strip().lower() == "nowait"


def pair_url(group: CopyGroup, pair: Pair) -> str:
    return f"remote-mirror-copypairs/{group.group_id},{pair.name}"


# -- create -----------------------------------------------------------------------------------------------
@router.post("/remote-mirror-copypairs")
async def create_pair(request: Request, body: PairCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    gad = body.replicationType == "GAD"
    if body.isAluaEnabled and not gad:
        raise VspError("INVALID_VALUE", attribute="isAluaEnabled", value=True,
                       cause="The ALUA attribute is set by GAD pairs only.")
    if body.quorumDiskId is not None and not gad:
        raise VspError("INVALID_VALUE", attribute="quorumDiskId", value=body.quorumDiskId,
                       cause="A quorum disk is for GAD pairs only.")
    if gad:
        check_gad_create(body)
    eng = engine_of(ctx)
    check_name("copyGroupName", body.copyGroupName, 29)  # "," or "/" would make two pair keys collide
    check_name("copyPairName", body.copyPairName)
    for attr, dg in (("localDeviceGroupName", body.localDeviceGroupName),
                     ("remoteDeviceGroupName", body.remoteDeviceGroupName)):
        if dg is not None:
            check_name(attr, dg)
    await remote_auth(request, ctx, body.remoteStorageDeviceId)
    ur = body.replicationType == "UR"
    if ur and body.fenceLevel not in (None, "ASYNC"):
        raise VspError("INVALID_VALUE", attribute="fenceLevel", value=body.fenceLevel,
                       cause="A Universal Replicator pair has fence level ASYNC.")
    if not ur and body.fenceLevel == "ASYNC":
        raise VspError("INVALID_VALUE", attribute="fenceLevel", value="ASYNC",
                       cause="Specify NEVER, DATA or STATUS for a TrueCopy pair.")
    if ur and body.isNewGroupCreation and (body.pvolJournalId is None or body.svolJournalId is None):
        raise VspError("MISSING_PARAMETER", attribute="pvolJournalId and svolJournalId")
    ctg: int | None = body.consistencyGroupId
    if not ur and not body.isConsistencyGroup:
        ctg = None
    elif not ur and ctg is None:
        raise VspError("MISSING_PARAMETER", attribute="consistencyGroupId")
    nowait = wants_nowait(request)

    async def work() -> list[str]:
        if gad:
            assert body.quorumDiskId is not None
            group, pair = await eng.gad.create(
                quorum_disk_id=body.quorumDiskId, group_name=body.copyGroupName, pair_name=body.copyPairName,
                remote_device_id=body.remoteStorageDeviceId, pvol=body.pvolLdevId, svol=body.svolLdevId,
                new_group=body.isNewGroupCreation, local_dg=body.localDeviceGroupName,
                remote_dg=body.remoteDeviceGroupName, fence="NEVER", copy_pace=body.copyPace or 3, ctg_id=ctg,
                path_group_id=body.pathGroupId, initial_copy=body.doInitialCopy is not False,
                mu_number=body.muNumber, wait=not nowait, alua=body.isAluaEnabled is True)
            return [pair_url(group, pair)]
        group, pair = await eng.create_pair(
            group_name=body.copyGroupName, pair_name=body.copyPairName, replication_type=body.replicationType,
            remote_device_id=body.remoteStorageDeviceId, pvol=body.pvolLdevId, svol=body.svolLdevId,
            new_group=body.isNewGroupCreation, local_dg=body.localDeviceGroupName,
            remote_dg=body.remoteDeviceGroupName, fence=body.fenceLevel or ("ASYNC" if ur else "NEVER"),
            copy_pace=body.copyPace or 3, ctg_id=ctg, path_group_id=body.pathGroupId,
            initial_copy=body.doInitialCopy is not False, mu_number=body.muNumber,
            pvol_journal=body.pvolJournalId, svol_journal=body.svolJournalId, wait=not nowait)
        return [pair_url(group, pair)]

    return await job_response(request, session, work)


# -- get ----------------------------------------------------------------------------------------------------
@router.get("/remote-mirror-copypairs/{pairId}")
async def get_pair(pairId: str, request: Request, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    group, name, remote = parse_id(ctx, pairId, 5)
    if remote:
        await remote_auth(request, ctx, group.remote_device_id)
    assert name is not None
    pair = engine_of(ctx).pairs.get(f"{group.name}/{name}")
    if pair is None:
        raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"copy pair {pairId}")
    return gad_model.complete_view(group, pair, pair_view(group, pair, ctx.system.storage_device_id))


@router.get("/remote-mirror-copygroups")
async def list_groups(request: Request, ctx: Ctx, _s: Auth, remoteStorageDeviceId: str | None = None,
                      detailInfoType: str | None = None) -> dict[str, Any]:
    eng = engine_of(ctx)
    if remoteStorageDeviceId is not None:
        await remote_auth(request, ctx, remoteStorageDeviceId)
    groups = [g for g in sorted(eng.groups.values(), key=lambda g: g.name)
              if remoteStorageDeviceId is None or g.remote_device_id == remoteStorageDeviceId]
    return data([group_view(g, None, ctx.system.storage_device_id) for g in groups])


@router.get("/remote-mirror-copygroups/{groupId}")
async def get_group(groupId: str, request: Request, ctx: Ctx, _s: Auth,
                    detailInfoType: str | None = None) -> dict[str, Any]:
    group, _, remote = parse_id(ctx, groupId, 4)
    if remote:
        await remote_auth(request, ctx, group.remote_device_id)
    eng = engine_of(ctx)
    pairs = eng.group_pairs(group.name)
    view = group_view(group, pairs, ctx.system.storage_device_id)
    for item, pair in zip(view["copyPairs"], pairs, strict=True):
        gad_model.complete_view(group, pair, item)  # GAD: quorumDiskId, the I/O modes
    return view


@router.get("/remote-copypairs")
async def list_local_pairs(ctx: Ctx, _s: Auth, replicationType: Literal["TC", "UR", "GAD"] | None = None,
                           headLdevId: int = Query(default=0, ge=0, le=MAX_LDEV_ID),
                           count: int = Query(default=500, ge=0, le=500)) -> dict[str, Any]:
    eng = engine_of(ctx)
    out: list[dict[str, Any]] = []
    me = ctx.system
    pairs = sorted(eng.pairs.values(), key=lambda p: (p.local_ldev, eng.groups[p.group].mu_number))
    for p in pairs:  # one entry per pair: a multi-target P-VOL shows once per mirror unit
        ldev_id = p.local_ldev
        if ldev_id < headLdevId or (count and len(out) >= count):
            continue
        g = eng.groups[p.group]
        if replicationType is not None and g.replication_type != replicationType:
            continue
        out.append({
            "replicationType": g.replication_type, "ldevId": ldev_id, "remoteSerialNumber": str(g.remote_serial),
            "remoteStorageTypeId": storage_type_id(g.remote_device_id), "remoteLdevId": p.remote_ldev,
            "primaryOrSecondary": "P-VOL" if p.role == "P" else "S-VOL", "muNumber": g.mu_number,
            "status": p.status, "serialNumber": str(me.serial), "storageTypeId": me.storage_type_id,
            "isMainframe": False,
        })
    return data(out)


# -- actions ---------------------------------------------------------------------------------------------------
async def _split(request: Request, ctx: StorageContext, session: Any, object_id: str, parts: int,
                 p: SplitParameters) -> JSONResponse:
    group, name, remote = parse_id(ctx, object_id, parts)
    _check_type(group, p.replicationType)
    await authorize_change(request, ctx, group, remote, "split", swap_on_s_side=p.svolOperationMode == "SSWS")
    eng = engine_of(ctx)
    eng.precheck("split", group.name, name, ssws=p.svolOperationMode == "SSWS")

    async def work() -> list[str]:
        await eng.split(group.name, name, svol_rw=p.svolAccessMode == "rw", ssws=p.svolOperationMode == "SSWS",
                        pvol_write_protect=bool(p.doPvolWriteProtect))
        return [_self_url(group, name)]

    return await job_response(request, session, work)


async def _resync(request: Request, ctx: StorageContext, session: Any, object_id: str, parts: int,
                  p: ResyncParameters) -> JSONResponse:
    group, name, remote = parse_id(ctx, object_id, parts)
    _check_type(group, p.replicationType)
    if name is not None and group.replication_type == "TC" and p.isConsistencyGroup is not None:
        raise VspError("WRONG_STATE", detail="registering pairs in a consistency group during a resync is done "
                                             "only in units of copy groups; resync the copy group instead")
    await authorize_change(request, ctx, group, remote, "resync", swap_on_s_side=bool(p.doSwapSvol))
    eng = engine_of(ctx)
    eng.precheck("resync", group.name, name, swap=bool(p.doSwapSvol))
    nowait = wants_nowait(request)

    async def work() -> list[str]:
        if p.isConsistencyGroup is not None and group.replication_type == "TC":
            group.ctg_id = (p.consistencyGroupId if p.consistencyGroupId is not None else 0) \
                if p.isConsistencyGroup else -1
            eng._save_group(group)
        await eng.resync(group.name, name, swap=bool(p.doSwapSvol), copy_pace=p.copyPace, fence=p.fenceLevel,
                         wait=not nowait)
        return [_self_url(group, name)]

    return await job_response(request, session, work)


async def _takeover(request: Request, ctx: StorageContext, session: Any, object_id: str, parts: int,
                    p: TakeoverParameters | None) -> JSONResponse:
    group, name, remote = parse_id(ctx, object_id, parts)
    eng = engine_of(ctx)
    mode = p.mode if p and p.mode else "auto"

    async def work() -> list[str]:
        await eng.takeover(group.name, name, mode)
        return [_self_url(group, name)]

    return await job_response(request, session, work)


def check_gad_create(body: PairCreate) -> None:
    """A GAD create names its quorum disk; its fence level is NEVER (the array shows no other)."""
    if body.quorumDiskId is None:
        raise VspError("MISSING_PARAMETER", attribute="quorumDiskId")
    if body.fenceLevel not in (None, "NEVER"):
        raise VspError("INVALID_VALUE", attribute="fenceLevel", value=body.fenceLevel,
                       cause="A GAD pair has fence level NEVER.")
    if body.pvolJournalId is not None or body.svolJournalId is not None:
        raise VspError("INVALID_VALUE", attribute="pvolJournalId", value=body.pvolJournalId,
                       cause="A GAD pair has no journals.")


def _check_type(group: CopyGroup, replication_type: str) -> None:
    if group.replication_type != replication_type:
        raise VspError("INVALID_VALUE", attribute="replicationType", value=replication_type,
                       cause=f"copy group {group.name} is a {group.replication_type} group")


def _self_url(group: CopyGroup, name: str | None) -> str:
    if name is None:
        return f"remote-mirror-copygroups/{group.group_id}"
    return f"remote-mirror-copypairs/{group.group_id},{name}"


@router.api_route("/remote-mirror-copypairs/{pairId}/actions/split/invoke", methods=["PUT", "POST"])
async def split_pair(pairId: str, request: Request, body: SplitBody, ctx: Ctx, session: Auth) -> JSONResponse:
    return await _split(request, ctx, session, pairId, 5, body.parameters)


@router.api_route("/remote-mirror-copygroups/{groupId}/actions/split/invoke", methods=["PUT", "POST"])
async def split_group(groupId: str, request: Request, body: SplitBody, ctx: Ctx, session: Auth) -> JSONResponse:
    return await _split(request, ctx, session, groupId, 4, body.parameters)


@router.api_route("/remote-mirror-copypairs/{pairId}/actions/resync/invoke", methods=["PUT", "POST"])
async def resync_pair(pairId: str, request: Request, body: ResyncBody, ctx: Ctx, session: Auth) -> JSONResponse:
    return await _resync(request, ctx, session, pairId, 5, body.parameters)


@router.api_route("/remote-mirror-copygroups/{groupId}/actions/resync/invoke", methods=["PUT", "POST"])
async def resync_group(groupId: str, request: Request, body: ResyncBody, ctx: Ctx, session: Auth) -> JSONResponse:
    return await _resync(request, ctx, session, groupId, 4, body.parameters)


@router.api_route("/remote-mirror-copypairs/{pairId}/actions/takeover/invoke", methods=["PUT", "POST"])
async def takeover_pair(pairId: str, request: Request, ctx: Ctx, session: Auth,
                        body: TakeoverBody | None = None) -> JSONResponse:
    return await _takeover(request, ctx, session, pairId, 5, body.parameters if body else None)


@router.api_route("/remote-mirror-copygroups/{groupId}/actions/takeover/invoke", methods=["PUT", "POST"])
async def takeover_group(groupId: str, request: Request, ctx: Ctx, session: Auth,
                         body: TakeoverBody | None = None) -> JSONResponse:
    return await _takeover(request, ctx, session, groupId, 4, body.parameters if body else None)


# -- delete ------------------------------------------------------------------------------------------------------
async def _delete(request: Request, ctx: StorageContext, session: Any, object_id: str, parts: int) -> JSONResponse:
    group, name, remote = parse_id(ctx, object_id, parts)
    await authorize_change(request, ctx, group, remote, "delete")
    eng = engine_of(ctx)
    if name is not None:
        eng.get_pair(group.name, name)

    async def work() -> list[str]:
        await eng.delete(group.name, name)
        return [_self_url(group, name)]

    return await job_response(request, session, work)


@router.delete("/remote-mirror-copypairs/{pairId}")
async def delete_pair(pairId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    return await _delete(request, ctx, session, pairId, 5)


@router.delete("/remote-mirror-copygroups/{groupId}")
async def delete_group(groupId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    return await _delete(request, ctx, session, groupId, 4)


# -- vspemu-private: counters for tests and benchmarks ------------------------------------------------------------
private_router = APIRouter(tags=["vspemu-private"])


@private_router.get("/replication/stats")
async def replication_stats(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return engine_of(ctx).stats()


# -- vspemu-private: online verify (see vspemu/replication/verify.py and docs/verify.md) --------------------------
class VerifyParameters(Body):
    mark: bool | None = None
    maxTracks: int | None = Field(default=None, ge=0, le=1000)
    hash: Literal["sha1", "blake2b"] | None = None


class VerifyBody(Body):
    parameters: VerifyParameters | None = None


async def _verify(request: Request, ctx: StorageContext, session: Any, object_id: str, parts: int,
                  p: VerifyParameters | None) -> JSONResponse:
    group, name, remote = parse_id(ctx, object_id, parts)
    await authorize_change(request, ctx, group, remote, "verify")
    verifier = engine_of(ctx).verifier
    mark = bool(p and p.mark)
    verifier.check(group, name, mark)
    max_list = p.maxTracks if p and p.maxTracks is not None else 100
    algo = p.hash if p and p.hash else "sha1"

    async def work() -> list[str]:
        await verifier.run(group, name, mark, max_list, algo)
        return [_self_url(group, name)]

    return await job_response(request, session, work, key=f"verify:{group.name}")


@private_router.api_route("/remote-mirror-copypairs/{pairId}/actions/verify/invoke", methods=["PUT", "POST"])
async def verify_pair(pairId: str, request: Request, ctx: Ctx, session: Auth,
                      body: VerifyBody | None = None) -> JSONResponse:
    return await _verify(request, ctx, session, pairId, 5, body.parameters if body else None)


@private_router.api_route("/remote-mirror-copygroups/{groupId}/actions/verify/invoke", methods=["PUT", "POST"])
async def verify_group(groupId: str, request: Request, ctx: Ctx, session: Auth,
                       body: VerifyBody | None = None) -> JSONResponse:
    return await _verify(request, ctx, session, groupId, 4, body.parameters if body else None)


@private_router.get("/remote-mirror-copypairs/{pairId}/verify")
async def verify_pair_report(pairId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    group, name, _ = parse_id(ctx, pairId, 5)
    return engine_of(ctx).verifier.report(group.name, name)


@private_router.get("/remote-mirror-copygroups/{groupId}/verify")
async def verify_group_report(groupId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    group, _, _ = parse_id(ctx, groupId, 4)
    return engine_of(ctx).verifier.report(group.name, None)
