"""Thin Image statuses and what each operation does to them: a data table, (status, operation) -> new status
("" for gone) or a :class:`Refusal` (WRONG_STATE, as the array answers); a pair missing from it is refused."""

from __future__ import annotations

from dataclasses import dataclass

from vspemu.errors import VspError

PAIR, PSUS, COPY, RCPY, PSUE = "PAIR", "PSUS", "COPY", "RCPY", "PSUE"
SPLIT, RESYNC, RESTORE, RESTORED, DELETE, ASSIGN, UNASSIGN, CLONE, CLONED, FAIL = (
    "split", "resync", "restore", "restored", "delete", "assign-volume", "unassign-volume", "clone", "cloned",
    "fail")


@dataclass(frozen=True)
class Refusal:
    detail: str


_NOT_SPLIT = Refusal("the snapshot is not split (PSUS)")
_BUSY = Refusal("the snapshot is being copied")
# (status, operation) -> the new status, or why the array refuses; a pair missing from the table is refused
TRANSITIONS: dict[tuple[str, str], str | Refusal] = {
    (PAIR, SPLIT): PSUS, (PSUS, SPLIT): Refusal("the snapshot is already split"), (PSUE, SPLIT): _NOT_SPLIT,
    (COPY, SPLIT): _BUSY, (RCPY, SPLIT): _BUSY,
    (PAIR, RESYNC): PAIR, (PSUS, RESYNC): PAIR, (PSUE, RESYNC): PAIR, (COPY, RESYNC): _BUSY, (RCPY, RESYNC): _BUSY,
    (PSUS, RESTORE): RCPY, (PAIR, RESTORE): _NOT_SPLIT, (PSUE, RESTORE): Refusal("the snapshot data is lost (PSUE)"),
    (COPY, RESTORE): _BUSY, (RCPY, RESTORE): _BUSY,
    (RCPY, RESTORED): PAIR,
    (PAIR, DELETE): "", (PSUS, DELETE): "", (PSUE, DELETE): "", (COPY, DELETE): _BUSY,
    (RCPY, DELETE): Refusal("the snapshot is being restored"),
    (PAIR, ASSIGN): PAIR, (PSUS, ASSIGN): PSUS, (PSUE, ASSIGN): PSUE, (COPY, ASSIGN): _BUSY, (RCPY, ASSIGN): _BUSY,
    (PAIR, UNASSIGN): PAIR, (PSUS, UNASSIGN): PSUS, (PSUE, UNASSIGN): PSUE, (COPY, UNASSIGN): _BUSY,
    (RCPY, UNASSIGN): _BUSY,
    (PSUS, CLONE): COPY, (PAIR, CLONE): _NOT_SPLIT, (PSUE, CLONE): _NOT_SPLIT, (COPY, CLONE): _BUSY,
    (RCPY, CLONE): _BUSY,
    (COPY, CLONED): "",
    (PSUS, FAIL): PSUE, (RCPY, FAIL): PSUE, (COPY, FAIL): PSUE, (PSUE, FAIL): PSUE,
}


def next_status(status: str, op: str) -> str:
    """The status after ``op`` ("" for gone), or WRONG_STATE as the array refuses it."""
    to = TRANSITIONS.get((status, op), Refusal(f"{op} is not possible in status {status}"))
    if isinstance(to, Refusal):
        raise VspError("WRONG_STATE", detail=f"{to.detail} (status {status}, operation {op})")
    return to
