"""Copy groups and pairs as one storage system records them.

Each side keeps its own record of each pair: its role (``P`` on the system that holds the P-VOL, ``S`` on
the other), its own status, and the last status it learned of the other side (``peer_status``). The two
records are kept in step over the replication link; while the link is down they may disagree, as on the
array. The primary owns the P-VOL status and the secondary the S-VOL status.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

SMPL, COPY, PAIR, PSUS, SSUS, PSUE, PFUL, PFUS, SSWS = (
    "SMPL", "COPY", "PAIR", "PSUS", "SSUS", "PSUE", "PFUL", "PFUS", "SSWS")
SUSPENDED = {PSUS, SSUS, PSUE, PFUS, SSWS}
ACTIVE = {COPY, PAIR, PFUL}
NOT_SPECIFIED = "NotSpecified"
FENCE_LEVELS = ("NEVER", "DATA", "STATUS")


@dataclass
class CopyGroup:
    name: str
    local_dg: str
    remote_dg: str
    remote_device_id: str
    remote_serial: int
    replication_type: str  # "TC" or "UR"
    role: str  # "P" or "S": the role of this side's volumes in the group
    path_group_id: int = 0
    mu_number: int = 0
    local_journal_id: int | None = None
    remote_journal_id: int | None = None
    ctg_id: int = -1  # -1: not in a consistency group

    def doc(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def group_id(self) -> str:
        return f"{self.remote_device_id},{self.name},{self.local_dg},{self.remote_dg}"

    def peer_view(self) -> dict[str, Any]:
        """The same group as the other side records it."""
        d = self.doc()
        d.update(local_dg=self.remote_dg, remote_dg=self.local_dg, role="S" if self.role == "P" else "P",
                 local_journal_id=self.remote_journal_id, remote_journal_id=self.local_journal_id)
        return d


@dataclass
class Pair:
    group: str
    name: str
    role: str  # "P" or "S"
    local_ldev: int
    remote_ldev: int
    status: str
    peer_status: str
    fence: str = "NEVER"
    copy_pace: int = 3
    svol_writable: bool = False  # S side: split with svolAccessMode rw, or SSWS
    pvol_write_protect: bool = False  # P side: split with doPvolWriteProtect
    swap_required: bool = False  # after an S-side takeover a normal resync is refused
    copy_total: int = 0  # tracks to copy in the running copy
    copy_done: int = 0
    fenced: bool = False  # P side: fence level forbids host writes after a failure
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"

    def doc(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def progress(self) -> int:
        if self.status != COPY:
            return -1
        if self.copy_total <= 0:
            return 0
        return min(99, self.copy_done * 100 // self.copy_total)


# the keys a pair object may carry: the Ansible collection's dataclass rejects any other
PAIR_KEYS = frozenset({
    "copyGroupName", "copyPairName", "remoteMirrorCopyPairId", "pvolLdevId", "svolLdevId", "pvolStatus",
    "svolStatus", "pvolStorageDeviceId", "svolStorageDeviceId", "consistencyGroupId",
    "svolDifferenceDataManagement", "svolProcessingStatus", "quorumDiskId", "pvolIOMode", "svolIOMode",
    "replicationType", "fenceLevel", "pvolDifferenceDataManagement", "pvolProcessingStatus", "pvolJournalId",
    "svolJournalId", "isAluaEnabled", "copyProgressRate",
})


def pair_view(group: CopyGroup, pair: Pair, local_device_id: str) -> dict[str, Any]:
    """The pair object as the answering system sees it (ids from its point of view)."""
    p_is_local = pair.role == "P"
    pvol, svol = (pair.local_ldev, pair.remote_ldev) if p_is_local else (pair.remote_ldev, pair.local_ldev)
    pdev, sdev = ((local_device_id, group.remote_device_id) if p_is_local
                  else (group.remote_device_id, local_device_id))
    pst, sst = (pair.status, pair.peer_status) if p_is_local else (pair.peer_status, pair.status)
    view: dict[str, Any] = {
        "remoteMirrorCopyPairId": f"{group.group_id},{pair.name}",
        "copyGroupName": group.name,
        "copyPairName": pair.name,
        "replicationType": group.replication_type,
        "pvolLdevId": pvol,
        "svolLdevId": svol,
        "pvolStorageDeviceId": pdev,
        "svolStorageDeviceId": sdev,
        "pvolStatus": pst,
        "svolStatus": sst,
        "fenceLevel": "ASYNC" if group.replication_type == "UR" else pair.fence,
        "consistencyGroupId": group.ctg_id,
        "copyProgressRate": pair.progress if COPY in (pst, sst) else -1,
        "pvolDifferenceDataManagement": "S",
        "svolDifferenceDataManagement": "S",
        "pvolProcessingStatus": "N",
        "svolProcessingStatus": "N",
        "isAluaEnabled": False,
    }
    if group.replication_type == "UR":
        pj, sj = ((group.local_journal_id, group.remote_journal_id) if group.role == "P"
                  else (group.remote_journal_id, group.local_journal_id))
        view["pvolJournalId"] = pj
        view["svolJournalId"] = sj
    assert set(view) <= PAIR_KEYS
    return view


def group_view(group: CopyGroup, pairs: list[Pair] | None, local_device_id: str) -> dict[str, Any]:
    view: dict[str, Any] = {
        "remoteMirrorCopyGroupId": group.group_id,
        "copyGroupName": group.name,
        "remoteStorageDeviceId": group.remote_device_id,
        "localDeviceGroupName": group.local_dg,
        "remoteDeviceGroupName": group.remote_dg,
    }
    if group.replication_type == "UR":
        view["muNumber"] = group.mu_number
    if pairs is not None:
        view["copyPairs"] = [pair_view(group, p, local_device_id) for p in pairs]
    return view


def status_digest(statuses: Iterable[tuple[str, str]]) -> str:
    """A digest of (pair name, status) pairs, in any order: what one side holds (its statuses) or knows of
    the other (its peer statuses). Equal digests both ways mean a ``pair.state`` exchange would change nothing."""
    h = hashlib.blake2b(digest_size=16)
    for name, status in sorted(statuses):
        h.update(f"{name}={status};".encode())
    return h.hexdigest()
