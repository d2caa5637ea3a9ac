"""Checks of what a peer sends in link request headers, before any of it is used.

The peer authenticated (it holds the link secret), but its headers are still input: every field is checked
for type and range here, and a bad one becomes a VspError (an ERROR reply on the link), never a TypeError
deep in the engine, a status string nobody knows, or a mirror number in a file name.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from vspemu.errors import VspError, invalid
from vspemu.replication.model import ACTIVE, SMPL, SUSPENDED
from vspemu.system.storage import MAX_LDEV_ID

# Copy group, device group and pair names: printable ASCII without spaces and without the characters that
# separate the parts of object ids and pair keys ("," and "/") or that URLs escape ("%", "\\", "?", "#").
NAME_RE = re.compile(r"^[!-~]+$")
NAME_FORBIDDEN = set(",/%\\?#")
STATUSES = frozenset({*ACTIVE, *SUSPENDED, SMPL})


def check_name(attribute: str, value: str, max_length: int = 31) -> str:
    """Refuse a copy group / device group / pair name the array would refuse (400 KART40039-E)."""
    if not isinstance(value, str) or not 1 <= len(value) <= max_length or not NAME_RE.match(value) \
            or NAME_FORBIDDEN & set(value):
        raise invalid(attribute, value, f"Specify 1 to {max_length} characters: letters, digits and symbols, "
                                        "without spaces and without , / % \\ ? #.")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PeerGroup(_Strict):
    """A copy group as the peer describes it (``CopyGroup.peer_view``); the remote identity is ours to set."""

    name: str = Field(min_length=1, max_length=31)
    local_dg: str = Field(min_length=1, max_length=31)
    remote_dg: str = Field(min_length=1, max_length=31)
    remote_device_id: str = ""  # ignored: replaced by the authenticated peer's id
    remote_serial: StrictInt = 0  # ignored: replaced by the registered peer's serial
    replication_type: Literal["TC", "UR", "GAD"]
    role: Literal["P", "S"]
    path_group_id: StrictInt = Field(default=0, ge=0, le=255)
    mu_number: StrictInt = Field(default=0, ge=0, le=3)
    local_journal_id: StrictInt | None = Field(default=None, ge=0, le=255)
    remote_journal_id: StrictInt | None = Field(default=None, ge=0, le=255)
    ctg_id: StrictInt = Field(default=-1, ge=-1, le=255)


class CreateHeader(_Strict):
    group: PeerGroup
    pair: str = Field(min_length=1, max_length=31)
    pvol: StrictInt = Field(ge=0, le=MAX_LDEV_ID)
    svol: StrictInt = Field(ge=0, le=MAX_LDEV_ID)
    size: StrictInt = Field(ge=0)
    status: Literal["COPY", "PAIR"]
    fence: Literal["NEVER", "DATA", "STATUS", "ASYNC"]
    copy_pace: StrictInt = Field(ge=1, le=15)
    new_group: StrictBool = False


def _refuse(what: str, e: ValidationError) -> VspError:
    errors = e.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    where = ".".join(str(x) for x in first.get("loc", ())) or what
    return invalid(where, repr(first.get("input"))[:80], f"The peer sent a bad {what} header: {first.get('msg')}")


def create_header(h: Any) -> dict[str, Any]:
    """The ``pair.create`` header, checked; the group doc ready for ``CopyGroup(**...)`` (remote id unset)."""
    try:
        doc = CreateHeader.model_validate(h)
    except ValidationError as e:
        raise _refuse("pair.create", e) from None
    for attr, value in (("copyGroupName", doc.group.name), ("localDeviceGroupName", doc.group.local_dg),
                        ("remoteDeviceGroupName", doc.group.remote_dg), ("copyPairName", doc.pair)):
        check_name(attr, value)
    return doc.model_dump()


def status(value: Any) -> str:
    if not isinstance(value, str) or value not in STATUSES:
        raise invalid("status", repr(value)[:40], "The peer sent an unknown pair status.")
    return value


def role(value: Any) -> str:
    if value not in ("P", "S"):
        raise invalid("to", repr(value)[:40], "The peer sent an unknown role.")
    return str(value)


def names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value) or len(value) > 65536:
        raise invalid("pairs", repr(value)[:40], "The peer sent a bad list of pair names.")
    return value
