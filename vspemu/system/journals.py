"""Journals (Universal Replicator): journal ids, their journal volumes and their settings.

A journal is a set of one or two journal volumes (existing DP LDEVs without LU paths and not paired) under a
journal id 0-255, with four mirror units (mu 0-3). Its configuration is persisted; its runtime figures
(journalStatus per mirror, usageRate, qMarker, qCount, numOfActivePaths, isDataCopying) live in memory and
are set by the UR code through :meth:`Journals.set_runtime`. A journal volume carries the LDEV attribute
"JNL" and can be neither mapped, expanded nor deleted while it is in the journal (an ``ldev_guards`` hook).

The UR code marks a journal as used by pairs with :attr:`Journals.users` (callables returning a reason
string when the journal, or one of its mirrors, is in use); a used journal cannot be deleted or shrunk.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from vspemu.errors import VspError, invalid, not_found
from vspemu.system.capacity import format_byte_capacity
from vspemu.system.storage import JOURNAL_ATTRIBUTE, Ldev, StorageSystem

MAX_JOURNAL_ID = 255
MAX_JOURNAL_VOLUMES = 2  # one journal volume and one reserve journal volume (VSP 5000 / E series)
MIRROR_UNITS = 4
COPY_SPEEDS = (3, 10, 100, 256)  # Mbps
COPY_PACES = ("L", "M", "H")
MAX_MP_BLADE_ID = 15
JNL = JOURNAL_ATTRIBUTE  # the LDEV attribute of a journal volume (it refuses host I/O)
PAIR_ATTRIBUTE = "HORC"


@dataclass
class MirrorUnit:
    mu_number: int
    copy_pace: str = "L"
    path_blockade_watch_minutes: int = 5
    # runtime, set by the UR code (not persisted)
    journal_status: str = "SMPL"
    consistency_group_id: int = 0
    is_data_copying: bool = False
    q_count: int | None = None  # entries the mirror's secondary has still to restore (None: the journal's)


@dataclass
class Journal:
    journal_id: int
    ldev_ids: list[int]
    mp_blade_id: int = 0
    is_cache_mode_enabled: bool = True
    is_inflow_control_enabled: bool = False
    data_overflow_watch_seconds: int = 60
    copy_speed: int = 256
    mirrors: list[MirrorUnit] = field(default_factory=lambda: [MirrorUnit(mu) for mu in range(MIRROR_UNITS)])
    # runtime, set by the UR code (not persisted)
    usage_rate: int = 0
    q_marker: str = "00000000"
    q_count: int = 0
    num_of_active_paths: int = 0

    RUNTIME = ("usage_rate", "q_marker", "q_count", "num_of_active_paths")
    MIRROR_RUNTIME = ("journal_status", "consistency_group_id", "is_data_copying", "q_count")

    def doc(self) -> dict[str, Any]:
        d = asdict(self)
        for key in self.RUNTIME:
            d.pop(key)
        d["mirrors"] = [{k: v for k, v in m.items() if k not in self.MIRROR_RUNTIME} for m in d["mirrors"]]
        return d

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Journal:
        doc = dict(doc)
        mirrors = [MirrorUnit(**m) for m in doc.pop("mirrors", [])]
        j = cls(**doc)
        if mirrors:
            j.mirrors = mirrors
        return j

    def mirror(self, mu: int) -> MirrorUnit:
        if not 0 <= mu < MIRROR_UNITS:
            raise invalid("muNumber", mu, f"Specify a value from 0 to {MIRROR_UNITS - 1}.")
        return self.mirrors[mu]


UserCheck = Callable[[Journal], str | None]


class Journals:
    def __init__(self, system: StorageSystem) -> None:
        self.system = system
        self.journals: dict[int, Journal] = {
            int(k): Journal.from_doc(v) for k, v in system.store.load("journals").items()
        }
        # set by the UR code: "is this journal used by pairs?" -> reason or None
        self.users: list[UserCheck] = []
        # set by the UR code: bring the runtime figures up to date before a view is rendered
        self.refreshers: list[Callable[[], None]] = []
        system.ldev_guards.append(self._guard)

    # -- queries ----------------------------------------------------------------------------------
    def get(self, journal_id: int) -> Journal:
        self.check_id(journal_id)
        j = self.journals.get(journal_id)
        if j is None:
            raise not_found("journal", journal_id)
        return j

    def list(self) -> list[Journal]:
        return [self.journals[k] for k in sorted(self.journals)]

    def ldevs_of(self, journal_id: int) -> builtins.list[int]:
        j = self.journals.get(journal_id)
        return list(j.ldev_ids) if j else []

    def journal_of_ldev(self, ldev_id: int) -> Journal | None:
        return next((j for j in self.journals.values() if ldev_id in j.ldev_ids), None)

    def in_use(self, journal: Journal) -> str | None:
        for check in self.users:
            reason = check(journal)
            if reason:
                return reason
        return None

    def capacity_blocks(self, journal: Journal) -> int:
        return sum(self.system.ldevs[i].block_capacity for i in journal.ldev_ids if i in self.system.ldevs)

    # -- checks -----------------------------------------------------------------------------------
    @staticmethod
    def check_id(journal_id: int) -> None:
        if not 0 <= journal_id <= MAX_JOURNAL_ID:
            raise invalid("journalId", journal_id, f"Specify a value from 0 to {MAX_JOURNAL_ID}.")

    def _guard(self, ldev: Ldev, action: str) -> None:
        j = self.journal_of_ldev(ldev.ldev_id)
        if j is not None and action in ("delete", "map", "expand"):
            raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is a journal volume of journal {j.journal_id}")

    def check_volume(self, ldev_id: int) -> Ldev:
        ldev = self.system.get_ldev(ldev_id)
        owner = self.journal_of_ldev(ldev_id)
        if owner is not None:
            raise VspError("JOURNAL_VOLUME_INVALID", ldev=ldev_id,
                           reason=f"it is already a journal volume of journal {owner.journal_id}")
        if self.system.ldev_luns(ldev_id):
            raise VspError("JOURNAL_VOLUME_INVALID", ldev=ldev_id, reason="it has LU paths")
        if PAIR_ATTRIBUTE in ldev.extra_attributes:
            raise VspError("JOURNAL_VOLUME_INVALID", ldev=ldev_id, reason="it is a pair volume")
        return ldev

    def _check_volumes(self, ldev_ids: builtins.list[int]) -> builtins.list[Ldev]:
        if len(set(ldev_ids)) != len(ldev_ids):
            raise invalid("ldevIds", ldev_ids, "An LDEV is specified more than once.")
        return [self.check_volume(i) for i in ldev_ids]

    # -- changes ----------------------------------------------------------------------------------
    def _save(self, j: Journal) -> None:
        self.system.store.put("journals", j.journal_id, j.doc())
        self.journals[j.journal_id] = j

    def check_create(self, journal_id: int, ldev_ids: builtins.list[int]) -> None:
        self.check_id(journal_id)
        if journal_id in self.journals:
            raise VspError("JOURNAL_ID_IN_USE", journal=journal_id)
        if not 1 <= len(ldev_ids) <= MAX_JOURNAL_VOLUMES:
            raise invalid("ldevIds", ldev_ids, f"Specify 1 to {MAX_JOURNAL_VOLUMES} LDEVs.")
        self._check_volumes(ldev_ids)

    def create(self, journal_id: int, ldev_ids: builtins.list[int], mp_blade_id: int | None = None) -> Journal:
        self.check_create(journal_id, ldev_ids)
        ldevs = self._check_volumes(ldev_ids)
        j = Journal(journal_id, list(ldev_ids), mp_blade_id=journal_id % 4 if mp_blade_id is None else mp_blade_id)
        with self.system.store.transaction():
            self._save(j)
            for ldev in ldevs:
                self.system.set_ldev_attribute(ldev, JNL, True)
        return j

    def expand(self, journal_id: int, ldev_ids: builtins.list[int]) -> Journal:
        j = self.get(journal_id)
        if len(j.ldev_ids) + len(ldev_ids) > MAX_JOURNAL_VOLUMES:
            raise VspError("JOURNAL_VOLUMES_MAX", journal=journal_id, maximum=MAX_JOURNAL_VOLUMES)
        ldevs = self._check_volumes(ldev_ids)
        with self.system.store.transaction():
            j.ldev_ids.extend(ldev_ids)
            self._save(j)
            for ldev in ldevs:
                self.system.set_ldev_attribute(ldev, JNL, True)
        return j

    def shrink(self, journal_id: int, ldev_ids: builtins.list[int]) -> Journal:
        j = self.get(journal_id)
        for i in ldev_ids:
            if i not in j.ldev_ids:
                raise invalid("ldevIds", i, f"LDEV {i} is not a journal volume of journal {journal_id}.")
        if len(set(ldev_ids)) >= len(j.ldev_ids):
            raise VspError("WRONG_STATE", detail=f"the last journal volume of journal {journal_id} cannot be "
                                                 "removed; delete the journal instead")
        reason = self.in_use(j)
        if reason:
            raise VspError("IN_USE", detail=f"journal {journal_id}: {reason}")
        with self.system.store.transaction():
            j.ldev_ids = [i for i in j.ldev_ids if i not in ldev_ids]
            self._save(j)
            for i in ldev_ids:
                self.system.set_ldev_attribute(self.system.get_ldev(i), JNL, False)
        return j

    def delete(self, journal_id: int) -> None:
        j = self.get(journal_id)
        reason = self.in_use(j)
        if reason:
            raise VspError("IN_USE", detail=f"journal {journal_id}: {reason}")
        with self.system.store.transaction():
            self.system.store.delete("journals", journal_id)
            del self.journals[journal_id]
            for i in j.ldev_ids:
                ldev = self.system.ldevs.get(i)
                if ldev is not None:
                    self.system.set_ldev_attribute(ldev, JNL, False)

    def update(self, journal_id: int, *, data_overflow_watch: int | None = None, cache_mode: bool | None = None,
               inflow_control: bool | None = None, copy_speed: int | None = None, mu: int | None = None,
               copy_pace: str | None = None, path_blockade_watch: int | None = None) -> Journal:
        j = self.get(journal_id)
        if data_overflow_watch is not None and not 0 <= data_overflow_watch <= 600:
            raise invalid("dataOverflowWatchInSeconds", data_overflow_watch, "Specify a value from 0 to 600.")
        if copy_speed is not None and copy_speed not in COPY_SPEEDS:
            raise invalid("copySpeed", copy_speed, f"Specify one of {', '.join(map(str, COPY_SPEEDS))}.")
        mirror = None
        if mu is not None or copy_pace is not None or path_blockade_watch is not None:
            if mu is None:
                raise VspError("MISSING_PARAMETER", attribute="mirrorUnit.muNumber")
            mirror = j.mirror(mu)
            if copy_pace is not None and copy_pace not in COPY_PACES:
                raise invalid("mirrorUnit.copyPace", copy_pace, "Specify L, M or H.")
            if path_blockade_watch is not None and not 0 <= path_blockade_watch <= 60:
                raise invalid("mirrorUnit.pathBlockadeWatchInMinutes", path_blockade_watch,
                              "Specify a value from 0 to 60.")
        if data_overflow_watch is not None:
            j.data_overflow_watch_seconds = data_overflow_watch
        if cache_mode is not None:
            j.is_cache_mode_enabled = cache_mode
        if inflow_control is not None:
            j.is_inflow_control_enabled = inflow_control
        if copy_speed is not None:
            j.copy_speed = copy_speed
        if mirror is not None:
            if copy_pace is not None:
                mirror.copy_pace = copy_pace
            if path_blockade_watch is not None:
                mirror.path_blockade_watch_minutes = path_blockade_watch
        self._save(j)
        return j

    def assign_mp_blade(self, journal_id: int, mp_blade_id: int) -> Journal:
        j = self.get(journal_id)
        if not 0 <= mp_blade_id <= MAX_MP_BLADE_ID:
            raise invalid("mpBladeId", mp_blade_id, f"Specify a value from 0 to {MAX_MP_BLADE_ID}.")
        j.mp_blade_id = mp_blade_id
        self._save(j)
        return j

    def set_runtime(self, journal_id: int, mu: int | None = None, **values: Any) -> None:
        """For the UR code: update runtime figures (journal-wide, or of one mirror with ``mu``)."""
        j = self.get(journal_id)
        target: Any = j if mu is None else j.mirror(mu)
        allowed = Journal.RUNTIME if mu is None else Journal.MIRROR_RUNTIME
        for key, value in values.items():
            if key not in allowed:
                raise AttributeError(f"{key} is not a runtime field ({', '.join(allowed)})")
            setattr(target, key, value)

    # -- views ------------------------------------------------------------------------------------
    def _basic(self, j: Journal, m: MirrorUnit) -> dict[str, Any]:
        blocks = self.capacity_blocks(j)
        return {
            "journalId": j.journal_id,
            "muNumber": m.mu_number,
            "consistencyGroupId": m.consistency_group_id,
            "journalStatus": m.journal_status,
            "numOfActivePaths": j.num_of_active_paths,
            "usageRate": j.usage_rate,
            "qMarker": j.q_marker,
            "qCount": j.q_count if m.q_count is None else m.q_count,  # per mirror, as raidcom shows Q-CNT
            "byteFormatCapacity": format_byte_capacity(blocks * 512),
            "blockCapacity": blocks,
            "numOfLdevs": len(j.ldev_ids),
            "firstLdevId": j.ldev_ids[0],
        }

    def refresh(self) -> None:
        for refresh in self.refreshers:
            refresh()

    def basic_views(self, j: Journal) -> builtins.list[dict[str, Any]]:
        """One entry per mirror in use; a journal without pairs shows one SMPL entry (mu 0)."""
        self.refresh()
        used = [m for m in j.mirrors if m.journal_status != "SMPL"]
        return [self._basic(j, m) for m in (used or [j.mirrors[0]])]

    def detail_view(self, j: Journal) -> dict[str, Any]:
        self.refresh()
        return {
            "journalId": j.journal_id,
            "isMainframe": False,
            "isCacheModeEnabled": j.is_cache_mode_enabled,
            "isInflowControlEnabled": j.is_inflow_control_enabled,
            "dataOverflowWatchInSeconds": j.data_overflow_watch_seconds,
            "copySpeed": j.copy_speed,
            "isDataCopying": any(m.is_data_copying for m in j.mirrors),
            "mpBladeId": j.mp_blade_id,
            "mirrorUnits": [
                {"muNumber": m.mu_number, "consistencyGroupId": m.consistency_group_id,
                 "journalStatus": m.journal_status, "pathBlockadeWatchInMinutes": m.path_blockade_watch_minutes,
                 "copyPace": m.copy_pace, "copySpeed": j.copy_speed, "isDataCopying": m.is_data_copying}
                for m in j.mirrors
            ],
        }
