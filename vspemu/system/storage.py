"""One storage system: identity, users, pool, LDEVs, ports, host groups and LU paths.

User accounts are :class:`vspemu.system.users.UserAccounts` (a base of :class:`StorageSystem`); ports,
host groups and LU paths are the dataclasses of :mod:`vspemu.system.hostgroups`.

This is the configuration model. It is synchronous and knows nothing about HTTP: the API layer validates
requests, calls these methods inside jobs, and shapes the answers. Every change is written through to
SQLite (:mod:`vspemu.system.store`) before the method returns.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from vspemu.errors import VspError, invalid, not_found
from vspemu.system.capacity import BLOCK, format_byte_capacity
from vspemu.system.hostgroups import HostGroup, HostGroups, Lun, Port, default_group_name
from vspemu.system.ldevs import MAX_LDEV_ID as MAX_LDEV_ID, Ldev as Ldev
from vspemu.system.pools import DEFAULT_POOL_NAME, MAX_POOL_ID, POOL_ATTRIBUTE, Pool
from vspemu.system.resources import Resources
from vspemu.system.store import Store
from vspemu.system.users import User, UserAccounts
from vspemu.volumes.volume import Volume

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
BLOCKED_REFUSAL = "the LDEV is blocked"
QOS_LIMITS = {  # set-qos parameter -> (lowest, highest); 0 clears a setting
    "upperIops": (100, 2147483647), "lowerIops": (10, 2147483647),
    "upperTransferRate": (1, 2097151), "lowerTransferRate": (1, 2097151),
    "upperAlertAllowableTime": (1, 600), "lowerAlertAllowableTime": (1, 600),
    "responsePriority": (1, 3), "responseAlertAllowableTime": (1, 600),
}

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


def check_ldev_size(size: int) -> None:
    if not 0 < size <= MAX_LDEV_BYTES:
        raise invalid("capacity", size, "Specify a capacity from 1 block to 256 TiB for a DP volume.")


class StorageSystem(UserAccounts):
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
        self.ldev_guards: list[Callable[[Ldev, str], None]] = [self._pool_volume_guard]
        # what else a pool holds (Thin Image snapshot data): pool id (None: all pools) -> bytes
        self.pool_usage: list[Callable[[int | None], int]] = []
        # LDEV ids other subsystems hold outside self.ldevs (external volumes, vspemu.system.quorum)
        self.ldev_id_claims: list[Callable[[int], bool]] = []
        # may an LDEV become a TrueCopy / UR pair volume (role "P" or "S") now? (local copies refuse theirs)
        self.remote_pair_checks: list[Callable[[Ldev, str], None]] = []

        self.pools: dict[int, Pool] = {0: Pool(0, DEFAULT_POOL_NAME)}
        for doc in self.store.load("pools").values():
            pool = Pool(**doc)
            self.pools[pool.pool_id] = pool
        self.users = {k: User(**v) for k, v in self.store.load("users").items()}
        if not self.users:
            self.add_user(user, password, built_in=True)
        elif not any(u.built_in for u in self.users.values()) and user in self.users:
            self.users[user].built_in = True  # a data directory from before users had groups: its first account
        self.ldevs: dict[int, Ldev] = {}
        self.volumes: dict[int, Volume] = {}
        for doc in self.store.load("ldevs").values():
            ldev = Ldev(**doc)
            self.ldevs[ldev.ldev_id] = ldev
            vol = self.volumes[ldev.ldev_id] = Volume(ldev.ldev_id, self._ldev_path(ldev.ldev_id), ldev.size)
            if JOURNAL_ATTRIBUTE in ldev.extra_attributes:
                vol.refuse_host_io(JOURNAL_REFUSAL)
            elif ldev.status == "BLK":
                vol.refuse_host_io(BLOCKED_REFUSAL)
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
        self.resources = Resources(self)  # resource groups, virtual storage machines (GAD configuration)

    def _wwn(self, index: int) -> str:
        return f"50060e80{self.serial:06x}{index:02x}"[:16]

    def _ldev_path(self, ldev_id: int) -> Path:
        return self.ldev_dir / f"{ldev_id:05d}.img"

    def close(self) -> None:
        for vol in self.volumes.values():
            vol.close()
        self.store.close()

    # -- pools ------------------------------------------------------------------------------------
    def pool_ids(self) -> list[int]:
        return sorted(self.pools)

    def get_pool(self, pool_id: int) -> Pool:
        pool = self.pools.get(pool_id)
        if pool is None:
            # the collection tells "no such pool" from other errors by this text (vsp_storage_pool_gateway)
            raise VspError("NOT_FOUND", cause="Specified object does not exist.", object_id=f"pool {pool_id}")
        return pool

    def _pool_volume_guard(self, ldev: Ldev, action: str) -> None:
        if self.is_pool_volume(ldev):
            raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is a pool volume of pool {ldev.pool_id}")

    def check_pool(self, pool_id: int) -> None:
        self.get_pool(pool_id)

    def is_pool_volume(self, ldev: Ldev) -> bool:
        return POOL_ATTRIBUTE in ldev.extra_attributes

    def pool_dp_volumes(self, pool_id: int) -> list[Ldev]:
        return [x for x in self.ldevs.values() if x.pool_id == pool_id and not self.is_pool_volume(x)]

    def pool_total_bytes(self, pool_id: int = 0) -> int:
        pool = self.get_pool(pool_id)
        if pool_id == 0:
            return self.pool_capacity
        return sum(self.ldevs[i].size for i in pool.ldev_ids if i in self.ldevs)

    def pool_used_bytes(self, pool_id: int | None = None) -> int:
        """What the pool's DP volumes really hold (the blocks their sparse files allocate); all pools if None."""
        ldevs = [x for x in self.ldevs.values() if not self.is_pool_volume(x)
                 and (pool_id is None or x.pool_id == pool_id)]
        return (sum(self.volumes[x.ldev_id].allocated_bytes() for x in ldevs)
                + sum(usage(pool_id) for usage in self.pool_usage))

    def _check_pool_volumes(self, ldev_ids: list[int]) -> list[Ldev]:
        if not ldev_ids:
            raise VspError("MISSING_PARAMETER", attribute="ldevIds")
        if len(set(ldev_ids)) != len(ldev_ids):
            raise invalid("ldevIds", ldev_ids, "Specify each LDEV once.")
        out = []
        for ldev_id in ldev_ids:
            ldev = self.get_ldev(ldev_id)
            if self.is_pool_volume(ldev):
                raise VspError("IN_USE", detail=f"ldev {ldev_id} is already a pool volume")
            if ldev.pool_id != 0:
                raise VspError("IN_USE", detail=f"ldev {ldev_id} is a DP volume of pool {ldev.pool_id}")
            if self.ldev_luns(ldev_id):
                raise VspError("IN_USE", detail=f"ldev {ldev_id} has LU paths")
            if ldev.extra_attributes:
                raise VspError("IN_USE", detail=f"ldev {ldev_id} is in use ({', '.join(ldev.extra_attributes)})")
            self.guard_ldev(ldev, "delete")
            out.append(ldev)
        return out

    def _take_pool_volumes(self, pool: Pool, ldevs: list[Ldev]) -> None:
        for ldev in ldevs:
            ldev.pool_id = pool.pool_id
            ldev.extra_attributes.append(POOL_ATTRIBUTE)
            self.save_ldev(ldev)
            pool.ldev_ids.append(ldev.ldev_id)
            self.volumes[ldev.ldev_id].drop_hosts()
        self.store.put("pools", pool.pool_id, asdict(pool))

    def create_pool(self, pool_id: int | None, name: str, pool_type: str, ldev_ids: list[int],
                    warning: int | None = None, depletion: int | None = None) -> Pool:
        if pool_id is None:
            pool_id = next((i for i in range(MAX_POOL_ID + 1) if i not in self.pools), None)
            if pool_id is None:
                raise VspError("LDEV_ID_EXHAUSTED", resource="poolId")
        elif not 0 <= pool_id <= MAX_POOL_ID:
            raise invalid("poolId", pool_id, f"Specify a value from 0 to {MAX_POOL_ID}.")
        if pool_id in self.pools:
            raise VspError("ALREADY_EXISTS", object_id=f"pool {pool_id}")
        if not name or len(name) > 32:
            raise invalid("poolName", name, "Specify 1 to 32 characters.")
        if any(p.name == name for p in self.pools.values()):
            raise VspError("ALREADY_EXISTS", object_id=f"pool {name}")
        pool = Pool(pool_id, name, pool_type)
        self._set_thresholds(pool, warning, depletion)
        ldevs = self._check_pool_volumes(ldev_ids)
        self.pools[pool_id] = pool
        self._take_pool_volumes(pool, ldevs)
        return pool

    def _set_thresholds(self, pool: Pool, warning: int | None, depletion: int | None) -> None:
        w = pool.warning_threshold if warning is None else warning
        d = pool.depletion_threshold if depletion is None else depletion
        if not 1 <= w <= 100:
            raise invalid("warningThreshold", w, "Specify a value from 1 to 100.")
        if not 1 <= d <= 100 or d < w:
            raise invalid("depletionThreshold", d, "Specify a value from 1 to 100, not below the warning one.")
        pool.warning_threshold, pool.depletion_threshold = w, d

    def update_pool(self, pool_id: int, name: str | None = None, warning: int | None = None,
                    depletion: int | None = None) -> Pool:
        pool = self.get_pool(pool_id)
        if name is not None:
            if not name or len(name) > 32:
                raise invalid("poolName", name, "Specify 1 to 32 characters.")
            if any(p.name == name and p.pool_id != pool_id for p in self.pools.values()):
                raise VspError("ALREADY_EXISTS", object_id=f"pool {name}")
            if pool_id == 0:
                raise VspError("WRONG_STATE", detail="pool 0 is the data directory's file system; it keeps its name")
        probe = Pool(pool.pool_id, pool.name, warning_threshold=pool.warning_threshold,
                     depletion_threshold=pool.depletion_threshold)
        self._set_thresholds(probe, warning, depletion)  # validate all before changing anything
        pool.warning_threshold, pool.depletion_threshold = probe.warning_threshold, probe.depletion_threshold
        if name is not None:
            pool.name = name
        if pool_id != 0:
            self.store.put("pools", pool_id, asdict(pool))
        return pool

    def expand_pool(self, pool_id: int, ldev_ids: list[int]) -> Pool:
        pool = self.get_pool(pool_id)
        if pool_id == 0:
            raise VspError("WRONG_STATE", detail="pool 0 is the data directory's file system; it has no pool volumes")
        self._take_pool_volumes(pool, self._check_pool_volumes(ldev_ids))
        return pool

    def delete_pool(self, pool_id: int) -> None:
        pool = self.get_pool(pool_id)
        if pool_id == 0:
            raise VspError("WRONG_STATE", detail="pool 0 cannot be deleted")
        if self.pool_dp_volumes(pool_id):
            raise VspError("IN_USE", detail=f"pool {pool_id} has DP volumes; delete them first")
        for ldev_id in pool.ldev_ids:  # the pool volumes become ordinary (unused) LDEVs of pool 0 again
            ldev = self.ldevs.get(ldev_id)
            if ldev is not None:
                ldev.pool_id = 0
                ldev.extra_attributes.remove(POOL_ATTRIBUTE)
                self.save_ldev(ldev)
        self.store.delete("pools", pool_id)
        del self.pools[pool_id]

    # -- LDEVs ------------------------------------------------------------------------------------
    def get_ldev(self, ldev_id: int) -> Ldev:
        ldev = self.ldevs.get(ldev_id)
        if ldev is None:
            raise not_found("ldev", ldev_id)
        return ldev

    def free_ldev_id(self, start: int = 0, end: int = MAX_LDEV_ID) -> int:
        for i in range(start, end + 1):
            if i not in self.ldevs and not self.ldev_id_claimed(i):
                return i
        raise VspError("LDEV_ID_EXHAUSTED", resource="ldevId")

    def create_ldev(self, size: int, pool_id: int = 0, ldev_id: int | None = None, label: str = "",
                    data_reduction_mode: str = "disabled") -> Ldev:
        self.check_pool(pool_id)
        if ldev_id is None:
            ldev_id = self.free_ldev_id()
        elif not 0 <= ldev_id <= MAX_LDEV_ID:
            raise invalid("ldevId", ldev_id, f"Specify a value from 0 to {MAX_LDEV_ID}.")
        elif ldev_id in self.ldevs or self.ldev_id_claimed(ldev_id):
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

    def ldev_id_claimed(self, ldev_id: int) -> bool:
        return any(claim(ldev_id) for claim in self.ldev_id_claims)

    def guard_ldev(self, ldev: Ldev, action: str) -> None:
        """Ask the subsystems whether an LDEV may be deleted / mapped / expanded now."""
        for guard in self.ldev_guards:
            guard(ldev, action)

    def check_remote_pair_volume(self, ldev: Ldev, role: str) -> None:
        """Raise the array's refusal if ``ldev`` may not become the ``role`` ("P"/"S") of a TC / UR pair now."""
        for check in self.remote_pair_checks:
            check(ldev, role)

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

    def check_plain(self, ldev: Ldev, action: str) -> None:
        """What the array refuses on a volume in use: a pair volume, a journal volume, a pool volume."""
        self.guard_ldev(ldev, action)
        if JOURNAL_ATTRIBUTE in ldev.extra_attributes:
            raise VspError("IN_USE", detail=f"ldev {ldev.ldev_id} is a journal volume")

    def set_ldev_status(self, ldev_id: int, status: str) -> Ldev:
        """change-status: "blk" blocks the LDEV (host connections dropped, no host I/O), "nml" restores it."""
        ldev = self.get_ldev(ldev_id)
        new = {"blk": "BLK", "nml": "NML"}.get(status)
        if new is None:
            raise invalid("status", status, "Specify blk or nml.")
        if new == "BLK":
            self.check_plain(ldev, "block")
        if ldev.status == new:
            return ldev
        ldev.status = new
        self.save_ldev(ldev)
        self.volumes[ldev_id].refuse_host_io(BLOCKED_REFUSAL if new == "BLK" else None)
        return ldev

    def check_format(self, ldev_id: int, operation: str) -> Ldev:
        ldev = self.get_ldev(ldev_id)
        if operation not in ("FMT", "QFMT"):
            raise invalid("operationType", operation, "Specify FMT or QFMT.")
        self.check_plain(ldev, "format")
        if ldev.status != "BLK":
            raise VspError("WRONG_STATE", detail=f"ldev {ldev_id} is not blocked; block it (change-status blk) "
                                                 "before formatting")
        return ldev

    def format_ldev(self, ldev_id: int, operation: str) -> Ldev:
        """Zero the whole volume (its file becomes one hole: nothing allocated), then back to normal."""
        ldev = self.check_format(ldev_id, operation)
        vol = self.volumes[ldev_id]
        vol.discard_local(0, vol.size)
        vol.flush_sync()
        ldev.status = "NML"
        self.save_ldev(ldev)
        vol.refuse_host_io(None)
        return ldev

    def check_qos(self, ldev_id: int, params: dict[str, int]) -> dict[str, int]:
        """The LDEV's QoS settings after ``params`` (0 clears one); refused if out of range."""
        ldev = self.get_ldev(ldev_id)
        if not params:
            raise VspError("MISSING_PARAMETER", attribute="parameters")
        for key, value in params.items():
            lo, hi = QOS_LIMITS[key]
            if value != 0 and not lo <= value <= hi:
                raise invalid(key, value, f"Specify 0 (none) or a value from {lo} to {hi}.")
        qos = {**ldev.qos, **params}
        qos = {k: v for k, v in qos.items() if v != 0}
        for upper, lower in (("upperIops", "lowerIops"), ("upperTransferRate", "lowerTransferRate")):
            if upper in qos and lower in qos and qos[lower] > qos[upper]:
                raise invalid(lower, qos[lower], f"Specify a value not above {upper} ({qos[upper]}).")
        return qos

    def set_qos(self, ldev_id: int, params: dict[str, int]) -> Ldev:
        qos = self.check_qos(ldev_id, params)
        ldev = self.get_ldev(ldev_id)
        ldev.qos = qos
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
