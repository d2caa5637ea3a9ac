"""Turning every failure into the array's JSON error body; never an HTML page or a stack trace."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vspemu.errors import VspError

log = logging.getLogger(__name__)


class SafeJSONResponse(JSONResponse):
    """JSON as UTF-8; a string the client sent that cannot be UTF-8 (a lone surrogate "\\ud800" echoed in an
    error) is written as a JSON escape instead of failing the response."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(request: Request, err: VspError) -> JSONResponse:
    return SafeJSONResponse(err.body(request.url.path), status_code=err.status)


def _attr(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_to_error(exc: RequestValidationError) -> VspError:
    errors = exc.errors()
    # the most telling problem first: unknown fields, then malformed JSON, then missing, then values
    order = {"extra_forbidden": 0, "json_invalid": 1, "missing": 2}
    errors = sorted(errors, key=lambda e: order.get(e.get("type", ""), 3))
    first = errors[0] if errors else {"type": "value_error", "loc": ("body",), "msg": "invalid"}
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    attr = _attr(loc)
    if kind == "extra_forbidden":
        return VspError("UNSUPPORTED_PARAMETER", attribute=attr)
    if kind == "json_invalid":
        return VspError("MALFORMED_BODY", cause=str(first.get("msg", "")))
    if loc and loc[0] == "query":
        return VspError("INVALID_QUERY", cause=str(first.get("msg", "")), attribute=attr)
    if loc and loc[0] == "path":
        return VspError("INVALID_OBJECT_ID", cause=str(first.get("msg", "")), object_id=attr)
    if kind == "missing":
        if loc == ("body",):
            return VspError("MALFORMED_BODY", cause="The request body is required.")
        return VspError("MISSING_PARAMETER", attribute=attr)
    if kind in ("model_type", "model_attributes_type", "dict_type") and loc == ("body",):
        return VspError("MALFORMED_BODY", cause="The request body must be a JSON object.")
    value = first.get("input")
    if isinstance(value, (dict, list)):
        value = type(value).__name__
    return VspError("INVALID_VALUE", cause=str(first.get("msg", "")), attribute=attr, value=value)


def install(app: FastAPI) -> None:
    @app.exception_handler(VspError)
    async def _vsp(request: Request, exc: VspError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_to_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            err = VspError("METHOD_NOT_ALLOWED", method=request.method)
        elif exc.status_code == 404:
            err = VspError("URL_NOT_FOUND", url=request.url.path)
        else:
            err = VspError("INVALID_VALUE", cause=str(exc.detail), attribute="request", value="")
            return SafeJSONResponse(err.body(request.url.path), status_code=exc.status_code)
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(request, VspError("INTERNAL", detail=type(exc).__name__))
