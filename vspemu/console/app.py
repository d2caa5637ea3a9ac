"""The lab console: one live status page for every system of a ``vspemu up`` lab.

A small Starlette app in its own process (``python -m vspemu.console --data-dir D``, started by ``vspemu up``),
served over HTTPS with its own self-signed certificate (``<data dir>/console/tls/server.crt``, listed in the
lab's ``export VSPEMU_CA_CERT=`` line). It reads the lab's systems from ``<data dir>/lab.json``.

Login: the page sends the lab's account (HTTP Basic) to ``POST /lab/api/session``; the console logs in to every
system's REST API with it (each system checks the password, with its own failure backoff) and answers a console
session token only if no system refused it. The credentials are then kept in this process's memory (never on
disk) for the life of the console session, so that a system that restarted (its sessions lost) is logged in to
again. ``GET /lab/api/status`` (``Authorization: Session <console token>``) fetches every system's status JSON
(``/ConfigurationManager/vspemu/v1/status``) concurrently and answers them together; the page polls it every
second. ``DELETE /lab/api/session`` logs out of the console and of every system.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from vspemu.client import tls_verify

PAGE = "/lab"
SESSIONS = "/ConfigurationManager/v1/objects/sessions"
STATUS = "/ConfigurationManager/vspemu/v1/status"
SYSTEM_PAGE = "/ConfigurationManager/vspemu/status"
IDLE_TIMEOUT = 1800.0  # seconds a console session lives without a request
MAX_SESSIONS = 64
MAX_CREDENTIALS = 512  # bytes of an Authorization header the console reads

_STATIC = {"lab.js": ("vspemu.console", "text/javascript; charset=utf-8"),
           "lab.css": ("vspemu.console", "text/css; charset=utf-8"),
           "status.css": ("vspemu.api", "text/css; charset=utf-8")}  # the per-system page's style, shared
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(package: str, name: str) -> bytes:
    return resources.files(package).joinpath("static", name).read_bytes()


def _error(status: int, message: str, cause: str = "", solution: str = "") -> JSONResponse:
    """Errors in the array's shape (message, cause, solution), so clients handle them alike."""
    return JSONResponse({"errorSource": "vspemu lab console", "messageId": f"LAB{status}", "message": message,
                         "cause": cause, "solution": solution}, status_code=status, headers=_PAGE_HEADERS)


@dataclass
class LabSystem:
    serial: int
    storage_device_id: str
    rest_url: str
    cert: str


@dataclass
class SystemSession:
    token: str
    session_id: int


@dataclass
class ConsoleSession:
    user: str
    password: str
    last_used: float = field(default_factory=time.monotonic)
    systems: dict[int, SystemSession] = field(default_factory=dict)


class LoginRefused(Exception):
    pass


class Console:
    """The console's state: the lab's systems, an HTTP client per system, the console sessions."""

    def __init__(self, systems: list[LabSystem]) -> None:
        self.systems = systems
        self.sessions: dict[str, ConsoleSession] = {}
        self.clients: dict[int, httpx.AsyncClient] = {}
        for s in systems:
            self.clients[s.serial] = httpx.AsyncClient(base_url=s.rest_url, verify=tls_verify(s.cert), timeout=5.0)

    async def close(self) -> None:
        for c in self.clients.values():
            await c.aclose()

    @staticmethod
    def from_lab(data_dir: Path) -> Console:
        state = json.loads((data_dir / "lab.json").read_text())
        return Console([LabSystem(int(s["serial"]), str(s["storageDeviceId"]), str(s["restUrl"]), str(s["cert"]))
                        for s in state["systems"]])

    # -- sessions on the systems --------------------------------------------------------------------------
    async def _login(self, system: LabSystem, user: str, password: str) -> SystemSession:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        r = await self.clients[system.serial].post(SESSIONS, json={}, headers={"Authorization": f"Basic {basic}"})
        if r.status_code in (401, 403):
            raise LoginRefused(f"{system.serial}: HTTP {r.status_code}")
        r.raise_for_status()
        body = r.json()
        return SystemSession(str(body["token"]), int(body["sessionId"]))

    async def _logout(self, system: LabSystem, s: SystemSession) -> None:
        try:
            await self.clients[system.serial].delete(f"{SESSIONS}/{s.session_id}",
                                                     headers={"Authorization": f"Session {s.token}"})
        except httpx.HTTPError:
            pass  # the session dies on its own

    async def login(self, user: str, password: str) -> str | None:
        """A console session if no system refused the credentials and at least one accepted them."""
        results = await asyncio.gather(*(self._login(s, user, password) for s in self.systems),
                                       return_exceptions=True)
        session = ConsoleSession(user, password)
        refused = False
        for system, res in zip(self.systems, results, strict=True):
            if isinstance(res, SystemSession):
                session.systems[system.serial] = res
            elif isinstance(res, LoginRefused):
                refused = True
        if refused or not session.systems:
            await asyncio.gather(*(self._logout(s, session.systems[s.serial]) for s in self.systems
                                   if s.serial in session.systems))
            return None
        self._expire()
        while len(self.sessions) >= MAX_SESSIONS:  # the least recently used goes
            oldest = min(self.sessions, key=lambda t: self.sessions[t].last_used)
            await self.logout(oldest)
        token = secrets.token_hex(24)
        self.sessions[token] = session
        return token

    async def logout(self, token: str) -> None:
        session = self.sessions.pop(token, None)
        if session is not None:
            await asyncio.gather(*(self._logout(s, session.systems[s.serial]) for s in self.systems
                                   if s.serial in session.systems))

    def _expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, s in self.sessions.items() if now - s.last_used > IDLE_TIMEOUT]:
            del self.sessions[token]  # (their system sessions time out on the systems)

    def session(self, token: str) -> ConsoleSession | None:
        self._expire()
        s = self.sessions.get(token)
        if s is not None:
            s.last_used = time.monotonic()
        return s

    # -- the aggregate ------------------------------------------------------------------------------------
    async def _status(self, system: LabSystem, session: ConsoleSession) -> dict[str, Any]:
        out: dict[str, Any] = {"serial": system.serial, "storageDeviceId": system.storage_device_id,
                               "restUrl": system.rest_url, "statusPage": system.rest_url + SYSTEM_PAGE,
                               "ok": False, "error": None, "status": None}
        client = self.clients[system.serial]
        try:
            for attempt in (1, 2):
                s = session.systems.get(system.serial)
                if s is None:  # not logged in there yet (it was down, or it restarted and lost its sessions)
                    s = session.systems[system.serial] = await self._login(system, session.user, session.password)
                r = await client.get(STATUS, headers={"Authorization": f"Session {s.token}"})
                if r.status_code == 401 and attempt == 1:
                    session.systems.pop(system.serial, None)
                    continue
                r.raise_for_status()
                out["status"], out["ok"] = r.json(), True
                break
        except LoginRefused as e:
            out["error"] = f"login refused ({e})"
        except (httpx.HTTPError, ValueError, KeyError) as e:
            out["error"] = f"cannot reach the system: {type(e).__name__} {e}".strip()
        return out

    async def status(self, session: ConsoleSession) -> dict[str, Any]:
        systems = await asyncio.gather(*(self._status(s, session) for s in self.systems))
        return {"time": time.time(), "systems": list(systems)}


def _token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "")[:MAX_CREDENTIALS].partition(" ")
    return token.strip() if scheme.lower() == "session" else ""


def build_app(console: Console) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await console.close()

    async def index(_request: Request) -> Response:
        return RedirectResponse(PAGE, status_code=302)

    async def page(_request: Request) -> Response:
        return Response(_static("vspemu.console", "lab.html"), media_type="text/html; charset=utf-8",
                        headers=_PAGE_HEADERS)

    async def static(request: Request) -> Response:
        entry = _STATIC.get(str(request.path_params.get("name", "")))
        if entry is None:
            return _error(404, "The file does not exist.")
        package, media = entry
        name = str(request.path_params["name"])
        return Response(_static(package, name), media_type=media, headers=_PAGE_HEADERS)

    async def login(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or len(header) > MAX_CREDENTIALS:
            return _error(401, "Log in with the lab's account (HTTP Basic).", "No credentials were given.",
                          "Send Authorization: Basic with the account of the lab's systems.")
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            sep = ""
        if not sep or not user:
            return _error(401, "The credentials could not be read.", "", "Send user:password in HTTP Basic.")
        token = await console.login(user, password)
        if token is None:
            return _error(401, "Login refused.", "A storage system of the lab refused the credentials, or none "
                          "answered.", "Use the account of the lab's systems.")
        return JSONResponse({"token": token}, headers=_PAGE_HEADERS)

    async def logout(request: Request) -> Response:
        token = _token(request)
        if console.session(token) is None:
            return _error(401, "Not logged in.")
        await console.logout(token)
        return JSONResponse({}, headers=_PAGE_HEADERS)

    async def status(request: Request) -> Response:
        session = console.session(_token(request))
        if session is None:
            return _error(401, "Not logged in.", "No console session, or it ended.", "Log in again.")
        return JSONResponse(await console.status(session), headers=_PAGE_HEADERS)

    return Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route(PAGE, page, methods=["GET"]),
        Route(f"{PAGE}/api/session", login, methods=["POST"]),
        Route(f"{PAGE}/api/session", logout, methods=["DELETE"]),
        Route(f"{PAGE}/api/status", status, methods=["GET"]),
        Route(f"{PAGE}/static/{{name}}", static, methods=["GET"]),
    ], lifespan=lifespan)
