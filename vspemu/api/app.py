"""The REST application: every object route under both path forms, services under both forms."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI

from vspemu import __version__
from vspemu.api import errors
from vspemu.api.common import API_ROOT, OBJECTS, check_device
from vspemu.api.routes import jobs, ldevs, pools, ports, services, sessions, storages
from vspemu.context import StorageContext

OBJECT_ROUTERS: list[APIRouter] = [sessions.router, jobs.router, ldevs.router, pools.router, ports.router]


def create_app(ctx: StorageContext) -> FastAPI:
    app = FastAPI(
        title=f"vspemu storage system {ctx.system.storage_device_id}",
        version=__version__,
        description="Hitachi VSP Configuration Manager REST API, as served by vspemu.",
        openapi_url="/ConfigurationManager/openapi.json",
        docs_url="/ConfigurationManager/docs",
        redoc_url=None,
    )
    app.state.ctx = ctx
    errors.install(app)
    scoped = [Depends(check_device)]
    for router in OBJECT_ROUTERS:
        app.include_router(router, prefix=OBJECTS)
        app.include_router(router, prefix=f"{OBJECTS}/storages/{{storageDeviceId}}", dependencies=scoped)
    app.include_router(storages.router, prefix=OBJECTS)
    app.include_router(storages.version_router)
    app.include_router(services.router, prefix=API_ROOT)
    app.include_router(services.router, prefix=f"{API_ROOT}/{{storageDeviceId}}", dependencies=scoped)
    return app
