"""User accounts and the array's built-in user groups (roles).

Three kinds of permission are modelled, from the built-in groups a user belongs to:
``security`` (manage users), ``modify`` (change the storage configuration) and ``view`` (read only).
The factory account (``maintenance``) is in the Administrator group, which has all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

ADMIN_GROUP = "Administrator User Group"
STORAGE_MODIFY_GROUP = "Storage Administrator (View & Modify) User Group"
STORAGE_VIEW_GROUP = "Storage Administrator (View Only) User Group"
SECURITY_MODIFY_GROUP = "Security Administrator (View & Modify) User Group"
SECURITY_VIEW_GROUP = "Security Administrator (View Only) User Group"


@dataclass(frozen=True)
class UserGroup:
    name: str
    roles: tuple[str, ...]
    permissions: frozenset[str]


BUILT_IN_GROUPS: dict[str, UserGroup] = {g.name: g for g in (
    UserGroup(ADMIN_GROUP, (
        "Audit Log Administrator (View & Modify)", "Security Administrator (View & Modify)",
        "Storage Administrator (View & Modify)", "Storage Administrator (Initial Configuration)",
        "Storage Administrator (System Resource Management)", "Storage Administrator (Provisioning)",
        "Storage Administrator (Performance Management)", "Storage Administrator (Local Copy)",
        "Storage Administrator (Remote Copy)"), frozenset({"view", "modify", "security"})),
    UserGroup(STORAGE_MODIFY_GROUP, ("Storage Administrator (View & Modify)",
                                     "Storage Administrator (Provisioning)", "Storage Administrator (Local Copy)",
                                     "Storage Administrator (Remote Copy)"), frozenset({"view", "modify"})),
    UserGroup(STORAGE_VIEW_GROUP, ("Storage Administrator (View Only)",), frozenset({"view"})),
    UserGroup(SECURITY_MODIFY_GROUP, ("Security Administrator (View & Modify)",), frozenset({"view", "security"})),
    UserGroup(SECURITY_VIEW_GROUP, ("Security Administrator (View Only)",), frozenset({"view"})),
)}

MIN_PASSWORD, MAX_PASSWORD = 6, 256
MAX_USER_NAME = 256
MAX_GROUPS = 8


def password_problem(password: str) -> str | None:
    """Why the array would refuse this password (printable ASCII, 6 to 256 characters), or None."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        return f"Specify {MIN_PASSWORD} to {MAX_PASSWORD} characters."
    if not all(0x21 <= ord(c) <= 0x7E for c in password):
        return "Specify printable ASCII characters without spaces."
    return None


def user_name_problem(name: str) -> str | None:
    if not 1 <= len(name) <= MAX_USER_NAME:
        return f"Specify 1 to {MAX_USER_NAME} characters."
    if not all(c.isascii() and (c.isalnum() or c in "-_.@!#$%&'*+=^`{|}~") for c in name) or "%" in name \
            or "#" in name:
        return "Specify letters, digits and - _ . @ ! $ & ' * + = ^ ` { | } ~."
    return None


def permissions_of(groups: list[str]) -> frozenset[str]:
    out: set[str] = set()
    for g in groups:
        group = BUILT_IN_GROUPS.get(g)
        if group is not None:
            out |= group.permissions
    return frozenset(out)
