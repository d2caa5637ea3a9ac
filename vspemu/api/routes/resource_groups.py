"""Resource groups and virtual storage machines (vspemu.system.resources): what GAD S-VOLs live in.

``resource-groups`` GET / POST / DELETE and the add-resource / remove-resource actions (LDEV ids, ports,
host groups), ``virtual-storages`` GET / POST. Parity groups, external parity groups and NVM subsystems are not
modelled (vspemu has none): naming one is refused. The resource-group lock is the system's one lock
(services/resource-group-service): every group reports it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response, sync_work
from vspemu.context import StorageContext
from vspemu.errors import VspError, invalid
from vspemu.system.resources import MAX_RESOURCE_GROUP_ID, NAME_MAX, ResourceGroup, VirtualStorage, model_type_id
from vspemu.system.storage import MAX_LDEV_ID

router = APIRouter(tags=["resource groups"])
MAX_ITEMS = MAX_LDEV_ID + 1


class GroupCreate(Body):
    resourceGroupName: str = Field(min_length=1, max_length=NAME_MAX)
    virtualStorageId: int | None = Field(default=None, ge=0, le=1023)
    virtualStorageDeviceId: str | None = Field(default=None, max_length=12)
    canRunIfResourceLocked: bool | None = None


class VirtualStorageCreate(Body):
    resourceGroupName: str = Field(min_length=1, max_length=NAME_MAX)
    virtualSerialNumber: str | int
    virtualModel: str = Field(min_length=1, max_length=64)


class ResourceParameters(Body):
    ldevIds: list[int] | None = Field(default=None, max_length=MAX_ITEMS)
    startLdevId: int | None = Field(default=None, ge=0, le=MAX_LDEV_ID)
    endLdevId: int | None = Field(default=None, ge=0, le=MAX_LDEV_ID)
    portIds: list[str] | None = Field(default=None, max_length=256)
    hostGroupIds: list[str] | None = Field(default=None, max_length=MAX_ITEMS)
    parityGroupIds: list[str] | None = Field(default=None, max_length=MAX_ITEMS)
    externalParityGroupIds: list[str] | None = Field(default=None, max_length=MAX_ITEMS)
    nvmSubsystemIds: list[int] | None = Field(default=None, max_length=MAX_ITEMS)
    canRunIfResourceLocked: bool | None = None


class ResourceBody(Body):
    parameters: ResourceParameters


def lock_status(ctx: StorageContext) -> str:
    return "Locked" if ctx.sessions.lock.owner is not None else "Unlocked"


def group_view(ctx: StorageContext, rg: ResourceGroup, detail: str | None = None) -> dict[str, Any]:
    vsm = ctx.system.resources.get_virtual_storage(rg.virtual_storage_id)
    out: dict[str, Any] = {
        "resourceGroupId": rg.resource_group_id,
        "resourceGroupName": rg.name,
        "lockStatus": lock_status(ctx),
        "virtualStorageId": rg.virtual_storage_id,
        "ldevIds": list(rg.ldev_ids),
        "parityGroupIds": [],
        "externalParityGroupIds": [],
        "portIds": list(rg.port_ids),
        "hostGroupIds": list(rg.host_group_ids),
    }
    if rg.virtual_storage_id != 0:
        out.update({"virtualStorageDeviceId": vsm.device_id, "virtualSerialNumber": str(vsm.serial),
                    "virtualModel": vsm.model})
    if detail and "nvmSubsystemIds" in detail.split(","):
        out["nvmSubsystemIds"] = []
    return out


def vsm_view(ctx: StorageContext, vsm: VirtualStorage) -> dict[str, Any]:
    """Exactly the fields the collection's VirtualStorageMachineInfo takes (it refuses any other): the
    virtual storage id of a VSM is in its resource groups' ``virtualStorageId``."""
    return {
        "virtualStorageDeviceId": vsm.device_id,
        "virtualSerialNumber": str(vsm.serial),
        "virtualModel": vsm.model,
        "virtualStorageTypeId": model_type_id(vsm.model),
        "resourceGroupIds": ctx.system.resources.groups_of(vsm.virtual_storage_id),
    }


def check_group_id(group_id: int) -> None:
    if not 0 <= group_id <= MAX_RESOURCE_GROUP_ID:
        raise VspError("INVALID_OBJECT_ID", object_id=group_id)


def serial_of(value: str | int, attribute: str) -> int:
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 6 or int(text) == 0:
        raise invalid(attribute, value, "Specify a serial number from 1 to 999999.")
    return int(text)


@router.get("/resource-groups")
async def list_groups(ctx: Ctx, _s: Auth, detailInfoType: str | None = None) -> dict[str, Any]:
    res = ctx.system.resources
    return data([group_view(ctx, res.get_group(i), detailInfoType) for i in res.group_ids()])


@router.get("/resource-groups/{resourceGroupId}")
async def get_group(resourceGroupId: int, ctx: Ctx, _s: Auth, detailInfoType: str | None = None) -> dict[str, Any]:
    check_group_id(resourceGroupId)
    return group_view(ctx, ctx.system.resources.get_group(resourceGroupId), detailInfoType)


@router.post("/resource-groups")
async def create_group(request: Request, body: GroupCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    res = ctx.system.resources
    vsm_id = body.virtualStorageId or 0
    if body.virtualStorageDeviceId is not None:
        found = res.virtual_storage_by_device_id(body.virtualStorageDeviceId).virtual_storage_id
        if body.virtualStorageId is not None and body.virtualStorageId != found:
            raise invalid("virtualStorageDeviceId", body.virtualStorageDeviceId,
                          f"It is virtual storage {found}, not {body.virtualStorageId}.")
        vsm_id = found
    res.check_new_group(body.resourceGroupName, vsm_id)

    def create() -> list[str]:
        rg = res.create_group(body.resourceGroupName, vsm_id)
        return [f"resource-groups/{rg.resource_group_id}"]

    return await job_response(request, session, sync_work(create), key="resource-groups")


def _resources(ctx: StorageContext, p: ResourceParameters) -> tuple[list[int], list[str], list[str]]:
    for name, value in (("parityGroupIds", p.parityGroupIds), ("externalParityGroupIds", p.externalParityGroupIds),
                        ("nvmSubsystemIds", p.nvmSubsystemIds)):
        if value:
            raise VspError("API_NOT_SUPPORTED", detail=f"vspemu has no {name[:-3]}s ({name})")
    ldev_ids = list(p.ldevIds or [])
    if (p.startLdevId is None) != (p.endLdevId is None):
        raise VspError("MISSING_PARAMETER", attribute="startLdevId and endLdevId (both)")
    if p.startLdevId is not None and p.endLdevId is not None:
        if p.endLdevId < p.startLdevId:
            raise invalid("endLdevId", p.endLdevId, "Specify a value not below startLdevId.")
        given = set(ldev_ids)
        ldev_ids += [i for i in range(p.startLdevId, p.endLdevId + 1) if i not in given]
    return ldev_ids, list(p.portIds or []), list(p.hostGroupIds or [])


@router.api_route("/resource-groups/{resourceGroupId}/actions/add-resource/invoke", methods=["POST", "PUT"])
async def add_resource(resourceGroupId: int, request: Request, body: ResourceBody, ctx: Ctx,
                       session: Auth) -> JSONResponse:
    check_group_id(resourceGroupId)
    res = ctx.system.resources
    ldevs, ports, hgs = _resources(ctx, body.parameters)
    res.check_add(resourceGroupId, ldevs, ports, hgs)

    def add() -> list[str]:
        res.add_resources(resourceGroupId, ldevs, ports, hgs)
        return [f"resource-groups/{resourceGroupId}"]

    return await job_response(request, session, sync_work(add), key="resource-groups")


@router.api_route("/resource-groups/{resourceGroupId}/actions/remove-resource/invoke", methods=["POST", "PUT"])
async def remove_resource(resourceGroupId: int, request: Request, body: ResourceBody, ctx: Ctx,
                          session: Auth) -> JSONResponse:
    check_group_id(resourceGroupId)
    res = ctx.system.resources
    ldevs, ports, hgs = _resources(ctx, body.parameters)
    res.check_remove(resourceGroupId, ldevs, ports, hgs)

    def remove() -> list[str]:
        res.remove_resources(resourceGroupId, ldevs, ports, hgs)
        return [f"resource-groups/{resourceGroupId}"]

    return await job_response(request, session, sync_work(remove), key="resource-groups")


@router.delete("/resource-groups/{resourceGroupId}")
async def delete_group(resourceGroupId: int, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    check_group_id(resourceGroupId)
    res = ctx.system.resources
    res.check_delete(resourceGroupId)

    def delete() -> list[str]:
        res.delete_group(resourceGroupId)
        return [f"resource-groups/{resourceGroupId}"]

    return await job_response(request, session, sync_work(delete), key="resource-groups")


@router.get("/virtual-storages")
async def list_virtual_storages(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    res = ctx.system.resources
    return data([vsm_view(ctx, res.get_virtual_storage(i)) for i in res.virtual_storage_ids()])


@router.get("/virtual-storages/{virtualStorageId}")
async def get_virtual_storage(virtualStorageId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """By virtual storage id (0-7) or by virtual storage device id (12 digits)."""
    res = ctx.system.resources
    if not virtualStorageId.isascii() or not virtualStorageId.isdigit() or len(virtualStorageId) > 12:
        raise VspError("INVALID_OBJECT_ID", object_id=virtualStorageId)
    if len(virtualStorageId) == 12:
        return vsm_view(ctx, res.virtual_storage_by_device_id(virtualStorageId))
    return vsm_view(ctx, res.get_virtual_storage(int(virtualStorageId)))


@router.post("/virtual-storages")
async def create_virtual_storage(request: Request, body: VirtualStorageCreate, ctx: Ctx,
                                 session: Auth) -> JSONResponse:
    """A virtual storage machine with its first resource group (as the collection's hv_resource_group makes
    one: resourceGroupName, virtualSerialNumber, virtualModel)."""
    res = ctx.system.resources
    serial = serial_of(body.virtualSerialNumber, "virtualSerialNumber")
    res.check_new_virtual_storage(serial, body.virtualModel)
    res.check_new_group(body.resourceGroupName, 0)

    def create() -> list[str]:
        rg = res.create_virtual_storage(body.resourceGroupName, serial, body.virtualModel)
        return [f"virtual-storages/{rg.virtual_storage_id}", f"resource-groups/{rg.resource_group_id}"]

    return await job_response(request, session, sync_work(create), key="resource-groups")
