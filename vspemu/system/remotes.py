"""Remote storage systems and remote path groups: registration, the link secret, Remote-Authorization.

A remote system is registered with ``POST remote-storages`` on the local system, carrying a session token of
the remote system (``Remote-Authorization``). The local system checks that token against the remote's
REST API before anything changes and pins the certificate the remote's REST server presented (trust on
first use, at registration). It learns the remote's replication-port addresses (vspemu-private route
``GET /ConfigurationManager/vspemu/v1/link``), asks it for a one-time registration nonce bound to its own id
(``POST .../link-peers/nonces``) and hands it a fresh link secret with that nonce (``POST .../link-peers``).
The remote accepts the secret only when the nonce is live and bound to that id, and when the registering
system confirms the registration itself (``POST .../registrations/confirm`` on the registering system's REST
address, answered only while that registration runs, with an HMAC of the secret), and it never replaces an
existing peer record unless the request proves knowledge of that record's secret (``rekeyProof``). Removing a
record from the remote side (``.../forget``) needs the same kind of proof. Both sides keep a *peer record* for
each other: the secret authenticates replication-link connections in both directions, the pinned certificate
every later REST call to the peer. A peer record is *registered* (visible in ``GET remote-storages`` with
dkcType "Remote") when the local administrator registered the remote, or when the remote registered us with
``isMutualDiscovery``.

This module knows nothing about HTTP frameworks; it talks to remote systems with httpx, through
:class:`vspemu.system.remote_api.RemoteApi` (the client side of the registration protocol and its proofs).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vspemu.errors import VspError, invalid, not_found
from vspemu.replication.link import Link, PathGroup
from vspemu.system.remote_api import (
    RemoteApi,
    forget_proof,
    link_ports_of,
    register_proof,
    rekey_proof,
)
from vspemu.system.storage import REPLICATION_PORTS, StorageSystem, storage_type_id

MIN_TIMEOUT_FOR_REMOTE_IO = 10
MAX_TIMEOUT_FOR_REMOTE_IO = 80
DEFAULT_TIMEOUT_FOR_REMOTE_IO = 15
MAX_PATHS_PER_GROUP = 8
DEVICE_ID_RE = re.compile(r"^[0-9A-F]{6}\d{6}$")
NONCE_TTL = 60.0  # seconds a registration nonce stays valid
MAX_NONCES = 64  # outstanding nonces kept (the oldest goes first)
TOKEN_TTL = 5.0  # seconds a Remote-Authorization token accepted by the remote is not asked about again
MAX_TOKENS = 64  # accepted tokens remembered (the oldest goes first)


@dataclass
class RemoteStorage:
    """What this system knows about another one (a peer record)."""

    storage_device_id: str
    serial: int
    model: str
    rest_server_ip: str
    rest_server_port: int
    secret: str  # hex; authenticates the replication link between the two systems
    link_ports: dict[str, list[Any]] = field(default_factory=dict)  # port id -> [host, tcp port]
    registered: bool = True  # visible in GET remote-storages
    cert_sha256: str = ""  # SHA-256 of the peer's REST certificate (DER), pinned at registration
    cert_pem: str = ""  # that certificate: the only one trusted for REST calls to the peer

    @property
    def storage_type_id(self) -> str:
        return storage_type_id(self.storage_device_id)


@dataclass
class PathGroupConfig:
    remote_serial: int
    remote_storage_type_id: str
    path_group_id: int
    remote_storage_device_id: str
    paths: list[list[str]] = field(default_factory=list)  # [local port, remote port]
    timeout: int = DEFAULT_TIMEOUT_FOR_REMOTE_IO
    round_trip_ms: int = 1
    min_paths: int = 1

    @property
    def object_id(self) -> str:
        return f"{self.remote_serial},{self.remote_storage_type_id},{self.path_group_id}"


class Remotes:
    """Peer records, path groups and the link wiring of one storage system."""

    def __init__(self, system: StorageSystem, link: Link, rest_host: str, rest_port: int,
                 min_timeout: int = MIN_TIMEOUT_FOR_REMOTE_IO) -> None:
        self.system = system
        self.link = link
        self.rest_host = rest_host
        self.rest_port = rest_port
        self.min_timeout = min_timeout
        self.peers: dict[str, RemoteStorage] = {
            k: RemoteStorage(**v) for k, v in system.store.load("remote_storages").items()
        }
        self.groups: dict[str, PathGroupConfig] = {
            k: PathGroupConfig(**v) for k, v in system.store.load("remotepath_groups").items()
        }
        self._lock = asyncio.Lock()
        self._nonces: dict[str, tuple[str, float]] = {}  # nonce -> (registering device id, expiry)
        self._pending: dict[tuple[str, str], str] = {}  # (target device id, nonce) -> secret, while registering
        self._accepted: dict[tuple[str, str], float] = {}  # (device id, sha256 of a token) -> accepted until
        link.secret_for = self.secret_for
        link.address_of = self.address_of

    # -- link callbacks ----------------------------------------------------------------------------
    def secret_for(self, device_id: str) -> bytes | None:
        peer = self.peers.get(device_id)
        return bytes.fromhex(peer.secret) if peer is not None else None

    def address_of(self, device_id: str, port_id: str) -> tuple[str, int] | None:
        peer = self.peers.get(device_id)
        if peer is None or port_id not in peer.link_ports:
            return None
        host, port = peer.link_ports[port_id]
        return str(host), int(port)

    async def start(self) -> None:
        """Bring back the path groups of the stored configuration (after a restart)."""
        for cfg in self.groups.values():
            await self._configure_link(cfg)

    # -- peers ------------------------------------------------------------------------------------
    def registered(self) -> list[RemoteStorage]:
        return sorted((p for p in self.peers.values() if p.registered), key=lambda p: p.storage_device_id)

    def get(self, device_id: str) -> RemoteStorage:
        peer = self.peers.get(device_id)
        if peer is None or not peer.registered:
            raise not_found("remote storage", device_id)
        return peer

    def by_serial(self, serial: int) -> RemoteStorage | None:
        return next((p for p in self.peers.values() if p.serial == serial and p.registered), None)

    def _save_peer(self, peer: RemoteStorage) -> None:
        self.system.store.put("remote_storages", peer.storage_device_id, asdict(peer))
        self.peers[peer.storage_device_id] = peer
        self._forget_tokens(peer.storage_device_id)

    def _forget_tokens(self, device_id: str) -> None:
        """A peer's record changed (registered, pinned, removed): its tokens are asked about again."""
        for key in [k for k in self._accepted if k[0] == device_id]:
            del self._accepted[key]

    def _drop_peer(self, device_id: str) -> None:
        self.system.store.delete("remote_storages", device_id)
        self.peers.pop(device_id, None)
        self._forget_tokens(device_id)
        self.link.drop_peer(device_id)

    def link_info(self) -> dict[str, Any]:
        s = self.system
        return {"storageDeviceId": s.storage_device_id, "serialNumber": s.serial, "model": s.model,
                "restServerIp": self.rest_host, "restServerPort": self.rest_port,
                "linkPorts": [{"portId": p, "host": h, "port": n, "enabled": self.link.port_enabled(p)}
                              for p, (h, n) in self.link.addresses().items()]}

    def api_for(self, peer: RemoteStorage, token: str) -> RemoteApi:
        """REST calls to a known peer: only its pinned certificate is trusted."""
        return RemoteApi(peer.rest_server_ip, peer.rest_server_port, token, peer.storage_device_id,
                         pin_pem=peer.cert_pem, pin_sha256=peer.cert_sha256)

    def _pin_legacy(self, peer: RemoteStorage, api: RemoteApi) -> None:
        """A record from before certificates were pinned: pin the first certificate seen (trust on first use)."""
        if not peer.cert_sha256 and api.peer_sha256:
            peer.cert_pem, peer.cert_sha256 = api.peer_pem, api.peer_sha256
            self._save_peer(peer)

    async def verify_token(self, device_id: str, token: str) -> RemoteStorage:
        """Remote-Authorization for an operation on a registered remote: its REST API must accept the token."""
        peer = self.get(device_id)
        # A token the remote accepted a moment ago is not asked about again: a client sends the same token
        # with every call of a sequence (a resync, then the status polls of both sides), and each check costs
        # a TLS connection and a REST call to the remote (about 10 ms here). A token revoked on the remote
        # system stays accepted here for at most TOKEN_TTL seconds; a refused token is never remembered.
        key = (device_id, hashlib.sha256(token.encode()).hexdigest())
        now = time.monotonic()
        if self._accepted.get(key, 0.0) > now:
            return peer
        api = self.api_for(peer, token)
        found = await api.storage()
        if found["storageDeviceId"] != device_id:
            raise VspError("REMOTE_MISMATCH", expected=device_id, found=found["storageDeviceId"])
        self._pin_legacy(peer, api)
        self._accepted.pop(key, None)
        self._accepted[key] = time.monotonic() + TOKEN_TTL
        while len(self._accepted) > MAX_TOKENS:
            del self._accepted[next(iter(self._accepted))]
        return peer

    async def check_registration(self, device_id: str, ip: str, port: int, token: str) -> dict[str, Any]:
        """Everything that can refuse a registration, before anything changes (no side effects)."""
        return (await self._probe(device_id, ip, port, token))[0]

    async def _probe(self, device_id: str, ip: str, port: int, token: str) -> tuple[dict[str, Any], RemoteApi]:
        if not DEVICE_ID_RE.match(device_id):
            raise invalid("storageDeviceId", device_id, "Specify the 12-character storage device ID.")
        if device_id == self.system.storage_device_id:
            raise VspError("REMOTE_IS_SELF", device=device_id)
        existing = self.peers.get(device_id)
        if existing is not None and existing.registered:
            raise VspError("ALREADY_EXISTS", object_id=f"remote storage {device_id}")
        api = RemoteApi(ip, port, token, device_id)
        found = await api.storage()
        if found["storageDeviceId"] == self.system.storage_device_id:
            raise VspError("REMOTE_IS_SELF", device=device_id)
        if found["storageDeviceId"] != device_id:
            raise VspError("REMOTE_MISMATCH", expected=device_id, found=found["storageDeviceId"])
        return found, api

    async def register(self, device_id: str, ip: str, port: int, token: str, mutual: bool) -> RemoteStorage:
        """Register a remote system (the job of POST remote-storages)."""
        async with self._lock:
            found, api = await self._probe(device_id, ip, port, token)
            api.pin()  # trust on first use: every later call of this registration, and the record, use it
            info = await api.link_info()
            me = self.system
            nonce = await api.nonce(me.storage_device_id)
            secret = secrets.token_hex(32)
            doc: dict[str, Any] = {
                "storageDeviceId": me.storage_device_id, "serialNumber": me.serial, "model": me.model,
                "restServerIp": self.rest_host, "restServerPort": self.rest_port, "secret": secret,
                "linkPorts": self.link_info()["linkPorts"], "isMutualDiscovery": mutual, "nonce": nonce,
            }
            old = self.peers.get(device_id)
            if old is not None:  # a hidden record (the remote registered us): prove we hold its secret
                doc["rekeyProof"] = rekey_proof(old.secret, me.storage_device_id, device_id, nonce, secret)
            self._pending[(device_id, nonce)] = secret
            try:
                await api.put_peer(doc)
            finally:
                self._pending.pop((device_id, nonce), None)
            peer = RemoteStorage(device_id, found["serialNumber"], found["model"], ip, port, secret,
                                 link_ports_of(info, ip), registered=True, cert_sha256=api.pin_sha256,
                                 cert_pem=api.pin_pem)
            self._save_peer(peer)
            return peer

    # -- the remote side of a registration (vspemu-private routes) ------------------------------------------
    def issue_nonce(self, device_id: str) -> str:
        """A single-use registration nonce for ``device_id``, valid for NONCE_TTL seconds."""
        if not DEVICE_ID_RE.match(device_id):
            raise invalid("storageDeviceId", device_id, "Specify the 12-character storage device ID.")
        now = time.monotonic()
        for k in [k for k, (_, exp) in self._nonces.items() if exp < now]:
            del self._nonces[k]
        while len(self._nonces) >= MAX_NONCES:
            del self._nonces[next(iter(self._nonces))]
        nonce = secrets.token_hex(16)
        self._nonces[nonce] = (device_id, now + NONCE_TTL)
        return nonce

    def _take_nonce(self, nonce: str, device_id: str) -> None:
        entry = self._nonces.pop(nonce, None)
        if entry is None or entry[0] != device_id or entry[1] < time.monotonic():
            raise invalid("nonce", nonce or "(none)", "Obtain a registration nonce for this storage device ID "
                          "first (it is valid once, for a short time).")

    def confirm(self, target: str, nonce: str) -> dict[str, Any]:
        """A target asks whether we are registering it with this nonce: the proof, only while we are."""
        secret = self._pending.get((target, nonce))
        if secret is None:
            raise not_found("registration", f"{target} (no registration in progress with that nonce)")
        return {"proof": register_proof(secret, self.system.storage_device_id, target, nonce)}

    async def accept_peer(self, doc: dict[str, Any], client_ip: str) -> None:
        """The remote side of a registration: keep the secret (maybe register), only inside a registration
        the registering system confirms, and never replace a known peer's secret without its proof."""
        device_id = str(doc["storageDeviceId"])
        me = self.system.storage_device_id
        if device_id == me:
            raise VspError("REMOTE_IS_SELF", device=device_id)
        if not DEVICE_ID_RE.match(device_id):
            raise invalid("storageDeviceId", device_id)
        nonce = str(doc.get("nonce") or "")
        self._take_nonce(nonce, device_id)
        secret = str(doc["secret"])
        bytes.fromhex(secret)
        existing = self.peers.get(device_id)
        if existing is not None:
            want = rekey_proof(existing.secret, device_id, me, nonce, secret)
            if not hmac.compare_digest(str(doc.get("rekeyProof") or ""), want):
                raise VspError("ALREADY_EXISTS", object_id=f"remote storage {device_id}",
                               cause=f"{me} already holds a link secret of {device_id}; remove that registration "
                                     "first (DELETE remote-storages) to register again.")
        rest_ip = str(doc.get("restServerIp") or client_ip)
        if rest_ip in ("0.0.0.0", "::"):
            rest_ip = client_ip
        rest_port = int(doc.get("restServerPort", 443))
        # the registering system must confirm, at its own REST address, that it runs this registration
        api = RemoteApi(rest_ip, rest_port, "", device_id)
        try:
            proof = await api.confirm(me, nonce)
        except VspError as e:
            raise VspError("REMOTE_AUTH_INVALID", remote=device_id,
                           cause=f"The registering storage system at {rest_ip}:{rest_port} did not confirm this "
                                 f"registration: {e.message}") from None
        if not hmac.compare_digest(proof, register_proof(secret, device_id, me, nonce)):
            raise VspError("REMOTE_AUTH_INVALID", remote=device_id,
                           cause=f"The registering storage system at {rest_ip}:{rest_port} did not confirm this "
                                 "registration.")
        if self.peers.get(device_id) is not existing:
            raise VspError("ALREADY_EXISTS", object_id=f"remote storage {device_id}",
                           cause="Another registration of that storage system finished meanwhile.")
        peer = RemoteStorage(
            device_id, int(doc["serialNumber"]), str(doc.get("model", "")), rest_ip, rest_port, secret,
            link_ports_of({"linkPorts": doc.get("linkPorts", [])}, rest_ip),
            registered=bool(doc.get("isMutualDiscovery")) or (existing is not None and existing.registered),
            cert_sha256=api.peer_sha256, cert_pem=api.peer_pem,
        )
        self._save_peer(peer)
        # connections made with the old secret must authenticate again
        self.link.drop_peer(device_id)
        for cfg in self.groups.values():
            if cfg.remote_storage_device_id == device_id:
                group = self.link.path_group(cfg.remote_serial, cfg.path_group_id)
                for path in group.paths.values() if group else ():
                    if path.conn is not None:
                        path.conn.close(reason="link secret changed")

    def groups_to(self, device_id: str) -> list[PathGroupConfig]:
        return [g for g in self.groups.values() if g.remote_storage_device_id == device_id]

    async def unregister(self, device_id: str, token: str, mutual: bool) -> None:
        """Remove a registration (the job of DELETE remote-storages)."""
        async with self._lock:
            peer = self.get(device_id)
            if self.groups_to(device_id):
                raise VspError("IN_USE", detail=f"remote path groups to {device_id} exist; delete them first")
            api = self.api_for(peer, token)
            me = self.system.storage_device_id
            keep = False
            try:
                for check_only in ((True, False) if mutual else (False,)):
                    nonce = await api.nonce(me)
                    answer = await api.forget_peer(me, mutual, check_only, nonce,
                                                   forget_proof(peer.secret, me, device_id, nonce, mutual, check_only))
                keep = bool(answer.get("keep"))
            except VspError as e:
                # not mutual: the remote may be gone, or (REMOTE_AUTH_INVALID: our proof failed) hold another
                # secret; our own registration can still be removed
                if mutual or e.key not in ("REMOTE_UNREACHABLE", "REMOTE_AUTH_INVALID"):
                    raise
                keep = True  # cannot tell whether the remote still uses the secret: keep it, hidden
            if keep:
                peer.registered = False
                self._save_peer(peer)
            else:
                self._drop_peer(device_id)

    def forget_peer(self, device_id: str, mutual: bool, check_only: bool, nonce: str = "",
                    proof: str = "") -> dict[str, Any]:
        """The remote side of an unregistration (vspemu-private route). Answers whether we keep the secret.
        Only the peer itself can ask: ``proof`` is an HMAC with the link secret over a nonce of ours."""
        peer = self.peers.get(device_id)
        if peer is None:
            return {"keep": False}
        self._take_nonce(nonce, device_id)
        want = forget_proof(peer.secret, device_id, self.system.storage_device_id, nonce, mutual, check_only)
        if not hmac.compare_digest(proof, want):
            raise VspError("REMOTE_AUTH_INVALID", remote=device_id,
                           cause="Only the registered storage system itself can remove its link secret here.")
        if mutual and self.groups_to(device_id):
            raise VspError("IN_USE", detail=f"remote path groups to {device_id} exist on "
                                            f"{self.system.storage_device_id}; delete them first")
        if check_only:
            return {"keep": peer.registered and not mutual}
        if peer.registered and not mutual:
            return {"keep": True}
        if self.groups_to(device_id):  # hidden peer still used by our path groups: keep it
            return {"keep": True}
        self._drop_peer(device_id)
        return {"keep": False}

    def refresh_ports(self, device_id: str, info: dict[str, Any]) -> None:
        peer = self.peers.get(device_id)
        if peer is not None:
            peer.link_ports = link_ports_of(info, peer.rest_server_ip)
            self._save_peer(peer)

    # -- path groups ------------------------------------------------------------------------------
    def get_group(self, object_id: str) -> PathGroupConfig:
        cfg = self.groups.get(object_id)
        if cfg is None:
            raise not_found("remote path group", object_id)
        return cfg

    def parse_group_id(self, object_id: str) -> str:
        parts = object_id.split(",")
        if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in (parts[0], parts[2])):
            raise VspError("INVALID_OBJECT_ID", object_id=object_id)
        return f"{int(parts[0])},{parts[1]},{int(parts[2])}"

    def _check_ports(self, peer: RemoteStorage, local_port: str, remote_port: str) -> None:
        if local_port not in self.system.ports:
            raise not_found("port", local_port)
        if local_port not in REPLICATION_PORTS:
            raise invalid("localPortId", local_port,
                          f"Specify a replication port ({', '.join(REPLICATION_PORTS)}).")
        if remote_port not in peer.link_ports:
            raise invalid("remotePortId", remote_port,
                          f"Specify a replication port of the remote storage system "
                          f"({', '.join(sorted(peer.link_ports)) or 'none known'}).")

    def check_new_group(self, remote_serial: int, type_id: str, path_group_id: int, local_port: str,
                        remote_port: str) -> RemoteStorage:
        peer = self.by_serial(remote_serial)
        if peer is None:
            raise not_found("remote storage", f"serial {remote_serial}")
        if type_id != peer.storage_type_id:
            raise invalid("remoteStorageTypeId", type_id,
                          f"The remote storage system {peer.storage_device_id} is of type {peer.storage_type_id}.")
        if not 0 <= path_group_id <= 255:
            raise invalid("pathGroupId", path_group_id, "Specify a value from 0 to 255.")
        object_id = f"{remote_serial},{type_id},{path_group_id}"
        if object_id in self.groups:
            raise VspError("ALREADY_EXISTS", object_id=f"remote path group {object_id}")
        self._check_ports(peer, local_port, remote_port)
        return peer

    async def _configure_link(self, cfg: PathGroupConfig) -> PathGroup:
        group = self.link.ensure_group(cfg.remote_serial, cfg.remote_storage_device_id, cfg.path_group_id,
                                       cfg.timeout)
        group.set_timeout(cfg.timeout)
        wanted = {(lp, rp) for lp, rp in cfg.paths}
        for key in list(group.paths):
            if key not in wanted:
                await group.remove_path(*key)
        for lp, rp in cfg.paths:
            await group.add_path(lp, rp)
        return group

    def _save_group(self, cfg: PathGroupConfig) -> None:
        self.system.store.put("remotepath_groups", cfg.object_id, asdict(cfg))
        self.groups[cfg.object_id] = cfg

    async def create_group(self, remote_serial: int, type_id: str, path_group_id: int, local_port: str,
                           remote_port: str) -> PathGroupConfig:
        peer = self.check_new_group(remote_serial, type_id, path_group_id, local_port, remote_port)
        cfg = PathGroupConfig(remote_serial, type_id, path_group_id, peer.storage_device_id,
                              [[local_port, remote_port]])
        self._save_group(cfg)
        group = await self._configure_link(cfg)
        await group.wait_attempted(min(5.0, float(cfg.timeout)))
        return cfg

    def check_path(self, cfg: PathGroupConfig, local_port: str, remote_port: str) -> None:
        peer = self.get(cfg.remote_storage_device_id)
        self._check_ports(peer, local_port, remote_port)
        if [local_port, remote_port] in cfg.paths:
            raise VspError("ALREADY_EXISTS", object_id=f"remote path {local_port},{remote_port}")
        if len(cfg.paths) >= MAX_PATHS_PER_GROUP:
            raise VspError("WRONG_STATE", detail=f"a path group has at most {MAX_PATHS_PER_GROUP} paths")

    async def add_path(self, object_id: str, local_port: str, remote_port: str) -> PathGroupConfig:
        cfg = self.get_group(object_id)
        self.check_path(cfg, local_port, remote_port)
        cfg.paths.append([local_port, remote_port])
        self._save_group(cfg)
        group = await self._configure_link(cfg)
        await group.wait_attempted(min(5.0, float(cfg.timeout)))
        return cfg

    async def remove_path(self, object_id: str, local_port: str, remote_port: str) -> PathGroupConfig:
        cfg = self.get_group(object_id)
        if [local_port, remote_port] not in cfg.paths:
            raise not_found("remote path", f"{local_port},{remote_port}")
        if len(cfg.paths) == 1:
            raise VspError("WRONG_STATE", detail="the last remote path of a group cannot be removed; "
                                                 "delete the remote path group instead")
        cfg.paths.remove([local_port, remote_port])
        self._save_group(cfg)
        await self._configure_link(cfg)
        return cfg

    def check_timeout(self, value: int) -> None:
        if not self.min_timeout <= value <= MAX_TIMEOUT_FOR_REMOTE_IO:
            raise invalid("timeoutValueForRemoteIOInSeconds", value,
                          f"Specify a value from {self.min_timeout} to {MAX_TIMEOUT_FOR_REMOTE_IO}.")

    async def update_group(self, object_id: str, timeout: int | None, round_trip_ms: int | None,
                           min_paths: int | None) -> PathGroupConfig:
        cfg = self.get_group(object_id)
        if timeout is not None:
            self.check_timeout(timeout)
            cfg.timeout = timeout
        if round_trip_ms is not None:
            cfg.round_trip_ms = round_trip_ms
        if min_paths is not None:
            cfg.min_paths = min_paths
        self._save_group(cfg)
        await self._configure_link(cfg)
        return cfg

    async def delete_group(self, object_id: str) -> None:
        cfg = self.get_group(object_id)
        self.system.store.delete("remotepath_groups", object_id)
        del self.groups[object_id]
        await self.link.remove_group(cfg.remote_serial, cfg.path_group_id)

    def group_view(self, cfg: PathGroupConfig) -> dict[str, Any]:
        peer = self.peers.get(cfg.remote_storage_device_id)
        group = self.link.path_group(cfg.remote_serial, cfg.path_group_id)
        paths = []
        for number, (lp, rp) in enumerate(cfg.paths):
            live = group.paths.get((lp, rp)) if group else None
            status = live.status if live else "ERR_02"
            paths.append({"cuType": "REMOTE", "portType": "FIBRE", "pathNumber": number, "localPortId": lp,
                          "remotePortId": rp, "pathStatus": status})
        normal = sum(1 for p in paths if p["pathStatus"] == "NML_01")
        return {
            "remotepathGroupId": cfg.object_id,
            "remoteStorageDeviceId": cfg.remote_storage_device_id,
            "remoteSerialNumber": str(cfg.remote_serial),
            "remoteStorageModel": peer.model if peer else "",
            "remoteStorageTypeId": cfg.remote_storage_type_id,
            "pathGroupId": cfg.path_group_id,
            "cuType": "REMOTE",
            "portType": "FIBRE",
            "cuStatus": "NML" if normal == len(paths) else ("WAR" if normal >= cfg.min_paths else "ERR"),
            "minNumOfPaths": cfg.min_paths,
            "numOfPaths": len(paths),
            "timeoutValueForRemoteIOInSeconds": cfg.timeout,
            "roundTripTimeInMilliSeconds": cfg.round_trip_ms,
            "remotePaths": paths,
        }
