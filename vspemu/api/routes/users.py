"""Users and user groups: local accounts with the array's built-in groups (roles).

Managing users needs a user group with the Security Administrator role (the Administrator group has it); a
user may always change their own password. Custom user groups are not modelled: creating or changing one is
refused with the array's "not supported" answer.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data, job_response, sync_work
from vspemu.context import StorageContext
from vspemu.errors import VspError, not_found
from vspemu.system.sessions import Session
from vspemu.system.users import BUILT_IN_GROUPS, MAX_GROUPS, User, UserGroup

router = APIRouter(tags=["users"])
GroupNames = Field(min_length=1, max_length=MAX_GROUPS)


class UserCreate(Body):
    userId: str = Field(min_length=1, max_length=256)
    authentication: Literal["local"] = "local"
    userPassword: str = Field(min_length=1, max_length=256)
    userGroupNames: list[str] = GroupNames


class UserUpdate(Body):
    userPassword: str = Field(min_length=1, max_length=256)


class GroupParameters(Body):
    userGroupNames: list[str] = GroupNames


class GroupAction(Body):
    parameters: GroupParameters


def user_view(ctx: StorageContext, user: User) -> dict[str, Any]:
    return {"userObjectId": user.name, "userId": user.name, "authentication": "local",
            "userGroupNames": list(user.groups), "isBuiltIn": user.built_in, "isAccountStatus": True}


def group_view(ctx: StorageContext, group: UserGroup) -> dict[str, Any]:
    return {"userGroupObjectId": group.name, "userGroupId": group.name, "roleNames": list(group.roles),
            "resourceGroupIds": [0], "isBuiltIn": True, "hasAllResourceGroup": True,
            "users": sorted(u.name for u in ctx.system.users.values() if group.name in u.groups)}


def _security(ctx: StorageContext, session: Session) -> None:
    ctx.system.check_permission(session.user, "security")


@router.get("/users")
async def list_users(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return data([user_view(ctx, u) for u in sorted(ctx.system.users.values(), key=lambda u: u.name)])


@router.get("/users/{userObjectId}")
async def get_user(userObjectId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return user_view(ctx, ctx.system.get_user(userObjectId))


@router.post("/users")
async def create_user(request: Request, body: UserCreate, ctx: Ctx, session: Auth) -> JSONResponse:
    _security(ctx, session)

    def create() -> list[str]:
        user = ctx.system.create_user(body.userId, body.userPassword, list(body.userGroupNames))
        return [f"users/{user.name}"]

    return await job_response(request, session, sync_work(create), key="users")


@router.api_route("/users/{userObjectId}", methods=["PATCH", "PUT"])
async def change_password(userObjectId: str, request: Request, body: UserUpdate, ctx: Ctx,
                          session: Auth) -> JSONResponse:
    ctx.system.get_user(userObjectId)
    if userObjectId != session.user:  # one's own password: always; another user's: security role
        _security(ctx, session)

    def change() -> list[str]:
        ctx.system.set_password(userObjectId, body.userPassword)
        return [f"users/{userObjectId}"]

    return await job_response(request, session, sync_work(change), key="users")


@router.post("/users/{userObjectId}/actions/{action}/invoke")
async def user_groups_action(userObjectId: str, action: Literal["add-user-group", "remove-user-group"],
                             request: Request, body: GroupAction, ctx: Ctx, session: Auth) -> JSONResponse:
    _security(ctx, session)
    user = ctx.system.get_user(userObjectId)
    names = list(body.parameters.userGroupNames)
    for g in names:
        if g not in BUILT_IN_GROUPS:
            raise not_found("user group", g)
    if action == "add-user-group":
        groups = [*user.groups, *(g for g in names if g not in user.groups)]
    else:
        groups = [g for g in user.groups if g not in names]
    if not groups:
        raise VspError("WRONG_STATE", detail="a user belongs to at least one user group")

    def change() -> list[str]:
        ctx.system.set_user_groups(userObjectId, groups)
        return [f"users/{userObjectId}"]

    return await job_response(request, session, sync_work(change), key="users")


@router.delete("/users/{userObjectId}")
async def delete_user(userObjectId: str, request: Request, ctx: Ctx, session: Auth) -> JSONResponse:
    _security(ctx, session)
    ctx.system.get_user(userObjectId)
    if userObjectId == session.user:
        raise VspError("WRONG_STATE", detail="a user cannot delete their own account")

    def delete() -> list[str]:
        ctx.system.delete_user(userObjectId)
        for s in ctx.sessions.list():  # the deleted user's sessions end with the account
            if s.user == userObjectId:
                ctx.sessions.delete(s.session_id)
        return [f"users/{userObjectId}"]

    return await job_response(request, session, sync_work(delete), key="users")


@router.get("/user-groups")
async def list_user_groups(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return data([group_view(ctx, g) for g in BUILT_IN_GROUPS.values()])


@router.get("/user-groups/{userGroupObjectId}")
async def get_user_group(userGroupObjectId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    group = BUILT_IN_GROUPS.get(userGroupObjectId)
    if group is None:
        raise not_found("user group", userGroupObjectId)
    return group_view(ctx, group)


@router.post("/user-groups")
async def create_user_group(ctx: Ctx, session: Auth) -> dict[str, Any]:
    _security(ctx, session)
    raise VspError("API_NOT_SUPPORTED", detail="vspemu has the built-in user groups only")


@router.api_route("/user-groups/{userGroupObjectId}", methods=["PATCH", "PUT", "DELETE"])
async def change_user_group(userGroupObjectId: str, ctx: Ctx, session: Auth) -> dict[str, Any]:
    _security(ctx, session)
    if userGroupObjectId not in BUILT_IN_GROUPS:
        raise not_found("user group", userGroupObjectId)
    raise VspError("API_NOT_SUPPORTED", detail="the built-in user groups cannot be changed")
