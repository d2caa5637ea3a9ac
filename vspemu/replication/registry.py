"""The records of one storage system's pairs and copy groups, and the write path each paired volume gets.

:class:`PairRegistry` keeps the groups and pairs (persisted in the system's store), the differential bitmap of
each pair's local volume, and gives each paired volume its replicator (:class:`.datapath.PairVolume`) and write
gate. The engine (:class:`.engine.Replication`) builds on it; nothing here talks to the other system.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from vspemu.errors import VspError, invalid, not_found
from vspemu.replication.bitmap import DirtyBitmap, fsync_dir
from vspemu.replication.copier import PairRuntime
from vspemu.replication.datapath import PairVolume, Target, WriteBarrier
from vspemu.replication.model import SUSPENDED, CopyGroup, Pair
from vspemu.system.storage import Ldev, StorageSystem
from vspemu.volumes.volume import Volume, WriteRefused

log = logging.getLogger(__name__)

MAX_NAME = 31
MAX_GROUP_NAME = 29


class PairRegistry:
    def __init__(self, system: StorageSystem, data_dir: Path) -> None:
        self.system = system
        self.bitmap_dir = data_dir / "bitmaps"
        self.bitmap_dir.mkdir(parents=True, exist_ok=True)
        self.groups: dict[str, CopyGroup] = {}
        self.pairs: dict[str, Pair] = {}
        self.ldev_pairs: dict[int, list[Pair]] = {}  # an LDEV's pairs: one, or a P-VOL's (multi-target)
        self.bitmaps: dict[str, DirtyBitmap] = {}  # pair key -> the differential bitmap of its local volume
        self.runtime: dict[str, PairRuntime] = {}
        self.barriers: dict[str, WriteBarrier] = {}
        # told of every pair record saved (before it is stored) and of every pair forgotten: GAD keeps its
        # volumes' I/O modes with them (vspemu.replication.gad)
        self.on_save: list[Callable[[Pair], None]] = []
        self.on_detach: list[Callable[[Pair], None]] = []
        system.ldev_guards.append(self._guard_ldev)

    def make_replicator(self, targets: list[Target]) -> PairVolume:
        """The write path of a volume in these pairs (the engine's PairVolume)."""
        raise NotImplementedError

    # -- records ----------------------------------------------------------------------------------------
    def index(self, pair: Pair, new: bool = False) -> None:
        """Index a pair and give its volume the write path; ``new``: a pair being created (a clean bitmap)."""
        self.pairs[pair.key] = pair
        self.ldev_pairs.setdefault(pair.local_ldev, []).append(pair)
        self.runtime.setdefault(pair.key, PairRuntime())
        vol = self.system.volumes.get(pair.local_ldev)
        if vol is not None:
            self.bitmaps[pair.key] = self._open_bitmap(pair, vol, new)
        self._attach(pair.local_ldev)

    def unindex(self, pair: Pair) -> None:
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
            vol.replicator = self.make_replicator(targets) if targets else None
            vol.write_gate = self._gate(pairs) if pairs else None
        if ldev is not None:
            self.system.set_ldev_attribute(ldev, "HORC", bool(pairs))

    def _detach(self, pair: Pair) -> None:
        for hook in self.on_detach:
            hook(pair)
        pairs = self.ldev_pairs.get(pair.local_ldev, [])
        pairs[:] = [x for x in pairs if x is not pair]
        if not pairs:
            self.ldev_pairs.pop(pair.local_ldev, None)
        bm = self.bitmaps.pop(pair.key, None)
        if bm is not None:
            bm.remove()
        self._attach(pair.local_ldev)

    @staticmethod
    def _gate(pairs: list[Pair]) -> Callable[[Volume], None]:
        def gate(volume: Volume) -> None:
            for pair in pairs:
                io_mode = pair.extra.get("io_mode")  # GAD: the volume's I/O mode decides (Mirror / Local / Block)
                if io_mode is not None:
                    if io_mode == "Block":
                        raise WriteRefused(f"LDEV {volume.ldev_id} is in I/O mode Block (GAD pair {pair.key})")
                    continue
                if pair.role == "P":
                    if pair.fenced:
                        raise WriteRefused(f"P-VOL {volume.ldev_id} is fenced ({pair.fence}) after a failure")
                    if pair.pvol_write_protect:
                        raise WriteRefused(f"P-VOL {volume.ldev_id} was split with write protection")
                elif not pair.svol_writable:
                    raise WriteRefused(f"S-VOL {volume.ldev_id} is not writable in status {pair.status}")

        return gate

    def save(self, pair: Pair) -> None:
        for hook in self.on_save:
            hook(pair)
        self.system.store.put("pairs", pair.key, pair.doc())

    def save_group(self, group: CopyGroup) -> None:
        self.system.store.put("copy_groups", group.name, group.doc())

    _save_group = save_group  # (the name the REST routes use)

    def _guard_ldev(self, ldev: Ldev, action: str) -> None:
        for pair in self.pairs_of(ldev.ldev_id):
            if action == "expand" and pair.status in SUSPENDED:
                continue  # the array allows expanding split pair volumes (enhancedExpansion)
            raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is a {pair.role}-VOL of pair {pair.key}")

    def _check_pvol_free(self, pvol: int, group_name: str, replication_type: str, mu: int | None,
                         journal_id: int | None) -> None:
        """A volume is in one pair, except a P-VOL of a multi-target set-up: a UR P-VOL may be in up to four
        mirrors, one per mirror unit (muNumber) of the same master journal, since a data volume belongs to one
        journal; and beside those in one TrueCopy pair (3DC multi-target). TrueCopy has mirror unit 0, so the UR
        mirrors of such a volume use mirror units 1-3, as in the array's 3DC configurations (CCI MU# h1-h3).
        A cascade (an S-VOL that is also a P-VOL) is not supported."""
        for other in self.pairs_of(pvol):
            og = self.groups[other.group]
            if "GAD" in (replication_type, og.replication_type):
                raise VspError("IN_USE", detail=f"ldev {pvol} is already a pair volume (pair {other.key}); vspemu "
                                                "does not combine GAD with other pairs of a volume (3DC with GAD)")
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

    def refuse_multi_target_swap(self, pairs: list[Pair]) -> None:
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

    def select(self, group: CopyGroup, pair_name: str | None) -> list[Pair]:
        pairs = self.group_pairs(group.name)
        if pair_name is not None:
            pairs = [self.get_pair(group.name, pair_name)]
        elif not pairs:
            raise VspError("INSTANCE_CANNOT_OPERATE", object_id=f"copy group {group.name}")
        return pairs

    @staticmethod
    def check_names(group_name: str, pair_name: str, local_dg: str | None, remote_dg: str | None) -> None:
        """The names of a new pair and its group (the array's limits)."""
        if not 1 <= len(group_name) <= MAX_GROUP_NAME or " " in group_name:
            raise invalid("copyGroupName", group_name, f"Specify 1 to {MAX_GROUP_NAME} characters, no spaces.")
        for attr, value in (("copyPairName", pair_name), ("localDeviceGroupName", local_dg),
                            ("remoteDeviceGroupName", remote_dg)):
            if value is not None and (not 1 <= len(value) <= MAX_NAME or " " in value or "," in value):
                raise invalid(attr, value, f"Specify 1 to {MAX_NAME} characters, no spaces or commas.")
        if "," in group_name:
            raise invalid("copyGroupName", group_name, "Commas are not allowed.")

    def check_group_for_new_pair(self, group_name: str, group: CopyGroup | None, pair_name: str, new_group: bool,
                                 replication_type: str, remote_device_id: str, local_dg: str | None,
                                 remote_dg: str | None) -> None:
        """A new pair's group: new and not there yet, or there, of the same kind, and primary on this side."""
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
