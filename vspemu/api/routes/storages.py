"""The storage system itself, and the API version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from vspemu import __version__
from vspemu.api.common import Auth, Ctx, data
from vspemu.context import StorageContext
from vspemu.errors import VspError, not_found

router = APIRouter(tags=["storages"])
version_router = APIRouter(tags=["version"])
# storage-wide facts, under both path forms (registered in app.OBJECT_ROUTERS)
facts_router = APIRouter(tags=["storage facts"])
KB = 1024

DKC_MICRO_VERSION = "90-09-21-00/00"


def view(ctx: StorageContext) -> dict[str, Any]:
    s = ctx.system
    return {
        "storageDeviceId": s.storage_device_id,
        "model": s.model,
        "serialNumber": s.serial,
        "svpIp": ctx.rest_host,
        "usesSvp": True,
        "dkcMicroVersion": DKC_MICRO_VERSION,
        "detailDkcMicroVersion": DKC_MICRO_VERSION,
        "communicationModes": [{"communicationMode": "lanConnectionMode"}],
        "isSecure": True,
    }


@router.get("/storages")
async def list_storages(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return data([view(ctx)])


@router.get("/storages/instance")
async def storage_instance(ctx: Ctx, _s: Auth, detailInfoType: str | None = None) -> dict[str, Any]:
    return view(ctx)


@router.get("/storages/{storageDeviceId}")
async def get_storage(storageDeviceId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    if storageDeviceId != ctx.system.storage_device_id:
        raise not_found("storage", storageDeviceId)
    return view(ctx)


@version_router.get("/ConfigurationManager/configuration/version")
async def api_version() -> dict[str, Any]:
    return {"productName": "vspemu Configuration Manager REST API", "apiVersion": "1.9.0",
            "vspemuVersion": __version__}


@facts_router.get("/total-capacities/instance")
async def total_capacities(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """The capacity of all pools (KiB), as the array answers; the collection's facts read ``total``."""
    system = ctx.system
    total = sum(system.pool_total_bytes(p) for p in system.pool_ids())
    used = sum(system.pool_used_bytes(p) for p in system.pool_ids())
    free = max(total - used, 0)
    part = {"freeSpace": free // KB, "totalCapacity": total // KB}
    return {"internal": part, "external": {"freeSpace": 0, "totalCapacity": 0}, "total": part}


@facts_router.get("/auditlog-syslog-servers/instance")
async def syslog_servers(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """No syslog transfer is configured (vspemu logs to its own data directory)."""
    off = {"isEnabled": False, "ipAddress": "", "port": 514}
    return {"transferProtocol": "UDP", "locationName": "", "retries": False, "retryInterval": 1,
            "isDetailed": False, "primarySyslogServer": off, "secondarySyslogServer": dict(off)}


# APIs the array has but vspemu does not model: the array's answer for a model without the feature. Only
# these exact routes (the collection tolerates this answer on each of them); an unknown URL is still a 404.
UNSUPPORTED_GET = {
    "/total-efficiencies/instance": "total efficiency (data reduction) reports",
    "/date-times/instance": "the storage system clock settings",
    "/time-zones": "the storage system time zone settings",
    "/nvm-subsystems": "NVMe over Fabrics subsystems",
}


def _unsupported(what: str) -> Any:
    async def route(_s: Auth) -> dict[str, Any]:
        raise VspError("API_NOT_SUPPORTED", detail=f"vspemu does not model {what}")

    return route


for _path, _what in UNSUPPORTED_GET.items():
    facts_router.add_api_route(_path, _unsupported(_what), methods=["GET"], response_model=None)
