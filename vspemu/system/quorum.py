"""Quorum disks for GAD, backed by a real volume of a third storage system reached over the network.

External volume (the minimal "external storage" vspemu models): a local LDEV id that stands for an LDEV of
another vspemu system, reached over NBD (its host I/O port: the LDEV needs an LU path there). It is registered
with a vspemu-private call (docs/gad.md); the array would build it from external path groups and an
external parity group, which vspemu does not model. Its LDEV id is taken (no DP volume can have it).

Quorum disk (``quorum-disks``, ids 0-31): the partner system of a future GAD pair (remoteSerialNumber /
remoteStorageTypeId: a registered remote storage) and either an external volume (``ldevId``) or none
(quorum-less, as the array allows since 2019). A disk with a volume is REAL: every check opens an NBD
connection to the quorum system, reads the quorum record and writes this system's heartbeat slot (FUA), then
reads it back. Status NORMAL when that works, BLOCKED when it does not. Checked every ``interval`` seconds and
before every GET answer.

The quorum record on the external volume (little endian; the first 12 KiB):

* offset 0, 512 bytes: header: magic ``VSPEMU-QUORUM\\0\\0\\0``, version (u32), 0s. Written when blank.
* offset 4096 * (1 + slot), 512 bytes: a system's slot. Slot 0 is the lower serial of the two systems,
  slot 1 the higher one, so the pair's two systems never write the same block. Fields: magic ``VQRS``,
  version u32, serial u64, partner serial u64, quorum disk id u32, heartbeat sequence u64, wall-clock seconds
  f64, arbitration epoch u64, flags u32, CRC32 of what precedes. The epoch and flags are written 0 now: they
  are what the GAD engine will use to record who won an arbitration (docs/gad.md).

Knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

from vspemu.client.nbd import NbdClient, NbdError, NbdOptionError
from vspemu.errors import VspError, invalid, not_found
from vspemu.system.storage import MAX_LDEV_ID, StorageSystem

log = logging.getLogger(__name__)

MAX_QUORUM_DISK_ID = 31
NORMAL = "NORMAL"
BLOCKED = "BLOCKED"
READ_RESPONSE_GUARANTEED_TIME = 40  # seconds, the array's default
CHECK_INTERVAL = 2.0
IO_TIMEOUT = 3.0
HEADER_MAGIC = b"VSPEMU-QUORUM\0\0\0"
SLOT_MAGIC = b"VQRS"
VERSION = 1
SLOT_SIZE = 512
SLOT_BASE = 4096
RECORD_BYTES = SLOT_BASE * 3  # the smallest external volume that holds the record
_SLOT = struct.Struct("<4sIQQIQdQI")


def slot_offset(slot: int) -> int:
    return SLOT_BASE * (1 + slot)


def slot_of(serial: int, partner: int) -> int:
    return 0 if serial < partner else 1


@dataclass
class QuorumSlot:
    """One system's heartbeat record on the quorum volume."""

    serial: int
    partner: int
    quorum_disk_id: int
    sequence: int
    wall_time: float
    epoch: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        body = _SLOT.pack(SLOT_MAGIC, VERSION, self.serial, self.partner, self.quorum_disk_id, self.sequence,
                          self.wall_time, self.epoch, self.flags)
        return (body + struct.pack("<I", zlib.crc32(body))).ljust(SLOT_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> QuorumSlot | None:
        body = raw[:_SLOT.size]
        if len(raw) < _SLOT.size + 4 or body[:4] != SLOT_MAGIC:
            return None
        (crc,) = struct.unpack_from("<I", raw, _SLOT.size)
        if crc != zlib.crc32(body):
            return None
        _m, _v, serial, partner, qid, seq, wall, epoch, flags = _SLOT.unpack(body)
        return cls(serial, partner, qid, seq, wall, epoch, flags)


@dataclass
class ExternalVolume:
    ldev_id: int
    external_serial: int
    external_ldev_id: int
    host: str
    port: int
    block_capacity: int = 0


@dataclass
class QuorumDisk:
    quorum_disk_id: int
    remote_serial: int
    remote_type_id: str
    ldev_id: int | None = None  # None: quorum-less
    read_response_guaranteed_time: int = READ_RESPONSE_GUARANTEED_TIME


@dataclass
class QuorumState:
    """What the last check found (not persisted)."""

    status: str = BLOCKED
    sequence: int = 0
    checked_at: float = 0.0
    error: str = ""
    partner: QuorumSlot | None = None  # the partner's slot as last read


# a remote storage system's storage type id, by serial; None when not registered (set by the server)
RemoteLookup = Callable[[int], str | None]


class QuorumDisks:
    """The external volumes and quorum disks of one storage system, and their periodic check."""

    def __init__(self, system: StorageSystem, remote_type: RemoteLookup | None = None,
                 interval: float = CHECK_INTERVAL, io_timeout: float = IO_TIMEOUT) -> None:
        self.system = system
        self.store = system.store
        self.remote_type = remote_type
        self.interval = interval
        self.io_timeout = io_timeout
        self.externals: dict[int, ExternalVolume] = {}
        for doc in self.store.load("external_volumes").values():
            ev = ExternalVolume(**doc)
            self.externals[ev.ldev_id] = ev
        self.disks: dict[int, QuorumDisk] = {}
        for doc in self.store.load("quorum_disks").values():
            qd = QuorumDisk(**doc)
            self.disks[qd.quorum_disk_id] = qd
        self.states: dict[int, QuorumState] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._task: asyncio.Task[None] | None = None
        self.users: list[Callable[[int], str | None]] = []  # who uses a quorum disk (None: nobody)
        system.ldev_id_claims.append(lambda i: i in self.externals)

    # -- external volumes --------------------------------------------------------------------------
    def check_new_external(self, ldev_id: int, serial: int, external_ldev_id: int) -> None:
        if not 0 <= ldev_id <= MAX_LDEV_ID:
            raise invalid("ldevId", ldev_id, f"Specify a value from 0 to {MAX_LDEV_ID}.")
        if not 0 <= external_ldev_id <= MAX_LDEV_ID:
            raise invalid("externalLdevId", external_ldev_id, f"Specify a value from 0 to {MAX_LDEV_ID}.")
        if not 1 <= serial <= 999999 or serial == self.system.serial:
            raise invalid("externalSerialNumber", serial, "Specify the serial number of another storage system.")
        if ldev_id in self.system.ldevs or ldev_id in self.externals:
            raise VspError("ALREADY_EXISTS", object_id=f"ldev {ldev_id}")

    def probe(self, host: str, port: int, external_ldev_id: int) -> int:
        """The size of the external LDEV, read over NBD (blocking: run in a thread). Refused when it cannot be
        reached or is too small to hold the quorum record."""
        try:
            with NbdClient(host, port, str(external_ldev_id), timeout=self.io_timeout) as c:
                c.read(0, SLOT_SIZE)
                size = c.size
        except NbdOptionError:
            raise not_found("external volume", f"{host}:{port} export {external_ldev_id} (an LDEV needs an LU "
                                               "path on the external system)") from None
        except (OSError, NbdError, ConnectionError) as e:
            raise VspError("REMOTE_UNREACHABLE", detail=f"external volume {host}:{port} export "
                                                        f"{external_ldev_id}: {e}") from None
        if size < RECORD_BYTES:
            raise invalid("externalLdevId", external_ldev_id, f"The volume must hold at least {RECORD_BYTES} "
                                                               "bytes (the quorum record).")
        return size

    def add_external(self, ev: ExternalVolume) -> ExternalVolume:
        self.check_new_external(ev.ldev_id, ev.external_serial, ev.external_ldev_id)
        self.store.put("external_volumes", ev.ldev_id, asdict(ev))
        self.externals[ev.ldev_id] = ev
        return ev

    def get_external(self, ldev_id: int) -> ExternalVolume:
        ev = self.externals.get(ldev_id)
        if ev is None:
            raise not_found("external volume", ldev_id)
        return ev

    def check_delete_external(self, ldev_id: int) -> ExternalVolume:
        ev = self.get_external(ldev_id)
        user = next((d for d in self.disks.values() if d.ldev_id == ldev_id), None)
        if user is not None:
            raise VspError("IN_USE", detail=f"ldev {ldev_id} is quorum disk {user.quorum_disk_id}")
        return ev

    def delete_external(self, ldev_id: int) -> None:
        self.check_delete_external(ldev_id)
        self.store.delete("external_volumes", ldev_id)
        del self.externals[ldev_id]

    # -- quorum disks --------------------------------------------------------------------------------
    def get(self, quorum_disk_id: int) -> QuorumDisk:
        disk = self.disks.get(quorum_disk_id)
        if disk is None:
            raise not_found("quorum disk", quorum_disk_id)
        return disk

    def check_new(self, quorum_disk_id: int, remote_serial: int, remote_type_id: str, ldev_id: int | None) -> None:
        if not 0 <= quorum_disk_id <= MAX_QUORUM_DISK_ID:
            raise invalid("quorumDiskId", quorum_disk_id, f"Specify a value from 0 to {MAX_QUORUM_DISK_ID}.")
        if quorum_disk_id in self.disks:
            raise VspError("ALREADY_EXISTS", object_id=f"quorum disk {quorum_disk_id}")
        if remote_serial == self.system.serial:
            raise invalid("remoteSerialNumber", remote_serial, "Specify the serial number of the other system "
                                                               "of the GAD pairs, not this one.")
        if self.remote_type is not None:
            known = self.remote_type(remote_serial)
            if known is None:
                raise not_found("remote storage", f"serial {remote_serial} (register it: remote-storages)")
            if known != remote_type_id:
                raise invalid("remoteStorageTypeId", remote_type_id, f"Remote storage {remote_serial} is of "
                                                                     f"type {known}.")
        if ldev_id is None:
            return
        if ldev_id not in self.externals:
            if ldev_id in self.system.ldevs:
                raise invalid("ldevId", ldev_id, "The LDEV is not an external volume; a quorum disk is an external "
                                                 "volume of a third storage system.")
            raise not_found("external volume", ldev_id)
        user = next((d for d in self.disks.values() if d.ldev_id == ldev_id), None)
        if user is not None:
            raise VspError("IN_USE", detail=f"ldev {ldev_id} is quorum disk {user.quorum_disk_id} already")

    def add(self, disk: QuorumDisk) -> QuorumDisk:
        self.check_new(disk.quorum_disk_id, disk.remote_serial, disk.remote_type_id, disk.ldev_id)
        self.store.put("quorum_disks", disk.quorum_disk_id, asdict(disk))
        self.disks[disk.quorum_disk_id] = disk
        self.states[disk.quorum_disk_id] = QuorumState(status=NORMAL if disk.ldev_id is None else BLOCKED)
        return disk

    def check_delete(self, quorum_disk_id: int) -> QuorumDisk:
        disk = self.get(quorum_disk_id)
        for user in self.users:  # the GAD pairs that use it (vspemu.replication.gad)
            what = user(quorum_disk_id)
            if what is not None:
                raise VspError("IN_USE", detail=f"quorum disk {quorum_disk_id} is used by {what}")
        return disk

    def delete(self, quorum_disk_id: int) -> None:
        self.check_delete(quorum_disk_id)
        self.store.delete("quorum_disks", quorum_disk_id)
        del self.disks[quorum_disk_id]
        self.states.pop(quorum_disk_id, None)

    def state(self, quorum_disk_id: int) -> QuorumState:
        disk = self.get(quorum_disk_id)
        st = self.states.get(quorum_disk_id)
        if st is None:
            st = self.states[quorum_disk_id] = QuorumState(status=NORMAL if disk.ldev_id is None else BLOCKED)
        return st

    # -- the check: real I/O to the quorum volume ----------------------------------------------------
    def exchange(self, disk: QuorumDisk, sequence: int) -> tuple[int, QuorumSlot | None]:
        """One heartbeat (blocking: run in a thread): read the record, write this system's slot with FUA, read
        it back. Returns the sequence written and the partner's slot (None when it never wrote one). Raises on
        any I/O failure."""
        assert disk.ldev_id is not None
        ev = self.get_external(disk.ldev_id)
        me = self.system.serial
        mine = slot_of(me, disk.remote_serial)
        slot = QuorumSlot(me, disk.remote_serial, disk.quorum_disk_id, sequence, time.time())
        with NbdClient(ev.host, ev.port, str(ev.external_ldev_id), timeout=self.io_timeout) as c:
            header = c.read(0, SLOT_SIZE)
            if header[:len(HEADER_MAGIC)] != HEADER_MAGIC:
                if header.strip(b"\0"):
                    raise ConnectionError("the external volume holds other data than a quorum record")
                c.write(0, (HEADER_MAGIC + struct.pack("<I", VERSION)).ljust(SLOT_SIZE, b"\0"), fua=True)
            own = c.read(slot_offset(mine), SLOT_SIZE)
            old = QuorumSlot.unpack(own)
            if old is not None:  # keep what the GAD engine wrote (epoch, flags) and the sequence going up
                slot.epoch, slot.flags = old.epoch, old.flags
                slot.sequence = max(sequence, old.sequence + 1)
            packed = slot.pack()
            c.write(slot_offset(mine), packed, fua=True)
            if c.read(slot_offset(mine), SLOT_SIZE) != packed:
                raise ConnectionError("the quorum slot does not read back as written")
            return slot.sequence, QuorumSlot.unpack(c.read(slot_offset(1 - mine), SLOT_SIZE))

    async def check(self, quorum_disk_id: int) -> QuorumState:
        """Check one quorum disk now (NORMAL / BLOCKED); quorum-less disks are always NORMAL."""
        disk = self.get(quorum_disk_id)
        st = self.state(quorum_disk_id)
        if disk.ldev_id is None:
            st.status, st.checked_at = NORMAL, time.monotonic()
            return st
        lock = self._locks.setdefault(quorum_disk_id, asyncio.Lock())
        async with lock:
            try:
                sequence, partner = await asyncio.to_thread(self.exchange, disk, st.sequence + 1)
            except (OSError, NbdError, NbdOptionError, ConnectionError, VspError) as e:
                new, st.error = BLOCKED, str(e) or type(e).__name__
            else:
                new, st.error, st.partner, st.sequence = NORMAL, "", partner, sequence
            if new != st.status:
                log.warning("quorum disk %s: %s -> %s %s", quorum_disk_id, st.status, new, st.error)
            st.status, st.checked_at = new, time.monotonic()
        return st

    # -- arbitration (the GAD engine, vspemu.replication.gad_io): claims in this system's slot ----------
    def _slots(self, disk: QuorumDisk, flags: int | None) -> tuple[QuorumSlot | None, QuorumSlot | None]:
        """Blocking: read this system's and the partner's slots; with ``flags``, first write this system's slot
        with those flags and the next epoch (above both slots' epochs), FUA, and read it back."""
        assert disk.ldev_id is not None
        ev = self.get_external(disk.ldev_id)
        mine = slot_of(self.system.serial, disk.remote_serial)
        with NbdClient(ev.host, ev.port, str(ev.external_ldev_id), timeout=self.io_timeout) as c:
            if c.read(0, SLOT_SIZE)[:len(HEADER_MAGIC)] != HEADER_MAGIC:
                raise ConnectionError("the external volume holds no quorum record")
            own = QuorumSlot.unpack(c.read(slot_offset(mine), SLOT_SIZE))
            partner = QuorumSlot.unpack(c.read(slot_offset(1 - mine), SLOT_SIZE))
            if flags is None:
                return own, partner
            epoch = max(own.epoch if own else 0, partner.epoch if partner else 0) + 1
            slot = QuorumSlot(self.system.serial, disk.remote_serial, disk.quorum_disk_id,
                              (own.sequence + 1) if own else 1, time.time(), epoch, flags)
            packed = slot.pack()
            c.write(slot_offset(mine), packed, fua=True)
            if c.read(slot_offset(mine), SLOT_SIZE) != packed:
                raise ConnectionError("the quorum slot does not read back as written")
            return slot, partner

    async def slots(self, quorum_disk_id: int, flags: int | None = None
                    ) -> tuple[QuorumSlot | None, QuorumSlot | None]:
        """(own slot, partner slot) read from the quorum volume, under the lock the heartbeat takes; with
        ``flags`` this system's slot is written first (a claim; see :meth:`_slots`). Raises on any I/O failure."""
        disk = self.get(quorum_disk_id)
        if disk.ldev_id is None:
            raise VspError("WRONG_STATE", detail=f"quorum disk {quorum_disk_id} has no volume")
        lock = self._locks.setdefault(quorum_disk_id, asyncio.Lock())
        async with lock:
            try:
                return await asyncio.to_thread(self._slots, disk, flags)
            except (OSError, NbdError, NbdOptionError, ConnectionError) as e:
                raise VspError("REMOTE_UNREACHABLE", detail=f"quorum disk {quorum_disk_id}: {e}") from None

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in list(self.disks)), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # never let the loop die
                log.exception("quorum check")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
