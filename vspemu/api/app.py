"""The REST application: every object route under both path forms, services under both forms."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI

from vspemu import __version__
from vspemu.api import errors
from vspemu.api.common import API_ROOT, OBJECTS, check_device
from vspemu.api.limits import RequestLimits
from vspemu.api.routes import (
    faults,
    host_groups,
    jobs,
    journals,
    ldevs,
    local_clone,
    pools,
    ports,
    quorum_disks,
    remote_pairs,
    remote_storages,
    remotepath_groups,
    resource_groups,
    services,
    sessions,
    snapshots,
    status,
    storages,
    users,
)
from vspemu.context import StorageContext

OBJECT_ROUTERS: list[APIRouter] = [sessions.router, jobs.router, ldevs.router, pools.router, ports.router,
                                   host_groups.router,
                                   remote_storages.router, remotepath_groups.router, journals.router,
                                   remote_pairs.router, storages.facts_router, users.router]
OBJECT_ROUTERS.append(snapshots.router)  # Thin Image (issue 17)
OBJECT_ROUTERS.append(resource_groups.router)  # issue 18: resource groups, virtual storages (GAD configuration)
OBJECT_ROUTERS.append(quorum_disks.router)  # issue 18: quorum disks (GAD configuration)
OBJECT_ROUTERS.append(local_clone.router)  # ShadowImage (issue 17)


def create_app(ctx: StorageContext) -> FastAPI:
    app = FastAPI(
        title=f"vspemu storage system {ctx.system.storage_device_id}",
        version=__version__,
        description="Hitachi VSP Configuration Manager REST API, as served by vspemu.",
        openapi_url="/ConfigurationManager/openapi.json",
        docs_url="/ConfigurationManager/docs",
        redoc_url=None,
        default_response_class=errors.SafeJSONResponse,
    )
    app.state.ctx = ctx
    errors.install(app)
    app.add_middleware(RequestLimits)
    app.add_middleware(status.RestMetrics)  # outermost: counts refused (413, 503) requests too
    scoped = [Depends(check_device)]
    for router in OBJECT_ROUTERS:
        app.include_router(router, prefix=OBJECTS)
        app.include_router(router, prefix=f"{OBJECTS}/storages/{{storageDeviceId}}", dependencies=scoped)
    app.include_router(storages.router, prefix=OBJECTS)
    app.include_router(storages.version_router)
    app.include_router(services.router, prefix=API_ROOT)
    app.include_router(services.router, prefix=f"{API_ROOT}/{{storageDeviceId}}", dependencies=scoped)
    # vspemu-private routes (outside the documented API): what the replication link needs
    app.include_router(remote_storages.private_router, prefix="/ConfigurationManager/vspemu/v1")
    app.include_router(remote_pairs.private_router, prefix="/ConfigurationManager/vspemu/v1")
    app.include_router(faults.router, prefix="/ConfigurationManager/vspemu/v1")
    app.include_router(quorum_disks.private_router, prefix="/ConfigurationManager/vspemu/v1")  # external volumes
    app.include_router(local_clone.private_router, prefix="/ConfigurationManager/vspemu/v1")
    status.install(app, ctx)  # /metrics, the status page and its JSON (docs/observability.md)
    return app
