"""ShadowImage: full local copies of a P-VOL onto an S-VOL of the same size, inside one storage system.

Each pair keeps three differential bitmaps (:class:`vspemu.replication.bitmap.DirtyBitmap`, one bit per
256 KiB track, a bit is durable before the change it records is made):

* ``p``: tracks where the S-VOL may differ from the P-VOL because of the P-VOL (not yet copied, or changed
  since the split). A bit is cleared only after its track's copy on the S-VOL is durable (fdatasync).
* ``s``: tracks hosts changed on the S-VOL after a split (merged into ``p`` by a resync or a restore).
* ``pend``: after a split, the tracks the S-VOL still lacks to be the P-VOL's image of the split instant.
  The background copier fills them from the P-VOL. A P-VOL change to a pending track first copies the old
  track to the S-VOL (copy-on-write into the S-VOL); a host write to a pending S-VOL track first fetches the
  P-VOL's track. A pending bit's clearing is durable before the track may change on either side, so a kill
  -9 never lets the copier bring later P-VOL data into a split image.

Both volumes carry a change observer (:meth:`vspemu.volumes.volume.Volume.add_observer`): every change of
their bytes, whatever the path (host write, TrueCopy / UR S-VOL write, restore, discard), is seen before it
is made. The copier runs on the event loop thread; a batch of tracks is read and written without yielding,
so no host write can fall between a track's read on the P-VOL and its write on the S-VOL.

Statuses and the transition table are in :mod:`.shadowimage_model`; the runtime of a pair, its observers and
the background copier in :mod:`.shadowimage_copier`. A split reports COPY until the pending
tracks are copied (the array's COPY(SP)) and PSUS afterwards; the split instant is the split request's.
A reverse resync (restore) writes the P-VOL through :meth:`Volume.write`, the host write path, so a TrueCopy
or UR P-VOL mirrors it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vspemu.errors import VspError, invalid, not_found
from vspemu.localcopy.shadowimage_copier import SiCopier, SiRuntime
from vspemu.localcopy.shadowimage_model import (
    COPY,
    DEFAULT_COPY_PACE,
    MAX_MU,
    PAIR,
    PSUE,
    PSUS,
    RCPY,
    SMPL,
    SiPair,
    check_transition,
)
from vspemu.replication.bitmap import DirtyBitmap, fsync_dir
from vspemu.system.storage import JOURNAL_ATTRIBUTE, Ldev, StorageSystem
from vspemu.volumes.volume import WriteRefused

log = logging.getLogger(__name__)

KIND = "si_pairs"


class ShadowImages(SiCopier):
    """The ShadowImage pairs of one storage system."""

    def __init__(self, system: StorageSystem, data_dir: Path, replication: Any = None) -> None:
        self.system = system
        self.replication = replication  # TrueCopy / UR pairs (vspemu.replication.engine.Replication) or None
        self.dir = data_dir / "bitmaps" / "si"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pairs: dict[str, SiPair] = {}
        self.runtime: dict[str, SiRuntime] = {}
        self._started = False
        system.ldev_guards.append(self._guard)
        system.remote_pair_checks.append(self._remote_pair_check)
        for doc in system.store.load(KIND).values():
            pair = SiPair.from_doc(doc)
            if pair.pvol not in system.volumes or pair.svol not in system.volumes:
                log.warning("ShadowImage pair %s: a volume is missing; pair dropped", pair.pair_id)
                system.store.delete(KIND, pair.pair_id)
                continue
            self._attach(pair, new=False)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the copiers (on the event loop): copies under way before a restart go on."""
        self._started = True
        for rt in self.runtime.values():
            self._start_copier(rt)

    async def close(self) -> None:
        tasks = [rt.task for rt in self.runtime.values() if rt.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for rt in self.runtime.values():
            for bm in (rt.p, rt.s, rt.pend):
                if bm is not None:
                    bm.close()

    def _paths(self, pair: SiPair) -> tuple[Path, Path, Path]:
        base = self.dir / f"{pair.pvol:05d}-{pair.svol:05d}"
        return base.with_suffix(".p.bmp"), base.with_suffix(".s.bmp"), base.with_suffix(".pend.bmp")

    def _attach(self, pair: SiPair, new: bool) -> SiRuntime:
        pvol, svol = self.system.volumes[pair.pvol], self.system.volumes[pair.svol]
        pp, sp, pendp = self._paths(pair)
        if new:
            p = DirtyBitmap.create(pp, pvol.size)
            s = DirtyBitmap.create(sp, svol.size)
            pendp.unlink(missing_ok=True)
            pend = None
        else:
            p = DirtyBitmap.open(pp, pvol.size) if pp.exists() else DirtyBitmap.create(pp, pvol.size, marked=True)
            s = DirtyBitmap.open(sp, svol.size) if sp.exists() else DirtyBitmap.create(sp, svol.size, marked=True)
            pend = None
            if pair.status == PSUS and pendp.exists():
                pend = DirtyBitmap.open(pendp, pvol.size)
                if pend.count() == 0:
                    pend.remove()
                    pend = None
            elif pendp.exists():
                pendp.unlink()
        rt = SiRuntime(pair, pvol, svol, p, s, pend)
        self.pairs[pair.pair_id] = pair
        self.runtime[pair.pair_id] = rt
        pvol.add_observer(rt.p_obs)
        svol.add_observer(rt.s_obs)
        return rt

    def _detach(self, rt: SiRuntime) -> None:
        rt.deleted = True
        rt.poke()
        rt.settled.set()
        rt.drained.set()
        if rt.task is not None:
            rt.task.cancel()
        rt.pvol.remove_observer(rt.p_obs)
        rt.svol.remove_observer(rt.s_obs)
        for bm in (rt.p, rt.s, rt.pend):
            if bm is not None:
                bm.remove()
        self.pairs.pop(rt.pair.pair_id, None)
        self.runtime.pop(rt.pair.pair_id, None)

    def _save(self, pairs: Iterable[SiPair]) -> None:
        with self.system.store.transaction():
            for pair in pairs:
                self.system.store.put(KIND, pair.pair_id, pair.doc())

    def _start_copier(self, rt: SiRuntime) -> None:
        if not self._started or rt.deleted or (rt.task is not None and not rt.task.done()):
            return
        rt.task = asyncio.get_running_loop().create_task(self._copier(rt), name=f"si-{rt.pair.pair_id}")

    # -- lookups --------------------------------------------------------------------------------------
    def get(self, pair_id: str) -> SiPair:
        pair = self.pairs.get(pair_id)
        if pair is None:
            raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"local copy pair {pair_id}")
        return pair

    def group_pairs(self, group_id: str) -> list[SiPair]:
        return [p for p in self.pairs.values() if p.group_id == group_id]

    def group_ids(self) -> list[str]:
        return sorted({p.group_id for p in self.pairs.values()})

    def pairs_of_ldev(self, ldev_id: int) -> list[SiPair]:
        return [p for p in self.pairs.values() if ldev_id in (p.pvol, p.svol)]

    def shown_status(self, pair: SiPair) -> str:
        """The status a client sees: a split still filling its pending tracks shows COPY (COPY(SP))."""
        rt = self.runtime.get(pair.pair_id)
        if pair.status == PSUS and rt is not None and rt.pend is not None:
            return COPY
        return pair.status

    def progress(self, pair: SiPair) -> int:
        rt = self.runtime.get(pair.pair_id)
        if rt is None:
            return 0
        if pair.status == PSUS:
            left = rt.pend.count() if rt.pend is not None else 0
        elif pair.status in (COPY, RCPY, PAIR):
            left = rt.p.count()
        else:
            return 0
        total = max(pair.total_tracks, left, 1)
        return 100 - (left * 100) // total if left else 100

    def stats(self) -> dict[str, dict[str, int]]:
        """Per pair: tracks copied by the last copy, copy-on-write fetches, marked tracks (vspemu-private)."""
        out: dict[str, dict[str, int]] = {}
        for pid, rt in self.runtime.items():
            out[pid] = {"tracksCopiedLastCopy": rt.tracks_copied, "copyOnWriteTracks": rt.cow_tracks,
                        "pvolMarkedTracks": rt.p.count(), "svolMarkedTracks": rt.s.count(),
                        "pendingTracks": rt.pend.count() if rt.pend is not None else 0}
        return out

    def _guard(self, ldev: Ldev, action: str) -> None:
        if action == "map":
            return
        for pair in self.pairs_of_ldev(ldev.ldev_id):
            role = "P" if ldev.ldev_id == pair.pvol else "S"
            raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is the {role}-VOL of ShadowImage pair "
                                            f"{pair.pair_id}")

    def _remote_pair_check(self, ldev: Ldev, role: str) -> None:
        """A ShadowImage P-VOL may be a TrueCopy / UR P-VOL or S-VOL; a ShadowImage S-VOL is refused as either
        (the array refuses it as a TC / UR S-VOL; as a P-VOL it would need the copier's writes mirrored, not
        modelled); no pair is made on a P-VOL being restored."""
        for pair in self.pairs_of_ldev(ldev.ldev_id):
            if pair.svol == ldev.ldev_id:
                raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is the S-VOL of ShadowImage pair {pair.pair_id}:"
                                                f" it cannot be a TrueCopy / Universal Replicator {role}-VOL")
            if pair.status == RCPY:
                raise VspError("WRONG_STATE", detail=f"ShadowImage pair {pair.pair_id} of ldev {ldev.ldev_id} is "
                                                     "being restored")

    # -- create ---------------------------------------------------------------------------------------
    def check_create(self, group: str, name: str, pvol_id: int, svol_id: int, pvol_dg: str | None,
                     svol_dg: str | None, new_group: bool | None, mu: int | None,
                     copy_pace: int | None) -> SiPair:
        """Validate a create; the pair it would make (nothing changes)."""
        system = self.system
        pvol = system.get_ldev(pvol_id)
        svol = system.get_ldev(svol_id)
        pdg = pvol_dg or f"{group}P_"
        sdg = svol_dg or f"{group}S_"
        if pvol_id == svol_id:
            raise invalid("svolLdevId", svol_id, "Specify an S-VOL other than the P-VOL.")
        if pvol.size != svol.size:
            raise VspError("WRONG_STATE", detail=f"the P-VOL ({pvol.size} bytes) and the S-VOL ({svol.size} "
                                                 "bytes) differ in size")
        for ldev, role in ((pvol, "P-VOL"), (svol, "S-VOL")):
            if JOURNAL_ATTRIBUTE in ldev.extra_attributes or system.is_pool_volume(ldev):
                raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is a journal or pool volume")
            if ldev.status == "BLK":
                raise VspError("WRONG_STATE", detail=f"the {role} {ldev.ldev_id} is blocked")
        for p in self.pairs_of_ldev(svol_id):
            raise VspError("IN_USE", detail=f"ldev {svol_id} is already in ShadowImage pair {p.pair_id}")
        rep = self.replication
        if rep is not None and rep.pairs_of(svol_id):
            raise VspError("IN_USE", detail=f"ldev {svol_id} is a TrueCopy / Universal Replicator pair volume: "
                                            "it cannot be a ShadowImage S-VOL")
        if any(p.svol == pvol_id for p in self.pairs.values()):
            raise VspError("IN_USE", detail=f"ldev {pvol_id} is a ShadowImage S-VOL (cascades are not supported)")
        of_pvol = [p for p in self.pairs.values() if p.pvol == pvol_id]
        used_mu = {p.mu for p in of_pvol}
        if mu is None:
            mu = next((m for m in range(MAX_MU + 1) if m not in used_mu), None)
            if mu is None:
                raise VspError("IN_USE", detail=f"ldev {pvol_id} is the P-VOL of 3 ShadowImage pairs already")
        elif mu in used_mu:
            raise VspError("IN_USE", detail=f"mirror unit {mu} of ldev {pvol_id} is in use")
        pair = SiPair(group, pdg, sdg, name, pvol_id, svol_id, mu,
                      copy_pace=copy_pace or DEFAULT_COPY_PACE)
        existing = self.group_pairs(pair.group_id)
        same_name = [p for p in self.pairs.values() if p.group == group]
        if new_group is True and same_name:
            raise VspError("ALREADY_EXISTS", object_id=f"copy group {group}")
        if new_group is False and not existing:
            raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"copy group {pair.group_id}")
        if not existing and same_name:
            raise VspError("ALREADY_EXISTS", object_id=f"copy group {group} (other device groups)")
        if any(p.name == name for p in existing):
            raise VspError("ALREADY_EXISTS", object_id=f"copy pair {pair.pair_id}")
        if any(p.pvol == pvol_id for p in existing):
            raise VspError("IN_USE", detail=f"ldev {pvol_id} is already a P-VOL of copy group {group}")
        return pair

    def create(self, pair: SiPair, consistency_group_id: int | None = None, auto_split: bool = False) -> SiPair:
        """Record the pair and start the initial copy (only tracks that hold data on either volume)."""
        pair.consistency_group_id = consistency_group_id
        pair.auto_split = auto_split
        pair.status = COPY
        rt = self._attach(pair, new=True)
        try:
            rt.p.set_ranges(rt.pvol.data_extents() + rt.svol.data_extents())
            pair.total_tracks = rt.p.count()
            self._save([pair])
        except BaseException:
            self._detach(rt)
            raise
        rt.settled.clear()
        self._start_copier(rt)
        rt.poke()
        return pair

    # -- split ----------------------------------------------------------------------------------------
    def check(self, pairs: list[SiPair], operation: str) -> None:
        for pair in pairs:
            check_transition(pair.pair_id, pair.status, operation)

    def split(self, pairs: list[SiPair]) -> None:
        """Split now, all pairs at one instant: no await between the first and the last."""
        self.check(pairs, "split")
        now = time.time()
        for pair in pairs:
            rt = self.runtime[pair.pair_id]
            pp, _, pendp = self._paths(pair)
            pend = DirtyBitmap.create(pendp, rt.pvol.size)
            pend.bits[:] = rt.p.bits
            pend._rewrite()  # durable before the split is
            if pend.count() == 0:
                pend.remove()
                rt.pend = None
            else:
                rt.pend = pend
                rt.drained.clear()
            pair.status = PSUS
            pair.split_time = now
            rt.tracks_copied = 0
            pair.total_tracks = rt.pend.count() if rt.pend is not None else 0
        self._save(pairs)
        for pair in pairs:
            self.runtime[pair.pair_id].poke()

    async def wait_drained(self, pairs: list[SiPair]) -> None:
        """Wait until split pairs hold their whole image (PSUS shown), or left PSUS."""
        for pair in pairs:
            rt = self.runtime.get(pair.pair_id)
            while rt is not None and not rt.deleted and pair.status == PSUS and rt.pend is not None:
                await rt.drained.wait()

    async def wait_copied(self, pairs: list[SiPair]) -> None:
        """Wait until no copy of these pairs is under way (PAIR, PSUE, or deleted)."""
        for pair in pairs:
            rt = self.runtime.get(pair.pair_id)
            if rt is not None:
                await rt.settled.wait()

    # -- resync / restore ----------------------------------------------------------------------------
    def resync(self, pairs: list[SiPair], copy_pace: int | None = None, quick: bool = False) -> None:
        """P-VOL -> S-VOL: copy the tracks either side changed since the split (all of them after PSUE)."""
        self.check(pairs, "resync")
        for pair in pairs:
            rt = self.runtime[pair.pair_id]
            if pair.status == PSUE:
                rt.p.mark_all_sync()
            else:
                rt.p.merge(rt.s.to_bytes())
            self._drop_pending(rt)
            rt.tracks_copied = 0
            pair.status = PAIR if quick else COPY
            if not quick:
                rt.settled.clear()
            pair.total_tracks = rt.p.count()
            if copy_pace is not None:
                pair.copy_pace = copy_pace
        self._save(pairs)
        for pair in pairs:
            rt = self.runtime[pair.pair_id]
            rt.s.clear_all()
            rt.svol.drop_hosts()  # the S-VOL is the copy target again: hosts lose it
            rt.poke()

    def check_restore(self, pairs: list[SiPair]) -> None:
        self.check(pairs, "restore")
        for pair in pairs:
            rt = self.runtime[pair.pair_id]
            try:
                rt.pvol.check_writable()  # e.g. a TrueCopy S-VOL in PAIR, a fenced P-VOL
            except WriteRefused as e:
                raise VspError("WRONG_STATE", detail=f"the P-VOL {pair.pvol} cannot be written now: {e}") from None
            for other in self.pairs.values():
                if other.pvol == pair.pvol and other is not pair and other.status not in (PSUS, PSUE):
                    raise VspError("WRONG_STATE", detail=f"ShadowImage pair {other.pair_id} of the same P-VOL "
                                                         f"is in {other.status}; split it first")

    def restore(self, pairs: list[SiPair], copy_pace: int | None = None) -> None:
        """S-VOL -> P-VOL (reverse resync): RCPY, then PAIR."""
        self.check_restore(pairs)
        for pair in pairs:
            rt = self.runtime[pair.pair_id]
            rt.p.merge(rt.s.to_bytes())
            self._drop_pending(rt)
            rt.tracks_copied = 0
            pair.status = RCPY
            rt.settled.clear()
            pair.total_tracks = rt.p.count()
            if copy_pace is not None:
                pair.copy_pace = copy_pace
        self._save(pairs)
        for pair in pairs:
            rt = self.runtime[pair.pair_id]
            rt.s.clear_all()
            rt.svol.drop_hosts()
            rt.poke()

    # -- delete ---------------------------------------------------------------------------------------
    def delete(self, pairs: list[SiPair]) -> None:
        self.check(pairs, "delete")
        with self.system.store.transaction():
            for pair in pairs:
                self.system.store.delete(KIND, pair.pair_id)
        for pair in pairs:
            rt = self.runtime.get(pair.pair_id)
            if rt is not None:
                self._detach(rt)
        fsync_dir(self.dir)


def local_clone_error(pair_id: str) -> VspError:
    return not_found("local copy pair", pair_id)


__all__ = ["SMPL", "ShadowImages", "SiPair"]
