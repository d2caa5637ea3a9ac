"""Universal Replicator: journaled writes, pull and restore in sequence order, journal full, path watch.

On the primary, a host write to a P-VOL in PAIR/PFUL is appended to the **master journal** (the local
journal of the copy group, a ring buffer on its journal volume, see :mod:`.journal`) and then written to
the P-VOL; the host is answered without waiting for the secondary. On the secondary a **restore loop**
pulls entries (``jnl.read``: "send me what follows sequence k; I have applied up to i and made durable up
to j"), applies them to the S-VOLs strictly in sequence order across every volume of the journal, and
reports with its next reads the applied sequence number (the lag, RPO) and the durable one; only entries up
to the durable number are freed on the primary. The S-VOLs of a journal are therefore always the image of
the P-VOLs at one earlier moment. The secondary makes its S-VOLs durable (fdatasync) in the background, at
most every :data:`.ur_restore.RESTORE_FLUSH_INTERVAL` seconds while entries keep coming and at once when it has caught
up, so pulling never waits for the disk (a flush per batch held the pull to the disk's flush rate).
A batch travels as the entries are stored in the journal (read with one ``pread``, sent without another
copy); the secondary checks each entry's CRC-32C, so the check covers the journal volume and the link. A
host write's entry is journaled **by reference** (its data stays in the P-VOL and is read from there when
pulled; a later write over a range whose entries are still in the journal first copies their data in: see
:mod:`.journal`), so a write costs the P-VOL write and a 64-byte header, not a second copy of its data.

- Usage over 80 %: the pairs show PFUL (still copying); with inflow control on, writes are slowed.
- A write that does not fit waits for room; if the journal stays full for dataOverflowWatchInSeconds the
  mirror is suspended (PFUS) and the journal's entries become bitmap marks (resync copies them).
- No read from the secondary for pathBlockadeWatchInMinutes (a cut link): PSUE, entries become marks.
- Split (flush mode): new writes are held, the secondary restores everything up to the last sequence
  number, then both sides go PSUS / SSUS: every S-VOL of the mirror shows the same cut.

vspemu keeps no restore-journal copy on the secondary: entries are applied on receipt and acknowledged
once durable, and a restarted secondary simply receives the unacknowledged entries again (a redo log).

**Multi-target.** A master journal serves up to four mirrors (mirror units, muNumber 0-3), each a copy group
to its own secondary; a P-VOL may be in one pair of each (3DC multi-target with UR). A host write is
journaled once, marked with the mirrors whose pair of that volume is in PAIR/PFUL (see :mod:`.journal`);
the pairs of the volume in other statuses mark their bitmaps instead. Each mirror's secondary pulls the whole
sequence: a run of entries not for its mirror arrives as a count only, so its restore stays in order. An
entry is freed once every mirror that still holds entries has restored it; a mirror that is suspended turns
its entries into bitmap marks and stops holding any (its *floor* in the journal header moves past them, so a
later resync never receives an entry from before it). Journal full (PFUS) suspends the mirrors that hold the
oldest entries, which frees room for the others. vspemu does not reverse (swap) a mirror whose P-VOLs are
in other mirrors. Beside its UR mirrors (on mirror units 1-3 then), a P-VOL may be in one TrueCopy pair (3DC
multi-target; the write path is :meth:`~vspemu.replication.datapath.PairVolume._update_all`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from vspemu.aio import wait_event
from vspemu.errors import VspError
from vspemu.replication import states
from vspemu.replication.journal import MasterJournal
from vspemu.replication.kinds import JOURNAL, LOCAL
from vspemu.replication.model import ACTIVE, COPY, PAIR, PFUL, PFUS, PSUE, CopyGroup, Pair
from vspemu.replication.ur_restore import PFUL_THRESHOLD, MirrorRuntime, Restorer
from vspemu.replication.wire import PeerInfo

if TYPE_CHECKING:
    from vspemu.replication.kinds import EngineCore
    from vspemu.system.journals import Journals
    from vspemu.volumes.volume import Volume

log = logging.getLogger(__name__)

READ_MAX_BYTES = 8 << 20
BY_REFERENCE = os.environ.get("VSPEMU_JOURNAL_BY_REFERENCE", "1") != "0"  # (see journal: entries by reference)
# Writes smaller than this are journaled with their data, not by reference: for a small write the copy into the
# journal costs less than the later read from the P-VOL, which the secondary's pull would do per entry (4 KiB
# QD1 latency: 226-283 us by reference vs 126-201 us stored, docs/benchmarks.md).
REF_MIN = 64 << 10
LONG_POLL = 0.5
MONITOR_INTERVAL = 0.2
FLUSH_TIMEOUT = 120.0


class UniversalReplicator:
    def __init__(self, engine: EngineCore, journals: Journals) -> None:
        self.engine = engine
        self.journals = journals
        self.masters: dict[int, MasterJournal] = {}  # journal id -> open master journal
        self.mirrors: dict[str, MirrorRuntime] = {}
        self.full_since: dict[int, float] = {}  # journal id -> since when a write waits for room
        self.room: dict[int, asyncio.Event] = {}  # journal id -> set when entries are freed
        self.held_full: set[int] = set()  # journals held full by a fault on demand
        self.restorer = Restorer(engine, self)  # the secondary's side
        engine.link.register_handler("jnl.read", self._h_read)
        engine.link.register_handler("jnl.split", self._h_split)
        journals.users.append(self._journal_user)
        journals.refreshers.append(self.refresh)

    # -- the ReplicationKind the engine calls (see .kinds) -----------------------------------------------
    replication_type = "UR"
    whole_group = True  # UR pairs are operated in units of mirrors

    @property
    def table(self) -> states.StateTable:
        return states.UNIVERSAL_REPLICATOR

    def write_mode(self, pair: Pair) -> str:
        return JOURNAL if pair.role == "P" and pair.status in (PAIR, PFUL) else LOCAL

    def check_create(self, group_name: str, group: CopyGroup | None, fence: str, mu_number: int | None,
                     journal_id: int | None) -> None:
        self.check_journal(journal_id if group is None else group.local_journal_id, group_name,
                           mu_number or 0 if group is None else group.mu_number, "P")

    def check_create_secondary(self, group: CopyGroup) -> None:
        self.check_journal(group.local_journal_id, group.name, group.mu_number, "S")

    def group_created(self, group: CopyGroup) -> None:
        self.start_mirror(group)

    def secondary_created(self, group: CopyGroup) -> None:
        self.ensure_restore(group)

    def group_forgotten(self, group: CopyGroup) -> None:
        self.forget_group(group)

    def became_primary(self, group: CopyGroup) -> None:
        self.start_mirror(group)

    def before_swap(self, group: CopyGroup) -> None:
        self.purge(group)  # journaled writes the other side never restored differ too

    def before_suspend(self, group: CopyGroup, pair: Pair) -> bool:
        self.purge(group)
        return False  # UR has no fence level

    def copy_starting(self, group: CopyGroup) -> None:
        # the path watch starts again with the copy: an old silence must not suspend the renewed mirror
        self.runtime(group).last_read = time.monotonic()

    def copy_after_restart(self, pair: Pair, marked: int) -> bool:
        return False  # a restarted primary serves the unacknowledged journal entries again

    async def peer_silent(self, group: CopyGroup, pairs: list[Pair]) -> None:
        return None  # the path watch (monitor) decides, after pathBlockadeWatchInMinutes

    async def before_split(self, group: CopyGroup) -> None:
        # flush mode: the secondary restores everything journaled before the split
        if not await self.drain(group):
            self.purge(group)

    async def split_on_secondary(self, group: CopyGroup, rw: bool) -> bool:
        await self.engine.call(group, "jnl.split", {"group": group.name, "rw": rw}, timeout=180)
        return True

    def mirror_stats(self, group: CopyGroup) -> dict[str, Any] | None:
        return self.lag(group)

    def background_tasks(self) -> list[Coroutine[Any, Any, None]]:
        return [self.monitor()]

    # -- journals ------------------------------------------------------------------------------------
    def _journal_user(self, journal: Any) -> str | None:
        for g in self.engine.groups.values():
            if g.replication_type == "UR" and g.local_journal_id == journal.journal_id:
                return f"copy group {g.name} (mirror {g.mu_number})"
        return None

    def check_journal(self, journal_id: int | None, group_name: str, mu: int, role: str) -> None:
        """A UR group's local journal must exist, not serve another group with the same mirror unit, and be a
        master journal (``role`` P) or a restore journal (S) for all its mirrors."""
        if journal_id is None:
            raise VspError("MISSING_PARAMETER", attribute="journalId")
        self.journals.get(journal_id)  # 404 if missing
        for g in self.engine.groups.values():
            if g.replication_type != "UR" or g.local_journal_id != journal_id or g.name == group_name:
                continue
            if g.mu_number == mu:
                raise VspError("IN_USE", detail=f"mirror {mu} of journal {journal_id} is used by copy group "
                                                f"{g.name}")
            if g.role != role:
                kind = "master" if g.role == "P" else "restore"
                raise VspError("IN_USE", detail=f"journal {journal_id} is the {kind} journal of copy group {g.name} "
                                                f"(mirror {g.mu_number}); a journal has one role for all its mirrors")

    def journal_groups(self, journal_id: int) -> list[CopyGroup]:
        """The mirrors (copy groups with pairs) whose master journal is ``journal_id`` on this side."""
        return [g for g in self.engine.groups.values() if g.replication_type == "UR" and g.role == "P"
                and g.local_journal_id == journal_id and self.engine.group_pairs(g.name)]

    def master(self, group: CopyGroup) -> MasterJournal:
        jid = group.local_journal_id
        assert jid is not None
        mj = self.masters.get(jid)
        if mj is None:
            j = self.journals.get(jid)
            vol = self.engine.system.volumes[j.ldev_ids[0]]
            mj = MasterJournal(vol.path, vol.size, self._read_pvol if BY_REFERENCE else None)
            mj.held_full = jid in self.held_full
            self.masters[jid] = mj
        return mj

    def runtime(self, group: CopyGroup) -> MirrorRuntime:
        rt = self.mirrors.get(group.name)
        if rt is None:
            rt = self.mirrors[group.name] = MirrorRuntime()
            if group.role == "P" and group.local_journal_id is not None:
                # (after a restart) the mirror may need every entry in the journal until its secondary says
                mj = self.master(group)
                rt.acked = max(mj.head_seq - 1, mj.floors[group.mu_number])
                rt.last_own = mj.last_seq
        return rt

    def hold_full(self, jid: int, held: bool) -> None:
        """Fault on demand (journal-full): the master journal behaves as full (its pairs PFUL now, PFUS once a
        write waited longer than the overflow watch), or normal again."""
        if held:
            self.held_full.add(jid)
        else:
            self.held_full.discard(jid)
        if jid in self.masters:
            self.masters[jid].held_full = held
        for g in self.journal_groups(jid):
            self.master(g).held_full = held
            self.refresh_group(g)
        if not held and jid in self.room:
            self.room[jid].set()

    def start_mirror(self, group: CopyGroup) -> None:
        """A mirror starts on this side as the primary (created, or reversed by a swap): no entry journaled
        so far is for it (an earlier mirror with this mirror unit may have left some behind)."""
        if group.local_journal_id is None:
            return
        mj = self.master(group)
        mj.set_floor(group.mu_number, mj.last_seq)
        rt = self.runtime(group)
        rt.acked = rt.last_own = mj.last_seq

    def forget_group(self, group: CopyGroup) -> None:
        rt = self.mirrors.pop(group.name, None)
        if rt is not None and rt.restore_task is not None:
            rt.restore_task.cancel()
        jid = group.local_journal_id
        others = [g for g in self.journal_groups(jid) if g.name != group.name] if jid is not None else []
        if jid is not None and jid in self.masters:
            if others:  # the other mirrors keep the journal; this one holds no entry any more
                if group.role == "P":
                    self.masters[jid].set_floor(group.mu_number, self.masters[jid].last_seq)
                self._release(jid)
            else:
                mj = self.masters.pop(jid)
                mj.reset()
                mj.close()
        if jid is not None and jid in self.journals.journals:
            if not others:
                self.journals.set_runtime(jid, usage_rate=0, q_count=0, num_of_active_paths=0)
            self.journals.set_runtime(jid, group.mu_number, journal_status="SMPL", is_data_copying=False,
                                      consistency_group_id=0, q_count=None)

    # -- the write path (primary) ------------------------------------------------------------------------
    async def journal_write(self, pairs: list[Pair], volume: Volume, offset: int, length: int,
                            data: bytes | memoryview | None, fua: bool) -> bool:
        """Journal a host write for ``pairs`` (the volume's pairs in PAIR/PFUL, one per mirror of one journal),
        then write it locally. False, with nothing written, if one of them left PAIR/PFUL meanwhile."""
        engine = self.engine
        groups = [engine.groups[p.group] for p in pairs]
        jid = groups[0].local_journal_id
        assert jid is not None
        mj = self.master(groups[0])
        j = self.journals.get(jid)
        if j.is_inflow_control_enabled and mj.usage_rate() >= PFUL_THRESHOLD:
            await asyncio.sleep(0.001 * (mj.usage_rate() - PFUL_THRESHOLD + 1))  # inflow control: slow down
        while not mj.fits(length, data is None):
            if any(p.status not in (PAIR, PFUL) for p in pairs):
                return False
            now = time.monotonic()
            since = self.full_since.setdefault(jid, now)
            if now - since >= j.data_overflow_watch_seconds:
                await self._overflow(jid)
                self.full_since.pop(jid, None)
                return False
            room = self.room.setdefault(jid, asyncio.Event())
            room.clear()
            await wait_event(room, 0.2)  # (no wait_for: host writes may run outside a task)
        if any(p.status not in (PAIR, PFUL) for p in pairs):
            return False
        self.full_since.pop(jid, None)
        mirrors = 0
        for g in groups:
            mirrors |= 1 << g.mu_number
        # entries by reference still in the P-VOL where this write goes get their data first (see journal)
        mj.protect(pairs[0].local_ldev, offset, length)
        seq = mj.append(pairs[0].local_ldev, offset, data, length, mirrors, ref=length >= REF_MIN)
        now = time.monotonic()
        runtimes = [self.runtime(g) for g in groups]
        for p, g, rt in zip(pairs, groups, runtimes, strict=True):
            rt.last_own = seq
            if (mj.usage_rate() >= PFUL_THRESHOLD) != (p.status == PFUL):
                self.refresh_group(g)  # PAIR <-> PFUL as the usage crosses 80 %
            if not rt.samples or now - rt.samples[-1][1] > 0.05:
                rt.samples.append((seq, now))
        if data is None:
            volume.discard_local(offset, length)
        else:
            volume.write_local(offset, data)
        for rt in runtimes:
            rt.new_entries.set()
        if fua:
            await asyncio.to_thread(mj.sync)
            await volume.flush_local()
        return True

    async def _overflow(self, jid: int) -> None:
        """The journal stayed full for dataOverflowWatchInSeconds: PFUS for the mirrors that hold its oldest
        entries (the others then find room)."""
        self._release(jid)  # (entries that no mirror needs go first)
        holding = [(self.runtime(g).acked, g) for g in self.journal_groups(jid) if self._holds(g)]
        if not holding and jid in self.held_full:  # held full on demand: no entry to blame, every mirror waits
            holding = [(0, g) for g in self.journal_groups(jid)]
        if not holding:
            return
        oldest = min(acked for acked, _ in holding)
        for acked, g in holding:
            if acked == oldest:
                await self.suspend_mirror(g, PFUS, "the journal stayed full longer than the overflow watch")

    async def flush(self, pair: Pair) -> None:
        group = self.engine.groups[pair.group]
        await asyncio.to_thread(self.master(group).sync)

    # -- pull (the primary's handler) -------------------------------------------------------------------
    async def _h_read(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes | memoryview]:
        group = self.engine.peer_group(peer, h["group"])
        if group.role != "P":
            raise VspError("WRONG_STATE", detail=f"copy group {group.name} is not a primary here")
        mj = self.master(group)
        rt = self.runtime(group)
        mu = group.mu_number
        rt.last_read = time.monotonic()
        restored = int(h.get("restored", 0))
        rt.applied = max(rt.applied, int(h.get("applied", restored)))
        if restored > rt.acked:
            rt.acked = restored
            rt.acked_event.set()
            self._release(group.local_journal_id)  # type: ignore[arg-type]
            self.refresh_group(group)
        first = max(int(h.get("from", 0)), mj.floors[mu] + 1)
        raw, first, count, own = mj.read_raw(first, READ_MAX_BYTES, mu)
        if not count and not h.get("nowait"):
            rt.new_entries.clear()
            try:
                await asyncio.wait_for(rt.new_entries.wait(), LONG_POLL)
            except TimeoutError:
                pass
            rt.last_read = time.monotonic()
            raw, first, count, own = mj.read_raw(first, READ_MAX_BYTES, mu)
        # the entries go as they are stored (no copy here); the secondary checks them and maps P-VOLs to
        # S-VOLs. A run of entries that are not for this mirror (other mirrors' bits, or up to its floor) goes
        # as a count only ("skip"): the secondary's restore still steps through every sequence number.
        svols = {str(p.local_ldev): p.remote_ldev for p in self.engine.group_pairs(group.name)}
        return {"count": count, "first": first, "skip": not own, "mu": mu, "floor": mj.floors[mu], "svols": svols,
                "lastSeq": mj.last_seq, "qCount": self._q_count(group, mj), "usage": mj.usage_rate(),
                "headSeq": max(mj.head_seq, mj.floors[mu] + 1), "nextSeq": first + count if count else 0}, raw

    def _read_pvol(self, ldev: int, offset: int, into: memoryview) -> None:
        """The bytes of a P-VOL for an entry by reference (with the host writes a Thin Image P-VOL has not
        written to its file yet); zeros if the LDEV is gone."""
        vol = self.engine.system.volumes.get(ldev)
        if vol is None:
            into[:] = bytes(len(into))
        else:
            vol.read_into(offset, into)

    async def _h_split(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        """A split issued on the secondary: the primary performs it (flush) for the whole mirror."""
        group = self.engine.peer_group(peer, h["group"])
        await self.engine.split(group.name, None, svol_rw=bool(h.get("rw")), pvol_write_protect=False)
        return {}, b""

    # -- restore (the secondary's loop, see .ur_restore) ---------------------------------------------------
    def ensure_restore(self, group: CopyGroup) -> None:
        self.restorer.ensure(group)

    # -- suspension ------------------------------------------------------------------------------------
    async def suspend_mirror(self, group: CopyGroup, status: str, reason: str) -> None:
        """PFUS / PSUE on the primary: the journal's entries become bitmap marks, then tell the secondary."""
        log.warning("mirror %s suspended (%s): %s", group.name, status, reason)
        self.purge(group)
        pairs = [p for p in self.engine.group_pairs(group.name) if p.status in ACTIVE]
        for p in pairs:
            self.engine.set_status(p, status)
        # tell the secondary without holding up the host write that found the journal full
        self.engine.background(self.engine.try_call(group, "pair.set", {
            "group": group.name, "pairs": [p.name for p in pairs], "status": status}))

    def purge(self, group: CopyGroup) -> None:
        """The mirror's entries not restored become bitmap marks; it holds no entry any more."""
        if group.role != "P" or group.local_journal_id is None:
            return
        self._mark_pending(group)
        self._release(group.local_journal_id)

    def _mark_pending(self, group: CopyGroup) -> None:
        mj = self.master(group)
        rt = self.runtime(group)
        mu = group.mu_number
        if self._holds(group) and mj.count:
            by_ldev = {p.local_ldev: p for p in self.engine.group_pairs(group.name)}
            for e in mj.pending():
                p = by_ldev.get(e.ldev)
                if p is not None and e.seq > rt.acked and mj.is_for(e, mu):
                    self.engine.bitmap(p).mark_sync(e.offset, e.length)
        mj.set_floor(mu, mj.last_seq)
        rt.acked = rt.last_own = mj.last_seq
        rt.acked_event.set()

    def _holds(self, group: CopyGroup) -> bool:
        rt = self.runtime(group)
        return rt.last_own > rt.acked

    def _release(self, jid: int) -> None:
        """Free the entries that no mirror of the journal needs any more.

        A mirror needs the entries after the last one its secondary restored, as long as it has entries of
        its own there; a mirror with such entries but no pair copying any more turns them into marks first."""
        mj = self.masters.get(jid)
        if mj is None:
            return
        needs: list[int] = []
        for g in self.journal_groups(jid):
            if not self._holds(g):
                continue
            if any(p.status in ACTIVE for p in self.engine.group_pairs(g.name)):
                needs.append(self.runtime(g).acked)
            else:
                self._mark_pending(g)
        if not needs:
            if mj.count:
                mj.reset()
        elif min(needs) >= mj.head_seq:
            mj.free(min(needs))
        room = self.room.get(jid)  # (made by a write that waits for room)
        if room is not None:
            room.set()

    def _q_count(self, group: CopyGroup, mj: MasterJournal) -> int:
        """Entries the mirror's secondary has still to restore (0 when none of them is for the mirror)."""
        rt = self.runtime(group)
        return max(0, mj.last_seq - rt.acked) if rt.last_own > rt.acked else 0

    async def drain(self, group: CopyGroup, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Flush mode of a split: wait until the secondary restored every write journaled for the mirror."""
        rt = self.runtime(group)
        target = rt.last_own
        deadline = time.monotonic() + timeout
        while rt.acked < target:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            rt.acked_event.clear()
            try:
                await asyncio.wait_for(rt.acked_event.wait(), min(left, 0.5))
            except TimeoutError:
                pass
        return True

    def path_watch_seconds(self, group: CopyGroup) -> float:
        if group.local_journal_id is None or group.local_journal_id not in self.journals.journals:
            return 300.0
        j = self.journals.journals[group.local_journal_id]
        return 60.0 * j.mirror(group.mu_number).path_blockade_watch_minutes

    # -- monitoring --------------------------------------------------------------------------------------
    async def monitor(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            for group in list(self.engine.groups.values()):
                if group.replication_type != "UR":
                    continue
                try:
                    await self._monitor_group(group)
                except Exception:
                    log.exception("monitoring %s", group.name)

    async def _monitor_group(self, group: CopyGroup) -> None:
        pairs = self.engine.group_pairs(group.name)
        if group.local_journal_id is None or not pairs:
            return
        if group.role == "P":
            if {p.status for p in pairs} & {PAIR, PFUL} and \
                    time.monotonic() - self.runtime(group).last_read > max(self.path_watch_seconds(group), 1):
                await self.suspend_mirror(group, PSUE, "the path was blocked longer than the path watch time")
        else:
            self.ensure_restore(group)
        self.refresh_group(group)

    def refresh(self) -> None:
        for group in list(self.engine.groups.values()):
            if group.replication_type == "UR":
                self.refresh_group(group)

    def refresh_group(self, group: CopyGroup) -> None:
        """Journal figures and statuses as they are now (journalStatus, usageRate, qMarker, qCount, PFUL)."""
        engine = self.engine
        pairs = engine.group_pairs(group.name)
        jid = group.local_journal_id
        if jid is None or jid not in self.journals.journals or not pairs:
            return
        rt = self.runtime(group)
        pg = engine.peer(group)
        active_paths = len(pg.active_paths) if pg else 0
        if group.role == "P":
            mj = self.master(group)
            usage = mj.usage_rate()
            for p in pairs:
                if p.status == PAIR and usage >= PFUL_THRESHOLD:
                    engine.set_status(p, PFUL)
                elif p.status == PFUL and usage < PFUL_THRESHOLD:
                    engine.set_status(p, PAIR)
            statuses = {p.status for p in pairs}
            q_count = self._q_count(group, mj)
            self.journals.set_runtime(jid, usage_rate=usage, q_marker=f"{mj.last_seq:08x}", q_count=mj.count,
                                      num_of_active_paths=active_paths)
            status = ("PJNF" if usage >= PFUL_THRESHOLD else "PJNN") if statuses & ACTIVE else \
                "PJSF" if PFUS in statuses else "PJSE" if PSUE in statuses else "PJSN"
        else:
            statuses = {p.status for p in pairs}
            q_count = max(0, rt.remote_last_seq - rt.restored)
            self.journals.set_runtime(jid, usage_rate=0, q_marker=f"{rt.restored:08x}", q_count=q_count,
                                      num_of_active_paths=active_paths)
            status = "SJNN" if statuses & ACTIVE else \
                "SJSF" if PFUS in statuses else "SJSE" if PSUE in statuses else "SJSN"
        self.journals.set_runtime(jid, group.mu_number, journal_status=status, consistency_group_id=group.ctg_id,
                                  is_data_copying=COPY in statuses, q_count=q_count)

    def lag(self, group: CopyGroup) -> dict[str, Any]:
        """RPO figures of a mirror on the primary: entries not restored and the age of the oldest."""
        if group.role != "P" or group.local_journal_id is None:
            return {}
        mj = self.master(group)
        rt = self.runtime(group)
        applied = max(rt.applied, rt.acked)
        behind = rt.last_own > applied
        oldest = next((t for s, t in rt.samples if s > applied), None)
        return {"qCount": self._q_count(group, mj), "usageRate": mj.usage_rate(), "lastSeq": mj.last_seq,
                "restoredSeq": rt.acked, "appliedSeq": applied,
                "lagSeconds": round(time.monotonic() - oldest, 3) if behind and oldest is not None else 0.0,
                "protectedBytes": mj.protected_bytes}

    def redo_after_restart(self) -> None:
        """A restarted primary writes journaled entries to its P-VOLs again (journal first, then volume): every
        entry of a journal written before entries by reference existed, else only the last one."""
        for jid in sorted({g.local_journal_id for g in self.engine.groups.values() if g.replication_type == "UR"
                           and g.role == "P" and g.local_journal_id is not None}):
            self._redo(jid, self.journal_groups(jid))

    def _redo(self, jid: int, groups: list[CopyGroup]) -> None:
        if not groups:
            return
        mj = self.master(groups[0])
        if not mj.count:
            return
        by_ldev = {p.local_ldev: p for g in groups for p in self.engine.group_pairs(g.name)}
        # only the last entry can have been journaled without reaching its P-VOL (each write is journaled and
        # written before the next is journaled); with entries by reference, replaying older ones would undo
        # newer writes (whose entries read the P-VOL), so only the last is replayed (a no-op if by reference)
        seq = mj.last_seq if mj.by_reference else mj.head_seq
        while seq <= mj.last_seq:
            batch = mj.read(seq, 64 << 20)
            if not batch:
                break
            for e in batch:
                vol = self.engine.system.volumes.get(e.ldev)
                if e.ldev not in by_ldev or vol is None:
                    continue
                if e.zero:
                    vol.discard_local(e.offset, e.length)
                else:
                    vol.write_local(e.offset, e.data)
            seq = batch[-1].seq + 1
        for vol in {self.engine.system.volumes[x] for x in by_ldev if x in self.engine.system.volumes}:
            vol.flush_sync()
        log.info("journal %s: %d entries written to the P-VOLs again after a restart", jid, mj.count)
