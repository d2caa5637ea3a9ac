"""Remote path groups (remotepath-groups): the paths from local replication ports to a remote system."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response
from vspemu.api.routes.remote_storages import remotes_of
from vspemu.errors import invalid

router = APIRouter(tags=["remotepath-groups"])


class PathGroupCreate(Body):
    remoteSerialNumber: str | int
    remoteStorageTypeId: str = Field(min_length=1, max_length=16)
    pathGroupId: int = Field(default=0, ge=0, le=255)
    localPortId: str = Field(min_length=1, max_length=16)
    remotePortId: str = Field(min_length=1, max_length=16)


class PathGroupUpdate(Body):
    timeoutValueForRemoteIOInSeconds: int | None = None
    roundTripTimeInMilliSeconds: int | None = Field(default=None, ge=1, le=500)
    minNumOfPaths: int | None = Field(default=None, ge=1, le=8)


class PathParameters(Body):
    localPortId: str = Field(min_length=1, max_length=16)
    remotePortId: str = Field(min_length=1, max_length=16)


class PathAction(Body):
    parameters: PathParameters


def _serial(value: str | int) -> int:
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()):
        raise invalid("remoteSerialNumber", value, "Specify the serial number of the remote storage system.")
    return int(text)


@router.get("/remotepath-groups")
async def list_groups(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    remotes = remotes_of(ctx)
    groups = sorted(remotes.groups.values(), key=lambda g: (g.remote_serial, g.path_group_id))
    return data([remotes.group_view(g) for g in groups])


@router.get("/remotepath-groups/{groupId}")
async def get_group(groupId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    remotes = remotes_of(ctx)
    return remotes.group_view(remotes.get_group(remotes.parse_group_id(groupId)))


@router.post("/remotepath-groups")
async def create_group(request: Request, body: PathGroupCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    remotes = remotes_of(ctx)
    serial = _serial(body.remoteSerialNumber)
    remotes.check_new_group(serial, body.remoteStorageTypeId, body.pathGroupId, body.localPortId,
                            body.remotePortId)

    async def work() -> list[str]:
        cfg = await remotes.create_group(serial, body.remoteStorageTypeId, body.pathGroupId, body.localPortId,
                                         body.remotePortId)
        return [f"remotepath-groups/{cfg.object_id}"]

    return await job_response(request, session, work, key="remotepath-groups")


@router.patch("/remotepath-groups/{groupId}")
async def update_group(groupId: str, request: Request, body: PathGroupUpdate, ctx: Ctx,
                       session: Auth) -> JSONResponse:
    remotes = remotes_of(ctx)
    object_id = remotes.parse_group_id(groupId)
    remotes.get_group(object_id)
    if body.timeoutValueForRemoteIOInSeconds is not None:
        remotes.check_timeout(body.timeoutValueForRemoteIOInSeconds)

    async def work() -> list[str]:
        await remotes.update_group(object_id, body.timeoutValueForRemoteIOInSeconds,
                                   body.roundTripTimeInMilliSeconds, body.minNumOfPaths)
        return [f"remotepath-groups/{object_id}"]

    return await job_response(request, session, work, key="remotepath-groups")


@router.api_route("/remotepath-groups/{groupId}/actions/add-remotepath/invoke", methods=["POST", "PUT"])
async def add_path(groupId: str, request: Request, body: PathAction, ctx: Ctx, session: Auth) -> JSONResponse:
    remotes = remotes_of(ctx)
    object_id = remotes.parse_group_id(groupId)
    cfg = remotes.get_group(object_id)
    p = body.parameters
    remotes.check_path(cfg, p.localPortId, p.remotePortId)

    async def work() -> list[str]:
        await remotes.add_path(object_id, p.localPortId, p.remotePortId)
        return [f"remotepath-groups/{object_id}"]

    return await job_response(request, session, work, key="remotepath-groups")


@router.api_route("/remotepath-groups/{groupId}/actions/remove-remotepath/invoke", methods=["POST", "PUT"])
async def remove_path(groupId: str, request: Request, body: PathAction, ctx: Ctx, session: Auth) -> JSONResponse:
    remotes = remotes_of(ctx)
    object_id = remotes.parse_group_id(groupId)
    remotes.get_group(object_id)
    p = body.parameters

    async def work() -> list[str]:
        await remotes.remove_path(object_id, p.localPortId, p.remotePortId)
        return [f"remotepath-groups/{object_id}"]

    return await job_response(request, session, work, key="remotepath-groups")


@router.delete("/remotepath-groups/{groupId}")
async def delete_group(groupId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    remotes = remotes_of(ctx)
    object_id = remotes.parse_group_id(groupId)
    remotes.get_group(object_id)

    async def work() -> list[str]:
        await remotes.delete_group(object_id)
        return [f"remotepath-groups/{object_id}"]

    return await job_response(request, session, work, key="remotepath-groups")
