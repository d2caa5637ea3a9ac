"""GAD (global-active device): the third replication kind, an active-active pair with a quorum disk.

:class:`Gad` is the :class:`~vspemu.replication.kinds.ReplicationKind` of ``replicationType: "GAD"``. The
engine's flows (create, initial copy, split, resync, swap resync, takeover, delete) work for it unchanged;
what GAD adds lives here and in two more modules:

* this module: the create (:meth:`Gad.create`: the quorum disk on both sides, the S-VOL in a virtual storage
  machine with the P side's identity and the GAD reserve 65535, then the engine's create), the S-VOL taking
  the P-VOL's virtual LDEV id, the ``GAD`` LDEV attribute, and each volume's I/O mode applied whenever its
  pair record changes (:mod:`.gad_model` derives the mode; Block refuses host reads and writes);
* :mod:`.gad_io`: the write path in PAIR (both volumes writable, one order set by the P side) and the quorum
  arbitration when the two systems lose each other;
* :mod:`.gad_model`: the I/O modes and the REST view fields.

Messages: ``gad.prepare`` (the primary asks the secondary to check its S-VOL and quorum disk before the
engine's ``pair.create``), ``gad.write`` / ``gad.flush`` (:mod:`.gad_io`).
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

from vspemu.errors import VspError, invalid, not_found
from vspemu.replication import states
from vspemu.replication.gad_io import GadCore, GadDataPath
from vspemu.replication.gad_model import BLOCK, GAD, io_mode
from vspemu.replication.kinds import ACTIVE, LOCAL, QuietHooks
from vspemu.replication.model import ACTIVE as ACTIVE_STATUSES, PAIR, CopyGroup, Pair
from vspemu.replication.wire import PeerInfo
from vspemu.system.quorum import NORMAL, QuorumDisks
from vspemu.system.resources import FREE_VLDEV, GAD_RESERVED_VLDEV, UNASSIGNED_VLDEV, VirtualStorage

log = logging.getLogger(__name__)

GAD_ATTRIBUTE = "GAD"


class Gad(QuietHooks):
    """The GAD :class:`~vspemu.replication.kinds.ReplicationKind`."""

    replication_type = GAD
    whole_group = False

    def __init__(self, engine: GadCore) -> None:
        self.engine = engine
        self.quorum: QuorumDisks | None = None  # set by the server (the quorum disks are built after the engine)
        self.io = GadDataPath(engine, self)
        self.creating: dict[str, int] = {}  # P side: pair key -> quorum disk id, while its create runs
        self.pending: dict[str, dict[str, Any]] = {}  # S side: pair key -> what gad.prepare checked
        self.alua: dict[str, bool] = {}  # P side: pair key -> isAluaEnabled of the create, while it runs
        engine.on_save.append(self.pair_saved)
        engine.on_detach.append(self.pair_detached)
        engine.link.register_handler("gad.prepare", self.h_prepare)

    def attach_quorum(self, quorum: QuorumDisks) -> None:
        self.quorum = quorum
        quorum.users.append(self.quorum_user)

    def quorum_user(self, quorum_disk_id: int) -> str | None:
        for p in self.engine.pairs.values():
            if self.is_gad(p) and p.extra.get("quorum") == quorum_disk_id:
                return f"GAD pair {p.key}"
        return None

    def is_gad(self, pair: Pair) -> bool:
        g = self.engine.groups.get(pair.group)
        return g is not None and g.replication_type == GAD

    # -- the ReplicationKind hooks ---------------------------------------------------------------------
    @property
    def table(self) -> states.StateTable:
        return states.GAD

    def write_mode(self, pair: Pair) -> str:
        return ACTIVE if pair.status == PAIR else LOCAL

    def check_create(self, group_name: str, group: CopyGroup | None, fence: str, mu_number: int | None,
                     journal_id: int | None) -> None:
        if fence != "NEVER":
            raise invalid("fenceLevel", fence, "A GAD pair has no fence level (NEVER).")
        if not any(k.startswith(f"{group_name}/") for k in self.creating):
            raise VspError("WRONG_STATE", detail="a GAD pair is created with its quorumDiskId (remote-mirror-"
                                                 "copypairs with replicationType GAD)")

    def check_create_secondary(self, group: CopyGroup) -> None:
        if not any(k.startswith(f"{group.name}/") for k in self.pending):
            raise VspError("WRONG_STATE", detail="the GAD S-VOL was not prepared (gad.prepare) for this pair")

    def before_suspend(self, group: CopyGroup, pair: Pair) -> bool:
        return False  # the I/O mode, not a fence, decides about host I/O

    def copy_after_restart(self, pair: Pair, marked: int) -> bool:
        return pair.status == PAIR and marked > 0  # as TrueCopy: marked tracks may differ after a crash

    async def peer_silent(self, group: CopyGroup, pairs: list[Pair]) -> None:
        # the two systems lost each other while idle: the quorum decides which side serves alone
        for p in pairs:
            if p.status == PAIR:
                await self.io.arbitrate(p, "the remote storage system does not answer")

    def background_tasks(self) -> list[Coroutine[Any, Any, None]]:
        """At start: each volume's I/O mode again. A P side that was mirroring holds host I/O (Block) until
        it has read the quorum: the S side may have taken over while this system was down."""
        held: list[Pair] = []
        quorum = self.quorum
        for p in list(self.engine.pairs.values()):
            if not self.is_gad(p):
                continue
            qid = p.extra.get("quorum")
            if p.role == "P" and p.status in ACTIVE_STATUSES and quorum is not None and isinstance(qid, int) \
                    and qid in quorum.disks and quorum.disks[qid].ldev_id is not None:
                p.extra["held"] = True
                held.append(p)
            self.apply_io_mode(p)
        return [self.io.after_restart(held)] if held else []

    # -- I/O modes, attributes, virtual ids: kept with the pair records -------------------------------------
    def pair_saved(self, pair: Pair) -> None:
        if not self.is_gad(pair):
            return
        if "quorum" not in pair.extra:  # the pair's first record on this side (its create)
            self._first_record(pair)
        if pair.status in ACTIVE_STATUSES:
            pair.extra.pop("lost", None)  # a resync or swap ended the arbitration's outcome
        if pair.status == PAIR:
            self.io.back_in_pair(pair)
        self.apply_io_mode(pair)

    def _first_record(self, pair: Pair) -> None:
        system = self.engine.system
        ldev = system.ldevs.get(pair.local_ldev)
        if pair.role == "P":
            pair.extra["quorum"] = self.creating.get(pair.key, -1)
            alua = self.alua.get(pair.key, False)
        else:
            prep = self.pending.pop(pair.key, {})
            pair.extra["quorum"] = prep.get("quorum", -1)
            alua = bool(prep.get("alua", False))
            if ldev is not None and "pvid" in prep:
                # the S-VOL answers with the P-VOL's identity: its virtual id (the VSM gives the serial)
                ldev.virtual_ldev_id = int(prep["pvid"])
                pair.extra["vid_assigned"] = True
                system.save_ldev(ldev)
        pair.extra["alua"] = alua
        if ldev is not None and alua and not ldev.is_alua_enabled:
            ldev.is_alua_enabled = True  # the LDEV's ALUA attribute (its GET shows it), kept after a delete
            system.save_ldev(ldev)
        if ldev is not None:
            system.set_ldev_attribute(ldev, GAD_ATTRIBUTE, True)

    def pair_detached(self, pair: Pair) -> None:
        if not self.is_gad(pair):
            return
        system = self.engine.system
        ldev = system.ldevs.get(pair.local_ldev)
        vol = system.volumes.get(pair.local_ldev)
        if vol is not None and vol.host_io_refused is not None and vol.host_io_refused.startswith("GAD"):
            vol.refuse_host_io(None)
        if ldev is None:
            return
        if pair.extra.get("vid_assigned"):
            # a choice (docs/gad.md): the former S-VOL no longer answers with the P-VOL's identity
            ldev.virtual_ldev_id = UNASSIGNED_VLDEV
            system.save_ldev(ldev)
        system.set_ldev_attribute(ldev, GAD_ATTRIBUTE, False)

    def apply_io_mode(self, pair: Pair) -> None:
        mode = io_mode(pair)
        pair.extra["io_mode"] = mode  # the write gate reads it (registry._gate)
        vol = self.engine.system.volumes.get(pair.local_ldev)
        if vol is None:
            return
        want = f"GAD I/O mode Block (pair {pair.key}, {pair.status})" if mode == BLOCK else None
        current = vol.host_io_refused
        if (want is None) != (current is None):
            log.info("GAD pair %s: %s I/O mode %s", pair.key, pair.role, mode)
            vol.refuse_host_io(want)  # Block drops the host connections, as a blocked LU would
        elif want is not None:
            vol.host_io_refused = want

    # -- create ------------------------------------------------------------------------------------------
    def _quorum_ok(self, quorum_disk_id: int, partner_serial: int) -> QuorumDisks:
        quorum = self.quorum
        if quorum is None:
            raise VspError("WRONG_STATE", detail="this storage system has no quorum disks")
        disk = quorum.get(quorum_disk_id)  # 404 if there is none
        if disk.remote_serial != partner_serial:
            raise VspError("WRONG_STATE", detail=f"quorum disk {quorum_disk_id} is for storage serial "
                                                 f"{disk.remote_serial}, not {partner_serial}")
        return quorum

    async def _check_quorum(self, quorum_disk_id: int, partner_serial: int) -> None:
        st = await self._quorum_ok(quorum_disk_id, partner_serial).check(quorum_disk_id)
        if st.status != NORMAL:
            raise VspError("REMOTE_UNREACHABLE", detail=f"quorum disk {quorum_disk_id} is {st.status}: "
                                                        f"{st.error}")

    async def create(self, *, quorum_disk_id: int, group_name: str, pair_name: str, remote_device_id: str,
                     pvol: int, svol: int, path_group_id: int | None, alua: bool = False,
                     **kwargs: Any) -> tuple[CopyGroup, Pair]:
        """A GAD pair: the checks of both sides, then the engine's create (its initial copy, COPY -> PAIR)."""
        system = self.engine.system
        remote = self.engine.remotes.get(remote_device_id)
        await self._check_quorum(quorum_disk_id, remote.serial)
        ldev = system.get_ldev(pvol)
        vid = system.resources.virtual_id(ldev)
        if vid in FREE_VLDEV:
            raise VspError("WRONG_STATE", detail=f"the P-VOL {pvol} has no virtual LDEV id ({vid}); a GAD "
                                                 "P-VOL needs one (its own id, or an assigned one)")
        if self.engine.pairs_of(pvol):
            raise VspError("IN_USE", detail=f"ldev {pvol} is already a pair volume; vspemu does not combine GAD "
                                            "with other pairs of a volume (3DC with GAD)")
        vsm = system.resources.virtual_storage_of_ldev(pvol)
        existing = self.engine.groups.get(group_name)
        probe = existing or CopyGroup(name=group_name, local_dg="", remote_dg="", remote_device_id=remote_device_id,
                                      remote_serial=remote.serial, replication_type=GAD, role="P",
                                      path_group_id=path_group_id or 0)
        await self.engine.call(probe, "gad.prepare", {
            "group": group_name, "pair": pair_name, "svol": svol, "quorum": quorum_disk_id,
            "pvid": vid, "vserial": vsm.serial, "vmodel": vsm.model, "alua": alua})
        key = f"{group_name}/{pair_name}"
        self.creating[key] = quorum_disk_id
        self.alua[key] = alua
        try:
            return await self.engine.create_pair(group_name=group_name, pair_name=pair_name, replication_type=GAD,
                                                 remote_device_id=remote_device_id, pvol=pvol, svol=svol,
                                                 path_group_id=path_group_id, **kwargs)
        finally:
            self.creating.pop(key, None)
            self.alua.pop(key, None)

    async def h_prepare(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        """The secondary's checks of a GAD create, before the engine's pair.create: the quorum disk (naming
        the primary, NORMAL), a path back to the primary (S-side host writes go there), the S-VOL free, in a
        virtual storage machine with the P-VOL's identity, holding the GAD reserve."""
        system = self.engine.system
        try:
            group, name, svol = str(h["group"]), str(h["pair"]), int(h["svol"])
            qid, pvid = int(h["quorum"]), int(h["pvid"])
            vserial, vmodel = int(h["vserial"]), str(h["vmodel"])
        except (KeyError, TypeError, ValueError):
            raise invalid("gad.prepare", "header", "The peer sent a bad GAD create.") from None
        partner = self.engine.remotes.get(peer.storage_device_id)
        await self._check_quorum(qid, partner.serial)
        if not any(serial == partner.serial and pg.active_paths for (serial, _), pg in self.engine.link.groups.items()):
            raise VspError("REMOTE_UNREACHABLE", detail=f"no working remote path group from this system to "
                                                        f"{peer.storage_device_id}: GAD needs paths both ways")
        ldev = system.ldevs.get(svol)
        if ldev is None:
            raise not_found("ldev", svol)
        if self.engine.pairs_of(svol):
            raise VspError("IN_USE", detail=f"S-VOL {svol} is already a pair volume")
        vsm = system.resources.virtual_storage_of_ldev(svol)
        if vsm.virtual_storage_id == 0 or vsm.device_id != VirtualStorage(0, vserial, vmodel).device_id:
            raise VspError("WRONG_STATE", detail=f"the S-VOL {svol} must be in a resource group of a virtual "
                                                 f"storage machine with serial {vserial} and the model family "
                                                 f"of {vmodel} (the P-VOL's identity)")
        if system.resources.virtual_id(ldev) != GAD_RESERVED_VLDEV:
            raise VspError("WRONG_STATE", detail=f"the S-VOL {svol} must hold the GAD reserve (virtual LDEV id "
                                                 f"{GAD_RESERVED_VLDEV}) before the pair is created")
        for other in system.ldevs.values():
            if other.ldev_id != svol and system.resources.virtual_id(other) == pvid and \
                    system.resources.virtual_storage_of_ldev(other.ldev_id).virtual_storage_id == \
                    vsm.virtual_storage_id:
                raise VspError("ALREADY_EXISTS", object_id=f"virtual LDEV id {pvid} in virtual storage "
                                                           f"{vsm.virtual_storage_id} (ldev {other.ldev_id})")
        self.pending[f"{group}/{name}"] = {"quorum": qid, "pvid": pvid, "alua": h.get("alua") is True}
        return {}, b""

    # -- the data path (called by PairVolume through the engine) --------------------------------------------
    async def active_write(self, pair: Pair, rep: Any, volume: Any, offset: int, length: int,
                           data: bytes | memoryview | None, fua: bool) -> None:
        await self.io.write(pair, rep, volume, offset, length, data, fua)

    async def active_flush(self, pair: Pair) -> None:
        await self.io.flush(pair)
