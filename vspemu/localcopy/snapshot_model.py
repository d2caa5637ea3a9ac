"""A Thin Image snapshot's record, the constants of Thin Image and the REST view of a snapshot."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from vspemu.localcopy.cow import Area
from vspemu.localcopy.snapshot_states import PAIR
from vspemu.system.storage import StorageSystem

TRACK = 256 << 10  # bytes saved per first change of a track (the array's Thin Image granularity)
MAX_MU = 1023  # mirror units 0-1023: up to 1,024 snapshots per P-VOL, as on the array
KIND = "snapshots"  # the configuration store's kind
# muNumber chosen when none is given: from 3 up (0-2 are the mirror units ShadowImage uses on the array, and the
# Ansible collection takes mirror unit 0 for "not given"), 0-2 last
AUTO_MU_ORDER = (*range(3, MAX_MU + 1), 0, 1, 2)
HTI_ATTRIBUTE = "HTI"  # in an LDEV's attributes while it is a snapshot P-VOL or an assigned S-VOL (as on the array)


@dataclass
class Snapshot:
    pvol: int
    mu: int
    pool_id: int
    group: str
    consistency_group: bool = False
    can_cascade: bool = False
    is_clone: bool = False
    svol: int | None = None
    status: str = PAIR
    seq: int = 0  # split order (0: not split)
    split_time: float | None = None
    epoch: int = 0  # counts S-VOL assignments and resets of host-written data (see cow.WRITTEN)
    area: Area | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.pvol},{self.mu}"

    def doc(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "area"}

    @property
    def data(self) -> Area:
        assert self.area is not None
        return self.area

    def written(self) -> set[int]:
        """The tracks of the assigned S-VOL that hold host-written bytes."""
        if self.svol is None or self.area is None:
            return set()
        return self.area.written.get(self.epoch, set())


def view(s: Snapshot, system: StorageSystem) -> dict[str, Any]:
    """The snapshot as the array's REST API shows it."""
    out: dict[str, Any] = {
        "snapshotGroupName": s.group, "primaryOrSecondary": "P-VOL", "status": s.status,
        "pvolLdevId": s.pvol, "muNumber": s.mu, "snapshotPoolId": s.pool_id,
        "concordanceRate": 100 if s.status == PAIR else 0,
        "isConsistencyGroup": s.consistency_group, "isWrittenInSvol": bool(s.written()) or bool(
            s.area is not None and s.area.own),
        "isClone": s.is_clone, "canCascade": s.can_cascade, "isRedirectOnWrite": False,
        "pvolProcessingStatus": "N", "snapshotId": s.key, "snapshotReplicationId": s.key,
        "type": "NORMAL",
    }
    if s.svol is not None:
        out["svolLdevId"] = s.svol
    if s.split_time is not None and s.status != PAIR:
        out["splitTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.split_time))
    if s.consistency_group:
        out["consistencyGroupId"] = 0
    return out
