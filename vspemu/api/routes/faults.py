"""Faults on demand (vspemu-private): list, create, clear (see vspemu.system.faults)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import Field

from vspemu.api.common import Auth, Body, Ctx, data
from vspemu.context import StorageContext
from vspemu.errors import VspError
from vspemu.system.faults import Faults, FaultSpec

router = APIRouter(tags=["vspemu-faults"])
STOP_DELAY = 0.3  # seconds between the answer to system-stop and the exit


class FaultCreate(Body):
    kind: str = Field(min_length=1, max_length=32)
    localPortId: str | None = Field(default=None, max_length=16)
    remoteSerialNumber: int | None = None
    remotePortId: str | None = Field(default=None, max_length=16)
    pathGroupId: int | None = None
    latencyMs: int | None = None
    bandwidthMiBps: float | None = None
    journalId: int | None = None
    ldevId: int | None = None


def faults_of(ctx: StorageContext) -> Faults:
    if ctx.faults is None:
        raise VspError("NOT_FOUND", object_id="faults")
    return ctx.faults


def _fault_id(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise VspError("INVALID_OBJECT_ID", object_id=text)
    return int(text)


@router.get("/faults")
async def list_faults(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return data(faults_of(ctx).list())


@router.get("/faults/{faultId}")
async def get_fault(faultId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return faults_of(ctx).get(_fault_id(faultId))


@router.post("/faults")
async def create_fault(body: FaultCreate, ctx: Ctx, _s: Auth) -> JSONResponse:
    faults = faults_of(ctx)
    doc = faults.check(FaultSpec(**body.model_dump()))
    fault = faults.add(doc)
    if fault["kind"] == "system-stop":  # answered first; then the process dies as with kill -9
        asyncio.get_running_loop().call_later(STOP_DELAY, os._exit, 137)
    return JSONResponse(fault, status_code=201)


@router.delete("/faults/{faultId}")
async def delete_fault(faultId: str, ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return faults_of(ctx).remove(_fault_id(faultId))


@router.delete("/faults")
async def clear_faults(ctx: Ctx, _s: Auth) -> dict[str, Any]:
    return data(faults_of(ctx).clear())

