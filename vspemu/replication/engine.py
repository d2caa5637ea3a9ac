"""Pairs and copy groups of one storage system: records, operations, and the messages between the sides.

One :class:`Replication` per storage system. It keeps this side's records (see :mod:`.model`), attaches
the write path (:mod:`.datapath`) to paired volumes, drives copies from the primary, and talks to the
other system over the replication link (:mod:`.link`). The primary initiates the normal direction; after a
swap the roles and the direction reverse. Either side reaches the other through any working path group it
has to that system (a swap needs path groups in both directions, as on the array).

Messages (all handlers are idempotent, since the link may resend a request on another path):

=================  =====================================================================================
``pair.create``    the primary asks the secondary to check its S-VOL and record the pair
``pair.set``       one side tells the other the status it must take (e.g. S: SSUS, COPY, PAIR, PSUE)
``pair.state``     report this side's statuses and learn the other's (push after a change, and polling)
``pair.delete``    forget the pair on the other side
``pair.bitmap``    the other side's differential bitmap of a volume (merged before a resync)
``pair.swap``      reverse the roles of pairs (swap resync)
``data.write``     write (or zero) a range of an S-VOL: host writes in PAIR and copy chunks
``data.flush``     make the S-VOL durable
``data.extents``   the ranges of an S-VOL that hold data (an initial copy must zero them too)
``verify.sums``    per-track digests of an S-VOL (online verify, :mod:`.verify`)
=================  =====================================================================================
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vspemu.crashpoints import crash_point
from vspemu.errors import VspError, invalid, not_found
from vspemu.replication import peer_headers
from vspemu.replication.bitmap import DirtyBitmap, fsync_dir
from vspemu.replication.datapath import PairVolume, WriteBarrier, copy_marked_tracks
from vspemu.replication.link import Link, PathGroup
from vspemu.replication.model import (
    ACTIVE,
    COPY,
    FENCE_LEVELS,
    PAIR,
    PFUL,
    PFUS,
    PSUE,
    PSUS,
    SMPL,
    SSUS,
    SSWS,
    SUSPENDED,
    CopyGroup,
    Pair,
)
from vspemu.replication.ur import UniversalReplicator
from vspemu.replication.verify import Verifier
from vspemu.replication.wire import LinkError, PeerInfo, RemoteError
from vspemu.system.journals import Journals
from vspemu.system.storage import Ldev, StorageSystem
from vspemu.volumes.volume import Volume, VolumeIOError, WriteRefused

log = logging.getLogger(__name__)

POLL_INTERVAL = 2.0
ACTIVITY_CLEAR_INTERVAL = 2.0
STATUS_CALL_TIMEOUT = 5.0
RESTART_PATH_WAIT = 30.0
MAX_NAME = 31
MAX_GROUP_NAME = 29
EXTENT = struct.Struct("!QQ")


def remote_to_vsp(e: RemoteError) -> VspError:
    """A VspError raised by the other system's handler, as a VspError here (same message id and text)."""
    key = e.detail.get("key") if isinstance(e.detail, dict) else None
    err = VspError(key if isinstance(key, str) else "REMOTE_UNREACHABLE", detail=str(e))
    text = e.remote_message
    if text.startswith("KART"):
        text = text.split(" ", 1)[-1]
    err.message = f"{text} (on the remote storage system)"
    return err


class PairRuntime:
    """What a pair has in memory only: its copy task and who waits for it."""

    def __init__(self) -> None:
        self.copy_task: asyncio.Task[None] | None = None
        self.settled = asyncio.Event()  # set when a copy ends (PAIR or failure)
        self.bytes_sent = 0
        self.tracks_sent = 0


class _LocalWriteFailed(Exception):
    """A mirrored write's local write failed (its OSError is the cause), after the data went to the S side."""


class Replication:
    def __init__(self, system: StorageSystem, link: Link, remotes: Any, data_dir: Path, journals: Journals) -> None:
        self.system = system
        self.link = link
        self.remotes = remotes
        self.bitmap_dir = data_dir / "bitmaps"
        self.bitmap_dir.mkdir(parents=True, exist_ok=True)
        self.groups: dict[str, CopyGroup] = {}
        self.pairs: dict[str, Pair] = {}
        self.ldev_pairs: dict[int, list[Pair]] = {}  # an LDEV's pairs: one, or a P-VOL's (multi-target)
        self.bitmaps: dict[str, DirtyBitmap] = {}  # pair key -> the differential bitmap of its local volume
        self.runtime: dict[str, PairRuntime] = {}
        self.barriers: dict[str, WriteBarrier] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._create_locks: dict[str, asyncio.Lock] = {}
        self._poll_misses: dict[str, int] = {}
        for msg, handler in (("pair.create", self._h_create), ("pair.set", self._h_set),
                             ("pair.state", self._h_state), ("pair.delete", self._h_delete),
                             ("pair.bitmap", self._h_bitmap), ("pair.swap", self._h_swap),
                             ("data.write", self._h_write), ("data.flush", self._h_flush),
                             ("data.extents", self._h_extents)):
            link.register_handler(msg, handler)
        system.ldev_guards.append(self._guard_ldev)
        self.ur = UniversalReplicator(self, journals)
        self.verifier = Verifier(self)  # online verify; serves verify.sums (see .verify)
        for doc in system.store.load("copy_groups").values():
            g = CopyGroup(**doc)
            self.groups[g.name] = g
        for doc in system.store.load("pairs").values():
            p = Pair(**doc)
            self._index(p)

    # -- records ----------------------------------------------------------------------------------------
    def _index(self, pair: Pair, new: bool = False) -> None:
        """Index a pair and give its volume the write path; ``new``: a pair being created (a clean bitmap)."""
        self.pairs[pair.key] = pair
        self.ldev_pairs.setdefault(pair.local_ldev, []).append(pair)
        self.runtime.setdefault(pair.key, PairRuntime())
        vol = self.system.volumes.get(pair.local_ldev)
        if vol is not None:
            self.bitmaps[pair.key] = self._open_bitmap(pair, vol, new)
        self._attach(pair.local_ldev)

    def _unindex(self, pair: Pair) -> None:
        """Undo :meth:`_index` of a pair whose record was not committed."""
        self.pairs.pop(pair.key, None)
        self._detach(pair)
        self.runtime.pop(pair.key, None)

    def _open_bitmap(self, pair: Pair, vol: Volume, new: bool = False) -> DirtyBitmap:
        """The pair's bitmap file, named by LDEV and mirror unit (a P-VOL may be in several UR mirrors).

        A new pair starts with a clean bitmap. A recorded pair whose bitmap file is missing gets every track
        marked: what differs is unknown (see :mod:`.bitmap`: an invalid file loads as all marked too)."""
        path = self.bitmap_dir / f"{pair.local_ldev:05d}.mu{self.groups[pair.group].mu_number}.bmp"
        if new:
            return DirtyBitmap.create(path, vol.size)
        legacy = self.bitmap_dir / f"{pair.local_ldev:05d}.bmp"  # before multi-target: one bitmap per LDEV
        if not path.exists() and legacy.exists():
            legacy.rename(path)
            fsync_dir(self.bitmap_dir)
        if not path.exists():
            log.warning("pair %s has no bitmap file %s: every track is marked", pair.key, path)
            return DirtyBitmap.create(path, vol.size, marked=True)
        return DirtyBitmap.open(path, vol.size)

    def bitmap(self, pair: Pair) -> DirtyBitmap:
        return self.bitmaps[pair.key]

    def pairs_of(self, ldev_id: int) -> list[Pair]:
        return self.ldev_pairs.get(ldev_id, [])

    def _attach(self, ldev_id: int) -> None:
        """Give the volume the write path of its pairs (sorted by group: barriers are entered in that order)."""
        vol = self.system.volumes.get(ldev_id)
        ldev = self.system.ldevs.get(ldev_id)
        pairs = sorted(self.pairs_of(ldev_id), key=lambda p: p.group)
        if vol is not None:
            targets = [(p, self.bitmaps[p.key], self.barriers.setdefault(p.group, WriteBarrier())) for p in pairs]
            vol.replicator = PairVolume(self, targets) if targets else None
            vol.write_gate = self._gate(pairs) if pairs else None
        if ldev is not None:
            self.system.set_ldev_attribute(ldev, "HORC", bool(pairs))

    def _detach(self, pair: Pair) -> None:
        pairs = self.ldev_pairs.get(pair.local_ldev, [])
        pairs[:] = [x for x in pairs if x is not pair]
        if not pairs:
            self.ldev_pairs.pop(pair.local_ldev, None)
        bm = self.bitmaps.pop(pair.key, None)
        if bm is not None:
            bm.remove()
        self._attach(pair.local_ldev)

    @staticmethod
    def _gate(pairs: list[Pair]) -> Any:
        def gate(volume: Volume) -> None:
            for pair in pairs:
                if pair.role == "P":
                    if pair.fenced:
                        raise WriteRefused(f"P-VOL {volume.ldev_id} is fenced ({pair.fence}) after a failure")
                    if pair.pvol_write_protect:
                        raise WriteRefused(f"P-VOL {volume.ldev_id} was split with write protection")
                elif not pair.svol_writable:
                    raise WriteRefused(f"S-VOL {volume.ldev_id} is not writable in status {pair.status}")

        return gate

    def _save(self, pair: Pair) -> None:
        self.system.store.put("pairs", pair.key, pair.doc())

    def _save_group(self, group: CopyGroup) -> None:
        self.system.store.put("copy_groups", group.name, group.doc())

    def _guard_ldev(self, ldev: Ldev, action: str) -> None:
        for pair in self.pairs_of(ldev.ldev_id):
            if action == "expand" and pair.status in SUSPENDED:
                continue  # the array allows expanding split pair volumes (enhancedExpansion)
            raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is a {pair.role}-VOL of pair {pair.key}")

    def _check_pvol_free(self, pvol: int, group_name: str, replication_type: str, mu: int,
                         journal_id: int | None) -> None:
        """A volume is in one pair, except a P-VOL of a multi-target set-up: a UR P-VOL may be in up to four
        mirrors, one per mirror unit (muNumber) of the same master journal, since a data volume belongs to one
        journal; and beside those in one TrueCopy pair (3DC multi-target). TrueCopy has mirror unit 0, so the UR
        mirrors of such a volume use mirror units 1-3, as in the array's 3DC configurations (CCI MU# h1-h3).
        A cascade (an S-VOL that is also a P-VOL) is not supported."""
        for other in self.pairs_of(pvol):
            og = self.groups[other.group]
            if other.role != "P":
                raise VspError("IN_USE", detail=f"ldev {pvol} is already a pair volume ({other.role}-VOL of "
                                                f"pair {other.key})")
            if og.name == group_name:
                raise VspError("IN_USE", detail=f"ldev {pvol} is already a P-VOL of copy group {og.name}")
            if replication_type == "TC" and og.replication_type == "TC":
                raise VspError("IN_USE", detail=f"ldev {pvol} is already the P-VOL of TrueCopy pair {other.key}; "
                                                "a volume is in one TrueCopy pair")
            if replication_type == "UR" and og.replication_type == "UR":
                if og.local_journal_id != journal_id:
                    raise VspError("IN_USE", detail=f"ldev {pvol} is a data volume of journal "
                                                    f"{og.local_journal_id} (copy group {og.name}); a data volume "
                                                    "belongs to one journal")
                if og.mu_number == mu:
                    raise VspError("IN_USE", detail=f"ldev {pvol} is already a P-VOL of mirror {og.mu_number} "
                                                    f"(copy group {og.name})")
                continue
            # one TrueCopy pair and one UR pair (a TrueCopy group created with a muNumber keeps it, and the
            # bitmap files are named by mirror unit: see _open_bitmap)
            ur_mu, tc_mu = (mu, og.mu_number) if replication_type == "UR" else (og.mu_number, mu or 0)
            if ur_mu in (0, tc_mu):
                raise VspError("IN_USE", detail=f"ldev {pvol} is a P-VOL of TrueCopy and UR pairs (3DC "
                                                "multi-target): TrueCopy has mirror unit 0, so its UR mirrors "
                                                "use mirror units 1-3" + (f" other than {tc_mu}, the TrueCopy "
                                                                         "group's" if tc_mu else ""))

    def shares_volumes(self, pairs: list[Pair]) -> bool:
        """True if a volume of these pairs is also in a pair of another group (a multi-target P-VOL)."""
        return any(len(self.pairs_of(p.local_ldev)) > 1 for p in pairs)

    def _refuse_multi_target_swap(self, pairs: list[Pair]) -> None:
        if self.shares_volumes(pairs):
            raise VspError("WRONG_STATE", detail="a P-VOL of this copy group is in pairs of other copy groups too "
                                                 "(multi-target); vspemu does not reverse such pairs: delete the "
                                                 "other pairs first")

    def group_pairs(self, group: str) -> list[Pair]:
        return sorted((p for p in self.pairs.values() if p.group == group), key=lambda p: p.name)

    def get_group(self, name: str) -> CopyGroup:
        g = self.groups.get(name)
        if g is None:
            raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"copy group {name}")
        return g

    def get_pair(self, group: str, name: str) -> Pair:
        p = self.pairs.get(f"{group}/{name}")
        if p is None:
            raise not_found("copy pair", f"{group},{name}")
        return p

    def write_mode(self, pair: Pair) -> str:
        """How a host write to this pair's volume travels: "forward" (TC PAIR), "journal" (UR), or "local"."""
        if pair.role != "P":
            return "local"
        if self.groups[pair.group].replication_type == "TC":
            return "forward" if pair.status == PAIR else "local"
        return "journal" if pair.status in (PAIR, PFUL) else "local"

    # -- reaching the other side ------------------------------------------------------------------------
    def peer(self, group: CopyGroup) -> PathGroup | None:
        pg = self.link.path_group(group.remote_serial, group.path_group_id)
        if pg is not None and pg.active_paths:
            return pg
        for (serial, _gid), other in sorted(self.link.groups.items()):
            if serial == group.remote_serial and other.active_paths:
                return other
        return pg

    async def call(self, group: CopyGroup, msg: str, header: dict[str, Any], payload: bytes | memoryview = b"",
                   timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        pg = self.peer(group)
        if pg is None:
            raise VspError("REMOTE_UNREACHABLE",
                           detail=f"no remote path group to storage {group.remote_device_id}")
        try:
            return await pg.call(msg, header, payload, timeout)
        except RemoteError as e:
            raise remote_to_vsp(e) from e
        except LinkError as e:
            raise VspError("REMOTE_UNREACHABLE", detail=str(e)) from e

    async def _try_call(self, group: CopyGroup, msg: str, header: dict[str, Any]) -> dict[str, Any] | None:
        try:
            h, _ = await self.call(group, msg, header, timeout=STATUS_CALL_TIMEOUT)
            return h
        except VspError as e:
            log.info("%s to %s failed: %s", msg, group.remote_device_id, e)
            return None

    # -- status changes ---------------------------------------------------------------------------------
    def _set(self, pair: Pair, status: str, peer_status: str | None = None) -> None:
        pair.status = status
        if peer_status is not None:
            pair.peer_status = peer_status
        if status != COPY:
            rt = self.runtime.get(pair.key)
            if rt is not None and rt.copy_task is None:
                rt.settled.set()
        self._save(pair)

    async def _push_state(self, group: CopyGroup, pairs: Iterable[Pair]) -> bool:
        states = {p.name: p.status for p in pairs}
        h = await self._try_call(group, "pair.state", {"group": group.name, "states": states})
        if h is None:
            return False
        self._learn(group, h.get("states", {}))
        return True

    def _learn(self, group: CopyGroup, states: dict[str, str]) -> None:
        for name, st in states.items():
            p = self.pairs.get(f"{group.name}/{name}")
            if p is None or p.peer_status == st:
                continue
            p.peer_status = st
            if st == SMPL and p.role == "P" and p.status in ACTIVE:
                p.status = PSUS  # the pair was deleted from the S side (array: P -> PSUS)
            if st == SSWS and p.role == "P" and p.status in ACTIVE:
                p.status = PSUS  # the S side took over
            if p.role == "S" and p.status in ACTIVE and st in (PSUS, PSUE, PFUS):
                p.status = SSUS if st == PSUS else st  # the primary suspended while we could not hear it
            self._save(p)

    async def suspend_on_error(self, pair: Pair, reason: str) -> None:
        """The link or the S side failed: PSUE, and the fence level decides about host writes."""
        if pair.status == PSUE and pair.role == "P":
            return
        log.warning("pair %s suspended by error: %s", pair.key, reason)
        group = self.groups[pair.group]
        if group.replication_type == "UR":
            self.ur.purge(group)
        fences = pair.role == "P" and group.replication_type == "TC" and pair.fence in ("DATA", "STATUS")
        if fences:
            # fenced before the S side is told, not after: the other writes in flight that fail to copy
            # meanwhile, and new ones, must not be acknowledged uncopied (STATUS: until the S side knows)
            pair.fenced = True
        self._set(pair, PSUE)
        told = await self._try_call(group, "pair.set", {"group": group.name, "pairs": [pair.name],
                                                        "status": PSUE}) is not None
        if fences and pair.fence == "STATUS" and told and pair.status == PSUE:
            pair.fenced = False
            self._save(pair)

    # -- the data path (called by PairVolume) ------------------------------------------------------------
    async def forward_write(self, pair: Pair, rep: PairVolume, offset: int, length: int,
                            data: bytes | memoryview | None, fua: bool, write_local: Callable[[], None]) -> None:
        """Mirror one host write of a P-VOL in PAIR: the write is sent to the S-VOL first and ``write_local``
        (the P-VOL's own write) runs while the S side works on it; the host is answered after both."""
        group = self.groups[pair.group]
        pg = self.peer(group)
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
                                         "fua": fua, "zero": data is None, "from": self.system.serial},
                          b"" if data is None else data, sent=local)
        except (LinkError, VspError) as e:
            await self.suspend_on_error(pair, f"write forwarding failed: {e}")
            if not local_done:
                write_local()
            if pair.fenced:
                raise VolumeIOError(f"the write could not be copied to the S-VOL ({e})") from e
            # NEVER (or STATUS with the S side told): the bitmap already holds the mark
        except _LocalWriteFailed as e:
            # the P-VOL's own write failed after the S-VOL was sent the data: the volumes may differ where the
            # bitmap is marked (the activity extent), so the pair is suspended to keep that mark until a resync
            await self.suspend_on_error(pair, f"the P-VOL write failed: {e.__cause__}")
            raise e.__cause__ from None  # type: ignore[misc]

    async def forward_flush(self, pair: Pair) -> None:
        group = self.groups[pair.group]
        try:
            await self.call(group, "data.flush", {"ldev": pair.remote_ldev})
        except VspError as e:
            await self.suspend_on_error(pair, f"flush forwarding failed: {e}")
            if pair.fenced:
                raise VolumeIOError(str(e)) from e

    # -- copying (primary side) ---------------------------------------------------------------------------
    def start_copy(self, pair: Pair) -> None:
        rt = self.runtime[pair.key]
        rt.settled.clear()
        group = self.groups[pair.group]
        if group.replication_type == "UR":
            # the path watch starts again with the copy: an old silence must not suspend the renewed mirror
            self.ur.runtime(group).last_read = time.monotonic()
        if rt.copy_task is None or rt.copy_task.done():
            rt.copy_task = asyncio.get_running_loop().create_task(self._copy(pair))

    async def _copy(self, pair: Pair) -> None:
        rt = self.runtime[pair.key]
        group = self.groups[pair.group]
        vol = self.system.volumes[pair.local_ldev]
        bm = self.bitmap(pair)
        barrier = self.barriers[pair.group]
        pair.copy_total = bm.count()
        pair.copy_done = 0
        # recorded before the copier clears (and persists the clearing of) any mark: a recovered COPY pair
        # with a clean bitmap and no copy on record never copied anything (see start)
        pair.extra["copy_started"] = True
        self._save(pair)
        rt.bytes_sent = rt.tracks_sent = 0

        async def send(offset: int, data: bytes | None, length: int) -> None:
            pg = self.peer(group)
            if pg is None:
                raise LinkError("no path group")
            await pg.call("data.write", {"ldev": pair.remote_ldev, "offset": offset, "length": length,
                                         "zero": data is None, "copy": True, "from": self.system.serial},
                          b"" if data is None else data)
            rt.bytes_sent += 0 if data is None else length

        def progress(n: int) -> None:
            pair.copy_done += n
            rt.tracks_sent += n

        try:
            await self._wait_peer(group, RESTART_PATH_WAIT)
            while pair.status == COPY and pair.role == "P":
                await copy_marked_tracks(vol, bm, send, lambda: pair.copy_pace, progress)
                await barrier.hold()
                try:
                    if bm.count() or pair.status != COPY:
                        continue
                    await self.call(group, "data.flush", {"ldev": pair.remote_ldev})
                    await self.call(group, "pair.set", {"group": group.name, "pairs": [pair.name],
                                                        "status": PAIR})
                    pair.copy_done = pair.copy_total
                    self._set(pair, PAIR, PAIR)
                finally:
                    await barrier.release()
        except (LinkError, VspError) as e:
            if pair.status == COPY:
                await self.suspend_on_error(pair, f"copy failed: {e}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("copy of %s failed", pair.key)
            await self.suspend_on_error(pair, "internal error in the copy")
        finally:
            bm.sync()
            rt.copy_task = None
            rt.settled.set()

    async def _wait_peer(self, group: CopyGroup, timeout: float) -> None:
        """Give the paths to the other system a moment to connect (after a restart)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            pg = self.peer(group)
            if pg is not None and pg.active_paths:
                return
            await asyncio.sleep(0.1)

    async def wait_settled(self, pairs: list[Pair]) -> None:
        """Wait until no pair is copying (the job of a create or resync without NoWait)."""
        for p in pairs:
            rt = self.runtime.get(p.key)
            while rt is not None and p.status == COPY and p.key in self.pairs:
                rt.settled.clear()
                if rt.copy_task is None:
                    break
                await rt.settled.wait()
        failed = [p for p in pairs if p.status not in (PAIR, PFUL) and p.key in self.pairs]
        if failed:
            raise VspError("WRONG_STATE", detail=f"the copy of pair {failed[0].key} ended in {failed[0].status}")

    # -- background: polling and activity-mark clearing ----------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.ur.redo_after_restart()
        for pair in self.pairs.values():
            if pair.role != "P":
                continue
            if pair.status == PAIR and self.groups[pair.group].replication_type == "TC" and \
                    self.bitmap(pair).count():
                # after a restart, tracks marked while PAIR may differ: copy them before PAIR again
                self._set(pair, COPY)
            if pair.status == COPY:
                bm = self.bitmap(pair)
                if not bm.count() and not pair.extra.get("copy_started"):
                    # a COPY pair whose copy never started has nothing marked only if its bitmap was lost
                    # (a crash of an earlier version between the pair record and its bitmap): copy it all
                    log.warning("pair %s is COPY with nothing marked and no copy started: every track is "
                                "marked", pair.key)
                    bm.mark_all_sync()
                self.start_copy(pair)
        for coro in (self._poll_loop(), self._activity_loop(), self.ur.monitor()):
            t = loop.create_task(coro)
            self._tasks.add(t)

    def background(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for rt in self.runtime.values():
            if rt.copy_task is not None:
                rt.copy_task.cancel()
        for bm in self.bitmaps.values():
            bm.sync()
            bm.close()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            for group in list(self.groups.values()):
                pairs = self.group_pairs(group.name)
                if not pairs:
                    continue
                ok = await self._push_state(group, pairs)
                misses = self._poll_misses[group.name] = 0 if ok else self._poll_misses.get(group.name, 0) + 1
                if misses >= 2 and group.replication_type == "TC":
                    # an idle PAIR pair learns of a dead link here (a copy in progress learns it itself)
                    for p in pairs:
                        if p.role == "P" and p.status == PAIR:
                            await self.suspend_on_error(p, "the remote storage system does not answer")

    async def _activity_loop(self) -> None:
        """Clear the activity marks of PAIR P-VOLs that are idle or beyond the hot set (see datapath).

        Only with the group's WriteBarrier held: no write is in flight, and every earlier one was forwarded and
        acknowledged (a failed forward turned the pair PSUE before its write left the barrier), so the
        cleared extents cover nothing that differs. Marks the write path does not know of (none in PAIR,
        normally) are cleared as a whole, as before.
        """
        def due(p: Pair) -> PairVolume | None:
            bm = self.bitmaps.get(p.key)
            if p.role != "P" or p.status != PAIR or bm is None or not bm.count():
                return None
            rep = getattr(self.system.volumes.get(p.local_ldev), "replicator", None)
            return rep if isinstance(rep, PairVolume) and rep.bitmap is bm and rep.activity_due() else None

        while True:
            await asyncio.sleep(ACTIVITY_CLEAR_INTERVAL)
            for name, barrier in list(self.barriers.items()):
                if not any(due(p) for p in self.group_pairs(name)):
                    continue
                await barrier.hold()
                try:
                    for p in self.group_pairs(name):
                        rep = due(p)
                        if rep is not None:
                            rep.clear_activity()
                            await asyncio.to_thread(rep.bitmap.sync)
                finally:
                    await barrier.release()

    # -- operations (called by the API, inside jobs) ------------------------------------------------------
    async def create_pair(self, *, group_name: str, pair_name: str, replication_type: str,
                          remote_device_id: str, pvol: int, svol: int, new_group: bool,
                          local_dg: str | None, remote_dg: str | None, fence: str, copy_pace: int,
                          ctg_id: int | None, path_group_id: int | None, initial_copy: bool,
                          mu_number: int | None = None, pvol_journal: int | None = None,
                          svol_journal: int | None = None, wait: bool = True) -> tuple[CopyGroup, Pair]:
        lock = self._create_locks.setdefault(group_name, asyncio.Lock())
        async with lock:
            group, pair = await self._create_pair(
                group_name=group_name, pair_name=pair_name, replication_type=replication_type,
                remote_device_id=remote_device_id, pvol=pvol, svol=svol, new_group=new_group, local_dg=local_dg,
                remote_dg=remote_dg, fence=fence, copy_pace=copy_pace, ctg_id=ctg_id, path_group_id=path_group_id,
                initial_copy=initial_copy, mu_number=mu_number, pvol_journal=pvol_journal,
                svol_journal=svol_journal)
        if initial_copy and wait:
            await self.wait_settled([pair])
        return group, pair

    async def _create_pair(self, *, group_name: str, pair_name: str, replication_type: str,
                           remote_device_id: str, pvol: int, svol: int, new_group: bool,
                           local_dg: str | None, remote_dg: str | None, fence: str, copy_pace: int,
                           ctg_id: int | None, path_group_id: int | None, initial_copy: bool,
                           mu_number: int | None, pvol_journal: int | None,
                           svol_journal: int | None) -> tuple[CopyGroup, Pair]:
        system = self.system
        if not 1 <= len(group_name) <= MAX_GROUP_NAME or " " in group_name:
            raise invalid("copyGroupName", group_name, f"Specify 1 to {MAX_GROUP_NAME} characters, no spaces.")
        for attr, value in (("copyPairName", pair_name), ("localDeviceGroupName", local_dg),
                            ("remoteDeviceGroupName", remote_dg)):
            if value is not None and (not 1 <= len(value) <= MAX_NAME or " " in value or "," in value):
                raise invalid(attr, value, f"Specify 1 to {MAX_NAME} characters, no spaces or commas.")
        if "," in group_name:
            raise invalid("copyGroupName", group_name, "Commas are not allowed.")
        if replication_type == "UR":
            g = self.groups.get(group_name)
            self.ur.check_journal(pvol_journal if g is None else g.local_journal_id, group_name,
                                  mu_number or 0 if g is None else g.mu_number, "P")
        if replication_type == "TC" and fence not in FENCE_LEVELS:
            raise invalid("fenceLevel", fence, "Specify NEVER, DATA or STATUS for a TrueCopy pair.")
        remote = self.remotes.get(remote_device_id)
        group = self.groups.get(group_name)
        if new_group and group is not None:
            raise VspError("ALREADY_EXISTS", object_id=f"copy group {group_name}")
        if not new_group:
            if group is None:
                raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"copy group {group_name}")
            if group.remote_device_id != remote_device_id or group.replication_type != replication_type:
                raise VspError("WRONG_STATE", detail=f"copy group {group_name} is a {group.replication_type} "
                               f"group with storage {group.remote_device_id}")
            if local_dg not in (None, group.local_dg) or remote_dg not in (None, group.remote_dg):
                raise invalid("localDeviceGroupName", local_dg, "The device groups of the copy group differ.")
            if f"{group_name}/{pair_name}" in self.pairs:
                raise VspError("ALREADY_EXISTS", object_id=f"copy pair {group_name},{pair_name}")
            if any(p.role != "P" for p in self.group_pairs(group_name)):
                raise VspError("WRONG_STATE", detail="pairs can be added only on the primary side of the group")
        ldev = system.get_ldev(pvol)
        self._check_pvol_free(pvol, group_name, replication_type, mu_number if group is None else group.mu_number,
                              pvol_journal if group is None else group.local_journal_id)
        if "JNL" in ldev.extra_attributes:
            raise VspError("IN_USE", detail=f"ldev {pvol} is a journal volume")
        pgid = path_group_id if path_group_id is not None else (group.path_group_id if group else 0)
        pg = self.link.path_group(remote.serial, pgid)
        if pg is None:
            raise not_found("remote path group", f"{remote.serial},{remote.storage_type_id},{pgid}")
        if not pg.active_paths:
            raise VspError("REMOTE_UNREACHABLE", detail=f"remote path group {pgid} has no working path")
        if group is None:
            group = CopyGroup(name=group_name, local_dg=local_dg or f"{group_name}P_",
                              remote_dg=remote_dg or f"{group_name}S_", remote_device_id=remote_device_id,
                              remote_serial=remote.serial, replication_type=replication_type, role="P",
                              path_group_id=pgid, mu_number=mu_number or 0, local_journal_id=pvol_journal,
                              remote_journal_id=svol_journal, ctg_id=-1 if ctg_id is None else ctg_id)
        status = COPY if initial_copy else PAIR
        pair = Pair(group=group_name, name=pair_name, role="P", local_ldev=pvol, remote_ldev=svol,
                    status=status, peer_status=status, fence=fence, copy_pace=copy_pace)
        # the S side checks its volume and records the pair first: if it refuses, nothing changed here
        await self.call(group, "pair.create", {
            "group": group.peer_view(), "pair": pair.name, "pvol": pvol, "svol": svol, "size": ldev.size,
            "status": status, "fence": fence, "copy_pace": copy_pace, "new_group": new_group,
        })
        extents: list[tuple[int, int]] = []
        if initial_copy:
            try:
                _, payload = await self.call(group, "data.extents", {"ldev": svol})
            except VspError:
                await self._try_call(group, "pair.delete", {"group": group.name, "pairs": [pair.name]})
                raise
            extents = [EXTENT.unpack_from(payload, i) for i in range(0, len(payload), EXTENT.size)]
        # a P-VOL already in other mirrors: no write in flight on it while its write path changes and the
        # new pair's bitmap is filled from what the volume holds (a write that waits goes the new way)
        held = [self.barriers[p.group] for p in sorted(self.pairs_of(pvol), key=lambda p: p.group)]
        for barrier in held:
            await barrier.hold()
        try:
            # crash safety: the pair's bitmap is complete and durable BEFORE its record (COPY) is committed, so
            # a crash at any point leaves either no pair here or a pair whose bitmap marks all that must be
            # copied (without our record, the S side's is completed by the same create issued again, or
            # removed by a delete there; see docs/replication.md)
            new_group_record = group.name not in self.groups
            try:
                with system.store.transaction():
                    if new_group_record:
                        self.groups[group.name] = group
                        self._save_group(group)
                        if replication_type == "UR":
                            self.ur.start_mirror(group)
                    self._save(pair)
                    self._index(pair, new=True)
                    if initial_copy:
                        vol = system.volumes[pvol]
                        self.bitmap(pair).set_ranges([*vol.data_extents(), *extents])  # fsynced, dir too
                    crash_point("pair-create-before-commit")
            except BaseException:
                self._unindex(pair)
                if new_group_record:
                    self.groups.pop(group.name, None)
                    self.barriers.pop(group.name, None)
                    if replication_type == "UR":
                        self.ur.forget_group(group)
                raise
            crash_point("pair-create-after-commit")
            if initial_copy:
                self.start_copy(pair)
        finally:
            for barrier in reversed(held):
                await barrier.release()
        return group, pair

    def _select(self, group: CopyGroup, pair_name: str | None) -> list[Pair]:
        pairs = self.group_pairs(group.name)
        if pair_name is not None:
            pairs = [self.get_pair(group.name, pair_name)]
        elif not pairs:
            raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"copy group {group.name}")
        return pairs

    async def split(self, group_name: str, pair_name: str | None, *, svol_rw: bool = False,
                    ssws: bool = False, pvol_write_protect: bool = False) -> list[Pair]:
        """pairsplit: P -> PSUS / S -> SSUS (or SSWS with svolOperationMode SSWS)."""
        group = self.get_group(group_name)
        if group.replication_type == "UR":
            pair_name = None  # UR pairs are operated in units of mirrors
        pairs = self._select(group, pair_name)
        if ssws:
            return await self._swap_split(group, pairs)
        for p in pairs:
            if p.status == SMPL:
                raise VspError("WRONG_STATE", detail=f"pair {p.key} is SMPL")
        todo = [p for p in pairs if p.status in ACTIVE]
        if not todo:
            return pairs  # already split: accepted, no change (CCI acceptance rules)
        if group.replication_type == "UR" and todo[0].role == "S":
            await self.call(group, "jnl.split", {"group": group.name, "rw": svol_rw}, timeout=180)
            return pairs
        barrier = self.barriers[group.name]
        await barrier.hold()  # one consistent point across the group
        try:
            if group.replication_type == "UR" and todo[0].role == "P":
                # flush mode: the secondary restores everything journaled before the split
                if not await self.ur.drain(group):
                    self.ur.purge(group)
            for p in todo:
                rt = self.runtime[p.key]
                if rt.copy_task is not None:
                    rt.copy_task.cancel()
                if self.write_mode(p) == "forward":
                    # no write is in flight and every earlier one reached the S-VOL: the activity marks
                    # cover nothing that differs, so the resync will copy only what changes from now on
                    self.bitmap(p).clear_all()
            if todo[0].role == "P":
                h = await self._try_call(group, "pair.set", {"group": group.name, "pairs": [p.name for p in todo],
                                                             "status": SSUS, "writable": svol_rw})
                for p in todo:
                    p.pvol_write_protect = pvol_write_protect
                    self._set(p, PSUS, SSUS if h is not None else p.peer_status)
            else:  # issued on the S side: the S-VOL changes first, the P side follows when told
                for p in todo:
                    p.svol_writable = svol_rw
                    self._set(p, SSUS)
                await self._try_call(group, "pair.set", {"group": group.name, "pairs": [p.name for p in todo],
                                                         "status": PSUS, "peer": SSUS})
        finally:
            await barrier.release()
        return pairs

    async def _swap_split(self, group: CopyGroup, pairs: list[Pair]) -> list[Pair]:
        """svolOperationMode SSWS, on the S side: the S-VOL takes over (SSWS, writable)."""
        self._check_split(pairs, ssws=True)
        await self._take_over(group, pairs)
        return pairs

    async def _take_over(self, group: CopyGroup, pairs: list[Pair]) -> None:
        names = [p.name for p in pairs]
        h = await self._try_call(group, "pair.set", {"group": group.name, "pairs": names, "status": PSUS,
                                                     "peer": SSWS})
        for p in pairs:
            p.svol_writable = True
            p.swap_required = True
            self._set(p, SSWS, PSUS if h is not None else p.peer_status)

    async def takeover(self, group_name: str, pair_name: str | None, mode: str) -> list[Pair]:
        group = self.get_group(group_name)
        pairs = self._select(group, None if group.replication_type == "UR" else pair_name)
        if any(p.role != "S" for p in pairs):
            # horctakeover on the P side: nop, or PVOL-takeover (unfence) after a failure
            for p in pairs:
                if p.fenced:
                    p.fenced = False
                    self._save(p)
            return pairs
        if all(p.status == SSWS for p in pairs):
            return pairs
        if mode == "auto":
            # swap-takeover when the primary answers and the pairs are in sync; else SVOL-takeover
            h = await self._try_call(group, "pair.state", {"group": group.name, "states": {}})
            if h is not None and all(h.get("states", {}).get(p.name) in (PAIR, PFUL) for p in pairs) and \
                    await self._try_call(group, "pair.swap", {"group": group.name, "pairs": [p.name for p in pairs],
                                                              "to": "S", "check": True}) is not None:
                # (the primary refuses a swap when its P-VOLs feed other mirrors: then SVOL-takeover below)
                await self._take_over(group, pairs)
                await self._swap_resync(group, pairs, wait=True)
                return pairs
        await self._take_over(group, pairs)
        return pairs

    # -- status checks, also run by the API before it accepts a job (a refusal is then a plain 412) -----------
    @staticmethod
    def _check_resync(pairs: list[Pair], swap: bool) -> None:
        if swap:
            for p in pairs:
                swapped_and_running = p.role == "P" and p.status in ACTIVE and p.peer_status in ACTIVE \
                    and p.extra.get("swapped")
                if p.status not in SUSPENDED and not swapped_and_running:
                    raise VspError("WRONG_STATE", detail=f"pair {p.key} is {p.status}; split it before a swap resync")
            return
        if all(p.status in ACTIVE for p in pairs):
            return
        for p in pairs:
            if p.status == SSWS or p.peer_status == SSWS or p.swap_required:
                raise VspError("WRONG_STATE", detail=f"pair {p.key} was taken over by the S side (SSWS): "
                                                     "resynchronize with doSwapSvol")
            if p.role != "P":
                raise VspError("WRONG_STATE", detail="a resync must be issued to the storage system that holds "
                                                     "the P-VOL (or use doSwapSvol to reverse the direction)")

    @staticmethod
    def _check_split(pairs: list[Pair], ssws: bool) -> None:
        if ssws and any(p.role != "S" for p in pairs):
            raise VspError("WRONG_STATE", detail="svolOperationMode SSWS must be issued to the storage system "
                                                 "that holds the S-VOL")

    def precheck(self, op: str, group_name: str, pair_name: str | None, *, swap: bool = False,
                 ssws: bool = False) -> None:
        """The status checks of an operation, before its job is accepted (the job checks again)."""
        group = self.get_group(group_name)
        pairs = self._select(group, None if group.replication_type == "UR" else pair_name)
        if op == "resync":
            self._check_resync(pairs, swap)
        elif op == "split":
            self._check_split(pairs, ssws)

    async def resync(self, group_name: str, pair_name: str | None, *, swap: bool = False,
                     copy_pace: int | None = None, fence: str | None = None, wait: bool = True) -> list[Pair]:
        group = self.get_group(group_name)
        if group.replication_type == "UR":
            pair_name = None
        pairs = self._select(group, pair_name)
        if swap:
            return await self._swap_resync(group, pairs, wait)
        if all(p.status in ACTIVE for p in pairs):
            return pairs  # already resynchronizing or in PAIR: accepted, no change
        self._check_resync(pairs, swap=False)
        todo = [p for p in pairs if p.status in SUSPENDED]
        if copy_pace is not None or fence is not None:
            for p in pairs:
                p.copy_pace = copy_pace if copy_pace is not None else p.copy_pace
                p.fence = fence if fence is not None else p.fence
                self._save(p)
        await self._resync_from_here(group, todo)
        if wait:
            await self.wait_settled(todo)
        return pairs

    async def _resync_from_here(self, group: CopyGroup, todo: list[Pair]) -> None:
        """This side holds the P-VOLs: merge the S bitmaps, S to COPY, copy the marked tracks.

        Crash safety: each merge is durable (file and directory fsynced) before the S side is told to clear its
        bitmap, so a crash at any point keeps every S-side mark in one of the two bitmaps."""
        for p in todo:
            _, bits = await self.call(group, "pair.bitmap", {"group": group.name, "pair": p.name})
            self.bitmap(p).merge(bits)
        await self.call(group, "pair.set", {"group": group.name, "pairs": [p.name for p in todo],
                                            "status": COPY, "clear_bitmap": True})
        crash_point("pair-resync-after-clear")
        for p in todo:
            p.fenced = False
            p.pvol_write_protect = False
            p.swap_required = False
            p.copy_done = 0
            p.extra.pop("copy_started", None)
            self._set(p, COPY, COPY)
            self.start_copy(p)

    async def _swap_resync(self, group: CopyGroup, pairs: list[Pair], wait: bool) -> list[Pair]:
        """doSwapSvol: the S-VOLs become P-VOLs (from whichever side it is issued) and copy the differences."""
        self._check_resync(pairs, swap=True)
        self._refuse_multi_target_swap(pairs)
        if all(p.role == "S" for p in pairs):
            # this side becomes the primary (the other side refuses first if its P-VOLs are in other mirrors)
            await self.call(group, "pair.swap", {"group": group.name, "pairs": [p.name for p in pairs],
                                                 "to": "S", "check": True})
            for p in pairs:
                _, bits = await self.call(group, "pair.bitmap", {"group": group.name, "pair": p.name})
                self.bitmap(p).merge(bits)
            await self.call(group, "pair.swap", {"group": group.name, "pairs": [p.name for p in pairs],
                                                 "to": "S"})
            self._become(group, pairs, "P")
            await self._resync_after_swap(group, pairs)
        elif all(p.role == "P" for p in pairs):
            # issued on the P side (pairresync -swapp): the other side becomes the primary and copies
            if group.replication_type == "UR":
                self.ur.purge(group)
            for p in pairs:
                bits = self.bitmap(p).to_bytes()
                await self.call(group, "pair.bitmap", {"group": group.name, "pair": p.name, "merge": True}, bits)
            self._become(group, pairs, "S")
            await self.call(group, "pair.swap", {"group": group.name, "pairs": [p.name for p in pairs],
                                                 "to": "P", "resync": True})
        else:
            raise VspError("WRONG_STATE", detail="the pairs of the group are not all on the same side")
        if wait:
            await self._wait_remote_pair(group, pairs)
        return pairs

    def _become(self, group: CopyGroup, pairs: list[Pair], role: str) -> None:
        for p in pairs:
            p.role = role
            p.swap_required = False
            p.fenced = False
            p.pvol_write_protect = False
            p.svol_writable = False
            p.extra["swapped"] = True
            self._set(p, COPY, COPY)
            if role == "S":
                self.bitmap(p).clear_all()
        if all(p.role == role for p in self.group_pairs(group.name)):
            group.role = role  # journal ids stay with their systems; master and restore roles swap
            self._save_group(group)
            if group.replication_type == "UR" and role == "P":
                self.ur.start_mirror(group)

    async def _resync_after_swap(self, group: CopyGroup, pairs: list[Pair]) -> None:
        await self.call(group, "pair.set", {"group": group.name, "pairs": [p.name for p in pairs],
                                            "status": COPY})
        for p in pairs:
            p.copy_done = 0
            p.extra.pop("copy_started", None)
            self._set(p, COPY, COPY)
            self.start_copy(p)

    async def _wait_remote_pair(self, group: CopyGroup, pairs: list[Pair]) -> None:
        local_p = [p for p in pairs if p.role == "P"]
        if local_p:
            await self.wait_settled(local_p)
            return
        for _ in range(36000):
            if all(p.status in (PAIR, PFUL) or p.key not in self.pairs for p in pairs):
                return
            if any(p.status == PSUE for p in pairs):
                raise VspError("WRONG_STATE", detail="the copy after the swap failed (PSUE)")
            await asyncio.sleep(0.1)

    async def delete(self, group_name: str, pair_name: str | None) -> list[Pair]:
        group = self.get_group(group_name)
        if group.replication_type == "UR" and pair_name is not None:
            pass  # deleting a single UR pair is allowed (pairsplit -S of one volume)
        pairs = self._select(group, pair_name)
        for p in pairs:
            rt = self.runtime.get(p.key)
            if rt is not None and rt.copy_task is not None:
                rt.copy_task.cancel()
        names = [p.name for p in pairs]
        if any(p.role == "P" for p in pairs):
            await self._try_call(group, "pair.delete", {"group": group.name, "pairs": names})
        else:  # from the S side: S -> SMPL, the P side goes PSUS when it learns of it
            await self._try_call(group, "pair.state", {"group": group.name,
                                                       "states": dict.fromkeys(names, SMPL)})
        await self._forget_held(group, pairs)
        return pairs

    async def _forget_held(self, group: CopyGroup, pairs: list[Pair]) -> None:
        """Forget the pairs with the group's barrier held: no host write is in flight on their volumes (one
        that waits meanwhile goes on through the volume's new write path, see PairVolume)."""
        barrier = self.barriers.get(group.name)
        if barrier is None:
            self._forget(group, pairs)
            return
        await barrier.hold()
        try:
            self._forget(group, pairs)
        finally:
            await barrier.release()

    def _forget(self, group: CopyGroup, pairs: list[Pair]) -> None:
        with self.system.store.transaction():
            for p in pairs:
                self.pairs.pop(p.key, None)
                self._detach(p)
                self.runtime.pop(p.key, None)
                self.system.store.delete("pairs", p.key)
            if not self.group_pairs(group.name):
                if group.replication_type == "UR":
                    self.ur.forget_group(group)
                self.groups.pop(group.name, None)
                self.barriers.pop(group.name, None)
                self.system.store.delete("copy_groups", group.name)

    def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks (vspemu-private): what the last copy of each pair sent."""
        out: dict[str, Any] = {}
        for key, p in self.pairs.items():
            rt = self.runtime[key]
            bm = self.bitmaps.get(p.key)
            out[key] = {"role": p.role, "status": p.status, "peerStatus": p.peer_status,
                        "tracksSentLastCopy": rt.tracks_sent, "bytesSentLastCopy": rt.bytes_sent,
                        "markedTracks": bm.count() if bm else 0, "copying": rt.copy_task is not None}
        mirrors = {g.name: self.ur.lag(g) for g in self.groups.values() if g.replication_type == "UR"}
        return {"pairs": out, "mirrors": mirrors}

    # -- handlers: what the other side asks of this one -------------------------------------------------------
    def _peer_group(self, peer: PeerInfo, name: str) -> CopyGroup:
        group = self.groups.get(str(name))
        if group is None or group.remote_device_id != peer.storage_device_id:
            raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"copy group {name}")
        return group

    async def _h_create(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        h = peer_headers.create_header(h)  # every field type- and range-checked (a bad one: an ERROR reply)
        gdoc = dict(h["group"])
        gdoc["remote_device_id"] = peer.storage_device_id
        gdoc["remote_serial"] = self.remotes.get(peer.storage_device_id).serial
        incoming = CopyGroup(**gdoc)
        svol = int(h["svol"])
        key = f"{incoming.name}/{h['pair']}"
        existing = self.pairs.get(key)
        if existing is not None and existing.local_ldev == svol and existing.role == "S":
            return {}, b""  # a resent request
        group = self.groups.get(incoming.name)
        if group is not None and (group.remote_device_id != peer.storage_device_id or h.get("new_group")):
            raise VspError("ALREADY_EXISTS", object_id=f"copy group {incoming.name} on the secondary")
        if key in self.pairs:
            raise VspError("ALREADY_EXISTS", object_id=f"copy pair {incoming.name},{h['pair']} on the secondary")
        ldev = self.system.get_ldev(svol)
        if self.pairs_of(svol):
            raise VspError("IN_USE", detail=f"S-VOL {svol} is already a pair volume")
        if "JNL" in ldev.extra_attributes:
            raise VspError("IN_USE", detail=f"S-VOL {svol} is a journal volume")
        if ldev.size != int(h["size"]):
            raise VspError("WRONG_STATE", detail=f"the S-VOL {svol} ({ldev.size} bytes) and the P-VOL "
                                                 f"({h['size']} bytes) differ in size")
        if incoming.replication_type == "UR":
            self.ur.check_journal(incoming.local_journal_id, incoming.name, incoming.mu_number, "S")
        pair = Pair(group=incoming.name, name=str(h["pair"]), role="S", local_ldev=svol, remote_ldev=int(h["pvol"]),
                    status=str(h["status"]), peer_status=str(h["status"]), fence=str(h["fence"]),
                    copy_pace=int(h["copy_pace"]))
        try:
            with self.system.store.transaction():
                if group is None:
                    self.groups[incoming.name] = incoming
                    self._save_group(incoming)
                self._save(pair)
                self._index(pair, new=True)  # the bitmap file is there before the record is committed
        except BaseException:
            self._unindex(pair)
            if group is None:
                self.groups.pop(incoming.name, None)
                self.barriers.pop(incoming.name, None)
            raise
        if incoming.replication_type == "UR":
            self.ur.ensure_restore(self.groups[incoming.name])
        return {}, b""

    async def _h_set(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        group = self._peer_group(peer, h["group"])
        status = peer_headers.status(h["status"])
        states: dict[str, str] = {}
        for name in peer_headers.names(h["pairs"]):
            p = self.pairs.get(f"{group.name}/{name}")
            if p is None:
                continue
            if h.get("clear_bitmap"):
                self.bitmap(p).clear_all()
            if "writable" in h:
                p.svol_writable = bool(h["writable"])
            if status in (COPY, PAIR) and p.role == "S":
                p.svol_writable = False
                p.swap_required = False
            if status == SSUS and p.role == "S" and p.status == SSWS:
                states[name] = p.status  # a takeover is not undone by a split
                continue
            self._set(p, status, peer_headers.status(h.get("peer", _peer_status_of_sender(status))))
            states[name] = p.status
        return {"states": states}, b""

    async def _h_state(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        group = self.groups.get(str(h["group"]))
        if group is None or group.remote_device_id != peer.storage_device_id:
            return {"states": {name: SMPL for name in h.get("states", {})}}, b""
        self._learn(group, {str(k): str(v) for k, v in h.get("states", {}).items()})
        return {"states": {p.name: p.status for p in self.group_pairs(group.name)}}, b""

    async def _h_delete(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        group = self.groups.get(str(h["group"]))
        if group is None or group.remote_device_id != peer.storage_device_id:
            return {}, b""
        pairs = [p for p in self.group_pairs(group.name) if p.name in h["pairs"]]
        await self._forget_held(group, pairs)
        return {}, b""

    async def _h_bitmap(self, peer: PeerInfo, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        group = self._peer_group(peer, h["group"])
        p = self.get_pair(group.name, str(h["pair"]))
        if group.replication_type == "UR":
            self.ur.purge(group)  # journaled writes the other side never restored differ too
        bm = self.bitmap(p)
        if h.get("merge"):
            bm.merge(payload)
            return {}, b""
        return {"marked": bm.count()}, bm.to_bytes()

    async def _h_swap(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        group = self._peer_group(peer, h["group"])
        pairs = [self.get_pair(group.name, n) for n in peer_headers.names(h["pairs"])]
        self._refuse_multi_target_swap(pairs)
        if h.get("check"):
            return {}, b""
        role = peer_headers.role(h["to"])
        if all(p.role == role and p.extra.get("swapped") for p in pairs) and not h.get("resync"):
            return {}, b""
        self._become(group, pairs, role)
        if role == "P" and h.get("resync"):
            await self._resync_after_swap(group, pairs)
        return {}, b""

    def _svol_for_peer(self, peer: PeerInfo, ldev_id: int) -> Pair:
        pairs = self.ldev_pairs.get(ldev_id)
        p = pairs[0] if pairs else None  # (an S-VOL is in one pair only: if the first is not an S pair, none is)
        group = self.groups.get(p.group) if p else None
        if p is None or group is None or group.remote_device_id != peer.storage_device_id or p.role != "S":
            raise VspError("WRONG_STATE", detail=f"ldev {ldev_id} is not an S-VOL of a pair with "
                                                 f"{peer.storage_device_id}")
        if p.status == SSWS or p.svol_writable:
            raise VspError("WRONG_STATE", detail=f"S-VOL {ldev_id} is {p.status} and no longer accepts updates")
        return p

    @Link.inline_handler  # runs in the link's receive callback; never needs asyncio.current_task()
    async def _h_write(self, peer: PeerInfo, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        ldev_id = int(h["ldev"])
        self._svol_for_peer(peer, ldev_id)
        vol = self.system.volumes[ldev_id]
        offset, length = int(h["offset"]), int(h["length"])
        if not vol.check_range(offset, length):
            raise invalid("offset", offset, "beyond the end of the S-VOL")
        if h.get("zero"):
            vol.discard_local(offset, length)
        elif h.get("copy") and len(payload) >= 1 << 20:
            from vspemu.replication.datapath import write_copy_chunk  # (local: engine's imports are not mine)

            await write_copy_chunk(vol, offset, payload)  # O_DIRECT in a worker thread (see datapath)
        else:
            vol.write_local(offset, payload)
        if h.get("fua"):
            await vol.flush_local()
        return {}, b""

    async def _h_flush(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        ldev_id = int(h["ldev"])
        self._svol_for_peer(peer, ldev_id)
        await self.system.volumes[ldev_id].flush_local()
        return {}, b""

    async def _h_extents(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        ldev_id = int(h["ldev"])
        vol = self.system.volumes.get(ldev_id)
        if vol is None:
            raise not_found("ldev", ldev_id)
        self._svol_for_peer(peer, ldev_id)
        return {}, b"".join(EXTENT.pack(o, n) for o, n in vol.data_extents())


def _peer_status_of_sender(status: str) -> str:
    """The status the sender (primary) has when it tells this side to take ``status``."""
    return {SSUS: PSUS, SSWS: PSUS}.get(status, status)
