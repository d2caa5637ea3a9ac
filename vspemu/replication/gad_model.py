"""GAD (global-active device) pairs as data: the I/O mode of each volume, and the fields GAD adds to the pair view.

The I/O mode follows from a side's role, its status, the other side's status as it knows it, and whether
it lost a quorum arbitration (``Pair.extra["lost"]``), so it needs no record of its own:

==============================  ==========  ==================================================================
side                            I/O mode    host I/O
==============================  ==========  ==================================================================
PAIR (either side)              Mirror      reads local, writes on both volumes in one order (.gad_io)
P-VOL in COPY                   Mirror      as in PAIR; the copier carries the writes (the bitmap marks them)
P-VOL split or suspended        Local       the P side serves alone (split PSUS, or won an arbitration PSUE)
P-VOL, the S side took over     Block       the other side is SSWS, or this side lost the arbitration (or
                                            restarted and has not read the quorum yet)
S-VOL in SSWS                   Local       the S side serves alone (takeover, or won the arbitration)
S-VOL otherwise                 Block       COPY, SSUS, PSUE: no host reads or writes
==============================  ==========  ==================================================================

The array reports ``L/M`` for Mirror in some outputs; the REST view says ``Mirror`` (a choice, docs/gad.md).
"""

from __future__ import annotations

from typing import Any

from vspemu.replication.model import COPY, PAIR, SMPL, SSWS, CopyGroup, Pair

GAD = "GAD"
MIRROR, LOCAL_IO, BLOCK = "Mirror", "Local", "Block"


def io_mode_of(role: str, status: str, peer_status: str, lost: bool = False) -> str | None:
    """The I/O mode of a side's volume (None: not a pair volume)."""
    if status == SMPL:
        return None
    if status == PAIR:
        return MIRROR
    if role == "P":
        if lost or peer_status == SSWS:
            return BLOCK
        return MIRROR if status == COPY else LOCAL_IO
    return LOCAL_IO if status == SSWS else BLOCK


def io_mode(pair: Pair) -> str | None:
    # "held": a P side after a restart, until the quorum shows whether the S side took over meanwhile
    blocked = bool(pair.extra.get("lost") or pair.extra.get("held"))
    return io_mode_of(pair.role, pair.status, pair.peer_status, blocked)


def view_fields(group: CopyGroup, pair: Pair) -> dict[str, Any]:
    """What a GAD pair's REST view adds: the quorum disk and the I/O modes of both volumes (the other side's
    from its status as this side knows it)."""
    if group.replication_type != GAD:
        return {}
    own = io_mode(pair)
    other = io_mode_of("S" if pair.role == "P" else "P", pair.peer_status, pair.status)
    pmode, smode = (own, other) if pair.role == "P" else (other, own)
    out: dict[str, Any] = {"fenceLevel": "NEVER", "pvolIOMode": pmode or "Block", "svolIOMode": smode or "Block"}
    out["isAluaEnabled"] = pair.extra.get("alua") is True  # as the create asked (both sides know it)
    if isinstance(pair.extra.get("quorum"), int):
        out["quorumDiskId"] = pair.extra["quorum"]
    return out


def complete_view(group: CopyGroup, pair: Pair, view: dict[str, Any]) -> dict[str, Any]:
    """A pair's REST view with the GAD fields (``view_fields``); a GAD pair in no consistency group has no
    ``consistencyGroupId`` at all (choice: the collection's hv_gad swap_split refuses any pair whose
    answer carries an int consistencyGroupId, -1 included, as "in a consistency group"; the array must
    leave it out for swap_split to work). TC and UR views are left as they are."""
    if group.replication_type != GAD:
        return view
    view.update(view_fields(group, pair))
    if view.get("consistencyGroupId", -1) < 0:
        view.pop("consistencyGroupId", None)
    return view
