"""Thin Image snapshots: copy-on-write point-in-time images of a P-VOL, kept in a pool.

A snapshot ``{pvolLdevId},{muNumber}`` is created in PAIR (no point in time yet); ``split`` takes the point in
time (PSUS). From then on, before a track (:data:`TRACK` bytes) of the P-VOL changes for the first time, its
old bytes are saved *once*, in the newest split snapshot of that P-VOL that has not saved that track. The
split snapshots of a P-VOL form a chain ordered by split time (``seq``); snapshot *k*'s image of track *t* is:

1. the bytes a host wrote to *k*'s S-VOL (kept in the S-VOL's own file while assigned, then in *k*'s area);
2. else the first saved copy of *t* in *k* or a newer snapshot of the chain;
3. else the P-VOL's current bytes (the track has not changed since *k* was split).

So 64 snapshots of a P-VOL cost what changed between their splits, not 64 copies. Dropping a snapshot from the
chain (delete, resync, the end of a restore) hands each saved track the next older snapshot still needs to it.

Crash safety: the observer (:meth:`Snapshots.before_change`, called before every change of a P-VOL's bytes)
makes the old tracks durable in the area first; a split is committed before any later write is seen; a host's
first writes wait in a pending log meanwhile (:mod:`vspemu.volumes.writebehind`, docs/snapshots.md). Statuses
and what each operation does to them are a table: :mod:`vspemu.localcopy.snapshot_states`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from vspemu.errors import VspError, invalid, not_found
from vspemu.localcopy.cow import COW, OWN, WRITTEN, Area, save_ahead
from vspemu.localcopy.snapshot_model import (
    AUTO_MU_ORDER,
    HTI_ATTRIBUTE,
    KIND,
    MAX_MU,
    TRACK,
    Snapshot,
)
from vspemu.localcopy.snapshot_states import (
    ASSIGN,
    CLONE,
    CLONED,
    COPY,
    DELETE,
    FAIL,
    PAIR,
    PSUE,
    PSUS,
    RCPY,
    RESTORE,
    RESTORED,
    RESYNC,
    SPLIT,
    UNASSIGN,
    next_status,
)
from vspemu.system.storage import JOURNAL_ATTRIBUTE, Ldev, StorageSystem
from vspemu.volumes.volume import Volume, VolumeIOError, WriteRefused, pread_exact, punch_hole
from vspemu.volumes.writebehind import attach, detach, read_under

log = logging.getLogger(__name__)


class Snapshots:
    """Every Thin Image snapshot of one storage system; the change observer of their P-VOLs and S-VOLs."""

    def __init__(self, system: StorageSystem, data_dir: Path, replication: Any = None) -> None:
        self.system = system
        self.replication = replication  # TrueCopy / UR pairs (vspemu.replication.engine.Replication) or None
        self.dir = data_dir / "snapshots"
        self.snaps: dict[str, Snapshot] = {}
        self._chains: dict[int, list[Snapshot]] = {}  # P-VOL -> its split snapshots, oldest first
        self._by_svol: dict[int, Snapshot] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        for doc in system.store.load(KIND).values():
            s = Snapshot(**doc)
            s.area = Area(self._area_path(s))
            if s.status == PAIR and s.area.end:  # a resync cut short by a crash: its data goes
                s.area.remove()
                s.area = Area(self._area_path(s))
            if s.status in (RCPY, COPY):  # a restore / clone cut short: the image is intact, do it again
                s.status = PSUS
                system.store.put(KIND, s.key, s.doc())
            self.snaps[s.key] = s
        for s in self.snaps.values():
            vol = system.volumes.get(s.pvol)
            if vol is not None:
                vol.add_observer(self)
            if s.svol is not None:
                self._attach_svol(s)
        self._rebuild_chains()
        for ldev_id in {x for s in self.snaps.values() for x in (s.pvol, s.svol) if x is not None}:
            self._mark(ldev_id)
            if (vol := system.volumes.get(ldev_id)) is not None:
                self._behind(vol)  # (replays a pending log a crash left)
        system.ldev_guards.append(self._guard)
        system.pool_usage.append(self.pool_used_bytes)
        system.remote_pair_checks.append(self._remote_pair_check)

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _area_path(self, s: Snapshot) -> Path:
        return self.dir / f"{s.pvol:05d}-{s.mu:04d}.tis"

    def _rebuild_chains(self) -> None:
        chains: dict[int, list[Snapshot]] = {}
        for s in self.snaps.values():
            if s.seq:
                chains.setdefault(s.pvol, []).append(s)
        for chain in chains.values():
            chain.sort(key=lambda x: x.seq)
        self._chains = chains

    def _save(self, *snaps: Snapshot) -> None:
        with self.system.store.transaction():
            for s in snaps:
                self.system.store.put(KIND, s.key, s.doc())

    def get(self, pvol: int, mu: int) -> Snapshot:
        s = self.snaps.get(f"{pvol},{mu}")
        if s is None:
            raise not_found("snapshot", f"{pvol},{mu}")
        return s

    def of_group(self, name: str) -> list[Snapshot]:
        out = [s for s in self.snaps.values() if s.group == name]
        if not out:
            raise not_found("snapshot group", name)
        return sorted(out, key=lambda s: (s.pvol, s.mu))

    def groups(self) -> list[str]:
        return sorted({s.group for s in self.snaps.values()})

    def listing(self, pvol: int | None = None, mu: int | None = None) -> list[Snapshot]:
        return sorted((s for s in self.snaps.values() if (pvol is None or s.pvol == pvol)
                       and (mu is None or s.mu == mu)), key=lambda s: (s.pvol, s.mu))

    def pool_used_bytes(self, pool_id: int | None) -> int:
        return sum(s.data.allocated_bytes() for s in self.snaps.values()
                   if s.area is not None and (pool_id is None or s.pool_id == pool_id))

    def _guard(self, ldev: Ldev, action: str) -> None:
        if action not in ("delete", "expand", "block", "format"):
            return
        if any(s.pvol == ldev.ldev_id for s in self.snaps.values()):
            raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is the P-VOL of Thin Image snapshots")
        if ldev.ldev_id in self._by_svol:
            raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is the S-VOL of snapshot "
                                            f"{self._by_svol[ldev.ldev_id].key}")

    def _remote_pair_check(self, ldev: Ldev, role: str) -> None:
        """A snapshot's P-VOL may be a TrueCopy / UR P-VOL or S-VOL (the DR test), its S-VOL never (the array
        shares only Thin Image P-VOLs with TC / UR); no pair is made on a P-VOL being restored."""
        s = self._by_svol.get(ldev.ldev_id)
        if s is not None:
            raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is the S-VOL of Thin Image snapshot {s.key}: it "
                                            f"cannot be a TrueCopy / Universal Replicator {role}-VOL")
        for s in self.snaps.values():
            if s.pvol == ldev.ldev_id and s.status == RCPY:
                raise VspError("WRONG_STATE", detail=f"snapshot {s.key} of ldev {ldev.ldev_id} is being restored")

    def _volume(self, ldev_id: int) -> Volume:
        return self.system.volumes[ldev_id]

    def _in_use(self, ldev_id: int) -> bool:
        return ldev_id in self._by_svol or any(s.pvol == ldev_id for s in self.snaps.values())

    def _rewatch(self, ldev_id: int) -> None:
        """Observe a volume while it is a snapshot P-VOL or an assigned S-VOL (it may be both: a clone of a
        snapshot's S-VOL), and show HTI in its attributes meanwhile."""
        vol = self.system.volumes.get(ldev_id)
        if vol is not None:
            if self._in_use(ldev_id):
                vol.add_observer(self)
            else:
                vol.remove_observer(self)
            self._behind(vol)
        self._mark(ldev_id)

    def _behind(self, vol: Volume) -> None:
        """A P-VOL's first host writes go through a pending log (:mod:`vspemu.volumes.writebehind`)."""
        if any(s.pvol == vol.ldev_id for s in self.snaps.values()):
            attach(vol, self.dir / f"{vol.ldev_id:05d}.wal",
                   lambda o, n: (a := self._newest(vol)) is not None and a.unsaved(self._tracks(vol.size, o, n)),
                   lambda ranges: save_ahead(lambda: self._newest(vol), vol.fd, vol.size, TRACK, sorted(
                       {t for o, n in ranges for t in self._tracks(vol.size, o, n)})))
        else:
            detach(vol)

    def _newest(self, vol: Volume) -> Area | None:
        chain = self._chains.get(vol.ldev_id)
        return chain[-1].data if chain and vol.read_redirect is None else None

    def _mark(self, ldev_id: int) -> None:
        ldev = self.system.ldevs.get(ldev_id)
        if ldev is not None:
            self.system.set_ldev_attribute(ldev, HTI_ATTRIBUTE, self._in_use(ldev_id))

    def _attach_svol(self, s: Snapshot) -> None:
        assert s.svol is not None
        vol = self.system.volumes.get(s.svol)
        if vol is None:
            return
        self._by_svol[s.svol] = s
        vol.add_observer(self)
        vol.read_redirect = lambda offset, view: self.read_image(s, offset, view)
        vol.write_gate = self._svol_gate

    def _detach_svol(self, s: Snapshot) -> None:
        if s.svol is None:
            return
        self._by_svol.pop(s.svol, None)
        vol = self.system.volumes.get(s.svol)
        if vol is not None:
            self._rewatch(s.svol)  # it may still be the P-VOL of a clone
            vol.read_redirect = None
            if vol.write_gate == self._svol_gate:
                vol.write_gate = None
            vol.drop_hosts()

    def _svol_gate(self, volume: Volume) -> None:
        s = self._by_svol.get(volume.ldev_id)
        if s is not None and s.status != PSUS:
            raise WriteRefused(f"LDEV {volume.ldev_id}: the S-VOL of snapshot {s.key} in {s.status} is not writable")

    # -- the change observer -----------------------------------------------------------------------------
    def before_change(self, volume: Volume, offset: int, length: int) -> None:
        if length <= 0:
            return
        chain = self._chains.get(volume.ldev_id)
        if chain:
            self._save_old(volume, chain, offset, length)
        s = self._by_svol.get(volume.ldev_id)
        if s is not None:
            self._fill_svol(s, volume, offset, length)

    def _tracks(self, size: int, offset: int, length: int) -> range:
        last = min(offset + length, size) - 1
        return range(offset // TRACK, last // TRACK + 1)

    def _save_old(self, volume: Volume, chain: list[Snapshot], offset: int, length: int) -> None:
        """Copy on write: the old bytes of each first-changed track go to the newest snapshot, durably (tracks
        saved by a host write still waiting in :meth:`prepare_change` for its sync are made durable here)."""
        area = chain[-1].data
        tracks = self._tracks(volume.size, offset, length)
        if self._append_old(volume, chain, tracks) or any(
                t in area.cow and not area.durable(area.cow[t]) for t in tracks):
            try:
                area.sync()
            except OSError as e:
                self._sync_failed(volume, chain, e)

    def _append_old(self, volume: Volume, chain: list[Snapshot], tracks: range) -> bool:
        """Append the old bytes of the tracks the newest snapshot lacks (not yet durable); True if any."""
        newest = chain[-1]
        area = newest.data
        todo = [t for t in tracks if t not in area.cow]
        if not todo:
            return False
        start = area.end
        try:
            for t in todo:
                old = bytearray(min(TRACK, volume.size - t * TRACK))
                read_under(volume, t * TRACK, memoryview(old))
                area.append(COW, t, bytes(old))
        except OSError as e:  # the pool cannot take it: the snapshots that needed these tracks are lost (PSUE)
            area.rollback(start)
            log.warning("snapshot %s: saving old tracks of LDEV %s failed: %s", newest.key, volume.ldev_id, e)
            self._fail([s for i, s in enumerate(chain)
                        if any(all(t not in x.data.cow for x in chain[i:]) for t in todo)])
            return False
        return True

    def _sync_failed(self, volume: Volume, chain: list[Snapshot], e: OSError) -> None:
        """The saved tracks may not be durable: every snapshot of the chain may lack some (PSUE)."""
        log.warning("snapshot data of LDEV %s could not be made durable: %s", volume.ldev_id, e)
        self._fail([s for s in chain if s.status != PSUE])

    async def prepare_change(self, volume: Volume, offset: int, length: int) -> None:
        """A host write (:meth:`Volume.write`) asks first, before it is written anywhere: the old tracks are
        appended now and made durable by an ``fdatasync`` in a worker thread that the host writes waiting at the
        same time share (group commit), so the event loop goes on meanwhile. :meth:`before_change` then finds
        them saved and durable (or, if a split came in between, saves what the new snapshot lacks itself)."""
        chain = self._chains.get(volume.ldev_id)
        if not chain or length <= 0:
            return
        area = chain[-1].data
        tracks = self._tracks(volume.size, offset, length)
        if self._append_old(volume, chain, tracks) or any(
                t in area.cow and not area.durable(area.cow[t]) for t in tracks):
            try:
                await area.sync_async()
            except OSError as e:
                if self._chains.get(volume.ldev_id) == chain:
                    self._sync_failed(volume, chain, e)

    def _fail(self, snaps: list[Snapshot]) -> None:
        for s in snaps:
            s.status = next_status(s.status, FAIL)
        self._save(*snaps)

    def _fill_svol(self, s: Snapshot, volume: Volume, offset: int, length: int) -> None:
        """A host write to a split snapshot's S-VOL: first copy the snapshot's image of the tracks it only
        partly covers into the S-VOL's file, make that durable, then record the tracks as the S-VOL's own."""
        written = s.written()
        todo = [t for t in self._tracks(volume.size, offset, length) if t not in written]
        if not todo:
            return
        fd = volume.fd
        for t in todo:
            lo, hi = t * TRACK, min((t + 1) * TRACK, volume.size)
            if offset <= lo and offset + length >= hi:
                continue  # the write covers the whole track
            buf = bytearray(hi - lo)
            self.read_image(s, lo, memoryview(buf), svol_file=False)
            os.pwrite(fd, buf, lo)
        os.fdatasync(fd)
        area = s.data
        for t in todo:
            area.append(WRITTEN, t, epoch=s.epoch)
        area.sync()

    # -- reading an image ----------------------------------------------------------------------------------
    def read_image(self, s: Snapshot, offset: int, view: memoryview, svol_file: bool = True) -> None:
        """Fill ``view`` with the snapshot's image from ``offset`` (NBD reads of its S-VOL come here)."""
        if s.status == PSUE:
            raise VolumeIOError(f"snapshot {s.key}: its data is lost (PSUE)")
        if not s.seq:
            raise WriteRefused(f"snapshot {s.key} is not split: its S-VOL cannot be read")
        pvol = self._volume(s.pvol)
        chain = self._chains.get(s.pvol, [])
        idx = chain.index(s) if s in chain else len(chain)
        written = s.written() if svol_file else set()
        own = s.data.own
        done, total = 0, len(view)
        while done < total:
            pos = offset + done
            t = pos // TRACK
            n = min(total - done, (t + 1) * TRACK - pos)
            part = view[done:done + n]
            if t in written and s.svol is not None:
                pread_exact(self._volume(s.svol).fd, part, pos, name=f"LDEV {s.svol}")
            elif t in own:
                s.data.read_into(own[t] + pos - t * TRACK, part)
            else:
                for x in chain[idx:]:
                    at = x.data.cow.get(t)
                    if at is not None:
                        x.data.read_into(at + pos - t * TRACK, part)
                        break
                else:
                    read_under(pvol, pos, part)
            done += n

    def image_tracks(self, s: Snapshot) -> set[int]:
        """The tracks where the snapshot's image may differ from the P-VOL now."""
        chain = self._chains.get(s.pvol, [])
        tracks: set[int] = set(s.written()) | set(s.data.own)
        if s in chain:
            for x in chain[chain.index(s):]:
                tracks |= x.data.cow.keys()
        return tracks

    # -- leaving the chain ---------------------------------------------------------------------------------
    def _drop_data(self, s: Snapshot) -> None:
        """The snapshot's point in time goes: the next older snapshot keeps the saved tracks it still needs,
        then the area is emptied (host-written data of the S-VOL goes too)."""
        chain = self._chains.get(s.pvol, [])
        if s in chain:
            i = chain.index(s)
            if i > 0:
                prev = chain[i - 1].data
                size = self._volume(s.pvol).size
                for t, at in sorted(s.data.cow.items()):
                    if t not in prev.cow:
                        prev.append(COW, t, s.data.read(at, min(TRACK, size - t * TRACK)))
                prev.sync()
        if s.svol is not None and s.written():
            vol = self._volume(s.svol)
            for t in s.written():  # the S-VOL's copies of host-written tracks: free them
                punch_hole(vol.fd, t * TRACK, min(TRACK, vol.size - t * TRACK))
        s.epoch += 1

    def _reset_area(self, s: Snapshot) -> None:
        s.data.remove()
        s.area = Area(self._area_path(s))

    # -- operations -------------------------------------------------------------------------------------------
    def check_create(self, pvol: int, mu: int | None, pool_id: int, group: str, svol: int | None,
                     is_clone: bool = False) -> int:
        """Refuse what the array refuses; the mirror unit to use."""
        system = self.system
        ldev = system.get_ldev(pvol)
        system.get_pool(pool_id)
        if JOURNAL_ATTRIBUTE in ldev.extra_attributes or system.is_pool_volume(ldev):
            raise VspError("IN_USE", detail=f"ldev {pvol} is a journal or pool volume")
        if pvol in self._by_svol:
            # a clone of a split snapshot's S-VOL (Cinder's create-volume-from-snapshot) is the one cascade
            # modelled: it needs a snapshot made with canCascade, in PSUS, and reads the S-VOL's image
            parent = self._by_svol[pvol]
            if not is_clone:
                raise VspError("IN_USE", detail=f"ldev {pvol} is the S-VOL of snapshot {parent.key} (cascaded "
                                                "snapshots other than clones are not modelled)")
            if not parent.can_cascade or parent.status != PSUS:
                raise VspError("WRONG_STATE", detail=f"ldev {pvol} is the S-VOL of snapshot {parent.key}, which "
                                                     "is not a split snapshot made with canCascade")
        used = {s.mu for s in self.snaps.values() if s.pvol == pvol}
        if mu is None:
            mu = next((i for i in AUTO_MU_ORDER if i not in used), None)
            if mu is None:
                raise VspError("LDEV_ID_EXHAUSTED", resource="muNumber")
        elif not 0 <= mu <= MAX_MU:
            raise invalid("muNumber", mu, f"Specify a value from 0 to {MAX_MU}.")
        elif mu in used:
            raise VspError("ALREADY_EXISTS", object_id=f"snapshot {pvol},{mu}")
        others = [s for s in self.snaps.values() if s.group == group]
        if others and any(s.pvol == pvol for s in others):
            raise VspError("ALREADY_EXISTS", object_id=f"snapshot of ldev {pvol} in snapshot group {group}")
        if svol is not None:
            self.check_svol(pvol, svol)
        return mu

    def check_svol(self, pvol: int, svol: int) -> None:
        system = self.system
        ldev = system.get_ldev(svol)
        if svol == pvol:
            raise invalid("svolLdevId", svol, "Specify a volume other than the P-VOL.")
        if svol in self._by_svol or any(s.pvol == svol for s in self.snaps.values()):
            raise VspError("IN_USE", detail=f"ldev {svol} is already a snapshot volume")
        if ldev.extra_attributes:
            raise VspError("IN_USE", detail=f"ldev {svol} is in use ({', '.join(ldev.extra_attributes)})")
        system.guard_ldev(ldev, "delete")  # a pair volume is refused
        if ldev.size != system.get_ldev(pvol).size:
            raise invalid("svolLdevId", svol, "Specify a volume of the P-VOL's capacity.")

    def create(self, pvol: int, mu: int | None, pool_id: int, group: str, *, svol: int | None = None,
               consistency_group: bool = False, can_cascade: bool = False, is_clone: bool = False,
               auto_split: bool = False) -> Snapshot:
        mu = self.check_create(pvol, mu, pool_id, group, svol, is_clone)
        s = Snapshot(pvol, mu, pool_id, group, consistency_group, can_cascade, is_clone)
        s.area = Area(self._area_path(s))
        if s.area.end:  # a leftover of a snapshot deleted by a crash half-way
            self._reset_area(s)
        self.snaps[s.key] = s
        self._save(s)
        self._rewatch(pvol)
        if svol is not None:
            self.assign(s, svol)
        if auto_split:
            self.split([s])
        return s

    @staticmethod
    def _check(snaps: list[Snapshot], op: str) -> None:
        for s in snaps:
            next_status(s.status, op)

    def check_split(self, snaps: list[Snapshot]) -> None:
        self._check(snaps, SPLIT)

    def check_resync(self, snaps: list[Snapshot]) -> None:
        self._check(snaps, RESYNC)
        self._check_no_clone_of_svol(snaps)

    def check_delete(self, snaps: list[Snapshot]) -> None:
        self._check(snaps, DELETE)
        self._check_no_clone_of_svol(snaps)

    def _check_no_clone_of_svol(self, snaps: list[Snapshot]) -> None:
        """A snapshot whose S-VOL is the P-VOL of a clone keeps its image (and S-VOL) until the clone is done."""
        for s in snaps:
            if s.svol is not None and any(x.pvol == s.svol for x in self.snaps.values()):
                raise VspError("IN_USE", detail=f"the S-VOL {s.svol} of snapshot {s.key} is the P-VOL of a clone")

    def check_assign(self, s: Snapshot, svol: int) -> None:
        next_status(s.status, ASSIGN)
        if s.svol is not None:
            raise VspError("WRONG_STATE", detail=f"snapshot {s.key} already has S-VOL {s.svol}")
        self.check_svol(s.pvol, svol)

    def check_unassign(self, snaps: list[Snapshot]) -> None:
        self._check(snaps, UNASSIGN)
        self._check_no_clone_of_svol(snaps)
        for s in snaps:
            if s.svol is None:
                raise VspError("WRONG_STATE", detail=f"snapshot {s.key} has no S-VOL")

    def split(self, snaps: list[Snapshot]) -> None:
        """One point in time for all of them (nothing else runs on the event loop meanwhile)."""
        self.check_split(snaps)
        for vol in {self._volume(s.pvol) for s in snaps}:
            if vol.behind is not None:  # every write acknowledged before the split is in its image
                vol.behind.drain_sync()
        seq = max((x.seq for x in self.snaps.values()), default=0)
        now = time.time()
        for s in snaps:
            seq += 1
            s.status, s.seq, s.split_time = PSUS, seq, now
        self._save(*snaps)  # durable before any later write is seen
        self._rebuild_chains()

    def resync(self, snaps: list[Snapshot]) -> None:
        self.check_resync(snaps)
        for s in snaps:
            self._leave_chain(s, PAIR)

    def _leave_chain(self, s: Snapshot, status: str) -> None:
        self._drop_data(s)
        s.status, s.seq = status, 0
        self._save(s)
        self._rebuild_chains()
        self._reset_area(s)

    def check_restore(self, s: Snapshot) -> None:
        next_status(s.status, RESTORE)
        if s.pvol in self._by_svol:
            raise VspError("WRONG_STATE", detail=f"snapshot {s.key} is a clone of a snapshot's S-VOL: no restore")
        rep = self.replication
        if rep is not None and any(p.role == "S" for p in rep.pairs_of(s.pvol)):  # in any status, as on the array
            raise VspError("WRONG_STATE", detail=f"the P-VOL {s.pvol} is a TrueCopy / Universal Replicator S-VOL: "
                                                 "restore on the primary side, or after a swap")
        vol = self._volume(s.pvol)
        try:
            vol.check_writable()  # e.g. the P-VOL is the S-VOL of a TrueCopy / UR pair in PAIR
        except WriteRefused as e:
            raise VspError("WRONG_STATE", detail=f"the P-VOL cannot be written now: {e}") from None
        for other in self.snaps.values():
            if other.pvol == s.pvol and other.status == RCPY:
                raise VspError("WRONG_STATE", detail=f"snapshot {other.key} of the P-VOL is being restored")

    async def restore(self, s: Snapshot, auto_split: bool = False) -> None:
        """Write the snapshot's image back to the P-VOL through the host write path (a TC/UR P-VOL mirrors
        it); RCPY meanwhile, PAIR when done (split again at once with ``auto_split``)."""
        self.check_restore(s)
        s.status = next_status(s.status, RESTORE)
        self._save(s)
        vol = self._volume(s.pvol)
        try:
            if vol.behind is not None:
                await vol.behind.drain()
            for t in sorted(self.image_tracks(s)):
                lo, hi = t * TRACK, min((t + 1) * TRACK, vol.size)
                buf = bytearray(hi - lo)
                self.read_image(s, lo, memoryview(buf))
                if os.pread(vol.fd, hi - lo, lo) != buf:
                    await vol.write(lo, bytes(buf))
            await vol.flush()
        except BaseException:
            if s.status == RCPY:
                s.status = PSUS  # the image is intact: the restore may be done again
                self._save(s)
            raise
        self._leave_chain(s, next_status(s.status, RESTORED))
        if auto_split:
            self.split([s])

    def assign(self, s: Snapshot, svol: int) -> None:
        self.check_assign(s, svol)
        vol = self._volume(svol)
        vol.drop_hosts()
        punch_hole(vol.fd, 0, vol.size)  # its old bytes are never shown; free them
        s.svol, s.epoch = svol, s.epoch + 1
        self._save(s)
        self._attach_svol(s)
        self._mark(svol)

    def unassign(self, s: Snapshot) -> None:
        """The S-VOL goes; bytes a host wrote through it stay with the snapshot (OWN records)."""
        self.check_unassign([s])
        assert s.svol is not None
        vol = self._volume(s.svol)
        written = sorted(s.written())
        for t in written:
            s.data.append(OWN, t, os.pread(vol.fd, min(TRACK, vol.size - t * TRACK), t * TRACK))
        s.data.sync()
        self._detach_svol(s)
        s.svol, s.epoch = None, s.epoch + 1
        self._save(s)
        punch_hole(vol.fd, 0, vol.size)

    def delete(self, snaps: list[Snapshot]) -> None:
        self.check_delete(snaps)
        for s in snaps:
            self._delete(s)

    def _delete(self, s: Snapshot) -> None:
        if s.seq:
            self._drop_data(s)
        if s.svol is not None:
            vol = self._volume(s.svol)
            self._detach_svol(s)
            punch_hole(vol.fd, 0, vol.size)
        self.system.store.delete(KIND, s.key)
        del self.snaps[s.key]
        self._rebuild_chains()
        s.data.remove()
        self._rewatch(s.pvol)

    def check_clone(self, s: Snapshot) -> None:
        next_status(s.status, CLONE)
        if s.svol is None:
            raise VspError("WRONG_STATE", detail=f"snapshot {s.key} has no S-VOL to clone into")

    async def clone(self, s: Snapshot) -> None:
        """Copy the whole image into the S-VOL, then the snapshot goes: the S-VOL is an ordinary volume."""
        self.check_clone(s)
        s.status = next_status(s.status, CLONE)
        self._save(s)
        assert s.svol is not None
        vol = self._volume(s.svol)
        buf = bytearray(TRACK)
        try:
            written = s.written()
            for t in range((vol.size + TRACK - 1) // TRACK):
                if t in written:
                    continue
                lo, hi = t * TRACK, min((t + 1) * TRACK, vol.size)
                view = memoryview(buf)[:hi - lo]
                self.read_image(s, lo, view)
                if any(view):
                    os.pwrite(vol.fd, view, lo)
                if t % 64 == 63:
                    await asyncio.sleep(0)
            await asyncio.to_thread(os.fdatasync, vol.fd)
        except BaseException:
            s.status = PSUS
            self._save(s)
            raise
        next_status(s.status, CLONED)
        if s.seq:
            self._drop_data(s)
        self._detach_svol(s)
        self.system.store.delete(KIND, s.key)
        del self.snaps[s.key]
        self._rebuild_chains()
        s.data.remove()
        self._rewatch(s.pvol)

    def background(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as e:  # noqa: BLE001 - logged; the snapshot's status says what happened
                log.warning("snapshot background work failed: %s", e)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

