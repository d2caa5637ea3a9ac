"""LDEVs: DP volumes whose bytes live in sparse files."""

from __future__ import annotations

import math
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response, sync_work
from vspemu.api.routes.quorum_disks import external_view
from vspemu.context import StorageContext
from vspemu.errors import VspError, invalid
from vspemu.system.capacity import BLOCK, format_byte_capacity, parse_byte_capacity
from vspemu.system.storage import MAX_LDEV_ID, QOS_LIMITS, Ldev, check_ldev_size

router = APIRouter(tags=["ldevs"])
LdevId = Field(default=None, ge=0, le=MAX_LDEV_ID)


class LdevCreate(Body):
    ldevId: int | None = LdevId
    poolId: int | None = None
    byteFormatCapacity: str | None = None
    # the collection sends a whole-number float (2097152.0) when the size has a decimal point ("1.5GB")
    blockCapacity: int | float | None = Field(default=None, gt=0)
    isParallelExecutionEnabled: bool | None = None
    startLdevId: int | None = LdevId
    endLdevId: int | None = LdevId
    dataReductionMode: Literal["disabled", "compression", "compression_deduplication"] | None = None
    label: str | None = Field(default=None, max_length=32)
    isDataReductionSharedVolumeEnabled: bool | None = None
    isCompressionAccelerationEnabled: bool | None = None


class LdevUpdate(Body):
    """PATCH ldevs/{id}: the fields the collection and Cinder send. Modelled: label, dataReductionMode,
    isAluaEnabled, isFullAllocationEnabled, isCompressionAccelerationEnabled, dataReductionProcessMode (stored
    and reported). Tiering (HDT) and SSID changes are refused: vspemu pools are not tiered."""

    label: str | None = Field(default=None, max_length=32)
    dataReductionMode: Literal["disabled", "compression", "compression_deduplication"] | None = None
    isAluaEnabled: bool | None = None
    isFullAllocationEnabled: bool | None = None
    isCompressionAccelerationEnabled: bool | None = None
    dataReductionProcessMode: Literal["inline", "post_process"] | None = None
    isDataReductionDeleteForceExecute: bool | None = None
    isRelocationEnabled: bool | None = None
    tierLevelForNewPageAllocation: str | None = Field(default=None, max_length=8)
    tieringPolicy: dict[str, Any] | None = None
    ssid: str | None = Field(default=None, max_length=8)


UNMODELLED_PATCH = {
    "isRelocationEnabled": "tier relocation (HDT pools)",
    "tierLevelForNewPageAllocation": "tier levels (HDT pools)",
    "tieringPolicy": "tiering policies (HDT pools)",
    "ssid": "SSIDs (mainframe)",
}


class FormatParameters(Body):
    operationType: Literal["FMT", "QFMT"]
    isDataReductionForceFormat: bool | None = None


class FormatBody(Body):
    parameters: FormatParameters


class StatusParameters(Body):
    status: Literal["blk", "nml"]


class StatusBody(Body):
    parameters: StatusParameters


class QosParameters(Body):
    upperIops: int | None = Field(default=None, ge=0)
    lowerIops: int | None = Field(default=None, ge=0)
    upperTransferRate: int | None = Field(default=None, ge=0)
    lowerTransferRate: int | None = Field(default=None, ge=0)
    upperAlertAllowableTime: int | None = Field(default=None, ge=0)
    lowerAlertAllowableTime: int | None = Field(default=None, ge=0)
    responsePriority: int | None = Field(default=None, ge=0)
    responseAlertAllowableTime: int | None = Field(default=None, ge=0)


class QosBody(Body):
    parameters: QosParameters


class LdevDelete(Body):
    isDataReductionDeleteForceExecute: bool | None = None


class ExpandParameters(Body):
    additionalByteFormatCapacity: str | None = None
    additionalBlockCapacity: int | float | None = Field(default=None, gt=0)
    enhancedExpansion: bool | None = None


class ExpandBody(Body):
    parameters: ExpandParameters


def whole_blocks(value: int | float, attribute: str) -> int:
    """A block count as the array takes it: an integer, or a float with no fraction (2097152.0)."""
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise invalid(attribute, value, "Specify a whole number of 512-byte blocks.")
        return int(value)
    return value


def undefined_view(ldev_id: int) -> dict[str, Any]:
    return {"ldevId": ldev_id, "emulationType": "NOT DEFINED", "resourceGroupId": 0, "numOfPorts": 0,
            "ports": [], "attributes": [], "status": "NML"}


def qos_view(ldev: Ldev) -> dict[str, Any]:
    """The ``qos`` object of ``detailInfoType=qos``: the settings made with set-qos (-1: none)."""
    return {key: ldev.qos.get(key, -1) for key in QOS_LIMITS}


def with_details(out: dict[str, Any], ldev: Ldev, detailInfoType: str | None) -> dict[str, Any]:
    if detailInfoType and "qos" in detailInfoType.split(","):
        out["qos"] = qos_view(ldev)
    return out


def view(ctx: StorageContext, ldev: Ldev) -> dict[str, Any]:
    system = ctx.system
    luns = system.ldev_luns(ldev.ldev_id)
    used_blocks = -(-system.volumes[ldev.ldev_id].allocated_bytes() // BLOCK)
    ports = [
        {"portId": lun.port_id, "hostGroupNumber": lun.host_group_number,
         "hostGroupName": system.host_groups[(lun.port_id, lun.host_group_number)].name, "lun": lun.lun}
        for lun in luns
    ]
    return {
        "ldevId": ldev.ldev_id,
        "clprId": 0,
        "emulationType": "OPEN-V-CVS",
        "byteFormatCapacity": format_byte_capacity(ldev.size),
        "blockCapacity": ldev.block_capacity,
        "numOfPorts": len(ports),
        "ports": ports,
        "attributes": (["CVS", *ldev.extra_attributes] if system.is_pool_volume(ldev)
                       else ["CVS", "HDP", *ldev.extra_attributes]),
        "label": ldev.label,
        "status": ldev.status,
        "mpBladeId": ldev.ldev_id % 4,
        "ssid": f"{0x0004 + ldev.ldev_id // 256:04X}",
        "poolId": ldev.pool_id,
        "numOfUsedBlock": min(used_blocks, ldev.block_capacity),
        "isFullAllocationEnabled": ldev.is_full_allocation_enabled,
        "isCompressionAccelerationEnabled": ldev.is_compression_acceleration_enabled,
        "dataReductionStatus": "DISABLED" if ldev.data_reduction_mode == "disabled" else "ENABLED",
        "dataReductionMode": ldev.data_reduction_mode,
        "dataReductionProcessMode": ldev.data_reduction_process_mode,
        "isAluaEnabled": ldev.is_alua_enabled,
        "naaId": f"60060e80{system.serial:08x}{0:08x}{ldev.ldev_id:08x}",
        **system.resources.ldev_fields(ldev),  # resourceGroupId, virtualLdevId, virtual storage (GAD)
    }


@router.post("/ldevs")
async def create_ldev(request: Request, body: LdevCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    if (body.byteFormatCapacity is None) == (body.blockCapacity is None):
        raise VspError("MISSING_PARAMETER", attribute="byteFormatCapacity or blockCapacity (exactly one)")
    if body.poolId is None:
        raise VspError("MISSING_PARAMETER", attribute="poolId")
    if body.isParallelExecutionEnabled and body.ldevId is not None:
        raise VspError("LDEV_ID_EXHAUSTED", cause="ldevId cannot be combined with isParallelExecutionEnabled",
                       resource="ldevId")
    if body.byteFormatCapacity is not None:
        size = parse_byte_capacity(body.byteFormatCapacity)
    else:
        assert body.blockCapacity is not None
        size = whole_blocks(body.blockCapacity, "blockCapacity") * BLOCK
    check_ldev_size(size)
    pool_id = body.poolId
    ctx.system.check_pool(pool_id)

    def create() -> list[str]:
        ldev_id = body.ldevId
        if ldev_id is None and (body.startLdevId is not None or body.endLdevId is not None):
            ldev_id = ctx.system.free_ldev_id(body.startLdevId or 0, body.endLdevId or MAX_LDEV_ID)
        ldev = ctx.system.create_ldev(size, pool_id, ldev_id, body.label or "",
                                      body.dataReductionMode or "disabled")
        return [f"ldevs/{ldev.ldev_id}"]

    return await job_response(request, session, sync_work(create), key="ldevs")


@router.get("/ldevs")
async def list_ldevs(
    ctx: Ctx, _s: Auth,
    ldevOption: Literal["defined", "undefined", "dpVolume", "luMapped", "luUnmapped", "externalVolume",
                        "mappedNvmSubsystem", "unmappedNvmSubsystem"] | None = None,
    headLdevId: int = Query(default=0, ge=0, le=MAX_LDEV_ID),
    count: int = Query(default=100, ge=1, le=16384),
    poolId: int | None = None,
    journalId: int | None = Query(default=None, ge=0, le=255),
    resourceGroupId: int | None = None,
    detailInfoType: str | None = None,
) -> dict[str, Any]:
    system = ctx.system
    journal_ldevs: set[int] | None = None
    if journalId is not None:
        journal_ldevs = set(ctx.journal_ldevs(journalId))
    filtered = poolId is not None or journal_ldevs is not None or resourceGroupId not in (None, 0)
    out: list[dict[str, Any]] = []
    for ldev_id in range(headLdevId, MAX_LDEV_ID + 1):
        if len(out) >= count:
            break
        ldev = system.ldevs.get(ldev_id)
        if ldev is None:
            ext = external_view(ctx, ldev_id)  # an external volume (quorum_disks.py), or None
            if ext is not None:
                if ldevOption in (None, "externalVolume") and not filtered:
                    out.append(ext)
            elif ldevOption == "undefined" or (ldevOption is None and not filtered):
                out.append(undefined_view(ldev_id))
            continue
        if ldevOption == "undefined" or ldevOption in ("externalVolume", "mappedNvmSubsystem"):
            continue
        mapped = bool(system.ldev_luns(ldev_id))
        if (ldevOption == "luMapped" and not mapped) or (ldevOption == "luUnmapped" and mapped):
            continue
        if poolId is not None and ldev.pool_id != poolId:
            continue
        if journal_ldevs is not None and ldev_id not in journal_ldevs:
            continue
        if resourceGroupId is not None and system.resources.group_of_ldev(ldev_id) != resourceGroupId:
            continue
        if ldevOption == "dpVolume" and system.is_pool_volume(ldev):
            continue
        out.append(with_details(view(ctx, ldev), ldev, detailInfoType))
    return data(out)


@router.get("/ldevs/{ldevId}")
async def get_ldev(ldevId: int, ctx: Ctx, _s: Auth, detailInfoType: str | None = None) -> dict[str, Any]:
    if not 0 <= ldevId <= MAX_LDEV_ID:
        raise VspError("INVALID_OBJECT_ID", object_id=ldevId)
    ldev = ctx.system.ldevs.get(ldevId)
    if ldev is None:
        return external_view(ctx, ldevId) or undefined_view(ldevId)  # an external volume (quorum_disks.py)
    return with_details(view(ctx, ldev), ldev, detailInfoType)


@router.api_route("/ldevs/{ldevId}", methods=["PATCH", "PUT"])
async def update_ldev(ldevId: int, request: Request, body: LdevUpdate, ctx: Ctx, session: Auth) -> JSONResponse:
    ctx.system.get_ldev(ldevId)
    fields = body.model_dump(exclude_none=True)
    if not fields:
        raise VspError("MISSING_PARAMETER", attribute="label, dataReductionMode, isAluaEnabled or another setting")
    for name, what in UNMODELLED_PATCH.items():
        if name in fields:
            raise VspError("API_NOT_SUPPORTED", detail=f"vspemu does not model {what} ({name})")

    def update() -> list[str]:
        system = ctx.system
        ldev = system.get_ldev(ldevId)
        if body.label is not None:
            system.set_label(ldevId, body.label)
        if body.dataReductionMode is not None:
            ldev.data_reduction_mode = body.dataReductionMode
        if body.isAluaEnabled is not None:
            ldev.is_alua_enabled = body.isAluaEnabled
        if body.isFullAllocationEnabled is not None:
            ldev.is_full_allocation_enabled = body.isFullAllocationEnabled
        if body.isCompressionAccelerationEnabled is not None:
            ldev.is_compression_acceleration_enabled = body.isCompressionAccelerationEnabled
        if body.dataReductionProcessMode is not None:
            ldev.data_reduction_process_mode = body.dataReductionProcessMode
        system.save_ldev(ldev)
        return [f"ldevs/{ldevId}"]

    return await job_response(request, session, sync_work(update), key=f"ldev:{ldevId}")


@router.api_route("/ldevs/{ldevId}/actions/format/invoke", methods=["POST", "PUT"])
async def format_ldev(ldevId: int, request: Request, body: FormatBody, ctx: Ctx, session: Auth) -> JSONResponse:
    """Format (FMT or QFMT, both the same here): the LDEV must be blocked; its data become zeros (the file
    is punched to one hole), and it is normal again afterwards."""
    operation = body.parameters.operationType
    ctx.system.check_format(ldevId, operation)

    def fmt() -> list[str]:
        ctx.system.format_ldev(ldevId, operation)
        return [f"ldevs/{ldevId}"]

    return await job_response(request, session, sync_work(fmt), key=f"ldev:{ldevId}")


@router.api_route("/ldevs/{ldevId}/actions/change-status/invoke", methods=["POST", "PUT"])
async def change_status(ldevId: int, request: Request, body: StatusBody, ctx: Ctx, session: Auth) -> JSONResponse:
    ldev = ctx.system.get_ldev(ldevId)
    status = body.parameters.status
    if status == "blk":
        ctx.system.check_plain(ldev, "block")

    def change() -> list[str]:
        ctx.system.set_ldev_status(ldevId, status)
        return [f"ldevs/{ldevId}"]

    return await job_response(request, session, sync_work(change), key=f"ldev:{ldevId}")


@router.api_route("/ldevs/{ldevId}/actions/set-qos/invoke", methods=["POST", "PUT"])
async def set_qos(ldevId: int, request: Request, body: QosBody, ctx: Ctx, session: Auth) -> JSONResponse:
    """Stored and reported (``detailInfoType=qos``); vspemu does not throttle host I/O by it."""
    params = body.parameters.model_dump(exclude_none=True)
    ctx.system.check_qos(ldevId, params)  # a refused request answers the error and changes nothing

    def apply() -> list[str]:
        ctx.system.set_qos(ldevId, params)
        return [f"ldevs/{ldevId}"]

    return await job_response(request, session, sync_work(apply), key=f"ldev:{ldevId}")


@router.api_route("/ldevs/{ldevId}/actions/discard-zero-page/invoke", methods=["POST", "PUT"])
async def discard_zero_page(ldevId: int, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    """Accepted: the volume files are sparse already (zero pages written by hosts are holes if discarded)."""
    ldev = ctx.system.get_ldev(ldevId)
    if ctx.system.is_pool_volume(ldev):
        raise VspError("IN_USE", detail=f"ldev {ldevId} is a pool volume, not a DP volume")

    def noop() -> list[str]:
        ctx.system.get_ldev(ldevId)
        return [f"ldevs/{ldevId}"]

    return await job_response(request, session, sync_work(noop), key=f"ldev:{ldevId}")


@router.delete("/ldevs/{ldevId}")
async def delete_ldev(ldevId: int, request: Request, ctx: Ctx, session: Auth,
                      body: LdevDelete | None = None) -> JSONResponse:
    ctx.system.get_ldev(ldevId)

    def delete() -> list[str]:
        ctx.system.delete_ldev(ldevId)
        return [f"ldevs/{ldevId}"]

    return await job_response(request, session, sync_work(delete), key=f"ldev:{ldevId}")


@router.api_route("/ldevs/{ldevId}/actions/expand/invoke", methods=["POST", "PUT"])
async def expand_ldev(ldevId: int, request: Request, body: ExpandBody, ctx: Ctx, session: Auth) -> JSONResponse:
    ctx.system.get_ldev(ldevId)
    p = body.parameters
    if (p.additionalByteFormatCapacity is None) == (p.additionalBlockCapacity is None):
        raise VspError("MISSING_PARAMETER",
                       attribute="additionalByteFormatCapacity or additionalBlockCapacity (exactly one)")
    if p.additionalByteFormatCapacity is not None:
        extra = parse_byte_capacity(p.additionalByteFormatCapacity, "additionalByteFormatCapacity")
    else:
        assert p.additionalBlockCapacity is not None
        extra = whole_blocks(p.additionalBlockCapacity, "additionalBlockCapacity") * BLOCK

    def expand() -> list[str]:
        ctx.system.expand_ldev(ldevId, extra)
        return [f"ldevs/{ldevId}"]

    return await job_response(request, session, sync_work(expand), key=f"ldev:{ldevId}")


class VirtualLdevParameters(Body):
    virtualLdevId: int = Field(ge=0, le=65535)


class VirtualLdevBody(Body):
    parameters: VirtualLdevParameters


@router.api_route("/ldevs/{ldevId}/actions/assign-virtual-ldevid/invoke", methods=["POST", "PUT"])
async def assign_virtual_ldevid(ldevId: int, request: Request, body: VirtualLdevBody, ctx: Ctx,
                                session: Auth) -> JSONResponse:
    """The LDEV's virtual id (65535: the GAD reserve); it must have none (unassign first). See resources.py."""
    vid = body.parameters.virtualLdevId
    ctx.system.resources.check_assign(ldevId, vid)

    def assign() -> list[str]:
        ctx.system.resources.assign_virtual_ldev_id(ldevId, vid)
        return [f"ldevs/{ldevId}"]

    return await job_response(request, session, sync_work(assign), key=f"ldev:{ldevId}")


@router.api_route("/ldevs/{ldevId}/actions/unassign-virtual-ldevid/invoke", methods=["POST", "PUT"])
async def unassign_virtual_ldevid(ldevId: int, request: Request, body: VirtualLdevBody, ctx: Ctx,
                                  session: Auth) -> JSONResponse:
    """Take the LDEV's virtual id away (it becomes 65534); ``virtualLdevId`` must be its current one."""
    vid = body.parameters.virtualLdevId
    ctx.system.resources.check_unassign(ldevId, vid)

    def unassign() -> list[str]:
        ctx.system.resources.unassign_virtual_ldev_id(ldevId, vid)
        return [f"ldevs/{ldevId}"]

    return await job_response(request, session, sync_work(unassign), key=f"ldev:{ldevId}")
