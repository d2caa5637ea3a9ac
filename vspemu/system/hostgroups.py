"""Host-side provisioning: host groups (FC) and iSCSI targets, their WWNs / initiator IQNs, CHAP users.

A host group lives on one target port and has a number (0-254) unique on that port; each host group has its
own LUN numbering (vspemu.system.storage keeps the LU paths; the Port, HostGroup and Lun records are defined
here). On an iSCSI port a host group is an iSCSI target with an ``iscsiName`` (IQN). Host group 0 of every
port always exists: deleting it initializes it (its name, host mode, WWNs, initiators, CHAP users and LU
paths go back to the factory state), as the array does.

Every change validates first (``check_*``) and only then writes, so a refused request changes nothing; the
REST layer calls the check before it submits the job. Everything is persisted in config.sqlite3 (0600), the
CHAP secrets too; no view ever carries a secret.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Protocol

from vspemu.errors import VspError, invalid, not_found
from vspemu.system.store import Store

MAX_HOST_GROUP_NUMBER = 254
MAX_NAME = 64  # hostGroupName, wwnNickname and iscsiNickname (the array allows up to 64 characters)
MAX_CHAP_NAME = 223
CHAP_SECRET_LENGTH = (12, 32)

# hostModeId, hostModeName, hostModeDisplay: the list `supported-host-modes/instance` answers
HOST_MODES: list[tuple[int, str, str]] = [
    (0, "LINUX/IRIX", "LINUX"), (1, "VMWARE", "VMWARE"), (3, "HP-UX", "HP"), (5, "OVMS", "OPEN_VMS"),
    (7, "TRU64", "TRU64"), (9, "SOLARIS", "SOLARIS"), (10, "NETWARE", "NETWARE"), (12, "WIN", "WINDOWS"),
    (15, "AIX", "AIX"), (33, "VMWARE_EX", "VMWARE_EXTENSION"), (44, "WIN_EX", "WINDOWS_EXTENSION"),
]
HOST_MODE_NAMES = {name for _, name, _ in HOST_MODES}
DEFAULT_HOST_MODE = "LINUX/IRIX"

# hostModeOptionId -> description (the options a VSP 5000 reports; the collection knows these numbers)
HOST_MODE_OPTIONS: dict[int, str] = {
    2: "VERITAS Database Edition/Advanced Cluster", 6: "TPRLO", 7: "Automatic recognition function of LUN",
    12: "No display for ghost LUN", 13: "SIM report at link failure", 14: "HP TruCluster with TrueCopy",
    15: "HACMP", 22: "Veritas Cluster Server", 23: "REC Command Support",
    25: "Support SPC-3 behavior on Persistent Reservation", 33: "Set/Report Device Identifier enable",
    39: "Change the nexus specified in SCSI Target Reset", 40: "V-VOL expansion",
    41: "Prioritized device recognition command", 42: "Prevent OHUB PCI retry", 43: "Queue Full Response",
    48: "HAM S-VOL Read", 49: "BB Credit Set Up Option1", 50: "BB Credit Set Up Option2",
    51: "Round Trip Set Up Option", 52: "HAM and Cluster software for SCSI-2 Reserve", 54: "EXTENDED COPY",
    57: "HAM response change", 60: "LUN0 Change Guard", 61: "Expanded Persistent Reserve Key",
    63: "vStorage APIs based on T10 standards", 65: "Round Trip extended set up option",
    67: "Change of the ED_TOV value", 68: "Support Page Reclamation for Linux",
    69: "Online LUSE expansion", 71: "Change the Unit Attention for Blocked Pool-VOLs", 72: "AIX GPFS Support",
    73: "Support Option for WS2012", 78: "The non-preferred path option", 80: "Multi Text OFF Mode",
    81: "NOP-In Suppress Mode", 82: "Discovery CHAP Mode", 83: "Report iSCSI Full Portal List Mode",
    88: "Port Consolidation", 91: "Disable I/O wait for OpenStack Option",
    95: "Change the SCSI LU Reset nexus for VSP/HUS VM", 96: "Change the nexus specified in SCSI LU Reset",
    97: "Proprietary ANCHOR command support", 100: "Hitachi HBA Emulation Connection Option",
    102: "GAD Standard Inquiry Expansion for HCS", 105: "Task Set Full response in the event of I/O overload",
    110: "ODX support for WS2012", 113: "iSCSI CHAP Authentication Log",
    114: "Auto Asynchronous Reclamation on ESXi 6.5+", 122: "TASK SET FULL response after reaching QoS upper limit",
    124: "Guaranteed response during controller failure", 131: "WCE bit OFF mode",
}
ISCSI_ONLY_OPTIONS = {80, 81, 82, 83, 113}
CLEAR_OPTIONS = -1  # hostModeOptions [-1] in a PATCH: remove every option (what the clients send)

AUTH_MODES = ("CHAP", "NONE", "BOTH")
CHAP_WAYS = ("TAR", "INI")
_WWN = re.compile(r"^[0-9a-fA-F]{16}$")
# RFC 3720 names: no commas (they separate the parts of an object id), no URL-special characters
_IQN = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[A-Za-z0-9.:_-]*)?|eui\.[0-9A-Fa-f]{16})$")
_FORBIDDEN = set(",/%\\?#")


@dataclass
class HostGroup:
    port_id: str
    number: int
    name: str
    host_mode: str = "LINUX/IRIX"
    host_mode_options: list[int] = field(default_factory=list)
    iscsi_name: str | None = None  # an iSCSI target's IQN (host groups of iSCSI ports only)
    authentication_mode: str = "BOTH"
    iscsi_target_direction: str = "S"


@dataclass
class Lun:
    port_id: str
    host_group_number: int
    lun: int
    ldev_id: int

    @property
    def lun_id(self) -> str:
        return f"{self.port_id},{self.host_group_number},{self.lun}"


@dataclass
class Port:
    port_id: str
    port_type: str = "FIBRE"
    attributes: list[str] = field(default_factory=lambda: ["TAR"])
    wwn: str = ""
    ipv4_address: str = ""  # iSCSI ports: the portal address (tcp port 3260)


class HostGroupSystem(Protocol):
    """What :class:`HostGroups` uses of its storage system (:class:`vspemu.system.storage.StorageSystem`)."""

    serial: int
    store: Store
    host_groups: dict[tuple[str, int], HostGroup]
    luns: dict[str, Lun]

    def get_port(self, port_id: str) -> Port: ...

    def get_host_group(self, port_id: str, number: int) -> HostGroup: ...

    def put_host_group(self, hg: HostGroup) -> None: ...

    def delete_lun(self, lun_id: str) -> None: ...


@dataclass
class HostWwn:
    port_id: str
    host_group_number: int
    wwn: str  # 16 lower-case hex digits
    nickname: str = ""

    @property
    def wwn_id(self) -> str:
        return f"{self.port_id},{self.host_group_number},{self.wwn}"


@dataclass
class HostIscsi:
    port_id: str
    host_group_number: int
    iscsi_name: str
    nickname: str = ""

    @property
    def iscsi_id(self) -> str:
        return f"{self.port_id},{self.host_group_number},{self.iscsi_name}"


@dataclass
class ChapUser:
    port_id: str
    host_group_number: int
    way: str  # TAR (the target authenticates the initiator) or INI (mutual: the initiator side)
    name: str
    secret: str = ""

    @property
    def chap_id(self) -> str:
        return f"{self.port_id},{self.host_group_number},{self.way},{self.name}"


def check_name(attribute: str, value: str, limit: int = MAX_NAME, allow_empty: bool = False) -> None:
    if not value and not allow_empty:
        raise invalid(attribute, value, "Specify 1 or more characters.")
    if len(value) > limit:
        raise invalid(attribute, value, f"Specify at most {limit} characters.")
    if not value.isascii() or not value.isprintable() or _FORBIDDEN & set(value):
        raise invalid(attribute, value, "Specify printable ASCII characters other than , / % \\ ? #.")


def normalize_wwn(wwn: str) -> str:
    if not _WWN.match(wwn):
        raise invalid("hostWwn", wwn, "Specify a WWN of 16 hexadecimal digits.")
    return wwn.lower()


def check_iqn(attribute: str, name: str) -> None:
    if len(name) > 223 or not _IQN.match(name):
        raise invalid(attribute, name, "Specify an iSCSI name in iqn. or eui. format (at most 223 characters).")


class HostGroups:
    """Host groups, WWNs, iSCSI initiators and CHAP users of one storage system."""

    def __init__(self, system: HostGroupSystem) -> None:
        self.system = system
        store = system.store
        self.wwns: dict[str, HostWwn] = {}
        for doc in store.load("host_wwns").values():
            w = HostWwn(**doc)
            self.wwns[w.wwn_id] = w
        self.iscsis: dict[str, HostIscsi] = {}
        for doc in store.load("host_iscsis").values():
            i = HostIscsi(**doc)
            self.iscsis[i.iscsi_id] = i
        self.chap_users: dict[str, ChapUser] = {}
        for doc in store.load("chap_users").values():
            c = ChapUser(**doc)
            self.chap_users[c.chap_id] = c

    # -- host groups ------------------------------------------------------------------------------
    def is_iscsi(self, port_id: str) -> bool:
        return self.system.get_port(port_id).port_type == "ISCSI"

    def default_iscsi_name(self, port_id: str, number: int) -> str:
        port = port_id.replace("CL", "").replace("-", "").lower()
        return f"iqn.1994-04.jp.co.hitachi:rsd.r90.t.{self.system.serial:05d}.{port}{number:03x}"

    def free_numbers(self, port_id: str) -> list[int]:
        self.system.get_port(port_id)
        used = {n for (p, n) in self.system.host_groups if p == port_id}
        return [n for n in range(MAX_HOST_GROUP_NUMBER + 1) if n not in used]

    def check_host_mode(self, host_mode: str | None, options: list[int] | None, iscsi: bool) -> None:
        if host_mode is not None and host_mode not in HOST_MODE_NAMES:
            raise invalid("hostMode", host_mode, f"Specify one of {', '.join(sorted(HOST_MODE_NAMES))}.")
        for opt in options or []:
            if opt == CLEAR_OPTIONS and len(options or []) == 1:
                continue
            if opt not in HOST_MODE_OPTIONS:
                raise invalid("hostModeOptions", opt, "Specify host mode options the storage system supports "
                              "(see supported-host-modes/instance), or [-1] to remove all.")
            if opt in ISCSI_ONLY_OPTIONS and not iscsi:
                raise invalid("hostModeOptions", opt, "The host mode option applies to iSCSI ports only.")

    def check_create(self, port_id: str, name: str, number: int | None, host_mode: str | None,
                     options: list[int] | None, iscsi_name: str | None) -> int:
        """Validate a new host group; return the number it will get."""
        port = self.system.get_port(port_id)
        if "TAR" not in port.attributes:
            raise invalid("portId", port_id, "Specify a target port; an initiator/RCU port has no host groups.")
        check_name("hostGroupName", name)
        iscsi = port.port_type == "ISCSI"
        self.check_host_mode(host_mode, options, iscsi)
        if options and CLEAR_OPTIONS in options:
            raise invalid("hostModeOptions", CLEAR_OPTIONS, "[-1] removes options; it is for a change only.")
        if iscsi_name is not None:
            if not iscsi:
                raise invalid("iscsiName", iscsi_name, "An iSCSI name is for a host group of an iSCSI port.")
            check_iqn("iscsiName", iscsi_name)
            if any(h.iscsi_name == iscsi_name for h in self.system.host_groups.values() if h.port_id == port_id):
                raise VspError("ALREADY_EXISTS", object_id=f"iSCSI target {iscsi_name} on {port_id}")
        if any(h.name == name for h in self.system.host_groups.values() if h.port_id == port_id):
            raise VspError("ALREADY_EXISTS", object_id=f"host group name {name} on {port_id}")
        if number is not None:
            if not 1 <= number <= MAX_HOST_GROUP_NUMBER:
                raise invalid("hostGroupNumber", number, f"Specify a number from 1 to {MAX_HOST_GROUP_NUMBER}.")
            if (port_id, number) in self.system.host_groups:
                raise VspError("ALREADY_EXISTS", object_id=f"host group {port_id},{number}")
            return number
        free = self.free_numbers(port_id)
        if not free:
            raise VspError("LDEV_ID_EXHAUSTED", resource=f"host group numbers of {port_id}")
        return free[0]

    def create(self, port_id: str, name: str, number: int | None = None, host_mode: str | None = None,
               options: list[int] | None = None, iscsi_name: str | None = None) -> HostGroup:
        num = self.check_create(port_id, name, number, host_mode, options, iscsi_name)
        hg = HostGroup(port_id, num, name, host_mode or DEFAULT_HOST_MODE, sorted(set(options or [])))
        if self.is_iscsi(port_id):
            hg.iscsi_name = iscsi_name or self.default_iscsi_name(port_id, num)
        self.system.put_host_group(hg)
        return hg

    def check_modify(self, hg: HostGroup, name: str | None, host_mode: str | None, options: list[int] | None,
                     auth_mode: str | None, direction: str | None) -> None:
        iscsi = self.is_iscsi(hg.port_id)
        if name is not None and name != hg.name:
            check_name("hostGroupName", name)
            if any(h.name == name for h in self.system.host_groups.values() if h.port_id == hg.port_id):
                raise VspError("ALREADY_EXISTS", object_id=f"host group name {name} on {hg.port_id}")
        self.check_host_mode(host_mode, options, iscsi)
        if options is not None and CLEAR_OPTIONS in options and len(options) != 1:
            raise invalid("hostModeOptions", options, "Specify [-1] alone to remove all host mode options.")
        if (auth_mode is not None or direction is not None) and not iscsi:
            raise invalid("authenticationMode", auth_mode or direction, "Authentication is for iSCSI targets.")
        if auth_mode is not None and auth_mode not in AUTH_MODES:
            raise invalid("authenticationMode", auth_mode, f"Specify one of {', '.join(AUTH_MODES)}.")
        if direction is not None and direction not in ("S", "D"):
            raise invalid("iscsiTargetDirection", direction, "Specify S (one-way) or D (mutual).")

    def modify(self, hg: HostGroup, name: str | None = None, host_mode: str | None = None,
               options: list[int] | None = None, auth_mode: str | None = None,
               direction: str | None = None) -> HostGroup:
        self.check_modify(hg, name, host_mode, options, auth_mode, direction)
        if name is not None:
            hg.name = name
        if host_mode is not None:
            hg.host_mode = host_mode
        if options is not None:
            hg.host_mode_options = [] if options == [CLEAR_OPTIONS] else sorted(set(options))
        if auth_mode is not None:
            hg.authentication_mode = auth_mode
        if direction is not None:
            hg.iscsi_target_direction = direction
        self.system.put_host_group(hg)
        return hg

    def delete(self, port_id: str, number: int) -> None:
        """Delete a host group with its LU paths, WWNs, initiators and CHAP users (group 0 is initialized)."""
        hg = self.system.get_host_group(port_id, number)
        # LU paths first: the last path of a volume going drops its NBD connections (storage.delete_lun)
        for lun in [x for x in self.system.luns.values()
                    if x.port_id == port_id and x.host_group_number == number]:
            self.system.delete_lun(lun.lun_id)
        with self.system.store.transaction():
            for table, kind in ((self.wwns, "host_wwns"), (self.iscsis, "host_iscsis"),
                                (self.chap_users, "chap_users")):
                for key in [k for k, v in table.items() if (v.port_id, v.host_group_number) == (port_id, number)]:
                    self.system.store.delete(kind, key)
                    del table[key]
            if number == 0:
                fresh = HostGroup(port_id, 0, default_group_name(port_id))
                if self.is_iscsi(port_id):
                    fresh.iscsi_name = self.default_iscsi_name(port_id, 0)
                self.system.put_host_group(fresh)
            else:
                self.system.store.delete("host_groups", f"{hg.port_id},{hg.number}")
                del self.system.host_groups[(port_id, number)]

    def find_by_name(self, port_id: str, name: str) -> HostGroup:
        self.system.get_port(port_id)
        for hg in self.system.host_groups.values():
            if hg.port_id == port_id and hg.name == name:
                return hg
        raise not_found("host group", f"{port_id},{name}")

    # -- WWNs (FC host groups) --------------------------------------------------------------------
    def get_wwn(self, port_id: str, number: int, wwn: str) -> HostWwn:
        found = self.wwns.get(f"{port_id},{number},{wwn.lower()}")
        if found is None:
            raise not_found("host WWN", f"{port_id},{number},{wwn}")
        return found

    def check_add_wwn(self, port_id: str, number: int, wwn: str) -> str:
        hg = self.system.get_host_group(port_id, number)
        if self.is_iscsi(port_id):
            raise invalid("portId", port_id, "A WWN is for a Fibre Channel port; use host-iscsis on iSCSI ports.")
        w = normalize_wwn(wwn)
        for other in self.wwns.values():
            if other.port_id == port_id and other.wwn == w:  # one WWN belongs to one host group of a port
                raise VspError("ALREADY_EXISTS", object_id=f"host WWN {w} in {port_id},{other.host_group_number}"
                               f" (host group {hg.name if other.host_group_number == number else 'another'})")
        return w

    def add_wwn(self, port_id: str, number: int, wwn: str) -> HostWwn:
        w = HostWwn(port_id, number, self.check_add_wwn(port_id, number, wwn))
        self.system.store.put("host_wwns", w.wwn_id, asdict(w))
        self.wwns[w.wwn_id] = w
        return w

    def set_wwn_nickname(self, w: HostWwn, nickname: str) -> HostWwn:
        check_name("wwnNickname", nickname, allow_empty=True)
        w.nickname = nickname
        self.system.store.put("host_wwns", w.wwn_id, asdict(w))
        return w

    def delete_wwn(self, w: HostWwn) -> None:
        self.system.store.delete("host_wwns", w.wwn_id)
        del self.wwns[w.wwn_id]

    # -- iSCSI initiators -------------------------------------------------------------------------
    def get_iscsi(self, port_id: str, number: int, name: str) -> HostIscsi:
        found = self.iscsis.get(f"{port_id},{number},{name}")
        if found is None:
            raise not_found("host iSCSI name", f"{port_id},{number},{name}")
        return found

    def check_add_iscsi(self, port_id: str, number: int, name: str) -> None:
        self.system.get_host_group(port_id, number)
        if not self.is_iscsi(port_id):
            raise invalid("portId", port_id, "An initiator iSCSI name is for an iSCSI port.")
        check_iqn("iscsiName", name)
        for other in self.iscsis.values():
            if other.port_id == port_id and other.iscsi_name == name:
                raise VspError("ALREADY_EXISTS",
                               object_id=f"host iSCSI name {name} in {port_id},{other.host_group_number}")

    def add_iscsi(self, port_id: str, number: int, name: str) -> HostIscsi:
        self.check_add_iscsi(port_id, number, name)
        i = HostIscsi(port_id, number, name)
        self.system.store.put("host_iscsis", i.iscsi_id, asdict(i))
        self.iscsis[i.iscsi_id] = i
        return i

    def set_iscsi_nickname(self, i: HostIscsi, nickname: str) -> HostIscsi:
        check_name("iscsiNickname", nickname, allow_empty=True)
        i.nickname = nickname
        self.system.store.put("host_iscsis", i.iscsi_id, asdict(i))
        return i

    def delete_iscsi(self, i: HostIscsi) -> None:
        self.system.store.delete("host_iscsis", i.iscsi_id)
        del self.iscsis[i.iscsi_id]

    # -- CHAP users -------------------------------------------------------------------------------
    def get_chap_user(self, port_id: str, number: int, way: str, name: str) -> ChapUser:
        found = self.chap_users.get(f"{port_id},{number},{way},{name}")
        if found is None:
            raise not_found("CHAP user", f"{port_id},{number},{way},{name}")
        return found

    @staticmethod
    def check_secret(secret: str) -> None:
        low, high = CHAP_SECRET_LENGTH
        if not low <= len(secret) <= high or not secret.isascii() or not secret.isprintable():
            raise invalid("chapPassword", "******", f"Specify {low} to {high} printable ASCII characters.")

    def check_add_chap_user(self, port_id: str, number: int, way: str, name: str, secret: str | None) -> None:
        self.system.get_host_group(port_id, number)
        if not self.is_iscsi(port_id):
            raise invalid("portId", port_id, "A CHAP user is for an iSCSI target.")
        if way not in CHAP_WAYS:
            raise invalid("wayOfChapUser", way, "Specify TAR or INI.")
        check_name("chapUserName", name, limit=MAX_CHAP_NAME)
        if f"{port_id},{number},{way},{name}" in self.chap_users:
            raise VspError("ALREADY_EXISTS", object_id=f"CHAP user {port_id},{number},{way},{name}")
        if secret is not None:
            self.check_secret(secret)

    def add_chap_user(self, port_id: str, number: int, way: str, name: str, secret: str | None = None) -> ChapUser:
        self.check_add_chap_user(port_id, number, way, name, secret)
        c = ChapUser(port_id, number, way, name, secret or "")
        self.system.store.put("chap_users", c.chap_id, asdict(c))
        self.chap_users[c.chap_id] = c
        return c

    def set_chap_secret(self, c: ChapUser, secret: str) -> ChapUser:
        self.check_secret(secret)
        c.secret = secret
        self.system.store.put("chap_users", c.chap_id, asdict(c))
        return c

    def delete_chap_user(self, c: ChapUser) -> None:
        self.system.store.delete("chap_users", c.chap_id)
        del self.chap_users[c.chap_id]


def default_group_name(port_id: str) -> str:
    """The name the array gives host group 0 of a port: CL1-A -> 1A-G00."""
    return f"{port_id[2:].replace('-', '')}-G00"
