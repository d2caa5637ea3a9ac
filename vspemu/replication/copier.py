"""The background copy of a pair (primary side): initial copy, resync, and the copy after a swap.

The copier sends the tracks the pair's bitmap marks (:func:`.datapath.copy_marked_tracks`, at the pair's copy
pace) as ``data.write`` copy chunks, and when none is left, with the group's write barrier held, makes the
S-VOL durable and turns the pair PAIR on both sides. A failure suspends the pair (PSUE) and keeps the marks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from vspemu.errors import VspError
from vspemu.replication.datapath import copy_marked_tracks
from vspemu.replication.kinds import EngineCore
from vspemu.replication.model import COPY, PAIR, PFUL, CopyGroup, Pair
from vspemu.replication.wire import LinkError

log = logging.getLogger(__name__)

RESTART_PATH_WAIT = 30.0  # seconds a copy waits for a path to the other system (after a restart)


class PairRuntime:
    """What a pair has in memory only: its copy task and who waits for it."""

    def __init__(self) -> None:
        self.copy_task: asyncio.Task[None] | None = None
        self.settled = asyncio.Event()  # set when a copy ends (PAIR or failure)
        self.bytes_sent = 0
        self.tracks_sent = 0


class CopierCore(EngineCore, Protocol):
    runtime: dict[str, PairRuntime]


class Copier:
    """Starts and runs the copies of one system's pairs."""

    def __init__(self, engine: CopierCore) -> None:
        self.engine = engine

    def start_copy(self, pair: Pair) -> None:
        rt = self.engine.runtime[pair.key]
        rt.settled.clear()
        group = self.engine.groups[pair.group]
        self.engine.kind(group).copy_starting(group)  # (UR: the path watch starts again with the copy)
        if rt.copy_task is None or rt.copy_task.done():
            rt.copy_task = asyncio.get_running_loop().create_task(self._copy(pair))

    async def _copy(self, pair: Pair) -> None:
        rt = self.engine.runtime[pair.key]
        group = self.engine.groups[pair.group]
        vol = self.engine.system.volumes[pair.local_ldev]
        bm = self.engine.bitmap(pair)
        barrier = self.engine.barriers[pair.group]
        pair.copy_total = bm.count()
        pair.copy_done = 0
        # recorded before the copier clears (and persists the clearing of) any mark: a recovered COPY pair
        # with a clean bitmap and no copy on record never copied anything (see start)
        pair.extra["copy_started"] = True
        self.engine.save(pair)
        rt.bytes_sent = rt.tracks_sent = 0

        async def send(offset: int, data: bytes | memoryview | None, length: int) -> None:
            pg = self.engine.peer(group)
            if pg is None:
                raise LinkError("no path group")
            await pg.call("data.write", {"ldev": pair.remote_ldev, "offset": offset, "length": length,
                                         "zero": data is None, "copy": True, "from": self.engine.system.serial},
                          b"" if data is None else data)
            rt.bytes_sent += 0 if data is None else length

        async def send_runs(runs: list[tuple[int, int]], data: memoryview) -> None:
            pg = self.engine.peer(group)
            if pg is None:
                raise LinkError("no path group")
            await pg.call("data.writev", {"ldev": pair.remote_ldev, "runs": [[o, n] for o, n in runs],
                                          "from": self.engine.system.serial}, data)
            rt.bytes_sent += len(data)

        def progress(n: int) -> None:
            pair.copy_done += n
            rt.tracks_sent += n

        try:
            await self.wait_peer(group, RESTART_PATH_WAIT)
            while pair.status == COPY and pair.role == "P":
                await copy_marked_tracks(vol, bm, send, lambda: pair.copy_pace, progress, send_runs=send_runs)
                await barrier.hold()
                try:
                    if bm.count() or pair.status != COPY:
                        continue
                    await self.engine.call(group, "data.flush", {"ldev": pair.remote_ldev})
                    await self.engine.call(group, "pair.set", {"group": group.name, "pairs": [pair.name],
                                                               "status": PAIR})
                    pair.copy_done = pair.copy_total
                    self.engine.set_status(pair, PAIR, PAIR)
                finally:
                    await barrier.release()
        except (LinkError, VspError) as e:
            if pair.status == COPY:
                await self.engine.suspend_on_error(pair, f"copy failed: {e}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("copy of %s failed", pair.key)
            await self.engine.suspend_on_error(pair, "internal error in the copy")
        finally:
            bm.sync()
            rt.copy_task = None
            rt.settled.set()

    async def wait_peer(self, group: CopyGroup, timeout: float) -> None:
        """Give the paths to the other system a moment to connect (after a restart)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            pg = self.engine.peer(group)
            if pg is not None and pg.active_paths:
                return
            await asyncio.sleep(0.1)

    async def wait_settled(self, pairs: list[Pair]) -> None:
        """Wait until no pair is copying (the job of a create or resync without NoWait)."""
        for p in pairs:
            rt = self.engine.runtime.get(p.key)
            while rt is not None and p.status == COPY and p.key in self.engine.pairs:
                rt.settled.clear()
                if rt.copy_task is None:
                    break
                await rt.settled.wait()
        failed = [p for p in pairs if p.status not in (PAIR, PFUL) and p.key in self.engine.pairs]
        if failed:
            raise VspError("WRONG_STATE", detail=f"the copy of pair {failed[0].key} ended in {failed[0].status}")
