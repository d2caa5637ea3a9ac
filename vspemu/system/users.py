"""User accounts and the array's built-in user groups (roles).

Three kinds of permission are modelled, from the built-in groups a user belongs to:
``security`` (manage users), ``modify`` (change the storage configuration) and ``view`` (read only).
The factory account (``maintenance``) is in the Administrator group, which has all of them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import asdict, dataclass, field

from vspemu.errors import VspError, invalid, not_found
from vspemu.system.store import Store

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


@dataclass
class User:
    name: str
    salt: str
    hash: str
    groups: list[str] = field(default_factory=lambda: [ADMIN_GROUP])
    built_in: bool = False

    @classmethod
    def new(cls, name: str, password: str, groups: list[str] | None = None, built_in: bool = False) -> User:
        salt = secrets.token_hex(16)
        return cls(name, salt, _hash_password(password, salt), list(groups or [ADMIN_GROUP]), built_in)

    def check(self, password: str) -> bool:
        return hmac.compare_digest(self.hash, _hash_password(password, self.salt))


def _hash_password(password: str, salt: str) -> str:
    return hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=2**14, r=8, p=1).hex()


class UserAccounts:
    """The user accounts of a storage system (a base of :class:`vspemu.system.storage.StorageSystem`)."""

    users: dict[str, User]
    store: Store

    # -- users ------------------------------------------------------------------------------------
    def add_user(self, name: str, password: str, groups: list[str] | None = None, built_in: bool = False) -> User:
        user = User.new(name, password, groups, built_in)
        self.users[name] = user
        self.store.put("users", name, asdict(user))
        return user

    def authenticate(self, name: str, password: str) -> bool:
        user = self.users.get(name)
        if user is None:
            _hash_password(password, "00" * 16)  # same cost, so timing does not tell who exists
            return False
        return user.check(password)

    def get_user(self, name: str) -> User:
        user = self.users.get(name)
        if user is None:
            raise not_found("user", name)
        return user

    def check_permission(self, name: str, permission: str) -> None:
        """403 unless the user's groups give ``permission`` (view / modify / security)."""
        user = self.users.get(name)
        if user is None or permission not in permissions_of(user.groups):
            raise VspError("NO_PERMISSION", user=name)

    @staticmethod
    def _check_groups(groups: list[str]) -> None:
        if not groups or len(groups) > MAX_GROUPS:
            raise invalid("userGroupNames", groups, f"Specify 1 to {MAX_GROUPS} user groups.")
        for g in groups:
            if g not in BUILT_IN_GROUPS:
                raise not_found("user group", g)

    def create_user(self, name: str, password: str, groups: list[str]) -> User:
        problem = user_name_problem(name)
        if problem:
            raise invalid("userId", name, problem)
        if name in self.users:
            raise VspError("ALREADY_EXISTS", object_id=f"user {name}")
        problem = password_problem(password)
        if problem:
            raise invalid("userPassword", "****", problem)
        self._check_groups(groups)
        return self.add_user(name, password, list(dict.fromkeys(groups)))

    def set_password(self, name: str, password: str) -> None:
        user = self.get_user(name)
        problem = password_problem(password)
        if problem:
            raise invalid("userPassword", "****", problem)
        new = User.new(name, password, user.groups, user.built_in)
        self.store.put("users", name, asdict(new))
        self.users[name] = new

    def _admins_left(self, without: str, groups: list[str] | None = None) -> bool:
        for u in self.users.values():
            g = groups if u.name == without and groups is not None else u.groups
            if (u.name != without or groups is not None) and "security" in permissions_of(g):
                return True
        return False

    def set_user_groups(self, name: str, groups: list[str]) -> None:
        user = self.get_user(name)
        self._check_groups(groups)
        groups = list(dict.fromkeys(groups))
        if user.built_in:
            raise VspError("WRONG_STATE", detail=f"the groups of the built-in user {name} cannot be changed")
        if not self._admins_left(name, groups):
            raise VspError("WRONG_STATE", detail="no user could manage users any more")
        user.groups = groups
        self.store.put("users", name, asdict(user))

    def delete_user(self, name: str) -> None:
        user = self.get_user(name)
        if user.built_in:
            raise VspError("WRONG_STATE", detail=f"the built-in user {name} cannot be deleted")
        if not self._admins_left(name):
            raise VspError("WRONG_STATE", detail="no user could manage users any more")
        self.store.delete("users", name)
        del self.users[name]
