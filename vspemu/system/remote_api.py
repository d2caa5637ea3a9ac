"""The client side of the registration protocol (vspemu.system.remotes): REST calls to a remote system.

:class:`RemoteApi` talks to one remote system's REST API over httpx (the remote's session token, its pinned
certificate) and the vspemu-private routes of a registration (link info, nonces, peer records, confirm,
forget); the ``*_proof`` functions are the HMACs with a link secret that prove knowledge of the secret
without sending it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ssl
from typing import Any

import httpx

from vspemu.errors import MESSAGES, VspError

PRIVATE_ROOT = "/ConfigurationManager/vspemu/v1"
REMOTE_TIMEOUT = 10.0


def _session_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Session {token}", "Content-Type": "application/json", "Accept": "application/json"}


def _base(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip
    return f"https://{host}:{port}"


def _proof(secret: str, *parts: object) -> str:
    """HMAC-SHA256 with a link secret over ``parts``: proves knowledge of the secret without sending it."""
    msg = "|".join(str(p) for p in parts).encode()
    return hmac.new(bytes.fromhex(secret), msg, hashlib.sha256).hexdigest()


def register_proof(secret: str, registering: str, target: str, nonce: str) -> str:
    return _proof(secret, "vspemu-register-v1", registering, target, nonce)


def rekey_proof(old_secret: str, registering: str, target: str, nonce: str, new_secret: str) -> str:
    return _proof(old_secret, "vspemu-rekey-v1", registering, target, nonce, new_secret)


def forget_proof(secret: str, sender: str, target: str, nonce: str, mutual: bool, check_only: bool) -> str:
    return _proof(secret, "vspemu-forget-v1", sender, target, nonce, int(mutual), int(check_only))


@functools.lru_cache(maxsize=64)
def pinned_context(pem: str) -> ssl.SSLContext:
    """TLS context that trusts exactly the pinned certificate (no host name check: the pin is the identity)."""
    ctx = ssl.create_default_context(cadata=pem)
    ctx.check_hostname = False
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the trust anchor
    return ctx


def _peer_der(r: httpx.Response) -> bytes:
    stream = r.extensions.get("network_stream")
    obj = stream.get_extra_info("ssl_object") if stream is not None else None
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    return der or b""


class RemoteApi:
    """Calls to another storage system's REST API with a token of a session there.

    Without a pin (the first call of a registration) any certificate is accepted and remembered
    (``peer_pem``, ``peer_sha256``); :meth:`pin` then restricts every later call to that certificate. A
    pinned call refuses another certificate during the TLS handshake, before a token is sent."""

    def __init__(self, ip: str, port: int, token: str, device_hint: str = "", pin_pem: str = "",
                 pin_sha256: str = "") -> None:
        self.ip, self.port, self.token = ip, port, token
        self.device_hint = device_hint
        self.pin_pem, self.pin_sha256 = pin_pem, pin_sha256
        self.peer_pem, self.peer_sha256 = "", ""

    def pin(self) -> None:
        """Trust only the certificate seen so far for every later call."""
        if not self.peer_pem:
            raise VspError("REMOTE_UNREACHABLE", cause="The remote REST server presented no certificate.",
                           detail=f"REST server {self.ip}:{self.port}")
        self.pin_pem, self.pin_sha256 = self.peer_pem, self.peer_sha256

    def _mismatch(self, seen: str = "") -> VspError:
        return VspError("REMOTE_UNREACHABLE",
                        cause=f"The REST server at {self.ip}:{self.port} presented a certificate "
                              f"{('(sha256 ' + seen + ') ') if seen else ''}other than the one pinned at "
                              f"registration (sha256 {self.pin_sha256}); nothing was sent to it. Remove the "
                              "registration and register the remote storage system again if its certificate "
                              "changed.",
                        detail=f"REST server {self.ip}:{self.port}")

    async def _request(self, method: str, path: str, json: Any = None, auth: bool = True) -> httpx.Response:
        verify: ssl.SSLContext | bool = pinned_context(self.pin_pem) if self.pin_pem else False
        headers = _session_headers(self.token) if auth else {"Content-Type": "application/json",
                                                             "Accept": "application/json"}
        try:
            async with httpx.AsyncClient(base_url=_base(self.ip, self.port), verify=verify,
                                         timeout=REMOTE_TIMEOUT) as http:
                r = await http.request(method, path, json=json, headers=headers)
                der = _peer_der(r)
        except httpx.ConnectError as e:
            if self.pin_pem and "CERTIFICATE_VERIFY_FAILED" in str(e):
                raise self._mismatch() from None
            raise VspError("REMOTE_UNREACHABLE", cause=f"{type(e).__name__}: {e}",
                           detail=f"REST server {self.ip}:{self.port}") from None
        except httpx.HTTPError as e:
            raise VspError("REMOTE_UNREACHABLE", cause=f"{type(e).__name__}: {e}",
                           detail=f"REST server {self.ip}:{self.port}") from None
        seen = hashlib.sha256(der).hexdigest() if der else ""
        if self.pin_sha256 and seen != self.pin_sha256:
            raise self._mismatch(seen)
        if der:
            self.peer_pem, self.peer_sha256 = ssl.DER_cert_to_PEM_cert(der), seen
        return r

    def _check(self, r: httpx.Response, what: str) -> Any:
        if r.status_code == 401:
            raise VspError("REMOTE_AUTH_INVALID", remote=self.device_hint or f"{self.ip}:{self.port}")
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 400:
            msg = body.get("message", "") if isinstance(body, dict) else r.text[:200]
            mid = body.get("messageId") if isinstance(body, dict) else None
            key = next((k for k, m in MESSAGES.items() if m.message_id == mid), None)
            if key is not None and key not in ("TOKEN_INVALID", "URL_NOT_FOUND", "METHOD_NOT_ALLOWED"):
                # the remote system refused in the array's vocabulary: pass its refusal on
                err = VspError(key, cause=f"Refused by the remote storage system: {msg}")
                err.message = msg or err.message
                raise err
            if r.status_code == 404 and what.startswith("vspemu"):
                raise VspError("REMOTE_UNREACHABLE", cause="The remote system does not offer the vspemu "
                               "replication link.", detail=f"{what}: HTTP 404")
            raise VspError("REMOTE_UNREACHABLE", cause=msg, detail=f"{what}: HTTP {r.status_code}")
        return body

    async def storage(self) -> dict[str, Any]:
        """GET storages on the remote: proves the token and tells who answers there."""
        body = self._check(await self._request("GET", "/ConfigurationManager/v1/objects/storages"), "storages")
        try:
            item = body["data"][0]
            return {"storageDeviceId": str(item["storageDeviceId"]), "serialNumber": int(item["serialNumber"]),
                    "model": str(item.get("model", ""))}
        except (KeyError, IndexError, TypeError, ValueError):
            raise VspError("REMOTE_UNREACHABLE", cause="The remote REST server answered an unexpected body.",
                           detail="GET storages") from None

    async def link_info(self) -> dict[str, Any]:
        return self._check(await self._request("GET", f"{PRIVATE_ROOT}/link"), "vspemu link")  # type: ignore

    async def nonce(self, device_id: str) -> str:
        """A one-time registration nonce of the remote, bound to ``device_id`` (the caller's id)."""
        body = self._check(await self._request("POST", f"{PRIVATE_ROOT}/link-peers/nonces",
                                               {"storageDeviceId": device_id}), "vspemu link-peers nonces")
        if not isinstance(body, dict) or not isinstance(body.get("nonce"), str):
            raise VspError("REMOTE_UNREACHABLE", cause="The remote REST server answered an unexpected body.",
                           detail="vspemu link-peers nonces")
        nonce: str = body["nonce"]  # (checked a str just above)
        return nonce

    async def put_peer(self, doc: dict[str, Any]) -> dict[str, Any]:
        return self._check(await self._request("POST", f"{PRIVATE_ROOT}/link-peers", doc),  # type: ignore
                           "vspemu link-peers")

    async def forget_peer(self, device_id: str, mutual: bool, check_only: bool, nonce: str,
                          proof: str) -> dict[str, Any]:
        body = {"isMutualDeletion": mutual, "checkOnly": check_only, "nonce": nonce, "proof": proof}
        answer: dict[str, Any] = self._check(
            await self._request("POST", f"{PRIVATE_ROOT}/link-peers/{device_id}/forget", body),
            "vspemu link-peers forget")
        return answer

    async def confirm(self, target: str, nonce: str) -> str:
        """Ask a registering system (no session there) to confirm its registration with us: its proof."""
        r = await self._request("POST", f"{PRIVATE_ROOT}/registrations/confirm",
                                {"storageDeviceId": target, "nonce": nonce}, auth=False)
        body = self._check(r, "vspemu registrations confirm")
        proof = body.get("proof") if isinstance(body, dict) else None
        return proof if isinstance(proof, str) else ""


def link_ports_of(info: dict[str, Any], rest_ip: str) -> dict[str, list[Any]]:
    """The remote's replication-port addresses from its link info (a wildcard host means: the REST host)."""
    out: dict[str, list[Any]] = {}
    for item in info.get("linkPorts", []):
        host = item.get("host") or rest_ip
        if host in ("0.0.0.0", "::", ""):
            host = rest_ip
        out[str(item["portId"])] = [str(host), int(item["port"])]
    return out
