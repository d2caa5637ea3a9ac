"""The storage system itself, and the API version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from vspemu import __version__
from vspemu.api.common import Auth, Ctx, data
from vspemu.context import StorageContext
from vspemu.errors import not_found

router = APIRouter(tags=["storages"])
version_router = APIRouter(tags=["version"])

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
