"""REST sessions and the resource-group lock.

Sessions live in memory, as on the array (a restarted controller forgets them). A session dies
``aliveTime`` seconds after its last use; at most :data:`MAX_SESSIONS` exist at once. The resource-group
lock is advisory: it has one owner session at a time, other sessions wait for it up to ``waitTime``
seconds, and it is released when its session ends.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from vspemu.errors import VspError, invalid, not_found

MAX_SESSIONS = 64
DEFAULT_ALIVE_TIME = 300


@dataclass
class Session:
    session_id: int
    token: str
    user: str
    ip_address: str
    alive_time: int
    created: float = field(default_factory=time.time)
    last_access: float = field(default_factory=time.time)
    monotonic_last: float = field(default_factory=time.monotonic)

    def expired(self, now: float) -> bool:
        return now - self.monotonic_last > self.alive_time


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_token: dict[str, Session] = {}
        self._by_id: dict[int, Session] = {}
        self._ids = itertools.count(0)
        self._clock = clock
        self.lock = ResourceLock()

    def _purge(self) -> None:
        now = self._clock()
        for s in [s for s in self._by_id.values() if s.expired(now)]:
            self._drop(s)

    def _drop(self, s: Session) -> None:
        self._by_id.pop(s.session_id, None)
        self._by_token.pop(s.token, None)
        self.lock.release_if_owner(s.session_id)

    def create(self, user: str, ip_address: str, alive_time: int | None) -> Session:
        if alive_time is None:
            alive_time = DEFAULT_ALIVE_TIME
        if not 1 <= alive_time <= 300:
            raise invalid("aliveTime", alive_time, "Specify a value from 1 to 300.")
        self._purge()
        if len(self._by_id) >= MAX_SESSIONS:
            raise VspError("SESSION_LIMIT", limit=MAX_SESSIONS)
        s = Session(next(self._ids), uuid.uuid4().hex, user, ip_address, alive_time)
        self._by_id[s.session_id] = s
        self._by_token[s.token] = s
        return s

    def authenticate(self, token: str) -> Session:
        """The live session for a token, touched; else 401 'The specified token is invalid'."""
        s = self._by_token.get(token)
        now = self._clock()
        if s is None or s.expired(now):
            if s is not None:
                self._drop(s)
            raise VspError("TOKEN_INVALID")
        s.monotonic_last = now
        s.last_access = time.time()
        return s

    def list(self) -> list[Session]:
        self._purge()
        return sorted(self._by_id.values(), key=lambda s: s.session_id)

    def get(self, session_id: int) -> Session:
        self._purge()
        s = self._by_id.get(session_id)
        if s is None:
            raise not_found("session", session_id)
        return s

    def delete(self, session_id: int) -> None:
        self._drop(self.get(session_id))


class ResourceLock:
    """The resource-group lock of one storage system (resource group 0)."""

    def __init__(self) -> None:
        self.owner: int | None = None
        self._cond = asyncio.Condition()

    async def acquire(self, session_id: int, wait_time: float) -> None:
        async with self._cond:
            if self.owner == session_id:
                return
            if self.owner is None:
                self.owner = session_id
                return
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.owner is None), timeout=wait_time)
            except TimeoutError:
                raise VspError("LOCKED", owner=self.owner) from None
            self.owner = session_id

    async def release(self, session_id: int) -> None:
        async with self._cond:
            if self.owner != session_id:
                raise VspError("NOT_LOCKED")
            self.owner = None
            self._cond.notify_all()

    def release_if_owner(self, session_id: int) -> None:
        if self.owner == session_id:
            self.owner = None
            try:
                asyncio.get_running_loop().create_task(self._notify())
            except RuntimeError:  # no loop running: nobody can be waiting
                pass

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()
