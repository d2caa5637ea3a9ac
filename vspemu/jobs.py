"""Jobs: how the array reports every state-changing request.

A job is an asyncio task plus a record (status, state, times, affectedResources, error). The HTTP layer
answers 202 with the record; a client polls ``GET jobs/{id}`` or sends ``Response-Job-Status: Completed``
to have the answer held until the job is done. Independent jobs run concurrently; jobs that name the
same object (``key``) run one after the other. Finished jobs are kept up to a bound, oldest dropped (a
running job is never dropped, and does not stop the finished ones after it from being dropped). A record
keeps at most :data:`MAX_REQUEST_BODY` characters of its request body: what the job view shows.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vspemu.errors import VspError, not_found

log = logging.getLogger(__name__)

Work = Callable[[], Awaitable[list[str]]]
MAX_REQUEST_BODY = 1024  # characters of the request body kept in a job record (the view shows them)


def iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class Job:
    job_id: int
    user_id: str
    base: str  # the URL prefix of the request's form, e.g. /ConfigurationManager/v1/objects
    request_url: str
    request_method: str
    request_body: str
    status: str = "Initializing"
    state: str = "Queued"
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    completed: float | None = None
    affected: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "jobId": self.job_id,
            "self": f"{self.base}/jobs/{self.job_id}",
            "userId": self.user_id,
            "status": self.status,
            "state": self.state,
            "createdTime": iso(self.created),
            "updatedTime": iso(self.updated),
            "request": {
                "requestUrl": self.request_url,
                "requestMethod": self.request_method,
                "requestBody": self.request_body,
            },
            "affectedResources": list(self.affected),
        }
        if self.completed is not None:
            body["completedTime"] = iso(self.completed)
        if self.error is not None:
            body["error"] = self.error
        return body


class Jobs:
    def __init__(self, keep: int = 3000) -> None:
        self._jobs: OrderedDict[int, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._keep = keep
        self._key_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # key -> (lock, [users])
        self._tasks: set[asyncio.Task[None]] = set()
        self.observers: list[Callable[[Job], None]] = []  # told of each finished job (metrics: its duration)

    def submit(self, work: Work, *, user: str, base: str, url: str, method: str, body: str,
               key: str | None = None) -> Job:
        if len(body) > MAX_REQUEST_BODY:
            body = body[:MAX_REQUEST_BODY] + "..."
        job = Job(next(self._ids), user, base, url, method, body)
        self._jobs[job.job_id] = job
        self._trim()
        task = asyncio.get_running_loop().create_task(self._run(job, work, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def _trim(self) -> None:
        """Drop the oldest finished jobs beyond the bound; running jobs stay wherever they are."""
        excess = len(self._jobs) - self._keep
        if excess <= 0:
            return
        drop: list[int] = []
        for job in self._jobs.values():
            if len(drop) >= excess:
                break
            if job.done.is_set():
                drop.append(job.job_id)
        for job_id in drop:
            del self._jobs[job_id]

    async def _run(self, job: Job, work: Work, key: str | None) -> None:
        lock: asyncio.Lock | None = None
        if key:
            lock, users = self._key_locks.setdefault(key, (asyncio.Lock(), [0]))
            users[0] += 1
        acquired = False
        try:
            if lock is not None:
                await lock.acquire()
                acquired = True
            job.status, job.state, job.updated = "Running", "Started", time.time()
            try:
                affected = await work()
            except VspError as e:
                job.error = e.body(job.request_url)
                job.state = "Failed"
            except Exception as e:  # a bug must fail the job, not the server
                log.exception("job %s failed", job.job_id)
                job.error = VspError("INTERNAL", detail=type(e).__name__).body(job.request_url)
                job.state = "Failed"
            else:
                job.affected = [f"{job.base}/{rel}" for rel in affected]
                job.state = "Succeeded"
        finally:
            if lock is not None and key is not None:
                if acquired:
                    lock.release()
                users = self._key_locks[key][1]
                users[0] -= 1
                if users[0] == 0:
                    del self._key_locks[key]
            now = time.time()
            job.status, job.updated, job.completed = "Completed", now, now
            job.done.set()
            self._trim()
            for observe in self.observers:
                observe(job)

    def get(self, job_id: int) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise not_found("job", job_id)
        return job

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    async def wait(self, job: Job, timeout: float) -> None:
        try:
            await asyncio.wait_for(job.done.wait(), timeout=max(timeout, 0.001))
        except TimeoutError:
            pass
