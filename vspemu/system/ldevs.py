"""The LDEV record (an LDEV's configuration; its bytes are a :class:`vspemu.volumes.volume.Volume`).

Defined apart from :mod:`vspemu.system.storage` (which keeps the LDEVs and re-exports these names) so that
the subsystems :class:`vspemu.system.storage.StorageSystem` is made of (resources.py) can name it without
importing the storage system back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vspemu.system.capacity import BLOCK

MAX_LDEV_ID = 65279


@dataclass
class Ldev:
    ldev_id: int
    pool_id: int
    block_capacity: int
    label: str = ""
    data_reduction_mode: str = "disabled"
    # attributes other subsystems add: "HORC" (TC/UR pair volume), "JNL" (journal volume), "POOL" (pool volume)
    extra_attributes: list[str] = field(default_factory=list)
    status: str = "NML"  # "BLK": blocked (change-status), no host I/O
    is_alua_enabled: bool = False
    is_full_allocation_enabled: bool = False
    is_compression_acceleration_enabled: bool = False
    data_reduction_process_mode: str = "inline"
    qos: dict[str, int] = field(default_factory=dict)  # set-qos parameters, as the array reports them
    virtual_ldev_id: int | None = None  # None: its own id; 65534 unassigned, 65535 GAD reserve (resources.py)

    @property
    def size(self) -> int:
        return self.block_capacity * BLOCK
