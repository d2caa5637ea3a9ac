"""Pairs and copy groups of one storage system: records, operations, and the messages between the sides.

One :class:`Replication` per storage system. It keeps this side's records (see :mod:`.model`), attaches
the write path (:mod:`.datapath`) to paired volumes, drives copies from the primary, and talks to the
other system over the replication link (:mod:`.link`). The primary initiates the normal direction; after a
swap the roles and the direction reverse. Either side reaches the other through any working path group it
has to that system (a swap needs path groups in both directions, as on the array).

The messages between the sides are listed in :mod:`.peer`, which handles them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

from vspemu.crashpoints import crash_point
from vspemu.errors import VspError, invalid, not_found
from vspemu.replication import states
from vspemu.replication.copier import Copier
from vspemu.replication.datapath import PairVolume, Target
from vspemu.replication.gad import Gad
from vspemu.replication.kinds import ReplicationKind
from vspemu.replication.link import Link, PathGroup
from vspemu.replication.model import (
    COPY,
    PAIR,
    PFUL,
    PSUE,
    PSUS,
    SMPL,
    SSUS,
    SSWS,
    CopyGroup,
    Pair,
    status_digest,
)
from vspemu.replication.peer import EXTENT, PeerHandlers
from vspemu.replication.registry import PairRegistry
from vspemu.replication.truecopy import TrueCopy
from vspemu.replication.ur import UniversalReplicator
from vspemu.replication.verify import Verifier
from vspemu.replication.wire import LinkError, PeerInfo, RemoteError
from vspemu.system.journals import Journals
from vspemu.system.storage import StorageSystem

log = logging.getLogger(__name__)

POLL_INTERVAL = 2.0
STATUS_CALL_TIMEOUT = 5.0


def remote_to_vsp(e: RemoteError) -> VspError:
    """A VspError raised by the other system's handler, as a VspError here (same message id and text)."""
    key = e.detail.get("key") if isinstance(e.detail, dict) else None
    err = VspError(key if isinstance(key, str) else "REMOTE_UNREACHABLE", detail=str(e))
    text = e.remote_message
    if text.startswith("KART"):
        text = text.split(" ", 1)[-1]
    err.message = f"{text} (on the remote storage system)"
    return err


class Replication(PairRegistry):
    def __init__(self, system: StorageSystem, link: Link, remotes: Any, data_dir: Path, journals: Journals) -> None:
        super().__init__(system, data_dir)
        self.link = link
        self.remotes = remotes
        self._tasks: set[asyncio.Task[None]] = set()
        self._create_locks: dict[str, asyncio.Lock] = {}
        self._poll_misses: dict[str, int] = {}
        self.handlers = PeerHandlers(self)  # pair.* and data.* (see .peer)
        self.copier = Copier(self)
        self.tc = TrueCopy(self)
        self.ur = UniversalReplicator(self, journals)
        self.gad = Gad(self)  # GAD (see .gad): its write path in PAIR is active_write / active_flush
        self.kinds: dict[str, ReplicationKind] = {k.replication_type: k for k in (self.tc, self.ur, self.gad)}
        self.active_write, self.active_flush = self.gad.active_write, self.gad.active_flush
        self.forward_write = self.tc.forward_write  # (the write path calls these: no extra frame per write)
        self.forward_flush = self.tc.forward_flush
        self.verifier = Verifier(self)  # online verify; serves verify.sums (see .verify)
        for doc in system.store.load("copy_groups").values():
            g = CopyGroup(**doc)
            self.groups[g.name] = g
        for doc in system.store.load("pairs").values():
            p = Pair(**doc)
            self.index(p)

    def kind(self, group: CopyGroup) -> ReplicationKind:
        """The implementation of the group's replication type (see :mod:`.kinds`)."""
        kind = self.kinds.get(group.replication_type)
        if kind is None:
            raise invalid("replicationType", group.replication_type, "Specify TC or UR.")
        return kind

    def write_mode(self, pair: Pair) -> str:
        """How a host write to this pair's volume travels: "forward" (TC PAIR), "journal" (UR), or "local"."""
        return self.kinds[self.groups[pair.group].replication_type].write_mode(pair)

    def make_replicator(self, targets: list[Target]) -> PairVolume:
        return PairVolume(self, targets)

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

    async def try_call(self, group: CopyGroup, msg: str, header: dict[str, Any]) -> dict[str, Any] | None:
        try:
            h, _ = await self.call(group, msg, header, timeout=STATUS_CALL_TIMEOUT)
            return h
        except VspError as e:
            log.info("%s to %s failed: %s", msg, group.remote_device_id, e)
            return None

    # -- status changes ---------------------------------------------------------------------------------
    def set_status(self, pair: Pair, status: str, peer_status: str | None = None) -> None:
        pair.status = status
        if peer_status is not None:
            pair.peer_status = peer_status
        if status != COPY:
            rt = self.runtime.get(pair.key)
            if rt is not None and rt.copy_task is None:
                rt.settled.set()
        self.save(pair)

    async def _push_state(self, group: CopyGroup, pairs: Iterable[Pair]) -> bool:
        """Exchange statuses with the other side. First only digests of both views (a few bytes, whatever
        the number of pairs); the statuses themselves only where a view differs (see :func:`status_digest`):
        the other side answers with its statuses if this side's view of them is stale, and this side sends
        its own if the other side's view is (``need``)."""
        pairs = list(pairs)
        h = await self.try_call(group, "pair.state", {
            "group": group.name, "digest": status_digest((p.name, p.status) for p in pairs),
            "peer_digest": status_digest((p.name, p.peer_status) for p in pairs)})
        if h is None:
            return False
        if "states" in h:  # the other side's statuses differ from what this side knows: learn them now
            self.learn(group, h["states"] if isinstance(h["states"], dict) else {})
        if h.get("same") is True or h.get("need") is False:
            return True  # the other side knows this side's statuses: the full exchange would change nothing
        states = {p.name: p.status for p in pairs}
        h = await self.try_call(group, "pair.state", {"group": group.name, "states": states})
        if h is None:
            return False
        self.learn(group, h.get("states", {}))
        return True

    def learn(self, group: CopyGroup, statuses: dict[str, str]) -> None:
        with self.system.store.transaction():  # (one commit for the group, not one per pair)
            for name, st in statuses.items():
                p = self.pairs.get(f"{group.name}/{name}")
                if p is None or p.peer_status == st:
                    continue
                p.peer_status = st
                p.status = states.on_peer_status(p, st)  # e.g. deleted or taken over there: PSUS (see .states)
                self.save(p)

    async def suspend_on_error(self, pair: Pair, reason: str) -> None:
        """The link or the S side failed: PSUE, and the fence level decides about host writes."""
        if pair.status == PSUE and pair.role == "P":
            return
        log.warning("pair %s suspended by error: %s", pair.key, reason)
        group = self.groups[pair.group]
        fences = self.kind(group).before_suspend(group, pair)  # (UR: the journal's entries become marks)
        if fences:
            # fenced before the S side is told, not after: the other writes in flight that fail to copy
            # meanwhile, and new ones, must not be acknowledged uncopied (STATUS: until the S side knows)
            pair.fenced = True
        self.set_status(pair, PSUE)
        told = await self.try_call(group, "pair.set", {"group": group.name, "pairs": [pair.name],
                                                        "status": PSUE}) is not None
        if fences and pair.fence == "STATUS" and told and pair.status == PSUE:
            pair.fenced = False
            self.save(pair)

    # -- background: restart, polling, the kinds' loops ------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.ur.redo_after_restart()
        for pair in self.pairs.values():
            if pair.role != "P":
                continue
            if self.kind(self.groups[pair.group]).copy_after_restart(pair, self.bitmap(pair).count()):
                # after a restart, tracks marked while PAIR may differ: copy them before PAIR again
                self.set_status(pair, COPY)
            if pair.status == COPY:
                bm = self.bitmap(pair)
                if not bm.count() and not pair.extra.get("copy_started"):
                    # a COPY pair whose copy never started has nothing marked only if its bitmap was lost
                    # (a crash of an earlier version between the pair record and its bitmap): copy it all
                    log.warning("pair %s is COPY with nothing marked and no copy started: every track is "
                                "marked", pair.key)
                    bm.mark_all_sync()
                self.copier.start_copy(pair)
        loops: list[Coroutine[Any, Any, None]] = [self._poll_loop()]
        for kind in self.kinds.values():
            loops += kind.background_tasks()
        for coro in loops:
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
                if misses >= 2:
                    await self.kind(group).peer_silent(group, pairs)


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
            await self.copier.wait_settled([pair])
        return group, pair

    async def _create_pair(self, *, group_name: str, pair_name: str, replication_type: str,
                           remote_device_id: str, pvol: int, svol: int, new_group: bool,
                           local_dg: str | None, remote_dg: str | None, fence: str, copy_pace: int,
                           ctg_id: int | None, path_group_id: int | None, initial_copy: bool,
                           mu_number: int | None, pvol_journal: int | None,
                           svol_journal: int | None) -> tuple[CopyGroup, Pair]:
        system = self.system
        self.check_names(group_name, pair_name, local_dg, remote_dg)
        kind = self.kinds.get(replication_type)
        if kind is None:
            raise invalid("replicationType", replication_type, "Specify TC or UR.")
        kind.check_create(group_name, self.groups.get(group_name), fence, mu_number, pvol_journal)
        remote = self.remotes.get(remote_device_id)
        group = self.groups.get(group_name)
        self.check_group_for_new_pair(group_name, group, pair_name, new_group, replication_type, remote_device_id,
                                      local_dg, remote_dg)
        ldev = system.get_ldev(pvol)
        system.check_remote_pair_volume(ldev, "P")  # e.g. a ShadowImage or Thin Image S-VOL
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
                await self.try_call(group, "pair.delete", {"group": group.name, "pairs": [pair.name]})
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
                        self.save_group(group)
                        kind.group_created(group)
                    self.save(pair)
                    self.index(pair, new=True)
                    if initial_copy:
                        vol = system.volumes[pvol]
                        self.bitmap(pair).set_ranges([*vol.data_extents(), *extents])  # fsynced, dir too
                    crash_point("pair-create-before-commit")
            except BaseException:
                self.unindex(pair)
                if new_group_record:
                    self.groups.pop(group.name, None)
                    self.barriers.pop(group.name, None)
                    kind.group_forgotten(group)
                raise
            crash_point("pair-create-after-commit")
            if initial_copy:
                self.copier.start_copy(pair)
        finally:
            for barrier in reversed(held):
                await barrier.release()
        return group, pair

    async def split(self, group_name: str, pair_name: str | None, *, svol_rw: bool = False,
                    ssws: bool = False, pvol_write_protect: bool = False) -> list[Pair]:
        """pairsplit: P -> PSUS / S -> SSUS (or SSWS with svolOperationMode SSWS)."""
        group = self.get_group(group_name)
        kind = self.kind(group)
        pairs = self.select(group, None if kind.whole_group else pair_name)  # UR: in units of mirrors
        if ssws:
            return await self._swap_split(group, pairs)
        outs = states.check(self.table(group), pairs, states.SPLIT)
        todo = [p for p, out in zip(pairs, outs, strict=True) if out != states.NO_CHANGE]
        if not todo:
            return pairs  # already split: accepted, no change (CCI acceptance rules)
        if todo[0].role == "S" and await kind.split_on_secondary(group, svol_rw):
            return pairs  # (UR: the primary splits the mirror, see UniversalReplicator.split_on_secondary)
        barrier = self.barriers[group.name]
        await barrier.hold()  # one consistent point across the group
        try:
            if todo[0].role == "P":
                await kind.before_split(group)  # (UR, flush mode: the secondary restores all journaled)
            for p in todo:
                rt = self.runtime[p.key]
                if rt.copy_task is not None:
                    rt.copy_task.cancel()
                if self.write_mode(p) == "forward":
                    # no write is in flight and every earlier one reached the S-VOL: the activity marks
                    # cover nothing that differs, so the resync will copy only what changes from now on
                    self.bitmap(p).clear_all()
            if todo[0].role == "P":
                h = await self.try_call(group, "pair.set", {"group": group.name, "pairs": [p.name for p in todo],
                                                             "status": SSUS, "writable": svol_rw})
                with self.system.store.transaction():  # one commit for the group operation
                    for p in todo:
                        p.pvol_write_protect = pvol_write_protect
                        self.set_status(p, PSUS, SSUS if h is not None else p.peer_status)
            else:  # issued on the S side: the S-VOL changes first, the P side follows when told
                with self.system.store.transaction():
                    for p in todo:
                        p.svol_writable = svol_rw
                        self.set_status(p, SSUS)
                await self.try_call(group, "pair.set", {"group": group.name, "pairs": [p.name for p in todo],
                                                         "status": PSUS, "peer": SSUS})
        finally:
            await barrier.release()
        return pairs

    async def _swap_split(self, group: CopyGroup, pairs: list[Pair]) -> list[Pair]:
        """svolOperationMode SSWS, on the S side: the S-VOL takes over (SSWS, writable)."""
        self._check_split(group, pairs, ssws=True)
        await self._take_over(group, pairs)
        return pairs

    async def _take_over(self, group: CopyGroup, pairs: list[Pair]) -> None:
        names = [p.name for p in pairs]
        h = await self.try_call(group, "pair.set", {"group": group.name, "pairs": names, "status": PSUS,
                                                     "peer": SSWS})
        with self.system.store.transaction():
            for p in pairs:
                p.svol_writable = True
                p.swap_required = True
                self.set_status(p, SSWS, PSUS if h is not None else p.peer_status)

    async def takeover(self, group_name: str, pair_name: str | None, mode: str) -> list[Pair]:
        group = self.get_group(group_name)
        pairs = self.select(group, None if self.kind(group).whole_group else pair_name)
        if any(p.role != "S" for p in pairs):
            # horctakeover on the P side: nop, or PVOL-takeover (unfence) after a failure
            for p in pairs:
                if p.fenced:
                    p.fenced = False
                    self.save(p)
            return pairs
        if all(out == states.NO_CHANGE for out in states.check(self.table(group), pairs, states.TAKEOVER)):
            return pairs  # already SSWS
        if mode == "auto":
            # swap-takeover when the primary answers and the pairs are in sync; else SVOL-takeover
            h = await self.try_call(group, "pair.state", {"group": group.name, "states": {}})
            if h is not None and all(h.get("states", {}).get(p.name) in (PAIR, PFUL) for p in pairs) and \
                    await self.try_call(group, "pair.swap", {"group": group.name, "pairs": [p.name for p in pairs],
                                                              "to": "S", "check": True}) is not None:
                # (the primary refuses a swap when its P-VOLs feed other mirrors: then SVOL-takeover below)
                await self._take_over(group, pairs)
                await self._swap_resync(group, pairs, wait=True)
                return pairs
        await self._take_over(group, pairs)
        return pairs

    # -- status checks, also run by the API before it accepts a job (a refusal is then a plain 412) -----------
    def table(self, group: CopyGroup) -> states.StateTable:
        """The state machine of the group's replication type (see :mod:`.states`)."""
        return self.kind(group).table

    def _check_resync(self, group: CopyGroup, pairs: list[Pair], swap: bool) -> list[states.Outcome]:
        if swap:
            return states.check(self.table(group), pairs, states.RESYNC_SWAP)
        if states.all_active(pairs):
            return [states.NO_CHANGE] * len(pairs)  # already resynchronizing or in PAIR: accepted, no change
        return states.check(self.table(group), pairs, states.RESYNC)

    def _check_split(self, group: CopyGroup, pairs: list[Pair], ssws: bool) -> None:
        if ssws:
            states.check(self.table(group), pairs, states.SPLIT_SSWS)

    def precheck(self, op: str, group_name: str, pair_name: str | None, *, swap: bool = False,
                 ssws: bool = False) -> None:
        """The status checks of an operation, before its job is accepted (the job checks again)."""
        group = self.get_group(group_name)
        pairs = self.select(group, None if self.kind(group).whole_group else pair_name)
        if op == "resync":
            self._check_resync(group, pairs, swap)
        elif op == "split":
            self._check_split(group, pairs, ssws)

    async def resync(self, group_name: str, pair_name: str | None, *, swap: bool = False,
                     copy_pace: int | None = None, fence: str | None = None, wait: bool = True) -> list[Pair]:
        group = self.get_group(group_name)
        pairs = self.select(group, None if self.kind(group).whole_group else pair_name)
        if swap:
            return await self._swap_resync(group, pairs, wait)
        outs = self._check_resync(group, pairs, swap=False)
        if all(out == states.NO_CHANGE for out in outs):
            return pairs  # already resynchronizing or in PAIR: accepted, no change
        todo = [p for p, out in zip(pairs, outs, strict=True) if out == COPY]
        if copy_pace is not None or fence is not None:
            with self.system.store.transaction():
                for p in pairs:
                    p.copy_pace = copy_pace if copy_pace is not None else p.copy_pace
                    p.fence = fence if fence is not None else p.fence
                    self.save(p)
        await self._resync_from_here(group, todo)
        if wait:
            await self.copier.wait_settled(todo)
        return pairs

    async def _resync_from_here(self, group: CopyGroup, todo: list[Pair]) -> None:
        """This side holds the P-VOLs: merge the S bitmaps, S to COPY, copy the marked tracks.

        Crash safety: each merge is durable (file and directory fsynced) before the S side is told to clear its
        bitmap, so a crash at any point keeps every S-side mark in one of the two bitmaps."""
        await self.handlers.merge_bitmaps(group, todo)
        await self.call(group, "pair.set", {"group": group.name, "pairs": [p.name for p in todo],
                                            "status": COPY, "clear_bitmap": True})
        crash_point("pair-resync-after-clear")
        with self.system.store.transaction():  # one commit for the group (before the job completes)
            for p in todo:
                p.fenced = False
                p.pvol_write_protect = False
                p.swap_required = False
                p.copy_done = 0
                p.extra.pop("copy_started", None)
                self.set_status(p, COPY, COPY)
        for p in todo:
            self.copier.start_copy(p)

    async def _swap_resync(self, group: CopyGroup, pairs: list[Pair], wait: bool) -> list[Pair]:
        """doSwapSvol: the S-VOLs become P-VOLs (from whichever side it is issued) and copy the differences."""
        self._check_resync(group, pairs, swap=True)
        self.refuse_multi_target_swap(pairs)
        if all(p.role == "S" for p in pairs):
            # this side becomes the primary (the other side refuses first if its P-VOLs are in other mirrors)
            await self.call(group, "pair.swap", {"group": group.name, "pairs": [p.name for p in pairs],
                                                 "to": "S", "check": True})
            await self.handlers.merge_bitmaps(group, pairs)
            await self.call(group, "pair.swap", {"group": group.name, "pairs": [p.name for p in pairs],
                                                 "to": "S"})
            self.become(group, pairs, "P")
            await self.resync_after_swap(group, pairs)
        elif all(p.role == "P" for p in pairs):
            # issued on the P side (pairresync -swapp): the other side becomes the primary and copies
            self.kind(group).before_swap(group)
            for p in pairs:
                bits = self.bitmap(p).to_bytes()
                await self.call(group, "pair.bitmap", {"group": group.name, "pair": p.name, "merge": True}, bits)
            self.become(group, pairs, "S")
            await self.call(group, "pair.swap", {"group": group.name, "pairs": [p.name for p in pairs],
                                                 "to": "P", "resync": True})
        else:
            raise VspError("WRONG_STATE", detail="the pairs of the group are not all on the same side")
        if wait:
            await self._wait_remote_pair(group, pairs)
        return pairs

    def become(self, group: CopyGroup, pairs: list[Pair], role: str) -> None:
        with self.system.store.transaction():
            self._become(group, pairs, role)

    def _become(self, group: CopyGroup, pairs: list[Pair], role: str) -> None:
        for p in pairs:
            p.role = role
            p.swap_required = False
            p.fenced = False
            p.pvol_write_protect = False
            p.svol_writable = False
            p.extra["swapped"] = True
            self.set_status(p, COPY, COPY)
            if role == "S":
                self.bitmap(p).clear_all()
        if all(p.role == role for p in self.group_pairs(group.name)):
            group.role = role  # journal ids stay with their systems; master and restore roles swap
            self.save_group(group)
            if role == "P":
                self.kind(group).became_primary(group)

    async def resync_after_swap(self, group: CopyGroup, pairs: list[Pair]) -> None:
        await self.call(group, "pair.set", {"group": group.name, "pairs": [p.name for p in pairs],
                                            "status": COPY})
        with self.system.store.transaction():
            for p in pairs:
                p.copy_done = 0
                p.extra.pop("copy_started", None)
                self.set_status(p, COPY, COPY)
        for p in pairs:
            self.copier.start_copy(p)

    async def _wait_remote_pair(self, group: CopyGroup, pairs: list[Pair]) -> None:
        local_p = [p for p in pairs if p.role == "P"]
        if local_p:
            await self.copier.wait_settled(local_p)
            return
        for _ in range(36000):
            if all(p.status in (PAIR, PFUL) or p.key not in self.pairs for p in pairs):
                return
            if any(p.status == PSUE for p in pairs):
                raise VspError("WRONG_STATE", detail="the copy after the swap failed (PSUE)")
            await asyncio.sleep(0.1)

    async def delete(self, group_name: str, pair_name: str | None) -> list[Pair]:
        group = self.get_group(group_name)  # (deleting a single UR pair is allowed: pairsplit -S of one volume)
        pairs = self.select(group, pair_name)
        for p in pairs:
            rt = self.runtime.get(p.key)
            if rt is not None and rt.copy_task is not None:
                rt.copy_task.cancel()
        names = [p.name for p in pairs]
        if any(p.role == "P" for p in pairs):
            await self.try_call(group, "pair.delete", {"group": group.name, "pairs": names})
        else:  # from the S side: S -> SMPL, the P side goes PSUS when it learns of it
            await self.try_call(group, "pair.state", {"group": group.name,
                                                       "states": dict.fromkeys(names, SMPL)})
        await self.forget_held(group, pairs)
        return pairs

    async def forget_held(self, group: CopyGroup, pairs: list[Pair]) -> None:
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
                self.kind(group).group_forgotten(group)
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
        mirrors = {g.name: st for g in self.groups.values() if (st := self.kind(g).mirror_stats(g)) is not None}
        return {"pairs": out, "mirrors": mirrors}

    # -- handlers: what the other side asks of this one -------------------------------------------------------
    def peer_group(self, peer: PeerInfo, name: str) -> CopyGroup:
        group = self.groups.get(str(name))
        if group is None or group.remote_device_id != peer.storage_device_id:
            raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"copy group {name}")
        return group
