"""TrueCopy (synchronous remote copy): the host write mirrored to the S-VOL, fence levels, activity marks.

A host write of a P-VOL in PAIR travels FORWARD (see :mod:`.kinds`): :class:`.datapath.PairVolume` marks the
write's activity extent, then :meth:`TrueCopy.forward_write` sends it to the S-VOL (``data.write``) and
writes the P-VOL while the S side works on it; the host is answered after both. A failed forward suspends
the pair (PSUE); the fence level decides whether host writes go on (NEVER), stop (DATA), or stop until the S
side knows (STATUS). :meth:`TrueCopy.activity_loop` clears the activity marks of idle PAIR P-VOLs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from vspemu.errors import VspError, invalid
from vspemu.replication import states
from vspemu.replication.datapath import PairVolume
from vspemu.replication.kinds import FORWARD, LOCAL, EngineCore, QuietHooks
from vspemu.replication.model import FENCE_LEVELS, PAIR, CopyGroup, Pair
from vspemu.replication.wire import LinkError
from vspemu.volumes.volume import VolumeIOError

ACTIVITY_CLEAR_INTERVAL = 2.0


class _LocalWriteFailed(Exception):
    """A mirrored write's local write failed (its OSError is the cause), after the data went to the S side."""


class TrueCopy(QuietHooks):
    """The TrueCopy :class:`~vspemu.replication.kinds.ReplicationKind`."""

    replication_type = "TC"
    whole_group = False  # a TrueCopy pair is operated alone or with its group

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine

    @property
    def table(self) -> states.StateTable:
        return states.TRUECOPY

    def write_mode(self, pair: Pair) -> str:
        return FORWARD if pair.role == "P" and pair.status == PAIR else LOCAL

    def check_create(self, group_name: str, group: CopyGroup | None, fence: str, mu_number: int | None,
                     journal_id: int | None) -> None:
        if fence not in FENCE_LEVELS:
            raise invalid("fenceLevel", fence, "Specify NEVER, DATA or STATUS for a TrueCopy pair.")

    def check_create_secondary(self, group: CopyGroup) -> None:
        return None

    def before_suspend(self, group: CopyGroup, pair: Pair) -> bool:
        # DATA and STATUS fence host writes of the P-VOL after a failure
        return pair.role == "P" and pair.fence in ("DATA", "STATUS")

    def copy_after_restart(self, pair: Pair, marked: int) -> bool:
        return pair.status == PAIR and marked > 0  # tracks marked while PAIR may differ after a restart

    async def peer_silent(self, group: CopyGroup, pairs: list[Pair]) -> None:
        # an idle PAIR pair learns of a dead link here (a copy in progress learns it itself)
        for p in pairs:
            if p.role == "P" and p.status == PAIR:
                await self.engine.suspend_on_error(p, "the remote storage system does not answer")

    def background_tasks(self) -> list[Coroutine[Any, Any, None]]:
        return [self.activity_loop()]

    # -- the data path (called by PairVolume) ------------------------------------------------------------
    async def forward_write(self, pair: Pair, rep: PairVolume, offset: int, length: int,
                            data: bytes | memoryview | None, fua: bool, write_local: Callable[[], None]) -> None:
        """Mirror one host write of a P-VOL in PAIR: the write is sent to the S-VOL first and ``write_local``
        (the P-VOL's own write) runs while the S side works on it; the host is answered after both."""
        group = self.engine.groups[pair.group]
        pg = self.engine.peer(group)
        local_done = False

        def local() -> None:
            nonlocal local_done
            local_done = True
            try:
                write_local()
            except OSError as e:
                raise _LocalWriteFailed() from e

        try:
            if pg is None:
                raise LinkError("no path group")
            await pg.call("data.write", {"ldev": pair.remote_ldev, "offset": offset, "length": length,
                                         "fua": fua, "zero": data is None, "from": self.engine.system.serial},
                          b"" if data is None else data, sent=local)
        except (LinkError, VspError) as e:
            await self.engine.suspend_on_error(pair, f"write forwarding failed: {e}")
            if not local_done:
                write_local()
            if pair.fenced:
                raise VolumeIOError(f"the write could not be copied to the S-VOL ({e})") from e
            # NEVER (or STATUS with the S side told): the bitmap already holds the mark
        except _LocalWriteFailed as e:
            # the P-VOL's own write failed after the S-VOL was sent the data: the volumes may differ where the
            # bitmap is marked (the activity extent), so the pair is suspended to keep that mark until a resync
            await self.engine.suspend_on_error(pair, f"the P-VOL write failed: {e.__cause__}")
            raise e.__cause__ from None  # type: ignore[misc]

    async def forward_flush(self, pair: Pair) -> None:
        group = self.engine.groups[pair.group]
        try:
            await self.engine.call(group, "data.flush", {"ldev": pair.remote_ldev})
        except VspError as e:
            await self.engine.suspend_on_error(pair, f"flush forwarding failed: {e}")
            if pair.fenced:
                raise VolumeIOError(str(e)) from e

    async def activity_loop(self) -> None:
        """Clear the activity marks of PAIR P-VOLs that are idle or beyond the hot set (see datapath).

        Only with the group's WriteBarrier held: no write is in flight, and every earlier one was forwarded and
        acknowledged (a failed forward turned the pair PSUE before its write left the barrier), so the
        cleared extents cover nothing that differs. Marks the write path does not know of (none in PAIR,
        normally) are cleared as a whole, as before.
        """
        def due(p: Pair) -> PairVolume | None:
            bm = self.engine.bitmaps.get(p.key)
            if p.role != "P" or p.status != PAIR or bm is None or not bm.count():
                return None
            rep = getattr(self.engine.system.volumes.get(p.local_ldev), "replicator", None)
            return rep if isinstance(rep, PairVolume) and rep.bitmap is bm and rep.activity_due() else None

        while True:
            await asyncio.sleep(ACTIVITY_CLEAR_INTERVAL)
            for name, barrier in list(self.engine.barriers.items()):
                if not any(due(p) for p in self.engine.group_pairs(name)):
                    continue
                await barrier.hold()
                try:
                    for p in self.engine.group_pairs(name):
                        rep = due(p)
                        if rep is not None:
                            rep.clear_activity()
                            await asyncio.to_thread(rep.bitmap.sync)
                finally:
                    await barrier.release()
