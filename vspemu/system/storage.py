"""One storage system: identity, users, pool, LDEVs, ports, host groups and LU paths.

This is the configuration model. It is synchronous and knows nothing about HTTP: the API layer validates
requests, calls these methods inside jobs, and shapes the answers. Every change is written through to
SQLite (:mod:`vspemu.system.store`) before the method returns.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vspemu.errors import VspError, invalid, not_found
from vspemu.system.capacity import BLOCK, format_byte_capacity
from vspemu.system.hostgroups import HostGroups, default_group_name
from vspemu.system.store import Store
from vspemu.volumes.volume import Volume

MAX_LDEV_ID = 65279
MAX_LDEV_BYTES = 256 << 40  # 256 TiB, the DP-volume limit of a VSP 5000
DEFAULT_USER = "maintenance"
DEFAULT_PASSWORD = "raid-maintenance"  # the arrays' factory default

# storageDeviceId = 6-character model prefix + serial number padded to 6 digits (api-spec 1.4)
MODEL_PREFIX = {
    "VSP 5100": "900000", "VSP 5500": "900000", "VSP 5200": "900000", "VSP 5600": "900000",
    "VSP 5100H": "900000", "VSP 5500H": "900000", "VSP 5200H": "900000", "VSP 5600H": "900000",
    "VSP E590": "934000", "VSP E790": "934000", "VSP E590H": "934000", "VSP E790H": "934000",
    "VSP E990": "936000", "VSP E1090": "938000", "VSP E1090H": "938000",
    "VSP G370": "886000", "VSP G700": "886000", "VSP G900": "886000",
    "VSP F370": "886000", "VSP F700": "886000", "VSP F900": "886000",
    "VSP G350": "882000", "VSP F350": "882000", "VSP G130": "880000",
    "VSP G1000": "800000", "VSP G1500": "800000", "VSP F1500": "800000",
}
# the short "storage type id" used in remote path groups and remote-copypairs (api-spec 1.4)
MODEL_TYPE_ID = {"900000": "R9", "800000": "R8"}

# the LDEV attribute of a journal volume (vspemu.system.journals): such a volume refuses host I/O
JOURNAL_ATTRIBUTE = "JNL"
JOURNAL_REFUSAL = "a journal volume accepts no host I/O"

HOST_PORTS = ["CL1-A", "CL2-A", "CL1-B", "CL2-B"]  # Fibre Channel target ports
# iSCSI target ports (10GbE iSCSI channel boards in the slots of clusters 5/6; docs/provisioning.md)
ISCSI_PORTS = ["CL5-A", "CL6-A", "CL5-B", "CL6-B"]
REPLICATION_PORTS = ["CL3-A", "CL4-A", "CL3-B", "CL4-B"]


def storage_device_id(model: str, serial: int) -> str:
    prefix = MODEL_PREFIX.get(model)
    if prefix is None:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(MODEL_PREFIX))}")
    return f"{prefix}{serial:06d}"


def storage_type_id(device_id: str) -> str:
    return MODEL_TYPE_ID.get(device_id[:6], "M8")


@dataclass
class User:
    name: str
    salt: str
    hash: str

    @classmethod
    def new(cls, name: str, password: str) -> User:
        salt = secrets.token_hex(16)
        return cls(name, salt, _hash_password(password, salt))

    def check(self, password: str) -> bool:
        return hmac.compare_digest(self.hash, _hash_password(password, self.salt))


def _hash_password(password: str, salt: str) -> str:
    return hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=2**14, r=8, p=1).hex()


@dataclass
class Ldev:
    ldev_id: int
    pool_id: int
    block_capacity: int
    label: str = ""
    data_reduction_mode: str = "disabled"
    # attributes other subsystems add: "HORC" (TC/UR pair volume), "JNL" (journal volume)
    extra_attributes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.block_capacity * BLOCK


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


def check_ldev_size(size: int) -> None:
    if not 0 < size <= MAX_LDEV_BYTES:
        raise invalid("capacity", size, "Specify a capacity from 1 block to 256 TiB for a DP volume.")


class StorageSystem:
    """The configuration of one storage system and the volumes it holds."""

    def __init__(self, data_dir: Path, serial: int, model: str = "VSP 5500H",
                 user: str = DEFAULT_USER, password: str = DEFAULT_PASSWORD,
                 pool_capacity: int | None = None) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.ldev_dir = data_dir / "ldevs"
        self.ldev_dir.mkdir(exist_ok=True)
        self.store = Store(data_dir / "config.sqlite3")
        ident = self.store.get("system", "identity")
        if ident is None:
            ident = {"serial": serial, "model": model}
            self.store.put("system", "identity", ident)
        elif ident["serial"] != serial:
            raise ValueError(f"{data_dir} belongs to serial {ident['serial']}, not {serial}")
        self.serial: int = ident["serial"]
        self.model: str = ident["model"]
        self.storage_device_id = storage_device_id(self.model, self.serial)
        self.storage_type_id = storage_type_id(self.storage_device_id)
        self.pool_capacity = pool_capacity or shutil.disk_usage(data_dir).total
        # hooks other subsystems set: who may map/delete/expand an LDEV (pairs, journals)
        self.ldev_guards: list[Callable[[Ldev, str], None]] = []

        self.users = {k: User(**v) for k, v in self.store.load("users").items()}
        if not self.users:
            self.add_user(user, password)
        self.ldevs: dict[int, Ldev] = {}
        self.volumes: dict[int, Volume] = {}
        for doc in self.store.load("ldevs").values():
            ldev = Ldev(**doc)
            self.ldevs[ldev.ldev_id] = ldev
            vol = self.volumes[ldev.ldev_id] = Volume(ldev.ldev_id, self._ldev_path(ldev.ldev_id), ldev.size)
            if JOURNAL_ATTRIBUTE in ldev.extra_attributes:
                vol.refuse_host_io(JOURNAL_REFUSAL)
        self.ports = {p: Port(p, wwn=self._wwn(i)) for i, p in enumerate(HOST_PORTS)}
        for i, p in enumerate(REPLICATION_PORTS):
            self.ports[p] = Port(p, attributes=["MCU", "RCU"], wwn=self._wwn(len(HOST_PORTS) + i))
        for i, p in enumerate(ISCSI_PORTS):
            self.ports[p] = Port(p, port_type="ISCSI", ipv4_address=f"192.168.{100 + i}.{self.serial % 250 + 1}")
        self.host_groups: dict[tuple[str, int], HostGroup] = {}
        for doc in self.store.load("host_groups").values():
            hg = HostGroup(**doc)
            self.host_groups[(hg.port_id, hg.number)] = hg
        self.hosts = HostGroups(self)
        for p in HOST_PORTS + ISCSI_PORTS:
            if (p, 0) not in self.host_groups:
                group0 = HostGroup(p, 0, default_group_name(p))
                if p in ISCSI_PORTS:
                    group0.iscsi_name = self.hosts.default_iscsi_name(p, 0)
                self.put_host_group(group0)
        self.luns: dict[str, Lun] = {}
        for doc in self.store.load("luns").values():
            lun = Lun(**doc)
            self.luns[lun.lun_id] = lun

    def _wwn(self, index: int) -> str:
        return f"50060e80{self.serial:06x}{index:02x}"[:16]

    def _ldev_path(self, ldev_id: int) -> Path:
        return self.ldev_dir / f"{ldev_id:05d}.img"

    def close(self) -> None:
        for vol in self.volumes.values():
            vol.close()
        self.store.close()

    # -- users ------------------------------------------------------------------------------------
    def add_user(self, name: str, password: str) -> None:
        user = User.new(name, password)
        self.users[name] = user
        self.store.put("users", name, asdict(user))

    def authenticate(self, name: str, password: str) -> bool:
        user = self.users.get(name)
        if user is None:
            _hash_password(password, "00" * 16)  # same cost, so timing does not tell who exists
            return False
        return user.check(password)

    # -- pool -------------------------------------------------------------------------------------
    def pool_used_bytes(self) -> int:
        return sum(v.allocated_bytes() for v in self.volumes.values())

    def check_pool(self, pool_id: int) -> None:
        if pool_id != 0:
            raise not_found("pool", pool_id)

    # -- LDEVs ------------------------------------------------------------------------------------
    def get_ldev(self, ldev_id: int) -> Ldev:
        ldev = self.ldevs.get(ldev_id)
        if ldev is None:
            raise not_found("ldev", ldev_id)
        return ldev

    def free_ldev_id(self, start: int = 0, end: int = MAX_LDEV_ID) -> int:
        for i in range(start, end + 1):
            if i not in self.ldevs:
                return i
        raise VspError("LDEV_ID_EXHAUSTED", resource="ldevId")

    def create_ldev(self, size: int, pool_id: int = 0, ldev_id: int | None = None, label: str = "",
                    data_reduction_mode: str = "disabled") -> Ldev:
        self.check_pool(pool_id)
        if ldev_id is None:
            ldev_id = self.free_ldev_id()
        elif not 0 <= ldev_id <= MAX_LDEV_ID:
            raise invalid("ldevId", ldev_id, f"Specify a value from 0 to {MAX_LDEV_ID}.")
        elif ldev_id in self.ldevs:
            raise VspError("ALREADY_EXISTS", object_id=f"ldev {ldev_id}")
        check_ldev_size(size)
        ldev = Ldev(ldev_id, pool_id, size // BLOCK, label, data_reduction_mode)
        path = self._ldev_path(ldev_id)
        try:
            vol = Volume.create(ldev_id, path, ldev.size)
        except OSError as e:  # e.g. EFBIG: larger than the file system allows; leave no file behind
            path.unlink(missing_ok=True)
            raise VspError("CAPACITY", cause=f"The volume file cannot be created: {e.strerror}.", pool=pool_id,
                           requested=format_byte_capacity(size)) from None
        try:
            self.store.put("ldevs", ldev_id, asdict(ldev))
        except BaseException:
            vol.remove()
            raise
        self.ldevs[ldev_id] = ldev
        self.volumes[ldev_id] = vol
        return ldev

    def guard_ldev(self, ldev: Ldev, action: str) -> None:
        """Ask the subsystems whether an LDEV may be deleted / mapped / expanded now."""
        for guard in self.ldev_guards:
            guard(ldev, action)

    def delete_ldev(self, ldev_id: int) -> None:
        ldev = self.get_ldev(ldev_id)
        self.guard_ldev(ldev, "delete")
        if any(lun.ldev_id == ldev_id for lun in self.luns.values()):
            raise VspError("IN_USE", detail=f"ldev {ldev_id} has LU paths; delete them first")
        self.store.delete("ldevs", ldev_id)
        del self.ldevs[ldev_id]
        self.volumes.pop(ldev_id).remove()

    def save_ldev(self, ldev: Ldev) -> None:
        self.store.put("ldevs", ldev.ldev_id, asdict(ldev))

    def set_label(self, ldev_id: int, label: str) -> Ldev:
        ldev = self.get_ldev(ldev_id)
        if len(label) > 32:
            raise invalid("label", label, "Specify at most 32 characters.")
        ldev.label = label
        self.save_ldev(ldev)
        return ldev

    def expand_ldev(self, ldev_id: int, additional_bytes: int) -> Ldev:
        ldev = self.get_ldev(ldev_id)
        self.guard_ldev(ldev, "expand")
        if additional_bytes <= 0:
            raise invalid("additionalByteFormatCapacity", additional_bytes, "Specify a positive capacity.")
        new_size = ldev.size + additional_bytes
        check_ldev_size(new_size)
        try:
            self.volumes[ldev_id].resize(new_size)
        except OSError as e:  # e.g. EFBIG: the file keeps its old size
            raise VspError("CAPACITY", cause=f"The volume file cannot be extended: {e.strerror}.",
                           pool=ldev.pool_id, requested=format_byte_capacity(additional_bytes)) from None
        ldev.block_capacity = new_size // BLOCK
        self.save_ldev(ldev)
        return ldev

    def set_ldev_attribute(self, ldev: Ldev, attribute: str, on: bool) -> None:
        has = attribute in ldev.extra_attributes
        if on and not has:
            ldev.extra_attributes.append(attribute)
        elif not on and has:
            ldev.extra_attributes.remove(attribute)
        else:
            return
        self.save_ldev(ldev)
        if attribute == JOURNAL_ATTRIBUTE:  # a journal volume refuses host I/O (and loses its connections)
            vol = self.volumes.get(ldev.ldev_id)
            if vol is not None:
                vol.refuse_host_io(JOURNAL_REFUSAL if on else None)

    def ldev_luns(self, ldev_id: int) -> list[Lun]:
        return [lun for lun in self.luns.values() if lun.ldev_id == ldev_id]

    # -- host groups and LU paths -----------------------------------------------------------------
    def put_host_group(self, hg: HostGroup) -> None:
        self.host_groups[(hg.port_id, hg.number)] = hg
        self.store.put("host_groups", f"{hg.port_id},{hg.number}", asdict(hg))

    def get_port(self, port_id: str) -> Port:
        port = self.ports.get(port_id)
        if port is None:
            raise not_found("port", port_id)
        return port

    def get_host_group(self, port_id: str, number: int) -> HostGroup:
        self.get_port(port_id)
        hg = self.host_groups.get((port_id, number))
        if hg is None:
            raise not_found("host group", f"{port_id},{number}")
        return hg

    def get_lun(self, lun_id: str) -> Lun:
        lun = self.luns.get(lun_id)
        if lun is None:
            raise not_found("lun", lun_id)
        return lun

    def add_lun(self, port_id: str, host_group_number: int, ldev_id: int, lun: int | None = None) -> Lun:
        self.get_host_group(port_id, host_group_number)
        ldev = self.get_ldev(ldev_id)
        self.guard_ldev(ldev, "map")
        used = {x.lun for x in self.luns.values()
                if x.port_id == port_id and x.host_group_number == host_group_number}
        if any(x.ldev_id == ldev_id and x.port_id == port_id and x.host_group_number == host_group_number
               for x in self.luns.values()):
            raise VspError("LUN_ALREADY_DEFINED", port=port_id, hg=host_group_number, lun=ldev_id)
        if lun is None:
            lun = next(i for i in range(0, 2048) if i not in used)
        elif not 0 <= lun <= 2047:
            raise invalid("lun", lun, "Specify a value from 0 to 2047.")
        elif lun in used:
            raise VspError("LUN_ALREADY_DEFINED", port=port_id, hg=host_group_number, lun=lun)
        path = Lun(port_id, host_group_number, lun, ldev_id)
        self.store.put("luns", path.lun_id, asdict(path))
        self.luns[path.lun_id] = path
        return path

    def delete_lun(self, lun_id: str) -> None:
        lun = self.get_lun(lun_id)
        self.store.delete("luns", lun_id)
        del self.luns[lun_id]
        vol = self.volumes.get(lun.ldev_id)
        if vol is not None and not self.ldev_luns(lun.ldev_id):  # its last path: hosts lose access now
            vol.drop_hosts()

    # -- host I/O export --------------------------------------------------------------------------
    def exported_volume(self, name: str) -> Volume | None:
        """The volume behind an NBD export name (the LDEV id), if the LDEV has an LU path (and is no journal
        volume). The connection is dropped when the last LU path goes or the LDEV is deleted."""
        if not (name.isascii() and name.isdigit()) or len(name) > 5:  # str.isdigit() alone accepts '²'
            return None
        ldev_id = int(name)
        ldev = self.ldevs.get(ldev_id)
        if ldev is None or JOURNAL_ATTRIBUTE in ldev.extra_attributes or not self.ldev_luns(ldev_id):
            return None
        vol = self.volumes[ldev_id]
        return None if vol.closed or vol.host_io_refused is not None else vol

    def export_names(self) -> list[str]:
        return sorted({str(lun.ldev_id) for lun in self.luns.values()}, key=int)
