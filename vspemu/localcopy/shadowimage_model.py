"""ShadowImage records: a pair, its statuses, the transition table and the REST view.

A pair is known by ``{copyGroupName},{pvolDeviceGroupName},{svolDeviceGroupName},{copyPairName}`` (the
array's ``localCloneCopypairId``); its group by the first three parts (``localCloneCopygroupId``).

Transitions are a data table, :data:`TRANSITIONS`: ``(status, operation) -> new status`` or a refusal text.
The status a copy reaches when it completes (COPY -> PAIR, RCPY -> PAIR) is the copier's, not an operation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SMPL = "SMPL"
COPY = "COPY"  # initial copy or resync under way (the array shows COPY(PD) / COPY(RS))
PAIR = "PAIR"
PSUS = "PSUS"  # split: the S-VOL holds the P-VOL's image of the split instant, hosts may use it
RCPY = "RCPY"  # reverse resync (restore) under way: S-VOL -> P-VOL
PSUE = "PSUE"  # suspended by an error (the copy failed)
STATUSES = (COPY, PAIR, PSUS, RCPY, PSUE)

DEFAULT_COPY_PACE = 3
MAX_MU = 2  # a P-VOL is in at most 3 ShadowImage pairs (mirror units 0-2)

Refusal = str  # the reason an operation is refused in a status

# (status, operation) -> the new status, or a refusal (str starting with "!")
TRANSITIONS: dict[tuple[str, str], str] = {
    (COPY, "split"): PSUS,
    (PAIR, "split"): PSUS,
    (PSUS, "split"): "!the pair is split already",
    (RCPY, "split"): "!a reverse resync (restore) is under way",
    (PSUE, "split"): "!the pair is suspended by an error (PSUE); resync it first",
    (COPY, "resync"): "!a copy is under way",
    (PAIR, "resync"): "!the pair is in PAIR already",
    (PSUS, "resync"): COPY,
    (RCPY, "resync"): "!a reverse resync (restore) is under way",
    (PSUE, "resync"): COPY,
    (COPY, "restore"): "!a copy is under way; split the pair first",
    (PAIR, "restore"): "!the pair is in PAIR; split it first",
    (PSUS, "restore"): RCPY,
    (RCPY, "restore"): "!a reverse resync (restore) is under way",
    (PSUE, "restore"): "!the pair is suspended by an error (PSUE); resync it first",
    (COPY, "delete"): SMPL,
    (PAIR, "delete"): SMPL,
    (PSUS, "delete"): SMPL,
    (RCPY, "delete"): "!a reverse resync (restore) is under way",
    (PSUE, "delete"): SMPL,
}


def transition(status: str, operation: str) -> tuple[str | None, Refusal | None]:
    """(new status, None) if allowed, else (None, why it is refused)."""
    new = TRANSITIONS.get((status, operation))
    if new is None:
        return None, f"{operation} is not an operation in status {status}"
    if new.startswith("!"):
        return None, new[1:]
    return new, None


@dataclass
class SiPair:
    group: str  # copyGroupName
    pvol_dg: str
    svol_dg: str
    name: str  # copyPairName
    pvol: int
    svol: int
    mu: int = 0
    status: str = COPY
    copy_pace: int = DEFAULT_COPY_PACE
    consistency_group_id: int | None = None
    auto_split: bool = False
    split_time: float | None = None
    total_tracks: int = 0  # tracks the current copy started with (for copyProgressRate)

    @property
    def group_id(self) -> str:
        return f"{self.group},{self.pvol_dg},{self.svol_dg}"

    @property
    def pair_id(self) -> str:
        return f"{self.group_id},{self.name}"

    def doc(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> SiPair:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in known})


def svol_status(pair: SiPair) -> str:
    return pair.status


def pair_view(pair: SiPair, progress: int, device_id: str) -> dict[str, Any]:
    """The array's ``local-clone-copypairs`` object."""
    view: dict[str, Any] = {
        "localCloneCopypairId": pair.pair_id,
        "copyGroupName": pair.group,
        "copyPairName": pair.name,
        "replicationType": "SI",
        "pvolLdevId": pair.pvol,
        "pvolDeviceGroupName": pair.pvol_dg,
        "pvolStatus": pair.status,
        "pvolMuNumber": pair.mu,
        "svolLdevId": pair.svol,
        "svolDeviceGroupName": pair.svol_dg,
        "svolStatus": svol_status(pair),
        "copyPace": pair.copy_pace,
        "copyProgressRate": progress,
        "isConsistencyGroup": pair.consistency_group_id is not None,
        "storageDeviceId": device_id,
    }
    if pair.consistency_group_id is not None:
        view["consistencyGroupId"] = pair.consistency_group_id
    if pair.split_time is not None and pair.status == PSUS:
        import time

        view["splitTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pair.split_time))
    return view


def group_view(group_id: str, pairs: list[SiPair], device_id: str) -> dict[str, Any]:
    """The array's ``local-clone-copygroups`` object."""
    name, pdg, sdg = group_id.split(",")
    return {
        "localCloneCopygroupId": group_id,
        "copyGroupName": name,
        "pvolDeviceGroupName": pdg,
        "svolDeviceGroupName": sdg,
        "storageDeviceId": device_id,
        "copyPairCount": len(pairs),
    }
