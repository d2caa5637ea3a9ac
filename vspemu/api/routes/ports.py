"""Ports, host groups and LU paths: how an LDEV becomes visible to hosts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response, sync_work
from vspemu.context import StorageContext
from vspemu.errors import VspError
from vspemu.system.hostgroups import Lun, Port
from vspemu.system.storage import MAX_LDEV_ID

router = APIRouter(tags=["ports"])


class LunCreate(Body):
    portId: str = Field(min_length=1, max_length=16)
    hostGroupNumber: int = Field(ge=0, le=254)
    ldevId: int = Field(ge=0, le=MAX_LDEV_ID)
    lun: int | None = Field(default=None, ge=0, le=2047)
    portIds: list[str] | None = None


def port_view(port: Port) -> dict[str, Any]:
    if port.port_type == "ISCSI":
        return {
            "portId": port.port_id,
            "portType": port.port_type,
            "portAttributes": port.attributes,
            "portSpeed": "10G",
            "loopId": "00",
            "fabricMode": False,
            "lunSecuritySetting": True,
            "ipv4Address": port.ipv4_address,
            "ipv4Subnetmask": "255.255.255.0",
            "ipv4GatewayAddress": "0.0.0.0",
            "tcpPort": "3260",
            "ipMode": "ipv4",
            "tcpMtu": 1500,
            "iscsiWindowSize": "64KB",
            "keepAliveTimer": 60,
            "isIPv6Updating": False,
            "macAddress": "00:60:e8:" + ":".join(f"{int(x):02x}" for x in port.ipv4_address.split(".")[1:]),
        }
    return {
        "portId": port.port_id,
        "portType": port.port_type,
        "portAttributes": port.attributes,
        "portSpeed": "AUT",
        "loopId": "EF",
        "fabricMode": True,
        "portConnection": "PtoP",
        "lunSecuritySetting": True,
        "wwn": port.wwn,
    }


def lun_view(ctx: StorageContext, lun: Lun) -> dict[str, Any]:
    hg = ctx.system.host_groups[(lun.port_id, lun.host_group_number)]
    return {
        "lunId": lun.lun_id,
        "portId": lun.port_id,
        "hostGroupNumber": lun.host_group_number,
        "hostMode": hg.host_mode,
        "lun": lun.lun,
        "ldevId": lun.ldev_id,
        "isCommandDevice": False,
        "luHostReserve": {"openSystem": False, "persistent": False, "pgrKey": False,
                          "mainframe": False, "acaReserve": False},
        "hostModeOptions": list(hg.host_mode_options),
    }


def split_id(text: str, parts: int, what: str) -> list[str]:
    items = text.split(",")
    if len(items) != parts or not all(items):
        raise VspError("INVALID_OBJECT_ID", object_id=f"{what} {text}")
    return items


def int_id(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):  # str.isdigit() alone accepts '²', which int() refuses
        raise VspError("INVALID_OBJECT_ID", object_id=f"{what} {text}")
    return int(text)


@router.get("/ports")
async def list_ports(ctx: Ctx, _s: Auth, detailInfoType: str | None = None) -> dict[str, Any]:
    return data([port_view(p) for p in ctx.system.ports.values()])


@router.get("/ports/{portId}")
async def get_port(portId: str, ctx: Ctx, _s: Auth, detailInfoType: str | None = None) -> dict[str, Any]:
    return port_view(ctx.system.get_port(portId))


@router.get("/luns")
async def list_luns(ctx: Ctx, _s: Auth, portId: str | None = None,
                    hostGroupNumber: int | None = Query(default=None, ge=0, le=254),
                    ldevId: int | None = None, isBasicLunInformation: bool | None = None,
                    lunOption: str | None = None) -> dict[str, Any]:
    luns = sorted(ctx.system.luns.values(), key=lambda x: (x.port_id, x.host_group_number, x.lun))
    out = [
        lun_view(ctx, x) for x in luns
        if (portId is None or x.port_id == portId)
        and (hostGroupNumber is None or x.host_group_number == hostGroupNumber)
        and (ldevId is None or x.ldev_id == ldevId)
    ]
    return data(out)


@router.get("/luns/{lunId}")
async def get_lun(lunId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    split_id(lunId, 3, "lun")
    return lun_view(ctx, ctx.system.get_lun(lunId))


@router.post("/luns")
async def create_lun(request: Request, body: LunCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    ctx.system.get_host_group(body.portId, body.hostGroupNumber)
    ctx.system.get_ldev(body.ldevId)

    def create() -> list[str]:
        lun = ctx.system.add_lun(body.portId, body.hostGroupNumber, body.ldevId, body.lun)
        return [f"luns/{lun.lun_id}"]

    return await job_response(request, session, sync_work(create), key="luns")


@router.delete("/luns/{lunId}")
async def delete_lun(lunId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    split_id(lunId, 3, "lun")
    ctx.system.get_lun(lunId)

    def delete() -> list[str]:
        ctx.system.delete_lun(lunId)
        return [f"luns/{lunId}"]

    return await job_response(request, session, sync_work(delete), key="luns")
