"""The peer side of the replication messages: what the other storage system asks of this one.

The handlers of the engine's messages; each is idempotent, since the link may resend a request on another
path.

=================  =====================================================================================
``pair.create``    the primary asks the secondary to check its S-VOL and record the pair
``pair.set``       one side tells the other the status it must take (e.g. S: SSUS, COPY, PAIR, PSUE)
``pair.state``     report this side's statuses and learn the other's (push after a change, and polling)
``pair.delete``    forget the pair on the other side
``pair.bitmap``    the other side's differential bitmap of a volume (merged before a resync); with
                   ``pairs``, the bitmaps of several pairs in one reply (a group resync: one round trip)
``pair.swap``      reverse the roles of pairs (swap resync)
``data.write``     write (or zero) a range of an S-VOL: host writes in PAIR and copy chunks
``data.writev``    write several ranges of an S-VOL, their data one after the other (the scattered tracks
                   of a resync in one request)
``data.flush``     make the S-VOL durable
``data.extents``   the ranges of an S-VOL that hold data (an initial copy must zero them too)
``verify.sums``    per-track digests of an S-VOL (online verify, :mod:`.verify`)
=================  =====================================================================================

``data.write`` is the end of the write path on the S side: it writes the S-VOL (see docs/architecture.md).
UR registers its own messages (``jnl.*``, :mod:`.ur`), the verifier ``verify.sums`` (:mod:`.verify`).
"""

from __future__ import annotations

import struct
from typing import Any

from vspemu.errors import VspError, invalid, not_found
from vspemu.replication import peer_headers
from vspemu.replication.direct_write import write_copy_chunk, write_copy_runs
from vspemu.replication.kinds import PeerCore
from vspemu.replication.link import Link
from vspemu.replication.model import COPY, PAIR, PSUS, SMPL, SSUS, SSWS, CopyGroup, Pair, status_digest
from vspemu.replication.wire import PeerInfo

BITMAP_BATCH_BYTES = 16 << 20  # bitmaps asked for in one pair.bitmap round trip (a 1 TiB volume's is 512 KiB)
EXTENT = struct.Struct("!QQ")  # (offset, length) of a data extent in a data.extents reply


class PeerHandlers:
    """The handlers of the pair.* and data.* messages, registered on the link."""

    def __init__(self, engine: PeerCore) -> None:
        self.engine = engine
        for msg, handler in (("pair.create", self.h_create), ("pair.set", self.h_set),
                             ("pair.state", self.h_state), ("pair.delete", self.h_delete),
                             ("pair.bitmap", self.h_bitmap), ("pair.swap", self.h_swap),
                             ("data.write", self.h_write), ("data.writev", self.h_writev),
                             ("data.flush", self.h_flush),
                             ("data.extents", self.h_extents)):
            engine.link.register_handler(msg, handler)

    async def merge_bitmaps(self, group: CopyGroup, pairs: list[Pair]) -> None:
        """Merge the other side's bitmaps of these pairs into this side's (each merge durable when this
        returns): one ``pair.bitmap`` round trip per batch of pairs, not one per pair."""
        batch: list[Pair] = []
        size = 0
        for i, p in enumerate(pairs):
            batch.append(p)
            size += len(self.engine.bitmap(p).bits)
            if size < BITMAP_BATCH_BYTES and i + 1 < len(pairs):
                continue
            h, payload = await self.engine.call(group, "pair.bitmap", {"group": group.name,
                                                                "pairs": [x.name for x in batch]})
            sizes = h.get("sizes")
            if not isinstance(sizes, list) or len(sizes) != len(batch) or sum(sizes) != len(payload):
                raise VspError("REMOTE_UNREACHABLE", detail="the other system sent bad bitmaps")
            view, off = memoryview(payload), 0
            for x, n in zip(batch, sizes, strict=True):
                self.engine.bitmap(x).merge(view[off:off + n])
                off += n
            batch, size = [], 0

    async def h_create(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        h = peer_headers.create_header(h)  # every field type- and range-checked (a bad one: an ERROR reply)
        gdoc = dict(h["group"])
        gdoc["remote_device_id"] = peer.storage_device_id
        gdoc["remote_serial"] = self.engine.remotes.get(peer.storage_device_id).serial
        incoming = CopyGroup(**gdoc)
        svol = int(h["svol"])
        key = f"{incoming.name}/{h['pair']}"
        existing = self.engine.pairs.get(key)
        if existing is not None and existing.local_ldev == svol and existing.role == "S":
            return {}, b""  # a resent request
        group = self.engine.groups.get(incoming.name)
        if group is not None and (group.remote_device_id != peer.storage_device_id or h.get("new_group")):
            raise VspError("ALREADY_EXISTS", object_id=f"copy group {incoming.name} on the secondary")
        if key in self.engine.pairs:
            raise VspError("ALREADY_EXISTS", object_id=f"copy pair {incoming.name},{h['pair']} on the secondary")
        ldev = self.engine.system.get_ldev(svol)
        self.engine.system.check_remote_pair_volume(ldev, "S")
        if self.engine.pairs_of(svol):
            raise VspError("IN_USE", detail=f"S-VOL {svol} is already a pair volume")
        if "JNL" in ldev.extra_attributes:
            raise VspError("IN_USE", detail=f"S-VOL {svol} is a journal volume")
        if ldev.size != int(h["size"]):
            raise VspError("WRONG_STATE", detail=f"the S-VOL {svol} ({ldev.size} bytes) and the P-VOL "
                                                 f"({h['size']} bytes) differ in size")
        self.engine.kind(incoming).check_create_secondary(incoming)
        pair = Pair(group=incoming.name, name=str(h["pair"]), role="S", local_ldev=svol, remote_ldev=int(h["pvol"]),
                    status=str(h["status"]), peer_status=str(h["status"]), fence=str(h["fence"]),
                    copy_pace=int(h["copy_pace"]))
        try:
            with self.engine.system.store.transaction():
                if group is None:
                    self.engine.groups[incoming.name] = incoming
                    self.engine.save_group(incoming)
                self.engine.save(pair)
                self.engine.index(pair, new=True)  # the bitmap file is there before the record is committed
        except BaseException:
            self.engine.unindex(pair)
            if group is None:
                self.engine.groups.pop(incoming.name, None)
                self.engine.barriers.pop(incoming.name, None)
            raise
        self.engine.kind(incoming).secondary_created(self.engine.groups[incoming.name])
        return {}, b""

    async def h_set(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        group = self.engine.peer_group(peer, h["group"])
        status = peer_headers.status(h["status"])
        states: dict[str, str] = {}
        with self.engine.system.store.transaction():  # one commit for the group's pairs
            for name in peer_headers.names(h["pairs"]):
                p = self.engine.pairs.get(f"{group.name}/{name}")
                if p is None:
                    continue
                if h.get("clear_bitmap"):
                    self.engine.bitmap(p).clear_all()
                if "writable" in h:
                    p.svol_writable = bool(h["writable"])
                if status in (COPY, PAIR) and p.role == "S":
                    p.svol_writable = False
                    p.swap_required = False
                if status == SSUS and p.role == "S" and p.status == SSWS:
                    states[name] = p.status  # a takeover is not undone by a split
                    continue
                self.engine.set_status(p, status,
                                       peer_headers.status(h.get("peer", _peer_status_of_sender(status))))
                states[name] = p.status
        return {"states": states}, b""

    async def h_state(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        group = self.engine.groups.get(str(h["group"]))
        if "states" not in h and "digest" in h:  # the poll's first step: is a full exchange needed?
            if group is None or group.remote_device_id != peer.storage_device_id:
                return {}, b""
            pairs = self.engine.group_pairs(group.name)
            need = h["digest"] != status_digest((p.name, p.peer_status) for p in pairs)  # our view is stale
            if h.get("peer_digest") == status_digest((p.name, p.status) for p in pairs):
                return {"same": not need, "need": need}, b""
            return {"states": {p.name: p.status for p in pairs}, "need": need}, b""
        if group is None or group.remote_device_id != peer.storage_device_id:
            return {"states": {name: SMPL for name in h.get("states", {})}}, b""
        self.engine.learn(group, {str(k): str(v) for k, v in h.get("states", {}).items()})
        return {"states": {p.name: p.status for p in self.engine.group_pairs(group.name)}}, b""

    async def h_delete(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        group = self.engine.groups.get(str(h["group"]))
        if group is None or group.remote_device_id != peer.storage_device_id:
            return {}, b""
        pairs = [p for p in self.engine.group_pairs(group.name) if p.name in h["pairs"]]
        await self.engine.forget_held(group, pairs)
        return {}, b""

    async def h_bitmap(self, peer: PeerInfo, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        group = self.engine.peer_group(peer, h["group"])
        if "pairs" in h:  # several pairs' bitmaps, one after the other; "sizes" gives each one's length
            pairs = [self.engine.get_pair(group.name, n) for n in peer_headers.names(h["pairs"])]
            self.engine.kind(group).before_swap(group)
            blobs = [self.engine.bitmap(p).to_bytes() for p in pairs]
            return {"sizes": [len(b) for b in blobs]}, b"".join(blobs)
        p = self.engine.get_pair(group.name, str(h["pair"]))
        self.engine.kind(group).before_swap(group)  # (UR: journaled writes never restored differ too)
        bm = self.engine.bitmap(p)
        if h.get("merge"):
            bm.merge(payload)
            return {}, b""
        return {"marked": bm.count()}, bm.to_bytes()

    async def h_swap(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        group = self.engine.peer_group(peer, h["group"])
        pairs = [self.engine.get_pair(group.name, n) for n in peer_headers.names(h["pairs"])]
        self.engine.refuse_multi_target_swap(pairs)
        if h.get("check"):
            return {}, b""
        role = peer_headers.role(h["to"])
        if all(p.role == role and p.extra.get("swapped") for p in pairs) and not h.get("resync"):
            return {}, b""
        self.engine.become(group, pairs, role)
        if role == "P" and h.get("resync"):
            await self.engine.resync_after_swap(group, pairs)
        return {}, b""

    def svol_for_peer(self, peer: PeerInfo, ldev_id: int) -> Pair:
        pairs = self.engine.ldev_pairs.get(ldev_id)
        p = pairs[0] if pairs else None  # (an S-VOL is in one pair only: if the first is not an S pair, none is)
        group = self.engine.groups.get(p.group) if p else None
        if p is None or group is None or group.remote_device_id != peer.storage_device_id or p.role != "S":
            raise VspError("WRONG_STATE", detail=f"ldev {ldev_id} is not an S-VOL of a pair with "
                                                 f"{peer.storage_device_id}")
        if p.status == SSWS or p.svol_writable:
            raise VspError("WRONG_STATE", detail=f"S-VOL {ldev_id} is {p.status} and no longer accepts updates")
        return p

    @Link.inline_handler  # runs in the link's receive callback; never needs asyncio.current_task()
    async def h_write(self, peer: PeerInfo, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        ldev_id = int(h["ldev"])
        self.svol_for_peer(peer, ldev_id)
        vol = self.engine.system.volumes[ldev_id]
        offset, length = int(h["offset"]), int(h["length"])
        if not vol.check_range(offset, length):
            raise invalid("offset", offset, "beyond the end of the S-VOL")
        if h.get("zero"):
            vol.discard_local(offset, length)
        elif h.get("copy") and len(payload) >= 1 << 20:
            await write_copy_chunk(vol, offset, payload)  # O_DIRECT in a worker thread (see direct_write)
        else:
            vol.write_local(offset, payload)
        if h.get("fua"):
            await vol.flush_local()
        return {}, b""

    async def h_writev(self, peer: PeerInfo, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Copy chunks of several ranges in one request: every range is checked before any is written."""
        ldev_id = int(h["ldev"])
        self.svol_for_peer(peer, ldev_id)
        vol = self.engine.system.volumes[ldev_id]
        runs = h.get("runs")
        if not isinstance(runs, list) or not runs:
            raise invalid("runs", runs, "a list of [offset, length]")
        ranges: list[tuple[int, int]] = []
        for run in runs:
            if not (isinstance(run, list) and len(run) == 2 and all(type(x) is int and x >= 0 for x in run)) or \
                    not vol.check_range(run[0], run[1]):
                raise invalid("runs", run, "[offset, length] within the S-VOL")
            ranges.append((run[0], run[1]))
        if sum(n for _, n in ranges) != len(payload):
            raise invalid("runs", len(payload), "the lengths of the runs add up to the data sent")
        await write_copy_runs(vol, ranges, memoryview(payload))  # O_DIRECT where aligned (see direct_write)
        return {}, b""

    async def h_flush(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        ldev_id = int(h["ldev"])
        self.svol_for_peer(peer, ldev_id)
        await self.engine.system.volumes[ldev_id].flush_local()
        return {}, b""

    async def h_extents(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        ldev_id = int(h["ldev"])
        vol = self.engine.system.volumes.get(ldev_id)
        if vol is None:
            raise not_found("ldev", ldev_id)
        self.svol_for_peer(peer, ldev_id)
        return {}, b"".join(EXTENT.pack(o, n) for o, n in vol.data_extents())


def _peer_status_of_sender(status: str) -> str:
    """The status the sender (primary) has when it tells this side to take ``status``."""
    return {SSUS: PSUS, SSWS: PSUS}.get(status, status)
