"""The pair state machines, as data: (status, role, operation) -> new status, "no change", or a refusal.

One :class:`StateTable` per replication type. The engine (:mod:`.engine`) and the REST routes' prechecks
consult the table of a pair's type through :func:`outcome` / :func:`check`; they never test statuses for an
operation themselves. A new replication type (GAD, ShadowImage, Thin Image) adds a table here and registers it
in :data:`TABLES`; it does not add branches to the engine (see docs/architecture.md).

A cell's key is the pair's own status on the side the operation is issued to, that side's role (``P`` holds
the P-VOL, ``S`` the S-VOL; :data:`LOCAL` for a local copy, whose one record holds both volumes), and the
operation. A few decisions also depend on what a side knows besides its
status; those are named *conditions* (:func:`conditions`) with their own rows, which take precedence over the
status cells:

``taken_over``       the S side took over (the other side is SSWS, or a swap is required since): a normal
                     resync is refused, a swap resync is the way back.
``swapped_running``  a P side that became the primary by a swap and copies or is in PAIR with its peer: a
                     swap resync issued again is accepted (the swap goes on from here).

Local copies (Thin Image: vspemu.localcopy.snapshot_states, ShadowImage: vspemu.localcopy.shadowimage_model)
keep their tables in the same format, with their own statuses and operations, role :data:`LOCAL` only and a
``default`` refusal for the cells they leave out; they :func:`register` them here under their own type names
("TI", "SI") when imported, and answer through :func:`next_local_status`. This module imports no local copy.

Group rules, applied by the engine before the cells: a resync of a group whose pairs are all active (COPY,
PAIR, PFUL) is accepted with no change (the CCI acceptance rule); UR pairs are operated in units of mirrors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vspemu.errors import VspError
from vspemu.replication.model import (
    ACTIVE,
    COPY,
    PAIR,
    PFUL,
    PFUS,
    PSUE,
    PSUS,
    SMPL,
    SSUS,
    SSWS,
    SUSPENDED,
    Pair,
)

STATUSES = (SMPL, COPY, PAIR, PSUS, SSUS, PSUE, PFUL, PFUS, SSWS)
ROLES = ("P", "S")
LOCAL = "L"  # the role of a local copy's record (both volumes on this system)

# operations
SPLIT = "split"  # pairsplit (P -> PSUS, S -> SSUS)
SPLIT_SSWS = "split-ssws"  # pairsplit with svolOperationMode SSWS: the S-VOL takes over
RESYNC = "resync"  # pairresync from the side that holds the P-VOL
RESYNC_SWAP = "resync-swap"  # pairresync with doSwapSvol: the roles reverse, the differences are copied
TAKEOVER = "takeover"  # horctakeover (on the P side: unfence only)
DELETE = "delete"  # pairsplit -S
OPERATIONS = (SPLIT, SPLIT_SSWS, RESYNC, RESYNC_SWAP, TAKEOVER, DELETE)

# conditions (see the module docstring)
TAKEN_OVER = "taken_over"
SWAPPED_RUNNING = "swapped_running"
CONDITIONS = (TAKEN_OVER, SWAPPED_RUNNING)

NO_CHANGE = "="  # accepted, the pair keeps its status
SUSPENDED_BY_ERROR = frozenset({PSUE, PFUS})  # a waiter for PAIR gives up (pairevtwait, the CLI's progress)


@dataclass(frozen=True)
class Refusal:
    """The error the operation is refused with (a message id of :mod:`vspemu.errors` and its detail, which
    may name ``{key}`` and ``{status}`` of the pair and the operation ``{op}``)."""

    message_id: str
    detail: str

    def error(self, pair: Pair) -> VspError:
        return self.error_for(pair.key, pair.status, "")

    def error_for(self, key: str, status: str, op: str) -> VspError:
        return VspError(self.message_id, detail=self.detail.format(key=key, status=status, op=op))


Outcome = str | Refusal  # a new status, NO_CHANGE, or a refusal


@dataclass(frozen=True)
class StateTable:
    replication_type: str
    cells: Mapping[tuple[str, str, str], Outcome]  # (status, role, operation) -> outcome
    conditions: Mapping[tuple[str, str], Outcome]  # (condition, operation) -> outcome, before the cells
    statuses: tuple[str, ...] = STATUSES
    roles: tuple[str, ...] = ROLES
    operations: tuple[str, ...] = OPERATIONS
    default: Refusal | None = None  # the outcome of a cell the table leaves out (None: every cell is there)

    @property
    def remote(self) -> bool:
        """A remote copy's table (P and S sides on two systems), not a local copy's."""
        return self.roles == ROLES


# -- the refusals (their texts are what the array's users see; tests pin the message ids) --------------------
SMPL_PAIR = Refusal("WRONG_STATE", "pair {key} is SMPL")
SSWS_ON_P = Refusal("WRONG_STATE", "svolOperationMode SSWS must be issued to the storage system that holds "
                                   "the S-VOL")
TAKEN_OVER_RESYNC = Refusal("WRONG_STATE", "pair {key} was taken over by the S side (SSWS): resynchronize with "
                                           "doSwapSvol")
RESYNC_ON_S = Refusal("WRONG_STATE", "a resync must be issued to the storage system that holds the P-VOL (or use "
                                     "doSwapSvol to reverse the direction)")
SWAP_NOT_SPLIT = Refusal("WRONG_STATE", "pair {key} is {status}; split it before a swap resync")


def _remote_copy_cells() -> dict[tuple[str, str, str], Outcome]:
    """The cells TrueCopy and Universal Replicator share, written out status by status."""
    cells: dict[tuple[str, str, str], Outcome] = {}

    def row(status: str, role: str, split: Outcome, split_ssws: Outcome, resync: Outcome, resync_swap: Outcome,
            takeover: Outcome, delete: Outcome = SMPL) -> None:
        for op, out in ((SPLIT, split), (SPLIT_SSWS, split_ssws), (RESYNC, resync), (RESYNC_SWAP, resync_swap),
                        (TAKEOVER, takeover), (DELETE, delete)):
            cells[(status, role, op)] = out

    #        status role  split        split-ssws  resync             resync-swap     takeover
    row(SMPL, "P", SMPL_PAIR, SSWS_ON_P, NO_CHANGE, SWAP_NOT_SPLIT, NO_CHANGE)
    row(COPY, "P", PSUS, SSWS_ON_P, NO_CHANGE, SWAP_NOT_SPLIT, NO_CHANGE)
    row(PAIR, "P", PSUS, SSWS_ON_P, NO_CHANGE, SWAP_NOT_SPLIT, NO_CHANGE)
    row(PFUL, "P", PSUS, SSWS_ON_P, NO_CHANGE, SWAP_NOT_SPLIT, NO_CHANGE)
    row(PSUS, "P", NO_CHANGE, SSWS_ON_P, COPY, COPY, NO_CHANGE)
    row(SSUS, "P", NO_CHANGE, SSWS_ON_P, COPY, COPY, NO_CHANGE)
    row(PSUE, "P", NO_CHANGE, SSWS_ON_P, COPY, COPY, NO_CHANGE)
    row(PFUS, "P", NO_CHANGE, SSWS_ON_P, COPY, COPY, NO_CHANGE)
    row(SSWS, "P", NO_CHANGE, SSWS_ON_P, TAKEN_OVER_RESYNC, COPY, NO_CHANGE)
    row(SMPL, "S", SMPL_PAIR, SSWS, RESYNC_ON_S, SWAP_NOT_SPLIT, SSWS)
    row(COPY, "S", SSUS, SSWS, RESYNC_ON_S, SWAP_NOT_SPLIT, SSWS)
    row(PAIR, "S", SSUS, SSWS, RESYNC_ON_S, SWAP_NOT_SPLIT, SSWS)
    row(PFUL, "S", SSUS, SSWS, RESYNC_ON_S, SWAP_NOT_SPLIT, SSWS)
    row(PSUS, "S", NO_CHANGE, SSWS, RESYNC_ON_S, COPY, SSWS)
    row(SSUS, "S", NO_CHANGE, SSWS, RESYNC_ON_S, COPY, SSWS)
    row(PSUE, "S", NO_CHANGE, SSWS, RESYNC_ON_S, COPY, SSWS)
    row(PFUS, "S", NO_CHANGE, SSWS, RESYNC_ON_S, COPY, SSWS)
    row(SSWS, "S", NO_CHANGE, SSWS, TAKEN_OVER_RESYNC, COPY, NO_CHANGE)
    return cells


_REMOTE_COPY_CONDITIONS: dict[tuple[str, str], Outcome] = {
    (TAKEN_OVER, RESYNC): TAKEN_OVER_RESYNC,
    (SWAPPED_RUNNING, RESYNC_SWAP): COPY,
}

TRUECOPY = StateTable("TC", _remote_copy_cells(), _REMOTE_COPY_CONDITIONS)
# Universal Replicator: the same transitions (PFUL / PFUS are its own statuses); its operations act on whole
# mirrors, a group rule of the engine
UNIVERSAL_REPLICATOR = StateTable("UR", _remote_copy_cells(), _REMOTE_COPY_CONDITIONS)

# GAD (global-active device): the same transitions as TrueCopy (split: PSUS/SSUS, SSWS: the S side takes over,
# swap resync after a takeover); what differs is the I/O mode each status gives the volumes (vspemu.replication
# .gad_model.io_mode: Mirror in PAIR, Local for the side that serves alone, Block for the other)
GAD = StateTable("GAD", _remote_copy_cells(), _REMOTE_COPY_CONDITIONS)

TABLES: dict[str, StateTable] = {t.replication_type: t for t in (TRUECOPY, UNIVERSAL_REPLICATOR, GAD)}


def register(table: StateTable) -> StateTable:
    """Add a replication type's table to :data:`TABLES` (local copies do, from their own modules)."""
    TABLES[table.replication_type] = table
    return table


def conditions(pair: Pair) -> list[str]:
    """The named conditions that hold for ``pair`` (see the module docstring)."""
    out: list[str] = []
    if pair.peer_status == SSWS or pair.swap_required:
        out.append(TAKEN_OVER)
    if pair.role == "P" and pair.status in ACTIVE and pair.peer_status in ACTIVE and pair.extra.get("swapped"):
        out.append(SWAPPED_RUNNING)
    return out


def outcome(table: StateTable, pair: Pair, op: str) -> Outcome:
    """What ``op`` does to ``pair``: its new status, :data:`NO_CHANGE`, or a :class:`Refusal`."""
    for cond in conditions(pair):
        out = table.conditions.get((cond, op))
        if out is not None:
            return out
    return table.cells[(pair.status, pair.role, op)]


def local_outcome(table: StateTable, status: str, op: str) -> Outcome:
    """What ``op`` does to a local copy in ``status`` (its one record, role :data:`LOCAL`)."""
    out = table.cells.get((status, LOCAL, op), table.default)
    if out is None:
        raise KeyError((table.replication_type, status, op))
    return out


def next_local_status(table: StateTable, status: str, op: str, key: str = "") -> str:
    """The status a local copy takes on ``op``; raises the table's refusal (naming ``key``) if refused."""
    out = local_outcome(table, status, op)
    if isinstance(out, Refusal):
        raise out.error_for(key, status, op)
    return out


def check(table: StateTable, pairs: list[Pair], op: str) -> list[Outcome]:
    """The outcomes of ``op`` for ``pairs``; raises the first pair's refusal, if any (a refused request changes
    nothing: the engine checks before it changes anything)."""
    outs: list[Outcome] = []
    for p in pairs:
        out = outcome(table, p, op)
        if isinstance(out, Refusal):
            raise out.error(p)
        outs.append(out)
    return outs


def all_active(pairs: list[Pair]) -> bool:
    """The group rule of a resync: a group whose pairs are all active is accepted with no change."""
    return all(p.status in ACTIVE for p in pairs)


def is_suspended(status: str) -> bool:
    return status in SUSPENDED


# -- what a side learns of the other side's status (pair.state), as data too -----------------------------------
# (own status set, role, the other side's new status) -> this side's new status
PEER_EVENTS: dict[tuple[frozenset[str], str, str], str] = {
    (frozenset(ACTIVE), "P", SMPL): PSUS,  # the pair was deleted from the S side (array: P -> PSUS)
    (frozenset(ACTIVE), "P", SSWS): PSUS,  # the S side took over
    (frozenset(ACTIVE), "S", PSUS): SSUS,  # the primary split while this side could not hear it
    (frozenset(ACTIVE), "S", PSUE): PSUE,  # ... suspended by error
    (frozenset(ACTIVE), "S", PFUS): PFUS,  # ... journal full
}


def on_peer_status(pair: Pair, peer_status: str) -> str:
    """The status ``pair`` takes when it learns that the other side is ``peer_status`` (often its own)."""
    for (own, role, peer), new in PEER_EVENTS.items():
        if pair.role == role and pair.status in own and peer_status == peer:
            return new
    return pair.status
