"""Universal Replicator, the secondary's side: pull journal entries and restore them in sequence order.

The restore loop of a mirror pulls entries (``jnl.read``, with the next read already on its way while a batch
is applied), applies them to the S-VOLs strictly in sequence order across every volume of the journal (a gap
or a corrupt entry stops the batch; the next read asks again from there), and makes the S-VOLs durable in the
background; its reads report what was applied and what is durable, and the primary frees entries up to the
durable number (see :mod:`.ur`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from vspemu.errors import VspError
from vspemu.replication.journal import CorruptEntry, parse_entries
from vspemu.replication.model import ACTIVE, PAIR, PFUL, PSUE, CopyGroup

if TYPE_CHECKING:
    from vspemu.replication.kinds import EngineCore
    from vspemu.volumes.volume import Volume

log = logging.getLogger(__name__)

PFUL_THRESHOLD = 80
RESTORE_FLUSH_INTERVAL = 0.25  # secondary: seconds between background flushes of the S-VOLs while busy


class MirrorRuntime:
    """What one UR copy group has in memory on this side."""

    def __init__(self) -> None:
        self.acked = 0  # primary: highest sequence number the secondary restored and made durable (freed here)
        self.applied = 0  # primary: highest sequence number the secondary applied to its S-VOLs (the lag)
        self.restored = 0  # secondary: highest sequence number applied to the S-VOLs
        self.durable = 0  # secondary: highest sequence number applied and flushed (reported for freeing)
        self.unflushed: set[Volume] = set()  # secondary: S-VOLs written since their last flush
        self.flush_task: asyncio.Task[None] | None = None
        self.flushed_at = time.monotonic()
        self.last_own = 0  # primary: the last sequence number journaled for this mirror
        self.last_read = time.monotonic()  # primary: when the secondary last pulled
        self.new_entries = asyncio.Event()
        self.acked_event = asyncio.Event()
        self.restore_task: asyncio.Task[None] | None = None
        self.samples: deque[tuple[int, float]] = deque(maxlen=4096)  # (seq, time) for the lag
        self.remote_q_count = 0
        self.remote_usage = 0
        self.remote_last_seq = 0
        self.read_errors_since: float | None = None


class RestoreHost(Protocol):
    """What the restore side asks of the replicator: a mirror's runtime and its path watch."""

    def runtime(self, group: CopyGroup) -> MirrorRuntime: ...

    def path_watch_seconds(self, group: CopyGroup) -> float: ...


class Restorer:
    """The restore loops of this side's UR mirrors (one task per mirror whose S-VOLs are here)."""

    def __init__(self, engine: EngineCore, ur: RestoreHost) -> None:
        self.engine = engine
        self.ur = ur

    def ensure(self, group: CopyGroup) -> None:
        if group.role != "S":
            return
        rt = self.ur.runtime(group)
        if rt.restore_task is None or rt.restore_task.done():
            rt.restore_task = asyncio.get_running_loop().create_task(self._restore_loop(group))

    async def _read(self, group: CopyGroup, rt: MirrorRuntime, from_seq: int, nowait: bool = False
                    ) -> tuple[dict[str, Any], bytes]:
        return await self.engine.call(group, "jnl.read", {
            "group": group.name, "from": from_seq, "restored": rt.durable, "applied": rt.restored, "nowait": nowait})

    async def _restore_loop(self, group: CopyGroup) -> None:
        """Pull and apply, with the next read already on its way while a batch is applied (read-ahead)."""
        rt = self.ur.runtime(group)
        engine = self.engine
        ahead: asyncio.Task[tuple[dict[str, Any], bytes]] | None = None
        try:
            while group.name in engine.groups and group.role == "S":
                pairs = engine.group_pairs(group.name)
                if not any(p.status in ACTIVE for p in pairs):
                    if ahead is not None:
                        ahead.cancel()
                        ahead = None
                    await asyncio.sleep(0.2)
                    continue
                try:
                    reading, ahead = ahead or self._read(group, rt, rt.restored + 1), None
                    h, payload = await reading
                except VspError as e:
                    now = time.monotonic()
                    if rt.read_errors_since is None:
                        rt.read_errors_since = now
                        log.info("journal read for %s failed: %s", group.name, e)
                    if now - rt.read_errors_since >= self.ur.path_watch_seconds(group):
                        for p in pairs:
                            if p.status in ACTIVE:
                                engine.set_status(p, PSUE)
                    await asyncio.sleep(0.5)
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("restore loop of %s", group.name)
                    await asyncio.sleep(1)
                    continue
                rt.read_errors_since = None
                rt.remote_q_count, rt.remote_usage = int(h.get("qCount", 0)), int(h.get("usage", 0))
                rt.remote_last_seq = int(h.get("lastSeq", 0))
                if int(h.get("headSeq", 1)) > rt.restored + 1:
                    # entries before the head were restored already or purged into the primary's bitmap
                    rt.restored = int(h["headSeq"]) - 1
                    if not rt.unflushed:
                        rt.durable = max(rt.durable, rt.restored)
                got = int(h.get("count", 0)) > 0
                if got:
                    if int(h.get("nextSeq", 0)) > rt.restored + 1:  # the next batch, while this one applies
                        ahead = asyncio.get_running_loop().create_task(self._read(group, rt, int(h["nextSeq"]), True))
                    if h.get("skip"):
                        self._skip(group, h, rt)
                    else:
                        rt.unflushed.update(self._apply(group, h, payload, rt))
                if rt.restored > rt.durable and (rt.flush_task is None or rt.flush_task.done()):
                    if not got:  # caught up: make it durable now, the next read reports it
                        await self._flush_restored(rt)
                    elif time.monotonic() - rt.flushed_at >= RESTORE_FLUSH_INTERVAL:
                        rt.flush_task = asyncio.get_running_loop().create_task(self._flush_restored(rt))
                for p in pairs:
                    if p.status == PAIR and rt.remote_usage >= PFUL_THRESHOLD:
                        engine.set_status(p, PFUL)
                    elif p.status == PFUL and rt.remote_usage < PFUL_THRESHOLD:
                        engine.set_status(p, PAIR)
        finally:
            if ahead is not None:
                ahead.cancel()

    async def _flush_restored(self, rt: MirrorRuntime) -> None:
        """Flush the S-VOLs written so far; then everything applied up to now is durable."""
        target, vols = rt.restored, rt.unflushed
        rt.unflushed = set()
        rt.flushed_at = time.monotonic()
        try:
            for vol in vols:
                await vol.flush_local()
        except BaseException:
            rt.unflushed |= vols  # try again with the next flush
            raise
        rt.durable = max(rt.durable, target)

    @staticmethod
    def _skip(group: CopyGroup, h: dict[str, Any], rt: MirrorRuntime) -> None:
        """A run of entries that are not for this mirror: restored as soon as they are next in sequence."""
        first, last = int(h["first"]), int(h["first"]) + int(h["count"]) - 1
        if rt.restored and first > rt.restored + 1:
            log.error("journal gap in %s: expected %d, got %d", group.name, rt.restored + 1, first)
            return
        rt.restored = max(rt.restored, last)

    def _apply(self, group: CopyGroup, h: dict[str, Any], payload: bytes, rt: MirrorRuntime) -> list[Volume]:
        """Apply the entries of a ``jnl.read`` reply strictly in sequence order; stop at a gap or a corrupt
        entry (either would break consistency; the next read asks again from there)."""
        system = self.engine.system
        touched: dict[int, Volume] = {}
        mu, floor = int(h["mu"]), int(h["floor"])
        svols = {int(k): int(v) for k, v in h["svols"].items()}
        volumes: dict[int, Volume | None] = {}  # S-VOL id -> the volume, if it is an S-VOL of this mirror
        try:
            for e in parse_entries(payload, int(h["first"])):
                if e.seq <= rt.restored and rt.restored:
                    continue  # already applied (a resent entry)
                if rt.restored and e.seq != rt.restored + 1:
                    log.error("journal gap in %s: expected %d, got %d", group.name, rt.restored + 1, e.seq)
                    break
                svol = svols.get(e.ldev) if e.is_for(mu, floor) else None
                if svol is not None:
                    if svol not in volumes:
                        pair = next((p for p in self.engine.pairs_of(svol) if p.group == group.name), None)
                        volumes[svol] = system.volumes.get(svol) if pair is not None and pair.role == "S" else None
                    vol = volumes[svol]
                    if vol is not None and not vol.check_range(e.offset, e.length):
                        log.error("journal entry %d for %s: offset %d + %d bytes beyond the end of S-VOL %d; "
                                  "restore stops here", e.seq, group.name, e.offset, e.length, svol)
                        break
                    if vol is not None:
                        if e.zero:
                            vol.discard_local(e.offset, e.length)
                        else:
                            vol.write_local(e.offset, e.data)
                        touched[svol] = vol
                rt.restored = e.seq
        except CorruptEntry as exc:
            log.error("journal read for %s: %s", group.name, exc)
        return list(touched.values())
