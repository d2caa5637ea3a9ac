"""ShadowImage records: a pair, its statuses, the transition table and the REST view.

A pair is known by ``{copyGroupName},{pvolDeviceGroupName},{svolDeviceGroupName},{copyPairName}`` (the
array's ``localCloneCopypairId``); its group by the first three parts (``localCloneCopygroupId``).

Transitions are a state table in the shared format of :mod:`vspemu.replication.states`, :data:`SHADOWIMAGE`
(type "SI", role ``LOCAL``): ``(status, operation) -> new status`` or a refusal (WRONG_STATE).
The status a copy reaches when it completes (COPY -> PAIR, RCPY -> PAIR) is the copier's, not an operation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vspemu.replication import states
from vspemu.replication.states import LOCAL, Outcome, Refusal, StateTable

SMPL = "SMPL"
COPY = "COPY"  # initial copy or resync under way (the array shows COPY(PD) / COPY(RS))
PAIR = "PAIR"
PSUS = "PSUS"  # split: the S-VOL holds the P-VOL's image of the split instant, hosts may use it
RCPY = "RCPY"  # reverse resync (restore) under way: S-VOL -> P-VOL
PSUE = "PSUE"  # suspended by an error (the copy failed)
STATUSES = (COPY, PAIR, PSUS, RCPY, PSUE)

DEFAULT_COPY_PACE = 3
MAX_MU = 2  # a P-VOL is in at most 3 ShadowImage pairs (mirror units 0-2)

OPERATIONS = ("split", "resync", "restore", "delete")


def _refusal(why: str) -> Refusal:
    return Refusal("WRONG_STATE", "{op} of ShadowImage pair {key}: " + why)


_RESTORING = _refusal("a reverse resync (restore) is under way")
_PSUE = _refusal("the pair is suspended by an error (PSUE); resync it first")
# (status, operation) -> the new status, or why it is refused
_TRANSITIONS: dict[tuple[str, str], Outcome] = {
    (COPY, "split"): PSUS,
    (PAIR, "split"): PSUS,
    (PSUS, "split"): _refusal("the pair is split already"),
    (RCPY, "split"): _RESTORING,
    (PSUE, "split"): _PSUE,
    (COPY, "resync"): _refusal("a copy is under way"),
    (PAIR, "resync"): _refusal("the pair is in PAIR already"),
    (PSUS, "resync"): COPY,
    (RCPY, "resync"): _RESTORING,
    (PSUE, "resync"): COPY,
    (COPY, "restore"): _refusal("a copy is under way; split the pair first"),
    (PAIR, "restore"): _refusal("the pair is in PAIR; split it first"),
    (PSUS, "restore"): RCPY,
    (RCPY, "restore"): _RESTORING,
    (PSUE, "restore"): _PSUE,
    (COPY, "delete"): SMPL,
    (PAIR, "delete"): SMPL,
    (PSUS, "delete"): SMPL,
    (RCPY, "delete"): _RESTORING,
    (PSUE, "delete"): SMPL,
}

SHADOWIMAGE = states.register(StateTable(
    "SI", {(status, LOCAL, op): out for (status, op), out in _TRANSITIONS.items()}, {},
    statuses=STATUSES, roles=(LOCAL,), operations=OPERATIONS,
    default=_refusal("{op} is not an operation in status {status}")))


def check_transition(pair_id: str, status: str, operation: str) -> str:
    """The status ``operation`` takes a pair to; WRONG_STATE (naming the pair) if it is refused."""
    return states.next_local_status(SHADOWIMAGE, status, operation, pair_id)


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
