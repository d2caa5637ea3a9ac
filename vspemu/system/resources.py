"""Resource groups, virtual storage machines and virtual LDEV ids: the configuration GAD needs.

A resource group holds LDEV ids, ports and host groups. Resource group 0 (``meta_resource``) always exists
and holds every resource that no other group holds. A virtual storage machine (VSM) gives the LDEVs of its
resource groups another identity (serial number, model): a GAD S-VOL lives in a VSM whose identity is the
P-VOL's system, with the P-VOL's LDEV id as its virtual LDEV id, so hosts see one volume behind both.
Virtual storage id 0 is the physical system itself (its own serial and model); meta_resource belongs to it.

Virtual LDEV ids live on the LDEV (``Ldev.virtual_ldev_id``; None = the LDEV's own id). 65534 means
"unassigned" (after unassign-virtual-ldevid) and 65535 "reserved for GAD" (a GAD S-VOL before its pair
exists), as on the array. The LDEV GET shows ``virtualLdevId`` only when it is not the LDEV's own id.

Everything is persisted in the system's configuration database (kinds ``virtual_storages`` and
``resource_groups``) and reloaded on restart. Knows nothing about HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from vspemu.errors import VspError, invalid, not_found
from vspemu.system.hostgroups import HostGroup, Port
from vspemu.system.ldevs import MAX_LDEV_ID, Ldev
from vspemu.system.store import Store

META_RESOURCE = "meta_resource"
MAX_RESOURCE_GROUP_ID = 1023
MAX_VIRTUAL_STORAGE_ID = 7  # VSP 5000: up to 8 virtual storage machines including the physical one
UNASSIGNED_VLDEV = 65534  # FF:FE: no virtual LDEV id
GAD_RESERVED_VLDEV = 65535  # FF:FF: reserved for a GAD S-VOL
MAX_VIRTUAL_LDEV_ID = 65279
FREE_VLDEV = (UNASSIGNED_VLDEV, GAD_RESERVED_VLDEV)  # an LDEV moves into / out of a VSM only with these
NAME_MAX = 32

# the virtualModel values the array reports (and the collection's VSPStorageModelsManager sends)
VIRTUAL_MODELS = {
    "VSP 5100H, 5500H", "VSP 5200H, 5600H", "VSP 5100, 5500", "VSP 5200, 5600",
    "VSP E1090", "VSP E1090H", "VSP E590", "VSP E590H", "VSP E790", "VSP E790H", "VSP E990",
    "VSP F350", "VSP F370", "VSP F400", "VSP F600", "VSP F700", "VSP F800", "VSP F900", "VSP F1500",
    "VSP G130", "VSP G200", "VSP G350", "VSP G370", "VSP G400", "VSP G600", "VSP G700", "VSP G800",
    "VSP G900", "VSP G1000", "VSP G1500", "VSP One B24", "VSP One B26", "VSP One B28", "VSP One B85",
}
# the 6-digit prefix of a (virtual) storage device id, by model family (api-spec 1.4)
_PREFIX = [("VSP 5", "900000"), ("VSP E590", "934000"), ("VSP E790", "934000"), ("VSP E990", "936000"),
           ("VSP E1090", "938000"), ("VSP G1000", "800000"), ("VSP G1500", "800000"), ("VSP F1500", "800000"),
           ("VSP G130", "880000"), ("VSP G350", "882000"), ("VSP F350", "882000")]


def model_prefix(model: str) -> str:
    return next((p for name, p in _PREFIX if model.startswith(name)), "886000")


def model_type_id(model: str) -> str:
    """The short storage type id (R9: VSP 5000, R8: G1000/G1500/F1500, M8: midrange)."""
    prefix = model_prefix(model)
    return {"900000": "R9", "800000": "R8"}.get(prefix, "M8")


def port_of_host_group(host_group_id: str) -> str:
    return host_group_id.split(",", 1)[0]


@dataclass
class VirtualStorage:
    virtual_storage_id: int
    serial: int
    model: str

    @property
    def device_id(self) -> str:
        return f"{model_prefix(self.model)}{self.serial:06d}"


@dataclass
class ResourceGroup:
    resource_group_id: int
    name: str
    virtual_storage_id: int = 0
    ldev_ids: list[int] = field(default_factory=list)
    port_ids: list[str] = field(default_factory=list)
    host_group_ids: list[str] = field(default_factory=list)  # "CL1-A,1"


class ResourceSystem(Protocol):
    """What :class:`Resources` uses of its storage system (:class:`vspemu.system.storage.StorageSystem`)."""

    serial: int
    model: str
    store: Store
    ldevs: dict[int, Ldev]
    ports: dict[str, Port]
    host_groups: dict[tuple[str, int], HostGroup]

    def get_port(self, port_id: str) -> Port: ...

    def get_host_group(self, port_id: str, number: int) -> HostGroup: ...

    def get_ldev(self, ldev_id: int) -> Ldev: ...

    def save_ldev(self, ldev: Ldev) -> None: ...

    def guard_ldev(self, ldev: Ldev, action: str) -> None: ...


class Resources:
    """Resource groups and virtual storage machines of one storage system."""

    def __init__(self, system: ResourceSystem) -> None:
        self.system = system
        self.store = system.store
        self.virtual_storages: dict[int, VirtualStorage] = {}
        for doc in self.store.load("virtual_storages").values():
            vsm = VirtualStorage(**doc)
            self.virtual_storages[vsm.virtual_storage_id] = vsm
        self.groups: dict[int, ResourceGroup] = {}
        for doc in self.store.load("resource_groups").values():
            rg = ResourceGroup(**doc)
            self.groups[rg.resource_group_id] = rg
        self._ldev_owner: dict[int, int] = {}  # LDEV id -> its group (other than 0): an index, not persisted
        self._reindex()

    def _reindex(self) -> None:
        self._ldev_owner = {i: rg.resource_group_id for rg in self.groups.values() for i in rg.ldev_ids}

    # -- virtual storage machines ----------------------------------------------------------------
    def physical(self) -> VirtualStorage:
        return VirtualStorage(0, self.system.serial, self.system.model)

    def virtual_storage_ids(self) -> list[int]:
        return [0, *sorted(self.virtual_storages)]

    def get_virtual_storage(self, vsm_id: int) -> VirtualStorage:
        if vsm_id == 0:
            return self.physical()
        vsm = self.virtual_storages.get(vsm_id)
        if vsm is None:
            raise not_found("virtual storage", vsm_id)
        return vsm

    def virtual_storage_by_device_id(self, device_id: str) -> VirtualStorage:
        for vid in self.virtual_storage_ids():
            vsm = self.get_virtual_storage(vid)
            if vsm.device_id == device_id:
                return vsm
        raise not_found("virtual storage", device_id)

    def groups_of(self, vsm_id: int) -> list[int]:
        ids = [rg.resource_group_id for rg in self.groups.values() if rg.virtual_storage_id == vsm_id]
        return sorted([0, *ids] if vsm_id == 0 else ids)

    def check_new_virtual_storage(self, serial: int, model: str) -> None:
        if not 1 <= serial <= 999999:
            raise invalid("virtualSerialNumber", serial, "Specify a serial number from 1 to 999999.")
        if model not in VIRTUAL_MODELS:
            raise invalid("virtualModel", model, "Specify a model the array knows, e.g. \"VSP 5100H, 5500H\".")
        if serial == self.system.serial or any(v.serial == serial for v in self.virtual_storages.values()):
            raise VspError("ALREADY_EXISTS", object_id=f"virtual storage with serial {serial}")
        if len(self.virtual_storages) >= MAX_VIRTUAL_STORAGE_ID:
            raise VspError("LDEV_ID_EXHAUSTED", resource="virtualStorageId")

    def create_virtual_storage(self, group_name: str, serial: int, model: str) -> ResourceGroup:
        """A new virtual storage machine and its first resource group (POST virtual-storages)."""
        self.check_new_virtual_storage(serial, model)
        self._check_new_group_name(group_name)
        vsm_id = next(i for i in range(1, MAX_VIRTUAL_STORAGE_ID + 1) if i not in self.virtual_storages)
        vsm = VirtualStorage(vsm_id, serial, model)
        with self.store.transaction():
            self.store.put("virtual_storages", vsm_id, asdict(vsm))
            rg = self._new_group(group_name, vsm_id)
        self.virtual_storages[vsm_id] = vsm
        return rg

    # -- resource groups ---------------------------------------------------------------------------
    def group_ids(self) -> list[int]:
        return [0, *sorted(self.groups)]

    def get_group(self, group_id: int) -> ResourceGroup:
        if group_id == 0:
            return self.meta_resource()
        rg = self.groups.get(group_id)
        if rg is None:
            raise not_found("resource group", group_id)
        return rg

    def meta_resource(self) -> ResourceGroup:
        """Group 0: every defined LDEV, port and host group that no other group holds."""
        held_ldevs = self._ldev_owner
        held_ports = {p for rg in self.groups.values() for p in rg.port_ids}
        held_hgs = {h for rg in self.groups.values() for h in rg.host_group_ids}
        system = self.system
        return ResourceGroup(
            0, META_RESOURCE, 0,
            [i for i in sorted(system.ldevs) if i not in held_ldevs],
            [p for p in system.ports if p not in held_ports],
            [f"{p},{n}" for (p, n) in sorted(system.host_groups) if f"{p},{n}" not in held_hgs],
        )

    def _check_new_group_name(self, name: str) -> None:
        if not name or len(name) > NAME_MAX:
            raise invalid("resourceGroupName", name, f"Specify 1 to {NAME_MAX} characters.")
        if name == META_RESOURCE or any(rg.name == name for rg in self.groups.values()):
            raise VspError("ALREADY_EXISTS", object_id=f"resource group {name}")

    def check_new_group(self, name: str, vsm_id: int) -> None:
        self._check_new_group_name(name)
        self.get_virtual_storage(vsm_id)
        if len(self.groups) >= MAX_RESOURCE_GROUP_ID:
            raise VspError("LDEV_ID_EXHAUSTED", resource="resourceGroupId")

    def create_group(self, name: str, vsm_id: int = 0) -> ResourceGroup:
        self.check_new_group(name, vsm_id)
        return self._new_group(name, vsm_id)

    def _new_group(self, name: str, vsm_id: int) -> ResourceGroup:
        group_id = next(i for i in range(1, MAX_RESOURCE_GROUP_ID + 1) if i not in self.groups)
        rg = ResourceGroup(group_id, name, vsm_id)
        self.store.put("resource_groups", group_id, asdict(rg))
        self.groups[group_id] = rg
        return rg

    def _save(self, rg: ResourceGroup) -> None:
        self.store.put("resource_groups", rg.resource_group_id, asdict(rg))

    def group_of_ldev(self, ldev_id: int) -> int:
        return self._ldev_owner.get(ldev_id, 0)

    def group_of_port(self, port_id: str) -> int:
        return next((rg.resource_group_id for rg in self.groups.values() if port_id in rg.port_ids), 0)

    def group_of_host_group(self, host_group_id: str) -> int:
        return next((rg.resource_group_id for rg in self.groups.values() if host_group_id in rg.host_group_ids), 0)

    def _check_resources(self, ldev_ids: list[int], port_ids: list[str], host_group_ids: list[str]) -> None:
        """Every resource named must exist (LDEV ids may be undefined: a group reserves ids, as on the array)."""
        for i in ldev_ids:
            if not 0 <= i <= MAX_LDEV_ID:
                raise invalid("ldevIds", i, f"Specify LDEV ids from 0 to {MAX_LDEV_ID}.")
        for p in port_ids:
            self.system.get_port(p)
        for h in host_group_ids:
            port, sep, number = h.partition(",")
            if not sep or not number.isascii() or not number.isdigit() or len(number) > 3:
                raise invalid("hostGroupIds", h, "Specify a host group as \"<port id>,<host group number>\".")
            self.system.get_host_group(port, int(number))
        for name, items in (("ldevIds", ldev_ids), ("portIds", port_ids), ("hostGroupIds", host_group_ids)):
            if len(set(items)) != len(items):
                raise invalid(name, items, "Specify each resource once.")

    def check_add(self, group_id: int, ldev_ids: list[int], port_ids: list[str],
                  host_group_ids: list[str]) -> ResourceGroup:
        rg = self.get_group(group_id)
        if group_id == 0:
            raise VspError("WRONG_STATE", detail="resources are added to meta_resource by removing them from "
                                                 "their resource group")
        if not (ldev_ids or port_ids or host_group_ids):
            raise VspError("MISSING_PARAMETER", attribute="ldevIds, portIds or hostGroupIds")
        self._check_resources(ldev_ids, port_ids, host_group_ids)
        for i in ldev_ids:
            owner = self.group_of_ldev(i)
            if owner != 0:
                raise VspError("IN_USE", detail=f"ldev {i} belongs to resource group {owner}")
            ldev = self.system.ldevs.get(i)  # into a virtual storage machine: only without a virtual id
            if ldev is not None and rg.virtual_storage_id != 0 and self.virtual_id(ldev) not in FREE_VLDEV:
                raise VspError("WRONG_STATE", detail=f"ldev {i} has virtual LDEV id {self.virtual_id(ldev)}; "
                                                     "unassign it first")
        for p in port_ids:
            owner = self.group_of_port(p)
            if owner != 0:
                raise VspError("IN_USE", detail=f"port {p} belongs to resource group {owner}")
        for h in host_group_ids:
            owner = self.group_of_host_group(h)
            if owner != 0:
                raise VspError("IN_USE", detail=f"host group {h} belongs to resource group {owner}")
        return rg

    def add_resources(self, group_id: int, ldev_ids: list[int], port_ids: list[str],
                      host_group_ids: list[str]) -> ResourceGroup:
        rg = self.check_add(group_id, ldev_ids, port_ids, host_group_ids)
        rg.ldev_ids = sorted([*rg.ldev_ids, *ldev_ids])
        rg.port_ids = [*rg.port_ids, *port_ids]
        rg.host_group_ids = [*rg.host_group_ids, *host_group_ids]
        self._save(rg)
        self._reindex()
        return rg

    def check_remove(self, group_id: int, ldev_ids: list[int], port_ids: list[str],
                     host_group_ids: list[str]) -> ResourceGroup:
        rg = self.get_group(group_id)
        if group_id == 0:
            raise VspError("WRONG_STATE", detail="resources leave meta_resource by being added to another group")
        if not (ldev_ids or port_ids or host_group_ids):
            raise VspError("MISSING_PARAMETER", attribute="ldevIds, portIds or hostGroupIds")
        for name, items, held_list in (("ldevIds", ldev_ids, rg.ldev_ids), ("portIds", port_ids, rg.port_ids),
                                       ("hostGroupIds", host_group_ids, rg.host_group_ids)):
            held = set(held_list)
            for item in items:
                if item not in held:
                    raise VspError("NOT_FOUND", object_id=f"{name} {item} in resource group {group_id}")
            if len(set(items)) != len(items):
                raise invalid(name, items, "Specify each resource once.")
        for i in ldev_ids:
            ldev = self.system.ldevs.get(i)
            if ldev is not None and rg.virtual_storage_id != 0 and self.virtual_id(ldev) not in FREE_VLDEV:
                raise VspError("WRONG_STATE", detail=f"ldev {i} has virtual LDEV id {self.virtual_id(ldev)} in "
                                                     f"virtual storage {rg.virtual_storage_id}; unassign it first")
        return rg

    def remove_resources(self, group_id: int, ldev_ids: list[int], port_ids: list[str],
                         host_group_ids: list[str]) -> ResourceGroup:
        rg = self.check_remove(group_id, ldev_ids, port_ids, host_group_ids)
        gone = set(ldev_ids)
        rg.ldev_ids = [i for i in rg.ldev_ids if i not in gone]
        rg.port_ids = [p for p in rg.port_ids if p not in port_ids]
        rg.host_group_ids = [h for h in rg.host_group_ids if h not in host_group_ids]
        self._save(rg)
        self._reindex()
        return rg

    def check_delete(self, group_id: int) -> ResourceGroup:
        rg = self.get_group(group_id)
        if group_id == 0:
            raise VspError("WRONG_STATE", detail="resource group 0 (meta_resource) cannot be deleted")
        if rg.ldev_ids or rg.port_ids or rg.host_group_ids:
            raise VspError("IN_USE", detail=f"resource group {group_id} holds resources; remove them first")
        return rg

    def delete_group(self, group_id: int) -> None:
        rg = self.check_delete(group_id)
        vsm_id = rg.virtual_storage_id
        with self.store.transaction():
            self.store.delete("resource_groups", group_id)
            # a virtual storage machine goes with its last resource group, as on the array
            last = vsm_id != 0 and not any(g.virtual_storage_id == vsm_id and g.resource_group_id != group_id
                                            for g in self.groups.values())
            if last:
                self.store.delete("virtual_storages", vsm_id)
        del self.groups[group_id]
        if last:
            self.virtual_storages.pop(vsm_id, None)

    # -- virtual LDEV ids --------------------------------------------------------------------------
    def virtual_storage_of_ldev(self, ldev_id: int) -> VirtualStorage:
        group_id = self.group_of_ldev(ldev_id)
        return self.get_virtual_storage(self.get_group(group_id).virtual_storage_id if group_id else 0)

    @staticmethod
    def virtual_id(ldev: Ldev) -> int:
        return ldev.ldev_id if ldev.virtual_ldev_id is None else ldev.virtual_ldev_id

    def _ldevs_in_vsm(self, vsm_id: int) -> Iterable[Ldev]:
        for ldev in self.system.ldevs.values():
            if self.virtual_storage_of_ldev(ldev.ldev_id).virtual_storage_id == vsm_id:
                yield ldev

    def check_assign(self, ldev_id: int, virtual_ldev_id: int) -> Ldev:
        ldev = self.system.get_ldev(ldev_id)
        if not (0 <= virtual_ldev_id <= MAX_VIRTUAL_LDEV_ID or virtual_ldev_id == GAD_RESERVED_VLDEV):
            raise invalid("virtualLdevId", virtual_ldev_id,
                          f"Specify a value from 0 to {MAX_VIRTUAL_LDEV_ID}, or {GAD_RESERVED_VLDEV} (GAD reserve).")
        if self.virtual_id(ldev) != UNASSIGNED_VLDEV:
            raise VspError("WRONG_STATE", detail=f"ldev {ldev_id} has virtual LDEV id {self.virtual_id(ldev)}; "
                                                 "unassign it first")
        if virtual_ldev_id != GAD_RESERVED_VLDEV:
            vsm = self.virtual_storage_of_ldev(ldev_id)
            for other in self._ldevs_in_vsm(vsm.virtual_storage_id):
                if other.ldev_id != ldev_id and self.virtual_id(other) == virtual_ldev_id:
                    raise VspError("ALREADY_EXISTS", object_id=f"virtual LDEV id {virtual_ldev_id} in virtual storage "
                                                               f"{vsm.virtual_storage_id} (ldev {other.ldev_id})")
        return ldev

    def assign_virtual_ldev_id(self, ldev_id: int, virtual_ldev_id: int) -> Ldev:
        ldev = self.check_assign(ldev_id, virtual_ldev_id)
        ldev.virtual_ldev_id = virtual_ldev_id
        self.system.save_ldev(ldev)
        return ldev

    def check_unassign(self, ldev_id: int, virtual_ldev_id: int) -> Ldev:
        ldev = self.system.get_ldev(ldev_id)
        current = self.virtual_id(ldev)
        if current == UNASSIGNED_VLDEV:
            raise VspError("WRONG_STATE", detail=f"ldev {ldev_id} has no virtual LDEV id")
        if virtual_ldev_id != current:
            raise invalid("virtualLdevId", virtual_ldev_id, f"ldev {ldev_id} has virtual LDEV id {current}.")
        self.system.guard_ldev(ldev, "unassign-virtual-ldevid")
        return ldev

    def unassign_virtual_ldev_id(self, ldev_id: int, virtual_ldev_id: int) -> Ldev:
        ldev = self.check_unassign(ldev_id, virtual_ldev_id)
        ldev.virtual_ldev_id = UNASSIGNED_VLDEV
        self.system.save_ldev(ldev)
        return ldev

    def ldev_fields(self, ldev: Ldev) -> dict[str, Any]:
        """What the LDEV GET adds: its resource group, its virtual id and virtual storage if not its own."""
        group_id = self.group_of_ldev(ldev.ldev_id)
        out: dict[str, Any] = {"resourceGroupId": group_id}
        vsm = self.virtual_storage_of_ldev(ldev.ldev_id)
        if ldev.virtual_ldev_id is not None and (ldev.virtual_ldev_id != ldev.ldev_id or vsm.virtual_storage_id):
            out["virtualLdevId"] = ldev.virtual_ldev_id
        if vsm.virtual_storage_id != 0:
            out["virtualStorageDeviceId"] = vsm.device_id
            out["virtualSerialNumber"] = str(vsm.serial)
            out["virtualModel"] = vsm.model
        return out
