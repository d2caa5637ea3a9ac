"""DP pools: pool 0 (the data directory's file system) and pools built from pool volumes (LDEVs)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response, sync_work
from vspemu.context import StorageContext
from vspemu.errors import VspError
from vspemu.system.pools import MAX_POOL_ID, Pool
from vspemu.system.storage import MAX_LDEV_ID

router = APIRouter(tags=["pools"])
MB = 1 << 20
LdevIds = Field(default=None, min_length=1, max_length=1024)
PoolType = Literal["DP", "HDP", "HDT", "HRT", "RT"]


class PoolCreate(Body):
    poolId: int | None = Field(default=None, ge=0, le=MAX_POOL_ID)
    poolName: str = Field(min_length=1, max_length=32)
    poolType: PoolType = "HDP"
    ldevIds: list[int] | None = LdevIds
    startLdevId: int | None = Field(default=None, ge=0, le=MAX_LDEV_ID)
    endLdevId: int | None = Field(default=None, ge=0, le=MAX_LDEV_ID)
    warningThreshold: int | None = Field(default=None, ge=1, le=100)
    depletionThreshold: int | None = Field(default=None, ge=1, le=100)
    duplicationLdevIds: list[int] | None = None


class PoolUpdate(Body):
    poolName: str | None = Field(default=None, min_length=1, max_length=32)
    poolType: PoolType | None = None
    warningThreshold: int | None = Field(default=None, ge=1, le=100)
    depletionThreshold: int | None = Field(default=None, ge=1, le=100)


class ExpandParameters(Body):
    ldevIds: list[int] = Field(min_length=1, max_length=1024)


class ExpandBody(Body):
    parameters: ExpandParameters


def view(ctx: StorageContext, pool: Pool) -> dict[str, Any]:
    system = ctx.system
    pid = pool.pool_id
    total = system.pool_total_bytes(pid)
    used = min(system.pool_used_bytes(pid), total)
    rate = int(used * 100 // total) if total else 0
    dp_volumes = system.pool_dp_volumes(pid)
    subscribed = sum(ldev.size for ldev in dp_volumes)
    first = min(pool.ldev_ids, default=min((x.ldev_id for x in dp_volumes), default=-1))
    status = "POLN" if rate < pool.depletion_threshold else "POLF"
    return {
        "poolId": pid,
        "poolName": pool.name,
        "poolType": "HDP" if pool.pool_type in ("DP", "HDP") else pool.pool_type,
        "poolStatus": status,
        "usedCapacityRate": rate,
        "usedPhysicalCapacityRate": rate,
        "availableVolumeCapacity": (total - used) // MB,
        "availablePhysicalVolumeCapacity": (total - used) // MB,
        "totalPoolCapacity": total // MB,
        "totalPhysicalCapacity": total // MB,
        "totalLocatedCapacity": subscribed // MB,
        "numOfLdevs": len(pool.ldev_ids) if pid else len(dp_volumes),
        "firstLdevId": first,
        "warningThreshold": pool.warning_threshold,
        "depletionThreshold": pool.depletion_threshold,
        "virtualVolumeCapacityRate": -1,
        "isMainframe": False,
        "isShrinking": False,
        "locatedVolumeCount": len(dp_volumes),
        "totalReservedCapacity": 0,
        "reservedVolumeCount": 0,
        "poolActionMode": "AUT",
        "dataReductionAccelerateCompCapacity": 0,
    }


@router.get("/pools")
async def list_pools(ctx: Ctx, _s: Auth, poolType: str | None = None, detailInfoType: str | None = None,
                     isMainframe: bool | None = None) -> dict[str, Any]:
    """``detailInfoType`` (FMC, tierPhysicalCapacity, efficiency, formattedCapacity, autoAddPoolVol, class, as
    the collection sends it) adds nothing vspemu models; the basic view is answered."""
    if poolType not in (None, "DP", "HDP") or isMainframe:
        return data([])
    return data([view(ctx, ctx.system.pools[p]) for p in ctx.system.pool_ids()])


@router.get("/pools/{poolId}")
async def get_pool(poolId: int, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return view(ctx, ctx.system.get_pool(poolId))


@router.post("/pools")
async def create_pool(request: Request, body: PoolCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    ldev_ids = body.ldevIds
    if ldev_ids is None:
        if body.startLdevId is None or body.endLdevId is None:
            raise VspError("MISSING_PARAMETER", attribute="ldevIds (or startLdevId and endLdevId)")
        if body.endLdevId < body.startLdevId or body.endLdevId - body.startLdevId >= 1024:
            raise VspError("INVALID_VALUE", attribute="endLdevId", value=body.endLdevId,
                           cause="Specify a range of at most 1024 LDEVs that ends at or after startLdevId.")
        ldev_ids = list(range(body.startLdevId, body.endLdevId + 1))
    elif body.startLdevId is not None or body.endLdevId is not None:
        raise VspError("INVALID_VALUE", attribute="startLdevId", value=body.startLdevId,
                       cause="Specify either ldevIds or startLdevId and endLdevId.")
    if body.duplicationLdevIds:
        raise VspError("API_NOT_SUPPORTED", detail="vspemu does not model deduplication (duplicationLdevIds)")
    pool_type = "HDP" if body.poolType == "DP" else body.poolType
    if pool_type not in ("HDP",):
        raise VspError("API_NOT_SUPPORTED", detail=f"vspemu models DP (HDP) pools only, not {body.poolType}")
    ids = list(ldev_ids)

    def create() -> list[str]:
        pool = ctx.system.create_pool(body.poolId, body.poolName, pool_type, ids,
                                      body.warningThreshold, body.depletionThreshold)
        return [f"pools/{pool.pool_id}"]

    return await job_response(request, session, sync_work(create), key="pools")


@router.api_route("/pools/{poolId}", methods=["PATCH", "PUT"])
async def update_pool(poolId: int, request: Request, body: PoolUpdate, ctx: Ctx, session: Auth) -> JSONResponse:
    pool = ctx.system.get_pool(poolId)
    if body.poolType is not None and body.poolType not in ("DP", "HDP") and body.poolType != pool.pool_type:
        raise VspError("API_NOT_SUPPORTED", detail=f"vspemu models DP (HDP) pools only, not {body.poolType}")

    def update() -> list[str]:
        ctx.system.update_pool(poolId, body.poolName, body.warningThreshold, body.depletionThreshold)
        return [f"pools/{poolId}"]

    return await job_response(request, session, sync_work(update), key="pools")


@router.api_route("/pools/{poolId}/actions/expand/invoke", methods=["POST", "PUT"])
async def expand_pool(poolId: int, request: Request, body: ExpandBody, ctx: Ctx, session: Auth) -> JSONResponse:
    ctx.system.get_pool(poolId)
    ids = list(body.parameters.ldevIds)

    def expand() -> list[str]:
        ctx.system.expand_pool(poolId, ids)
        return [f"pools/{poolId}"]

    return await job_response(request, session, sync_work(expand), key="pools")


@router.delete("/pools/{poolId}")
async def delete_pool(poolId: int, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    ctx.system.get_pool(poolId)

    def delete() -> list[str]:
        ctx.system.delete_pool(poolId)
        return [f"pools/{poolId}"]

    return await job_response(request, session, sync_work(delete), key="pools")
