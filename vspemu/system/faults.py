"""Faults on demand: break a storage system on purpose for DR rehearsals (docs/faults-on-demand.md).

A fault is a JSON document kept in the configuration (kind ``faults``), so a restart clears none silently:
the persistent ones are re-applied at start (:meth:`Faults.apply`). Kinds:

- ``path``: one remote path (``localPortId``, ``remoteSerialNumber``, ``remotePortId``) held down: its
  connections are cut and new ones refused in both directions; the path shows ERR_13.
- ``path-group``: every path of a path group (``remoteSerialNumber``, ``pathGroupId``) held down.
- ``path-delay``: ``latencyMs`` and/or ``bandwidthMiBps`` on the sending side of a path group's connections
  (and of the connections the remote system opened to this one).
- ``journal-full``: a master journal (``journalId``) behaves as full: PFUL, then PFUS once a write waited
  longer than the journal's data overflow watch.
- ``ldev-eio``: every read and write of an LDEV's data (``ldevId``) fails: EIO to the host, the copy fails.
- ``system-stop``: the process exits as with ``kill -9`` right after answering (never stored).

The hooks are attributes that are None (or False) while no fault is set: ``Link.path_fault``,
``Link.shaper_for``, ``Volume.io_fault``, ``MasterJournal.held_full``.
"""

from __future__ import annotations

import builtins
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vspemu.errors import VspError, invalid
from vspemu.replication.link import SendShaper
from vspemu.system.storage import REPLICATION_PORTS

if TYPE_CHECKING:
    from vspemu.replication.engine import Replication
    from vspemu.replication.link import Link
    from vspemu.system.journals import Journals
    from vspemu.system.storage import StorageSystem

KINDS = ("path", "path-group", "path-delay", "journal-full", "ldev-eio", "system-stop")
STORE_KIND = "faults"
MAX_FAULTS = 256
MAX_LATENCY_MS = 60_000
MAX_BANDWIDTH_MIBPS = 100_000
_FIELDS = {
    "path": ("localPortId", "remoteSerialNumber", "remotePortId"),
    "path-group": ("remoteSerialNumber", "pathGroupId"),
    "path-delay": ("remoteSerialNumber", "pathGroupId", "latencyMs", "bandwidthMiBps"),
    "journal-full": ("journalId",),
    "ldev-eio": ("ldevId",),
    "system-stop": (),
}
_REQUIRED = {
    "path": ("localPortId", "remoteSerialNumber", "remotePortId"),
    "path-group": ("remoteSerialNumber",),
    "path-delay": ("remoteSerialNumber",),
    "journal-full": ("journalId",),
    "ldev-eio": ("ldevId",),
    "system-stop": (),
}


@dataclass
class FaultSpec:
    """A request for a fault, as the REST body gives it (checked by :meth:`Faults.check`)."""

    kind: str
    localPortId: str | None = None  # noqa: N815 - the array's attribute names
    remoteSerialNumber: int | None = None  # noqa: N815
    remotePortId: str | None = None  # noqa: N815
    pathGroupId: int | None = None  # noqa: N815
    latencyMs: int | None = None  # noqa: N815
    bandwidthMiBps: float | None = None  # noqa: N815
    journalId: int | None = None  # noqa: N815
    ldevId: int | None = None  # noqa: N815


def _int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(name, value, f"Specify an integer from {low} to {high}.")
    return value


class Faults:
    def __init__(self, system: StorageSystem, link: Link | None, replication: Replication | None,
                 journals: Journals) -> None:
        self.system = system
        self.link = link
        self.replication = replication
        self.journals = journals
        self.faults: dict[int, dict[str, Any]] = {}
        for key, doc in system.store.load(STORE_KIND).items():
            if key.isdigit() and doc.get("kind") in KINDS and doc.get("kind") != "system-stop":
                self.faults[int(key)] = doc

    # -- the registry ---------------------------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        return [dict(self.faults[k]) for k in sorted(self.faults)]

    def get(self, fault_id: int) -> dict[str, Any]:
        doc = self.faults.get(fault_id)
        if doc is None:
            raise VspError("NOT_FOUND", object_id=f"fault {fault_id}")
        return dict(doc)

    def check(self, spec: FaultSpec) -> dict[str, Any]:
        """The fault's document; raises (and changes nothing) if the request is not valid."""
        kind = spec.kind
        if kind not in KINDS:
            raise invalid("kind", kind, f"Specify one of {', '.join(KINDS)}.")
        given = {k: v for k, v in vars(spec).items() if k != "kind" and v is not None}
        for name in given:
            if name not in _FIELDS[kind]:
                raise VspError("UNSUPPORTED_PARAMETER", cause=f"{name} does not apply to a {kind} fault.",
                               attribute=name)
        for name in _REQUIRED[kind]:
            if name not in given:
                raise VspError("MISSING_PARAMETER", attribute=name)
        doc: dict[str, Any] = {"kind": kind}
        for port_name in ("localPortId", "remotePortId"):
            if port_name in given:
                if given[port_name] not in REPLICATION_PORTS:
                    raise invalid(port_name, given[port_name],
                                  f"Specify a replication port ({', '.join(REPLICATION_PORTS)}).")
                doc[port_name] = given[port_name]
        if "remoteSerialNumber" in given:
            doc["remoteSerialNumber"] = _int("remoteSerialNumber", given["remoteSerialNumber"], 1, 999999)
        if kind in ("path-group", "path-delay"):
            doc["pathGroupId"] = _int("pathGroupId", given.get("pathGroupId", 0), 0, 255)
        if kind == "path-delay":
            latency = _int("latencyMs", given.get("latencyMs", 0), 0, MAX_LATENCY_MS)
            bw = given.get("bandwidthMiBps", 0)
            if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not 0 <= bw <= MAX_BANDWIDTH_MIBPS:
                raise invalid("bandwidthMiBps", bw, f"Specify a number from 0 (no limit) to {MAX_BANDWIDTH_MIBPS}.")
            if latency == 0 and bw == 0:
                raise VspError("MISSING_PARAMETER", attribute="latencyMs or bandwidthMiBps")
            doc["latencyMs"], doc["bandwidthMiBps"] = latency, bw
        if kind == "journal-full":
            jid = _int("journalId", given["journalId"], 0, 255)
            self.journals.get(jid)  # 404 if there is no such journal
            doc["journalId"] = jid
        if kind == "ldev-eio":
            ldev = _int("ldevId", given["ldevId"], 0, 65279)
            if ldev not in self.system.volumes:
                raise VspError("NOT_FOUND", object_id=f"ldev {ldev}")
            doc["ldevId"] = ldev
        if kind != "system-stop" and len(self.faults) >= MAX_FAULTS:
            raise VspError("CAPACITY", cause=f"At most {MAX_FAULTS} faults can be in force.")
        return doc

    def add(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Put a checked fault in force (and in the configuration); returns it with its faultId."""
        fault_id = max(self.faults, default=-1) + 1
        doc = {"faultId": fault_id, **doc, "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if doc["kind"] != "system-stop":
            self.system.store.put(STORE_KIND, fault_id, doc)
            self.faults[fault_id] = doc
            self.apply()
        return dict(doc)

    def remove(self, fault_id: int) -> dict[str, Any]:
        doc = self.get(fault_id)
        self.system.store.delete(STORE_KIND, fault_id)
        del self.faults[fault_id]
        self.apply()
        return doc

    def clear(self) -> builtins.list[dict[str, Any]]:
        docs = self.list()
        with self.system.store.transaction():
            for doc in docs:
                self.system.store.delete(STORE_KIND, doc["faultId"])
        self.faults.clear()
        self.apply()
        return docs

    # -- applying ------------------------------------------------------------------------------------
    def _of(self, kind: str) -> builtins.list[dict[str, Any]]:
        return [f for f in self.faults.values() if f["kind"] == kind]

    def path_down(self, local_port: str, remote_serial: int, remote_port: str, group_id: int | None) -> bool:
        """Whether a path is held down. ``group_id`` None: a connection the remote system opened to us."""
        for f in self.faults.values():
            if f["kind"] == "path" and f["localPortId"] == local_port and f["remotePortId"] == remote_port \
                    and f["remoteSerialNumber"] == remote_serial:
                return True
            if f["kind"] == "path-group" and group_id is not None and f["remoteSerialNumber"] == remote_serial \
                    and f["pathGroupId"] == group_id:
                return True
        return False

    def shaper(self, remote_serial: int, group_id: int | None) -> SendShaper | None:
        for f in self._of("path-delay"):
            if f["remoteSerialNumber"] == remote_serial and (group_id is None or f["pathGroupId"] == group_id):
                return self._shapers.setdefault(f["faultId"], SendShaper(f["latencyMs"] / 1000.0,
                                                                         f["bandwidthMiBps"] * (1 << 20)))
        return None

    _shapers: dict[int, SendShaper]

    def apply(self) -> None:
        """Put the hooks in the state the faults in force ask for (at start and after every change)."""
        self._shapers = {k: v for k, v in getattr(self, "_shapers", {}).items() if k in self.faults}
        link = self.link
        if link is not None:
            link.path_fault = self.path_down if self._of("path") or self._of("path-group") else None
            link.shaper_for = self.shaper if self._of("path-delay") else None
            link.apply_faults()
        eio = {f["ldevId"] for f in self._of("ldev-eio")}
        for ldev_id, vol in self.system.volumes.items():
            vol.io_fault = "I/O error (fault on demand)" if ldev_id in eio else None
        if self.replication is not None:
            ur = self.replication.ur
            full = {f["journalId"] for f in self._of("journal-full")}
            for jid in full | set(ur.held_full):
                if (jid in full) != (jid in ur.held_full):
                    ur.hold_full(jid, jid in full)
