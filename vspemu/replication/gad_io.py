"""GAD host I/O in PAIR (both volumes written, one order) and the quorum arbitration when the link fails.

**Writes in PAIR (I/O mode Mirror on both sides).** The P side orders every write of the pair, whichever side
the host wrote to:

* a host write on the **P side** marks its activity extent (durably, before anything else: see
  :mod:`.datapath`), waits for overlapping writes in flight (:class:`.datapath.InFlight`), is sent to the
  S-VOL (``data.write``) and written on the P-VOL while the S side works on it; the host is answered after
  both, as TrueCopy's synchronous mirror;
* a host write on the **S side** is not written there: it is sent to the P side (``gad.write``), which writes
  it through the P-VOL's own write path (the P side's order, the P-VOL then the S-VOL by ``data.write``) and
  answers only when the S-VOL has it; then the S side answers its host.

So the S-VOL receives every write from the P side, in the P side's order, and overlapping writes from the two
sides end the same on both volumes. Reads are local on each side.

**Arbitration** (a write cannot be mirrored, or the status polls go unanswered). Per quorum disk, one at a
time, each side decides before it answers any host write again:

* quorum-less disk: the P side wins, the S side loses (a choice, docs/gad.md);
* the **P side** reads the S side's slot on the quorum volume: if the S side claims the pair
  (:data:`CLAIM`), the P side loses; otherwise it writes its own claim and wins; it loses if it cannot read
  or write the quorum volume (a side that can reach neither its partner nor the quorum never serves);
* the **S side** reads the P side's slot, waits :data:`S_WAIT` seconds (longer than the P side's heartbeat
  interval and its quorum I/O timeout) and reads it again: if the P side claims the pair or its heartbeat
  sequence moved, the P side is alive and reached the quorum: the S side loses; otherwise it writes its own
  claim and wins (the P system is gone, or cut from the quorum too).

The winner's pairs serve alone (P: PSUE, I/O mode Local; S: SSWS, Local), the loser's are PSUE in I/O mode
Block (host reads and writes refused). A side clears its claim when its pairs are in PAIR again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from vspemu.errors import VspError, invalid
from vspemu.replication.gad_model import BLOCK, GAD, io_mode
from vspemu.replication.kinds import EngineCore
from vspemu.replication.model import PAIR, PSUE, SSWS, CopyGroup, Pair
from vspemu.replication.wire import LinkError, PeerInfo, RemoteError
from vspemu.system.quorum import CHECK_INTERVAL, IO_TIMEOUT, QuorumDisks
from vspemu.volumes.volume import VolumeIOError, WriteRefused

if TYPE_CHECKING:
    from vspemu.replication.datapath import PairVolume
    from vspemu.volumes.volume import Volume

log = logging.getLogger(__name__)

CLAIM = 0x1  # quorum slot flag: "this system serves the pairs of this quorum disk alone"
S_WAIT = 2 * CHECK_INTERVAL + IO_TIMEOUT + 1.0  # the S side's wait for signs of life of the P side


class GadCore(EngineCore, Protocol):
    """What GAD uses of the engine besides :class:`EngineCore`."""

    on_save: list[Callable[[Pair], None]]
    on_detach: list[Callable[[Pair], None]]

    @property
    def create_pair(self) -> Callable[..., Coroutine[Any, Any, tuple[CopyGroup, Pair]]]: ...

    def learn(self, group: CopyGroup, statuses: dict[str, str]) -> None: ...


class GadKind(Protocol):
    """What the data path uses of the GAD kind (.gad.Gad)."""

    quorum: QuorumDisks | None

    def is_gad(self, pair: Pair) -> bool: ...


class GadDataPath:
    def __init__(self, engine: GadCore, kind: GadKind) -> None:
        self.engine = engine
        self.kind = kind
        self._arbitrating: dict[int, asyncio.Lock] = {}
        self._clearing: set[int] = set()  # quorum disks whose claim is being withdrawn
        self.arbitrations: list[dict[str, Any]] = []  # what each arbitration decided (tests, the log)
        for msg, handler in (("gad.write", self.h_write), ("gad.flush", self.h_flush)):
            engine.link.register_handler(msg, handler)

    # -- host writes -----------------------------------------------------------------------------------------
    async def write(self, pair: Pair, rep: PairVolume, volume: Volume, offset: int, length: int,
                    data: bytes | memoryview | None, fua: bool) -> None:
        if pair.role == "P":
            await self._p_write(pair, rep, volume, offset, length, data, fua)
        else:
            await self._s_write(pair, rep, volume, offset, length, data, fua)

    async def _p_write(self, pair: Pair, rep: PairVolume, volume: Volume, offset: int, length: int,
                       data: bytes | memoryview | None, fua: bool) -> None:
        extents = rep._touch_activity(offset, length)
        if extents is not None:
            await rep.bitmap.mark(*extents)
        flight = rep.inflight.try_begin(offset, offset + length) or await rep.inflight.begin(offset, offset + length)
        try:
            local_done = False

            def local() -> None:
                nonlocal local_done
                local_done = True
                rep._write_local(volume, offset, length, data)

            group = self.engine.groups[pair.group]
            pg = self.engine.peer(group)
            try:
                if pg is None:
                    raise LinkError("no path group")
                await pg.call("data.write", {"ldev": pair.remote_ldev, "offset": offset, "length": length,
                                             "fua": fua, "zero": data is None, "from": self.engine.system.serial},
                              b"" if data is None else data, sent=local)
            except RemoteError as e:  # the S side answered but refused: learn why (e.g. it took over)
                if not local_done:
                    local()
                await self._refused(pair, f"the S side refused the write: {e}")
            except LinkError as e:
                if not local_done:
                    local()
                await self.arbitrate(pair, f"write mirroring failed: {e}")
            if io_mode(pair) == BLOCK:
                raise VolumeIOError(f"GAD pair {pair.key}: the write could not be mirrored and this side is "
                                    "in I/O mode Block")
            if fua:
                await volume.flush_local()
        finally:
            rep.inflight.end(flight)

    async def _s_write(self, pair: Pair, rep: PairVolume, volume: Volume, offset: int, length: int,
                       data: bytes | memoryview | None, fua: bool) -> None:
        group = self.engine.groups[pair.group]
        pg = self.engine.peer(group)
        try:
            if pg is None:
                raise LinkError("no path group")
            await pg.call("gad.write", {"ldev": pair.remote_ldev, "offset": offset, "length": length, "fua": fua,
                                        "zero": data is None}, b"" if data is None else data)
            return  # the P side wrote both volumes (this one by data.write) before it answered
        except RemoteError as e:
            await self._refused(pair, f"the P side refused the write: {e}")
        except LinkError as e:
            await self.arbitrate(pair, f"write forwarding failed: {e}")
        if io_mode(pair) == BLOCK or pair.status == PAIR:
            raise VolumeIOError(f"GAD pair {pair.key}: the write could not reach the P side and this side is "
                                "in I/O mode Block")
        # this side won: it serves alone, the bitmap keeps the write for the resync
        await rep.bitmap.mark(offset, length)
        rep._write_local(volume, offset, length, data)
        if fua:
            await volume.flush_local()

    async def flush(self, pair: Pair) -> None:
        """A host flush in PAIR (the local volume is flushed already): the other volume too."""
        group = self.engine.groups[pair.group]
        msg = "data.flush" if pair.role == "P" else "gad.flush"
        pg = self.engine.peer(group)
        try:
            if pg is None:
                raise LinkError("no path group")
            await pg.call(msg, {"ldev": pair.remote_ldev})
            return
        except RemoteError as e:
            await self._refused(pair, f"flush refused: {e}")
        except LinkError as e:
            await self.arbitrate(pair, f"flush forwarding failed: {e}")
        if io_mode(pair) == BLOCK:
            raise VolumeIOError(f"GAD pair {pair.key} is in I/O mode Block")

    async def _refused(self, pair: Pair, reason: str) -> None:
        """The other side answers but refuses a mirrored write: learn its status (e.g. SSWS after a takeover:
        this side goes Block); if it says nothing new, suspend (this side keeps serving: the link works, so
        the other side knows)."""
        log.warning("GAD pair %s: %s", pair.key, reason)
        group = self.engine.groups[pair.group]
        h = await self.engine.try_call(group, "pair.state", {"group": group.name, "states": {}})
        states = h.get("states") if h is not None else None
        if isinstance(states, dict):
            self.engine.learn(group, {str(k): str(v) for k, v in states.items()})
        if pair.status == PAIR:
            await self.engine.suspend_on_error(pair, reason)

    # -- what the S side asks of the P side ---------------------------------------------------------------
    def _pvol_for_peer(self, peer: PeerInfo, ldev_id: int) -> Pair:
        pairs = self.engine.ldev_pairs.get(ldev_id)
        p = pairs[0] if pairs else None
        group = self.engine.groups.get(p.group) if p else None
        if p is None or group is None or group.replication_type != GAD or p.role != "P" or \
                group.remote_device_id != peer.storage_device_id:
            raise VspError("WRONG_STATE", detail=f"ldev {ldev_id} is not the P-VOL of a GAD pair with "
                                                 f"{peer.storage_device_id}")
        if p.status != PAIR:
            raise VspError("WRONG_STATE", detail=f"GAD pair {p.key} is {p.status}: the P-VOL takes no writes "
                                                 "from the S side")
        return p

    async def h_write(self, peer: PeerInfo, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """A host write of the S-VOL: written through the P-VOL's write path (P-VOL, then the S-VOL by
        ``data.write``, in this side's order); answered when both have it."""
        ldev_id = int(h["ldev"])
        self._pvol_for_peer(peer, ldev_id)
        vol = self.engine.system.volumes[ldev_id]
        offset, length = int(h["offset"]), int(h["length"])
        if not vol.check_range(offset, length) or (not h.get("zero") and len(payload) != length):
            raise invalid("offset", offset, "beyond the end of the P-VOL, or a bad length")
        try:
            if h.get("zero"):
                await vol.discard(offset, length, True, bool(h.get("fua")))
            else:
                await vol.write(offset, payload, bool(h.get("fua")))
        except (WriteRefused, OSError) as e:  # (VolumeIOError: the mirror failed and this side is Block)
            raise VspError("WRONG_STATE", detail=f"the P-VOL did not take the write: {e}") from None
        return {}, b""

    async def h_flush(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        ldev_id = int(h["ldev"])
        self._pvol_for_peer(peer, ldev_id)
        await self.engine.system.volumes[ldev_id].flush_local()
        return {}, b""

    # -- arbitration -------------------------------------------------------------------------------------------
    async def arbitrate(self, pair: Pair, reason: str) -> bool:
        """Decide through the quorum whether this side keeps serving the pairs of ``pair``'s quorum disk (see
        the module docstring); every GAD pair of that disk still in PAIR here takes the outcome. True if this
        side serves (I/O mode Local)."""
        qid = int(pair.extra.get("quorum", -1))
        lock = self._arbitrating.setdefault(qid, asyncio.Lock())
        async with lock:
            if pair.status != PAIR:  # decided meanwhile (another write, the poll)
                return io_mode(pair) != BLOCK
            log.warning("GAD pair %s (%s side): arbitration through quorum disk %s: %s", pair.key, pair.role, qid,
                        reason)
            won, why = await self._decide(pair.role, qid)
            pairs = [p for p in self.engine.pairs.values() if self.kind.is_gad(p) and p.status == PAIR
                     and p.extra.get("quorum") == qid]
            with self.engine.system.store.transaction():
                for p in pairs:
                    if won and p.role == "S":
                        p.swap_required = True  # the way back is a swap resync, as after a takeover
                        self.engine.set_status(p, SSWS)
                    else:
                        if not won:
                            p.extra["lost"] = True
                        self.engine.set_status(p, PSUE)
            self.arbitrations.append({"quorumDiskId": qid, "role": pair.role, "won": won, "why": why,
                                      "pairs": [p.key for p in pairs]})
            log.warning("GAD quorum disk %s: this side %s (%s); pairs %s", qid, "serves" if won else "is blocked",
                        why, [p.key for p in pairs])
            return won

    async def _decide(self, role: str, qid: int) -> tuple[bool, str]:
        quorum = self.kind.quorum
        if quorum is None or qid not in quorum.disks:
            return role == "P", "no quorum disk: the P side wins"
        if quorum.disks[qid].ldev_id is None:
            return role == "P", "quorum-less: the P side wins"
        try:
            if role == "P":
                _, partner = await quorum.slots(qid)
                if partner is not None and partner.flags & CLAIM:
                    return False, f"the S side claimed the pairs (epoch {partner.epoch})"
                own, _ = await quorum.slots(qid, CLAIM)
                return True, f"claimed (epoch {own.epoch if own else '?'})"
            _, before = await quorum.slots(qid)
            if before is not None and before.flags & CLAIM:
                return False, "the P side claimed the pairs"
            await asyncio.sleep(S_WAIT)
            _, after = await quorum.slots(qid)
            if after is not None and (after.flags & CLAIM or before is None or after.sequence != before.sequence):
                return False, "the P side is alive and reaches the quorum"
            own, _ = await quorum.slots(qid, CLAIM)
            return True, f"the P side is silent on the quorum: claimed (epoch {own.epoch if own else '?'})"
        except VspError as e:
            return False, f"the quorum cannot be reached: {e}"

    async def after_restart(self, pairs: list[Pair]) -> None:
        """P-side pairs held (Block) at start: read the quorum (until it answers); if the S side claimed the
        pairs meanwhile, this side lost (PSUE, Block), else it goes on as it was."""
        quorum = self.kind.quorum
        assert quorum is not None
        for qid in sorted({int(p.extra["quorum"]) for p in pairs}):
            partner = None
            while qid in quorum.disks:  # (a quorum disk deleted meanwhile: nothing to wait for)
                try:
                    _, partner = await quorum.slots(qid)
                    break
                except VspError as e:
                    log.warning("GAD quorum disk %s: cannot read it after the restart, host I/O held: %s", qid, e)
                    await asyncio.sleep(CHECK_INTERVAL)
            claimed = partner is not None and bool(partner.flags & CLAIM)
            with self.engine.system.store.transaction():
                for p in pairs:
                    if p.extra.get("quorum") != qid or p.key not in self.engine.pairs:
                        continue
                    p.extra.pop("held", None)
                    if claimed:
                        log.warning("GAD pair %s: the S side claimed the pairs while this system was down: Block",
                                    p.key)
                        p.extra["lost"] = True
                        self.engine.set_status(p, PSUE)
                    else:
                        self.engine.save(p)

    def back_in_pair(self, pair: Pair) -> None:
        """A pair is in PAIR again: withdraw this side's claim on its quorum disk, if the slot holds one (also a
        claim made before a restart)."""
        qid = pair.extra.get("quorum")
        quorum = self.kind.quorum
        if not isinstance(qid, int) or quorum is None or qid in self._clearing or \
                qid not in quorum.disks or quorum.disks[qid].ldev_id is None:
            return
        self._clearing.add(qid)

        async def clear() -> None:
            try:
                own, _ = await quorum.slots(qid)
                if own is not None and own.flags & CLAIM:
                    await quorum.slots(qid, 0)
                    log.info("GAD quorum disk %s: claim withdrawn", qid)
            except VspError as e:
                log.warning("GAD quorum disk %s: the claim could not be withdrawn: %s", qid, e)
            finally:
                self._clearing.discard(qid)

        self.engine.background(clear())
