"""REST sessions and the resource-group lock.

Sessions live in memory, as on the array (a restarted controller forgets them). A session dies
``aliveTime`` seconds after its last use; at most :data:`MAX_SESSIONS` exist at once. The resource-group
lock is advisory: it has one owner session at a time, other sessions wait for it up to ``waitTime``
seconds, and it is released when its session ends.

Logins (:class:`LoginGuard`): the password hash (scrypt, ~50 ms of CPU) runs in a small thread pool behind a
semaphore, never on the event loop, so a storm of logins cannot stall host I/O or the link. Repeated failures
back off: per client address (after :data:`ADDRESS_FREE_FAILURES` failures in a row, further attempts from
it are refused without hashing for a delay that doubles up to :data:`ADDRESS_MAX_DELAY`), and per user (after
:data:`USER_FREE_FAILURES` failures from anywhere, for a delay that doubles up to the short
:data:`USER_MAX_DELAY`, and never for an address that logged in as that user successfully in the last
:data:`TRUSTED_FOR` seconds): an attacker hammering a user does not lock its owner out for long.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vspemu.errors import VspError, invalid, not_found

MAX_SESSIONS = 64
DEFAULT_ALIVE_TIME = 300

HASH_THREADS = 2  # password hashes at once (each a CPU-bound scrypt)
ADDRESS_FREE_FAILURES = 5  # failures in a row from one address before it is refused
ADDRESS_MAX_DELAY = 300.0
USER_FREE_FAILURES = 20  # failures for one user (any address) before the user is refused
USER_MAX_DELAY = 30.0  # bounded: the owner of an attacked account waits at most this long
FORGET_AFTER = 900.0  # a failure record with no new failure for this long is forgotten
TRUSTED_FOR = 3600.0  # an address that logged in as a user is exempt from that user's backoff this long
MAX_RECORDS = 10000  # failure records kept per kind (addresses, users), oldest dropped


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
        self.logins = LoginGuard(clock)

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


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class LoginGuard:
    """Password checks off the event loop, with backoff of repeated failures per address and per user."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="login-hash")
        self._slots = asyncio.Semaphore(HASH_THREADS)
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()
        self._users: OrderedDict[str, _Failures] = OrderedDict()
        self._trusted: OrderedDict[tuple[str, str], float] = OrderedDict()  # (user, address) -> last success

    def _record(self, table: OrderedDict[str, _Failures], key: str, now: float) -> _Failures | None:
        rec = table.get(key)
        if rec is not None and now - rec.last > FORGET_AFTER and now >= rec.blocked_until:
            del table[key]
            return None
        return rec

    def _trusted_now(self, user: str, address: str, now: float) -> bool:
        when = self._trusted.get((user, address))
        return when is not None and now - when <= TRUSTED_FOR

    def check(self, user: str, address: str) -> None:
        """Refuse (401 KART40067-E, no hashing) while the address or the user is backed off."""
        now = self._clock()
        waits = []
        rec = self._record(self._addresses, address, now)
        if rec is not None and now < rec.blocked_until:
            waits.append(rec.blocked_until - now)
        rec = self._record(self._users, user, now)
        if rec is not None and now < rec.blocked_until and not self._trusted_now(user, address, now):
            waits.append(rec.blocked_until - now)
        if waits:
            raise VspError("AUTH_BACKOFF", seconds=max(1, round(max(waits))))

    async def verify(self, check: Callable[[], bool]) -> bool:
        """Run the password check (``check``) in the hash pool, at most HASH_THREADS at once."""
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._pool, check)

    def failed(self, user: str, address: str) -> None:
        now = self._clock()
        self._fail(self._addresses, address, now, ADDRESS_FREE_FAILURES, ADDRESS_MAX_DELAY)
        self._fail(self._users, user, now, USER_FREE_FAILURES, USER_MAX_DELAY)

    def succeeded(self, user: str, address: str) -> None:
        self._addresses.pop(address, None)  # the user's record stays: its owner logging in must not reset it
        self._trusted[(user, address)] = self._clock()
        self._trusted.move_to_end((user, address))
        while len(self._trusted) > MAX_RECORDS:
            self._trusted.popitem(last=False)

    @staticmethod
    def _fail(table: OrderedDict[str, _Failures], key: str, now: float, free: int, max_delay: float) -> None:
        rec = table.get(key)
        if rec is None or now - rec.last > FORGET_AFTER:
            rec = table[key] = _Failures()
        table.move_to_end(key)
        rec.count += 1
        rec.last = now
        if rec.count >= free:
            rec.blocked_until = now + min(2.0 ** (rec.count - free), max_delay)
        while len(table) > MAX_RECORDS:
            table.popitem(last=False)
