"""What every route shares: the context, authentication, the job answer, request-body models."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from vspemu.errors import VspError
from vspemu.jobs import MAX_REQUEST_BODY
from vspemu.system.sessions import Session

if TYPE_CHECKING:
    from vspemu.context import StorageContext

API_ROOT = "/ConfigurationManager/v1"
OBJECTS = f"{API_ROOT}/objects"
MAX_RESPONSE_WAIT = 1800.0
# a job that finishes within this many seconds is answered already Completed: clients that poll at long
# intervals (the Ansible collection polls every 10 s after a first immediate GET) then do not wait for nothing
JOB_ANSWER_GRACE = 0.5


class Body(BaseModel):
    """A request body: unknown fields are refused (KART40038-E) and types are strict, as on the array."""

    model_config = ConfigDict(extra="forbid", strict=True)


def ctx_of(request: Request) -> StorageContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


def get_ctx(request: Request) -> StorageContext:
    return ctx_of(request)


def authenticate(request: Request) -> Session:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "session" or not token.strip():
        raise VspError("TOKEN_INVALID", cause="The Authorization header does not carry a session token.")
    session = ctx_of(request).sessions.authenticate(token.strip())
    check_role(request, session)
    return session


# routes that check their own permission (users: one's own password), or that every user may call (log out)
_SELF_CHECKED = ("/users", "/user-groups", "/sessions")


def check_role(request: Request, session: Session) -> None:
    """A change to the storage configuration needs a user group with a modify role (403 otherwise)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    rest = request.url.path.partition("/objects")[2]
    if rest.startswith("/storages/"):  # the storage-scoped form: /objects/storages/{id}/...
        rest = "/" + rest.split("/", 3)[-1] if rest.count("/") >= 3 else ""
    if rest.startswith(_SELF_CHECKED):
        return
    ctx_of(request).system.check_permission(session.user, "modify")


def basic_credentials(request: Request) -> tuple[str, str]:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise VspError("AUTH_FAILED", cause="Basic authentication is required to create a session.")
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise VspError("AUTH_FAILED", cause="The Authorization header cannot be decoded.") from None
    if not sep:
        raise VspError("AUTH_FAILED", cause="The Authorization header cannot be decoded.")
    return user, password


Ctx = Annotated["StorageContext", Depends(get_ctx)]
Auth = Annotated[Session, Depends(authenticate)]


def objects_base(request: Request) -> str:
    """The objects URL prefix in the form the client used (short or storage-scoped)."""
    device = request.path_params.get("storageDeviceId")
    if device is not None and request.url.path.startswith(f"{OBJECTS}/storages/"):
        return f"{OBJECTS}/storages/{device}"
    return OBJECTS


def check_device(request: Request) -> None:
    """For storage-scoped paths: the storageDeviceId must be this system's."""
    device = request.path_params.get("storageDeviceId")
    if device is not None and device != ctx_of(request).system.storage_device_id:
        raise VspError("NOT_FOUND", object_id=f"storage {device}")


def data(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"data": items}


async def job_response(request: Request, session: Session, work: Callable[[], Awaitable[list[str]]],
                       key: str | None = None) -> JSONResponse:
    """Run ``work`` as a job and answer 202 with the job (held until done if the client asks)."""
    ctx = ctx_of(request)
    # the headers are checked before the job is submitted: a refused request changes nothing
    wanted = request.headers.get("response-job-status", "").strip().rstrip(";").strip().lower()
    max_wait = response_max_wait(request) if wanted == "completed" else JOB_ANSWER_GRACE
    raw = await request.body()
    job = ctx.jobs.submit(
        work, user=session.user, base=objects_base(request), url=request.url.path,
        method=request.method, body=raw[:4 * MAX_REQUEST_BODY + 4].decode("utf-8", "replace"), key=key,
    )
    await ctx.jobs.wait(job, max_wait)
    return JSONResponse(job.view(), status_code=202)


def response_max_wait(request: Request) -> float:
    """Seconds to hold the answer (``Response-Max-Wait``, default and maximum 1800); 400 when not a number."""
    text = request.headers.get("response-max-wait")
    if text is None or not text.strip():
        return MAX_RESPONSE_WAIT
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or not text.strip().replace(".", "", 1).isascii():
        raise VspError("INVALID_VALUE", attribute="Response-Max-Wait", value=text,
                       cause=f"Specify a number of seconds from 0 to {int(MAX_RESPONSE_WAIT)}.")
    return min(value, MAX_RESPONSE_WAIT)


def sync_work(fn: Callable[[], list[str]]) -> Callable[[], Awaitable[list[str]]]:
    """Wrap a quick configuration change (an LDEV, a LUN path) as job work."""

    async def work() -> list[str]:
        return fn()

    return work
