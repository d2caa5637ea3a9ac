"""Host groups / iSCSI targets, host WWNs, host iSCSI names, CHAP users and the supported host modes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response, sync_work
from vspemu.api.routes.ports import int_id, split_id
from vspemu.context import StorageContext
from vspemu.errors import VspError
from vspemu.system.hostgroups import (
    HOST_MODE_OPTIONS,
    HOST_MODES,
    ISCSI_ONLY_OPTIONS,
    MAX_HOST_GROUP_NUMBER,
    ChapUser,
    HostGroup,
    HostIscsi,
    HostWwn,
    check_name,
)

router = APIRouter(tags=["host groups"])

PortId = Field(min_length=1, max_length=16)
HgNumber = Field(ge=0, le=MAX_HOST_GROUP_NUMBER)


class HostGroupCreate(Body):
    portId: str = PortId
    hostGroupName: str = Field(max_length=256)
    hostGroupNumber: int | None = Field(default=None, ge=0, le=MAX_HOST_GROUP_NUMBER)
    hostMode: str | None = Field(default=None, max_length=64)
    hostModeOptions: list[int] | None = Field(default=None, max_length=256)
    iscsiName: str | None = Field(default=None, max_length=256)


class HostGroupPatch(Body):
    hostGroupName: str | None = Field(default=None, max_length=256)
    hostMode: str | None = Field(default=None, max_length=64)
    hostModeOptions: list[int] | None = Field(default=None, max_length=256)
    authenticationMode: str | None = Field(default=None, max_length=16)
    iscsiTargetDirection: str | None = Field(default=None, max_length=4)


class HostWwnCreate(Body):
    portId: str = PortId
    hostGroupNumber: int = HgNumber
    hostWwn: str = Field(max_length=64)


class NicknamePatch(Body):
    wwnNickname: str = Field(max_length=256)


class HostIscsiCreate(Body):
    portId: str = PortId
    hostGroupNumber: int = HgNumber
    iscsiName: str = Field(max_length=256)


class IscsiNicknamePatch(Body):
    iscsiNickname: str = Field(max_length=256)


class ChapUserCreate(Body):
    portId: str = PortId
    hostGroupNumber: int = HgNumber
    chapUserName: str = Field(max_length=256)
    wayOfChapUser: str = Field(max_length=8)
    chapPassword: str | None = Field(default=None, max_length=256)


class ChapUserPatch(Body):
    chapPassword: str = Field(max_length=256)


# -- views -----------------------------------------------------------------------------------------
def host_group_view(ctx: StorageContext, hg: HostGroup) -> dict[str, Any]:
    view: dict[str, Any] = {
        "hostGroupId": f"{hg.port_id},{hg.number}",
        "portId": hg.port_id,
        "hostGroupNumber": hg.number,
        "hostGroupName": hg.name,
        "hostMode": hg.host_mode,
        "hostModeOptions": list(hg.host_mode_options),
        "resourceGroupId": ctx.system.resources.group_of_host_group(f"{hg.port_id},{hg.number}"),
        "isDefined": True,
    }
    if hg.iscsi_name is not None:
        view.update({"iscsiName": hg.iscsi_name, "authenticationMode": hg.authentication_mode,
                     "iscsiTargetDirection": hg.iscsi_target_direction})
    return view


def undefined_view(port_id: str, number: int) -> dict[str, Any]:
    return {"hostGroupId": f"{port_id},{number}", "portId": port_id, "hostGroupNumber": number,
            "resourceGroupId": 0, "isDefined": False}


def wwn_view(ctx: StorageContext, w: HostWwn) -> dict[str, Any]:
    hg = ctx.system.host_groups[(w.port_id, w.host_group_number)]
    return {"hostWwnId": w.wwn_id, "portId": w.port_id, "hostGroupNumber": w.host_group_number,
            "hostGroupName": hg.name, "hostWwn": w.wwn, "wwnNickname": w.nickname or "-"}


def iscsi_view(ctx: StorageContext, i: HostIscsi) -> dict[str, Any]:
    hg = ctx.system.host_groups[(i.port_id, i.host_group_number)]
    return {"hostIscsiId": i.iscsi_id, "portId": i.port_id, "hostGroupNumber": i.host_group_number,
            "hostGroupName": hg.name, "iscsiName": i.iscsi_name, "iscsiNickname": i.nickname or "-"}


def chap_view(ctx: StorageContext, c: ChapUser) -> dict[str, Any]:
    hg = ctx.system.host_groups[(c.port_id, c.host_group_number)]
    # the secret is never reported
    return {"chapUserId": c.chap_id, "portId": c.port_id, "hostGroupNumber": c.host_group_number,
            "hostGroupName": hg.name, "chapUserName": c.name, "wayOfChapUser": c.way}


def _hg_of(ctx: StorageContext, port_id: str | None, number: int | None, name: str | None) -> list[HostGroup]:
    """The host groups a listing query selects (portId required, then a number or a name)."""
    if port_id is None:
        raise VspError("MISSING_PARAMETER", attribute="portId")
    ctx.system.get_port(port_id)
    if number is not None:
        return [ctx.system.get_host_group(port_id, number)]
    if name is not None:  # an unknown name selects nothing (Cinder looks its groups up by name this way)
        return [h for h in ctx.system.host_groups.values() if h.port_id == port_id and h.name == name]
    return [h for h in ctx.system.host_groups.values() if h.port_id == port_id]


# -- host groups -----------------------------------------------------------------------------------
@router.get("/host-groups")
async def list_host_groups(ctx: Ctx, _s: Auth, portId: str | None = None, isUndefined: bool | None = None,
                           detailInfoType: str | None = None, isSimpleMode: bool | None = None,
                           hostGroupName: str | None = None) -> dict[str, Any]:
    if portId is not None:
        ctx.system.get_port(portId)
    if isUndefined:
        if portId is None:
            raise VspError("MISSING_PARAMETER", attribute="portId")
        return data([undefined_view(portId, n) for n in ctx.system.hosts.free_numbers(portId)])
    groups = sorted(ctx.system.host_groups.values(), key=lambda h: (h.port_id, h.number))
    return data([host_group_view(ctx, h) for h in groups
                 if (portId is None or h.port_id == portId) and (hostGroupName is None or h.name == hostGroupName)])


@router.get("/host-groups/{hostGroupId}")
async def get_host_group(hostGroupId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    port_id, number = split_id(hostGroupId, 2, "host group")
    return host_group_view(ctx, ctx.system.get_host_group(port_id, int_id(number, "host group")))


@router.post("/host-groups")
async def create_host_group(request: Request, body: HostGroupCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    hosts = ctx.system.hosts
    hosts.check_create(body.portId, body.hostGroupName, body.hostGroupNumber, body.hostMode,
                       body.hostModeOptions, body.iscsiName)

    def create() -> list[str]:
        hg = hosts.create(body.portId, body.hostGroupName, body.hostGroupNumber, body.hostMode,
                          body.hostModeOptions, body.iscsiName)
        return [f"host-groups/{hg.port_id},{hg.number}"]

    return await job_response(request, session, sync_work(create), key="host-groups")


@router.put("/host-groups/{hostGroupId}")  # the array takes PUT like PATCH; Cinder sends PUT
@router.patch("/host-groups/{hostGroupId}")
async def patch_host_group(hostGroupId: str, request: Request, body: HostGroupPatch, ctx: Ctx,
                           session: Auth) -> JSONResponse:
    port_id, number = split_id(hostGroupId, 2, "host group")
    hg = ctx.system.get_host_group(port_id, int_id(number, "host group"))
    hosts = ctx.system.hosts
    hosts.check_modify(hg, body.hostGroupName, body.hostMode, body.hostModeOptions, body.authenticationMode,
                       body.iscsiTargetDirection)

    def modify() -> list[str]:
        hosts.modify(hg, body.hostGroupName, body.hostMode, body.hostModeOptions, body.authenticationMode,
                     body.iscsiTargetDirection)
        return [f"host-groups/{hg.port_id},{hg.number}"]

    return await job_response(request, session, sync_work(modify), key="host-groups")


@router.delete("/host-groups/{hostGroupId}")
async def delete_host_group(hostGroupId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    port_id, number = split_id(hostGroupId, 2, "host group")
    hg = ctx.system.get_host_group(port_id, int_id(number, "host group"))

    def delete() -> list[str]:
        ctx.system.hosts.delete(hg.port_id, hg.number)
        return [f"host-groups/{hg.port_id},{hg.number}"]

    return await job_response(request, session, sync_work(delete), key="host-groups")


@router.get("/supported-host-modes/instance")
async def supported_host_modes(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    all_modes = [mode_id for mode_id, _, _ in HOST_MODES]
    return {
        "hostModes": [{"hostModeId": i, "hostModeName": name, "hostModeDisplay": display}
                      for i, name, display in HOST_MODES],
        "hostModeOptions": [{"hostModeOptionId": i, "hostModeOptionDescription": text,
                             "scope": "ISCSI" if i in ISCSI_ONLY_OPTIONS else "ALL",
                             "requiredHostModes": all_modes}
                            for i, text in sorted(HOST_MODE_OPTIONS.items())],
    }


# -- host WWNs -------------------------------------------------------------------------------------
def _wwn_of(ctx: StorageContext, wwn_id: str) -> HostWwn:
    port_id, number, wwn = split_id(wwn_id, 3, "host WWN")
    return ctx.system.hosts.get_wwn(port_id, int_id(number, "host WWN"), wwn)


@router.get("/host-wwns")
async def list_host_wwns(ctx: Ctx, _s: Auth, portId: str | None = None,
                         hostGroupNumber: int | None = Query(default=None, ge=0, le=MAX_HOST_GROUP_NUMBER),
                         hostGroupName: str | None = None) -> dict[str, Any]:
    groups = {(h.port_id, h.number) for h in _hg_of(ctx, portId, hostGroupNumber, hostGroupName)}
    wwns = sorted(ctx.system.hosts.wwns.values(), key=lambda w: (w.host_group_number, w.wwn))
    return data([wwn_view(ctx, w) for w in wwns if (w.port_id, w.host_group_number) in groups])


@router.get("/host-wwns/{hostWwnId}")
async def get_host_wwn(hostWwnId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return wwn_view(ctx, _wwn_of(ctx, hostWwnId))


@router.post("/host-wwns")
async def add_host_wwn(request: Request, body: HostWwnCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    hosts = ctx.system.hosts
    hosts.check_add_wwn(body.portId, body.hostGroupNumber, body.hostWwn)

    def add() -> list[str]:
        return [f"host-wwns/{hosts.add_wwn(body.portId, body.hostGroupNumber, body.hostWwn).wwn_id}"]

    return await job_response(request, session, sync_work(add), key="host-wwns")


@router.put("/host-wwns/{hostWwnId}")
@router.patch("/host-wwns/{hostWwnId}")
async def patch_host_wwn(hostWwnId: str, request: Request, body: NicknamePatch, ctx: Ctx,
                         session: Auth) -> JSONResponse:
    w = _wwn_of(ctx, hostWwnId)
    check_name("wwnNickname", body.wwnNickname, allow_empty=True)

    def patch() -> list[str]:
        return [f"host-wwns/{ctx.system.hosts.set_wwn_nickname(w, body.wwnNickname).wwn_id}"]

    return await job_response(request, session, sync_work(patch), key="host-wwns")


@router.delete("/host-wwns/{hostWwnId}")
async def delete_host_wwn(hostWwnId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    w = _wwn_of(ctx, hostWwnId)

    def delete() -> list[str]:
        ctx.system.hosts.delete_wwn(w)
        return [f"host-wwns/{w.wwn_id}"]

    return await job_response(request, session, sync_work(delete), key="host-wwns")


# -- host iSCSI names (initiators of an iSCSI target) ----------------------------------------------
def _iscsi_of(ctx: StorageContext, iscsi_id: str) -> HostIscsi:
    port_id, number, name = split_id(iscsi_id, 3, "host iSCSI")
    return ctx.system.hosts.get_iscsi(port_id, int_id(number, "host iSCSI"), name)


@router.get("/host-iscsis")
async def list_host_iscsis(ctx: Ctx, _s: Auth, portId: str | None = None,
                           hostGroupNumber: int | None = Query(default=None, ge=0, le=MAX_HOST_GROUP_NUMBER),
                           hostGroupName: str | None = None) -> dict[str, Any]:
    groups = {(h.port_id, h.number) for h in _hg_of(ctx, portId, hostGroupNumber, hostGroupName)}
    items = sorted(ctx.system.hosts.iscsis.values(), key=lambda i: (i.host_group_number, i.iscsi_name))
    return data([iscsi_view(ctx, i) for i in items if (i.port_id, i.host_group_number) in groups])


@router.get("/host-iscsis/{hostIscsiId}")
async def get_host_iscsi(hostIscsiId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return iscsi_view(ctx, _iscsi_of(ctx, hostIscsiId))


@router.post("/host-iscsis")
async def add_host_iscsi(request: Request, body: HostIscsiCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    hosts = ctx.system.hosts
    hosts.check_add_iscsi(body.portId, body.hostGroupNumber, body.iscsiName)

    def add() -> list[str]:
        return [f"host-iscsis/{hosts.add_iscsi(body.portId, body.hostGroupNumber, body.iscsiName).iscsi_id}"]

    return await job_response(request, session, sync_work(add), key="host-iscsis")


@router.put("/host-iscsis/{hostIscsiId}")
@router.patch("/host-iscsis/{hostIscsiId}")
async def patch_host_iscsi(hostIscsiId: str, request: Request, body: IscsiNicknamePatch, ctx: Ctx,
                           session: Auth) -> JSONResponse:
    i = _iscsi_of(ctx, hostIscsiId)
    check_name("iscsiNickname", body.iscsiNickname, allow_empty=True)

    def patch() -> list[str]:
        return [f"host-iscsis/{ctx.system.hosts.set_iscsi_nickname(i, body.iscsiNickname).iscsi_id}"]

    return await job_response(request, session, sync_work(patch), key="host-iscsis")


@router.delete("/host-iscsis/{hostIscsiId}")
async def delete_host_iscsi(hostIscsiId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    i = _iscsi_of(ctx, hostIscsiId)

    def delete() -> list[str]:
        ctx.system.hosts.delete_iscsi(i)
        return [f"host-iscsis/{i.iscsi_id}"]

    return await job_response(request, session, sync_work(delete), key="host-iscsis")


# -- CHAP users ------------------------------------------------------------------------------------
def _chap_of(ctx: StorageContext, chap_id: str) -> ChapUser:
    port_id, number, way, name = split_id(chap_id, 4, "CHAP user")
    return ctx.system.hosts.get_chap_user(port_id, int_id(number, "CHAP user"), way, name)


@router.get("/chap-users")
async def list_chap_users(ctx: Ctx, _s: Auth, portId: str | None = None,
                          hostGroupNumber: int | None = Query(default=None, ge=0, le=MAX_HOST_GROUP_NUMBER),
                          hostGroupName: str | None = None) -> dict[str, Any]:
    groups = {(h.port_id, h.number) for h in _hg_of(ctx, portId, hostGroupNumber, hostGroupName)}
    items = sorted(ctx.system.hosts.chap_users.values(), key=lambda c: (c.host_group_number, c.way, c.name))
    return data([chap_view(ctx, c) for c in items if (c.port_id, c.host_group_number) in groups])


@router.get("/chap-users/{chapUserId}")
async def get_chap_user(chapUserId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return chap_view(ctx, _chap_of(ctx, chapUserId))


@router.post("/chap-users")
async def add_chap_user(request: Request, body: ChapUserCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    hosts = ctx.system.hosts
    hosts.check_add_chap_user(body.portId, body.hostGroupNumber, body.wayOfChapUser, body.chapUserName,
                              body.chapPassword)

    def add() -> list[str]:
        c = hosts.add_chap_user(body.portId, body.hostGroupNumber, body.wayOfChapUser, body.chapUserName,
                                body.chapPassword)
        return [f"chap-users/{c.chap_id}"]

    return await job_response(request, session, sync_work(add), key="chap-users")


@router.put("/chap-users/{chapUserId}")
@router.patch("/chap-users/{chapUserId}")
async def patch_chap_user(chapUserId: str, request: Request, body: ChapUserPatch, ctx: Ctx,
                          session: Auth) -> JSONResponse:
    c = _chap_of(ctx, chapUserId)
    ctx.system.hosts.check_secret(body.chapPassword)

    def patch() -> list[str]:
        return [f"chap-users/{ctx.system.hosts.set_chap_secret(c, body.chapPassword).chap_id}"]

    return await job_response(request, session, sync_work(patch), key="chap-users")


@router.delete("/chap-users/{chapUserId}")
async def delete_chap_user(chapUserId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    c = _chap_of(ctx, chapUserId)

    def delete() -> list[str]:
        ctx.system.hosts.delete_chap_user(c)
        return [f"chap-users/{c.chap_id}"]

    return await job_response(request, session, sync_work(delete), key="chap-users")
