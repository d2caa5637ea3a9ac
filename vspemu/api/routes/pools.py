"""Pools: one DP pool (pool 0) whose capacity is the data directory's file system."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from vspemu.api.common import Auth, Ctx, data
from vspemu.context import StorageContext
from vspemu.errors import not_found

router = APIRouter(tags=["pools"])
MB = 1 << 20


def view(ctx: StorageContext) -> dict[str, Any]:
    system = ctx.system
    total = system.pool_capacity
    used = system.pool_used_bytes()
    rate = int(used * 100 // total) if total else 0
    subscribed = sum(ldev.size for ldev in system.ldevs.values())
    return {
        "poolId": 0,
        "poolName": "vspemu-pool0",
        "poolType": "HDP",
        "poolStatus": "POLN" if rate < 100 else "POLF",
        "usedCapacityRate": rate,
        "usedPhysicalCapacityRate": rate,
        "availableVolumeCapacity": (total - used) // MB,
        "availablePhysicalVolumeCapacity": (total - used) // MB,
        "totalPoolCapacity": total // MB,
        "totalPhysicalCapacity": total // MB,
        "totalLocatedCapacity": subscribed // MB,
        "numOfLdevs": len(system.ldevs),
        "firstLdevId": min(system.ldevs, default=-1),
        "warningThreshold": 70,
        "depletionThreshold": 80,
        "virtualVolumeCapacityRate": -1,
        "isMainframe": False,
        "isShrinking": False,
        "locatedVolumeCount": len(system.ldevs),
        "totalReservedCapacity": 0,
        "reservedVolumeCount": 0,
        "poolActionMode": "AUT",
        "dataReductionAccelerateCompCapacity": 0,
    }


@router.get("/pools")
async def list_pools(ctx: Ctx, _s: Auth, poolType: str | None = None,
                     detailInfoType: str | None = None) -> dict[str, Any]:
    if poolType not in (None, "DP", "HDP"):
        return data([])
    return data([view(ctx)])


@router.get("/pools/{poolId}")
async def get_pool(poolId: int, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    if poolId != 0:
        raise not_found("pool", poolId)
    return view(ctx)
