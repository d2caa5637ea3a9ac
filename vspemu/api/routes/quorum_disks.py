"""Quorum disks (``quorum-disks``) and the vspemu-private external volumes behind them (vspemu.system.quorum).

A GET checks the quorum volumes first (real NBD I/O to the quorum system), so its status is current: NORMAL
or BLOCKED. Registering a quorum disk on an external volume that cannot be read and written is refused.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response, sync_work
from vspemu.context import StorageContext
from vspemu.errors import VspError, invalid
from vspemu.system.quorum import MAX_QUORUM_DISK_ID, ExternalVolume, QuorumDisk, QuorumDisks
from vspemu.system.storage import MAX_LDEV_ID

router = APIRouter(tags=["quorum disks"])
private_router = APIRouter(tags=["vspemu-private"])


class QuorumCreate(Body):
    quorumDiskId: int | None = Field(default=None, ge=0, le=MAX_QUORUM_DISK_ID)
    remoteSerialNumber: str | int
    remoteStorageTypeId: str = Field(min_length=1, max_length=8)
    ldevId: int | None = Field(default=None, ge=0, le=MAX_LDEV_ID)
    isQuorumDiskLess: bool | None = None


class ExternalCreate(Body):
    ldevId: int = Field(ge=0, le=MAX_LDEV_ID)
    externalSerialNumber: int = Field(ge=1, le=999999)
    externalLdevId: int = Field(ge=0, le=MAX_LDEV_ID)
    nbdHost: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:\-\[\]]+$")
    nbdPort: int = Field(ge=1, le=65535)


def quorum_of(ctx: StorageContext) -> QuorumDisks:
    if ctx.quorum is None:
        raise VspError("API_NOT_SUPPORTED", detail="this system runs without quorum disks")
    return ctx.quorum


def view(q: QuorumDisks, disk: QuorumDisk) -> dict[str, Any]:
    out: dict[str, Any] = {
        "quorumDiskId": disk.quorum_disk_id,
        "remoteSerialNumber": str(disk.remote_serial),
        "remoteStorageTypeId": disk.remote_type_id,
        "readResponseGuaranteedTime": disk.read_response_guaranteed_time,
        "status": q.state(disk.quorum_disk_id).status,
    }
    if disk.ldev_id is not None:
        out["ldevId"] = disk.ldev_id
    return out


def external_view(ctx: StorageContext, ldev_id: int) -> dict[str, Any] | None:
    """The LDEV GET of an external volume's LDEV id (None when the id is no external volume)."""
    ev = ctx.quorum.externals.get(ldev_id) if ctx.quorum is not None else None
    if ev is None:
        return None
    quorum = next((d.quorum_disk_id for d in ctx.quorum.disks.values() if d.ldev_id == ldev_id), None) \
        if ctx.quorum is not None else None
    out: dict[str, Any] = {
        "ldevId": ldev_id, "clprId": 0, "emulationType": "OPEN-V", "blockCapacity": ev.block_capacity,
        "numOfPorts": 0, "ports": [], "attributes": ["ELUN"] + (["QRD"] if quorum is not None else []),
        "label": "", "status": "NML", "resourceGroupId": 0,
        "externalVolumeId": f"{ev.external_serial:06d}{ev.external_ldev_id:04X}",
        "externalSerialNumber": str(ev.external_serial), "externalLdevId": ev.external_ldev_id,
    }
    if quorum is not None:
        out["quorumDiskId"] = quorum
    return out


def remote_serial(value: str | int) -> int:
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 6 or int(text) == 0:
        raise invalid("remoteSerialNumber", value, "Specify a serial number from 1 to 999999.")
    return int(text)


def check_id(quorum_disk_id: int) -> None:
    if not 0 <= quorum_disk_id <= MAX_QUORUM_DISK_ID:
        raise VspError("INVALID_OBJECT_ID", object_id=quorum_disk_id)


@router.get("/quorum-disks")
async def list_quorum_disks(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    q = quorum_of(ctx)
    await q.check_all()
    return data([view(q, q.disks[i]) for i in sorted(q.disks)])


@router.get("/quorum-disks/{quorumDiskId}")
async def get_quorum_disk(quorumDiskId: int, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    check_id(quorumDiskId)
    q = quorum_of(ctx)
    disk = q.get(quorumDiskId)
    await q.check(quorumDiskId)
    return view(q, disk)


@router.post("/quorum-disks")
async def create_quorum_disk(request: Request, body: QuorumCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    q = quorum_of(ctx)
    serial = remote_serial(body.remoteSerialNumber)
    if body.isQuorumDiskLess and body.ldevId is not None:
        raise invalid("ldevId", body.ldevId, "A quorum-less quorum disk has no LDEV (isQuorumDiskLess).")
    if body.isQuorumDiskLess is False and body.ldevId is None:
        raise VspError("MISSING_PARAMETER", attribute="ldevId")
    qid = body.quorumDiskId
    if qid is None:
        qid = next((i for i in range(MAX_QUORUM_DISK_ID + 1) if i not in q.disks), None)
        if qid is None:
            raise VspError("LDEV_ID_EXHAUSTED", resource="quorumDiskId")
    disk = QuorumDisk(qid, serial, body.remoteStorageTypeId, body.ldevId)
    q.check_new(qid, serial, body.remoteStorageTypeId, body.ldevId)
    if body.ldevId is not None:  # the quorum volume must really be readable and writable now
        try:
            await asyncio.to_thread(q.exchange, disk, 1)
        except VspError:
            raise
        except Exception as e:
            raise VspError("REMOTE_UNREACHABLE", detail=f"the quorum volume (ldev {body.ldevId}) cannot be read "
                                                        f"and written: {e or type(e).__name__}") from None

    async def create() -> list[str]:
        q.add(disk)
        await q.check(disk.quorum_disk_id)
        return [f"quorum-disks/{disk.quorum_disk_id}"]

    return await job_response(request, session, create, key="quorum-disks")


@router.delete("/quorum-disks/{quorumDiskId}")
async def delete_quorum_disk(quorumDiskId: int, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    check_id(quorumDiskId)
    q = quorum_of(ctx)
    q.check_delete(quorumDiskId)

    def delete() -> list[str]:
        q.delete(quorumDiskId)
        return [f"quorum-disks/{quorumDiskId}"]

    return await job_response(request, session, sync_work(delete), key="quorum-disks")


# -- vspemu-private: external volumes (what the array builds from external path / parity groups) ------------
def external_doc(ev: ExternalVolume) -> dict[str, Any]:
    return {"ldevId": ev.ldev_id, "externalSerialNumber": ev.external_serial, "externalLdevId": ev.external_ldev_id,
            "nbdHost": ev.host, "nbdPort": ev.port, "blockCapacity": ev.block_capacity}


@private_router.get("/external-volumes")
async def list_external_volumes(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    q = quorum_of(ctx)
    return data([external_doc(q.externals[i]) for i in sorted(q.externals)])


@private_router.post("/external-volumes")
async def create_external_volume(body: ExternalCreate, ctx: Ctx, session: Auth) -> dict[str, Any]:
    """Map an LDEV of another vspemu system (reached over NBD: it needs an LU path there) to a local LDEV id."""
    ctx.system.check_permission(session.user, "modify")
    q = quorum_of(ctx)
    q.check_new_external(body.ldevId, body.externalSerialNumber, body.externalLdevId)
    size = await asyncio.to_thread(q.probe, body.nbdHost, body.nbdPort, body.externalLdevId)
    ev = ExternalVolume(body.ldevId, body.externalSerialNumber, body.externalLdevId, body.nbdHost, body.nbdPort,
                        size // 512)
    q.add_external(ev)
    return external_doc(ev)


@private_router.delete("/external-volumes/{ldevId}")
async def delete_external_volume(ldevId: int, ctx: Ctx, session: Auth) -> dict[str, Any]:
    ctx.system.check_permission(session.user, "modify")
    q = quorum_of(ctx)
    ev = q.check_delete_external(ldevId)
    q.delete_external(ldevId)
    return external_doc(ev)


@private_router.get("/quorum-disks/{quorumDiskId}")
async def quorum_details(quorumDiskId: int, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    """What the last heartbeat saw: this system's sequence, the partner's slot, the last error."""
    check_id(quorumDiskId)
    q = quorum_of(ctx)
    disk = q.get(quorumDiskId)
    st = await q.check(quorumDiskId)
    partner = st.partner
    return {**view(q, disk), "sequence": st.sequence, "error": st.error,
            "partner": None if partner is None else {"serialNumber": partner.serial, "sequence": partner.sequence,
                                                     "wallTime": partner.wall_time, "epoch": partner.epoch}}
