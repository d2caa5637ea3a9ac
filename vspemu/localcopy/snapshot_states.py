"""Thin Image statuses and what each operation does to them: a state table in the shared format of
:mod:`vspemu.replication.states` (type "TI", role ``LOCAL``), (status, operation) -> new status ("" for gone)
or a :class:`~vspemu.replication.states.Refusal` (WRONG_STATE, as the array answers); a cell missing from it
is refused (the table's ``default``)."""

from __future__ import annotations

from vspemu.replication import states
from vspemu.replication.states import LOCAL, Outcome, Refusal, StateTable

PAIR, PSUS, COPY, RCPY, PSUE = "PAIR", "PSUS", "COPY", "RCPY", "PSUE"
STATUSES = (PAIR, PSUS, COPY, RCPY, PSUE)
SPLIT, RESYNC, RESTORE, RESTORED, DELETE, ASSIGN, UNASSIGN, CLONE, CLONED, FAIL = (
    "split", "resync", "restore", "restored", "delete", "assign-volume", "unassign-volume", "clone", "cloned",
    "fail")
OPERATIONS = (SPLIT, RESYNC, RESTORE, RESTORED, DELETE, ASSIGN, UNASSIGN, CLONE, CLONED, FAIL)


def _refusal(why: str) -> Refusal:
    return Refusal("WRONG_STATE", why + " (status {status}, operation {op})")


_NOT_SPLIT = _refusal("the snapshot is not split (PSUS)")
_BUSY = _refusal("the snapshot is being copied")
# (status, operation) -> the new status, or why the array refuses; a pair missing from the table is refused
_TRANSITIONS: dict[tuple[str, str], Outcome] = {
    (PAIR, SPLIT): PSUS, (PSUS, SPLIT): _refusal("the snapshot is already split"), (PSUE, SPLIT): _NOT_SPLIT,
    (COPY, SPLIT): _BUSY, (RCPY, SPLIT): _BUSY,
    (PAIR, RESYNC): PAIR, (PSUS, RESYNC): PAIR, (PSUE, RESYNC): PAIR, (COPY, RESYNC): _BUSY, (RCPY, RESYNC): _BUSY,
    (PSUS, RESTORE): RCPY, (PAIR, RESTORE): _NOT_SPLIT,
    (PSUE, RESTORE): _refusal("the snapshot data is lost (PSUE)"),
    (COPY, RESTORE): _BUSY, (RCPY, RESTORE): _BUSY,
    (RCPY, RESTORED): PAIR,
    (PAIR, DELETE): "", (PSUS, DELETE): "", (PSUE, DELETE): "", (COPY, DELETE): _BUSY,
    (RCPY, DELETE): _refusal("the snapshot is being restored"),
    (PAIR, ASSIGN): PAIR, (PSUS, ASSIGN): PSUS, (PSUE, ASSIGN): PSUE, (COPY, ASSIGN): _BUSY, (RCPY, ASSIGN): _BUSY,
    (PAIR, UNASSIGN): PAIR, (PSUS, UNASSIGN): PSUS, (PSUE, UNASSIGN): PSUE, (COPY, UNASSIGN): _BUSY,
    (RCPY, UNASSIGN): _BUSY,
    (PSUS, CLONE): COPY, (PAIR, CLONE): _NOT_SPLIT, (PSUE, CLONE): _NOT_SPLIT, (COPY, CLONE): _BUSY,
    (RCPY, CLONE): _BUSY,
    (COPY, CLONED): "",
    (PSUS, FAIL): PSUE, (RCPY, FAIL): PSUE, (COPY, FAIL): PSUE, (PSUE, FAIL): PSUE,
}

THIN_IMAGE = states.register(StateTable(
    "TI", {(status, LOCAL, op): out for (status, op), out in _TRANSITIONS.items()}, {},
    statuses=STATUSES, roles=(LOCAL,), operations=OPERATIONS,
    default=_refusal("{op} is not possible in status {status}")))


def next_status(status: str, op: str) -> str:
    """The status after ``op`` ("" for gone), or WRONG_STATE as the array refuses it."""
    return states.next_local_status(THIN_IMAGE, status, op)
