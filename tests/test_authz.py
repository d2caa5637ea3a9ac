"""Issue 14 (authorization): registration secrets, Remote-Authorization with NotSpecified ids, TLS pinning,
and the checks of what a peer sends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from crc32c import crc32c
from typer.testing import CliRunner

from tests.conftest import MakeSystem
from vspemu.cli.main import app
from vspemu.client import ApiError, VspClient, tls_verify
from vspemu.lab import SystemProcess, free_port, link_systems, set_link_ports
from vspemu.replication import peer_headers
from vspemu.replication.journal import ENTRY, ENTRY_MAGIC, MIRROR_SHIFT
from vspemu.replication.link import Link
from vspemu.replication.wire import RemoteError

CG = "azg"


def _pair_lab(pc: VspClient, sc: VspClient, s: SystemProcess) -> tuple[int, int]:
    pv = pc.create_ldev("16M")
    pc.add_lun(pv)
    sv = sc.create_ldev("16M")
    sc.add_lun(sv)
    body = {"copyGroupName": CG, "copyPairName": "p1", "replicationType": "TC",
            "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}
    pc.invoke("POST", "remote-mirror-copypairs", body, remote=sc)
    return pv, sv


def _statuses(pc: VspClient) -> tuple[str, str]:
    info = pc.get(f"remote-mirror-copypairs/NotSpecified,{CG},{CG}P_,NotSpecified,p1")
    return info["pvolStatus"], info["svolStatus"]


# -- item 2: NotSpecified ids skip Remote-Authorization only where the array allows it ----------------------
def test_not_specified_refused_where_the_remote_side_changes(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, pc, sc = linked
    _pair_lab(pc, sc, s)
    ns_pair = f"remote-mirror-copypairs/NotSpecified,{CG},{CG}P_,NotSpecified,p1"
    ns_group = f"remote-mirror-copygroups/NotSpecified,{CG},{CG}P_,NotSpecified"
    tc = {"parameters": {"replicationType": "TC"}}
    for method, path, body in (("PUT", f"{ns_pair}/actions/split/invoke", tc),
                               ("PUT", f"{ns_group}/actions/split/invoke", tc),
                               ("DELETE", ns_pair, None), ("DELETE", ns_group, None)):
        with pytest.raises(ApiError) as e:
            pc.invoke(method, path, body)
        assert (e.value.status, e.value.message_id) == (400, "KART40060-E"), (method, path)
        assert _statuses(pc) == ("PAIR", "PAIR")
    # a real split with Remote-Authorization, then a NotSpecified resync is refused too
    pid = f"{s.storage_device_id},{CG},{CG}P_,{CG}S_,p1"
    pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/split/invoke", tc, remote=sc)
    assert _statuses(pc) == ("PSUS", "SSUS")
    for path in (ns_pair, ns_group):
        with pytest.raises(ApiError) as e:
            pc.invoke("PUT", f"{path}/actions/resync/invoke", tc)
        assert (e.value.status, e.value.message_id) == (400, "KART40060-E")
    # a swap resync needs the S side: from the P side the NotSpecified form stays refused
    with pytest.raises(ApiError) as e:
        pc.invoke("PUT", f"{ns_pair}/actions/resync/invoke", {"parameters": {"replicationType": "TC",
                                                                             "doSwapSvol": True}})
    assert e.value.message_id == "KART40060-E"
    assert _statuses(pc) == ("PSUS", "SSUS")
    assert sc.get(f"remote-mirror-copypairs/NotSpecified,{CG},{CG}S_,NotSpecified,p1")["svolStatus"] == "SSUS"
    # the forms the array allows: local GETs (above), swap split on the S side, takeover on the S side
    pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/resync/invoke", tc, remote=sc)
    assert _statuses(pc) == ("PAIR", "PAIR")
    s_ns = f"remote-mirror-copypairs/NotSpecified,{CG},{CG}S_,NotSpecified,p1"
    sc.invoke("PUT", f"{s_ns}/actions/split/invoke", {"parameters": {"replicationType": "TC",
                                                                     "svolOperationMode": "SSWS"}})
    assert sc.get(s_ns)["svolStatus"] == "SSWS"
    sc.invoke("POST", f"{s_ns}/actions/takeover/invoke", {"parameters": {"mode": "forceSplit"}})
    assert sc.get(s_ns)["svolStatus"] == "SSWS"


def _peer_doc(system: SystemProcess, peer_id: str) -> dict[str, Any]:
    """A system's peer record, as stored."""
    with sqlite3.connect(system.data_dir / "config.sqlite3") as con:
        row = con.execute("SELECT doc FROM objects WHERE kind = 'remote_storages' AND id = ?", (peer_id,)).fetchone()
    return json.loads(row[0])  # type: ignore[no-any-return]


def _link_secret(system: SystemProcess, peer_id: str) -> bytes:
    return bytes.fromhex(_peer_doc(system, peer_id)["secret"])


# -- item 1: a link secret is accepted only inside a registration the registering system confirms -----------
def _peer_ids(c: VspClient) -> dict[str, bool]:
    return {x["storageDeviceId"]: x["registered"] for x in c.private("GET", "link/paths")["peers"]}


def _refused(c: VspClient, path: str, body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as e:
        c.private("POST", path, body)
    return e.value


def test_forged_link_peers_refused_and_nothing_changes(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, pc, sc = linked
    before = _peer_ids(sc)
    assert before == {p.storage_device_id: True}
    forged = {"storageDeviceId": p.storage_device_id, "serialNumber": p.serial, "model": p.model,
              "restServerIp": "127.0.0.1", "restServerPort": p.rest_port, "secret": "ab" * 32,
              "linkPorts": [{"portId": "CL3-A", "host": "127.0.0.1", "port": free_port()}],
              "isMutualDiscovery": True}
    # a session on the secondary alone: no nonce -> refused
    e = _refused(sc, "link-peers", forged)
    assert (e.status, e.message_id) == (400, "KART40039-E")
    # with a nonce it obtained itself: replacing a registered peer's secret is refused
    nonce = sc.private("POST", "link-peers/nonces", {"storageDeviceId": p.storage_device_id})["nonce"]
    e = _refused(sc, "link-peers", {**forged, "nonce": nonce})
    assert (e.status, e.message_id) == (409, "KART40045-E")
    e = _refused(sc, "link-peers", {**forged, "nonce": nonce, "rekeyProof": "00" * 32})  # used once
    assert (e.status, e.message_id) == (400, "KART40039-E")
    nonce = sc.private("POST", "link-peers/nonces", {"storageDeviceId": p.storage_device_id})["nonce"]
    e = _refused(sc, "link-peers", {**forged, "nonce": nonce, "rekeyProof": "00" * 32})  # a wrong proof
    assert (e.status, e.message_id) == (409, "KART40045-E")
    # a new peer: the system at the REST address given must confirm the registration; the primary does not
    fake = "900000999999"
    nonce = sc.private("POST", "link-peers/nonces", {"storageDeviceId": fake})["nonce"]
    e = _refused(sc, "link-peers", {**forged, "storageDeviceId": fake, "nonce": nonce})
    assert (e.status, e.message_id) == (401, "KART40061-E")
    # a nonce is bound to the id it was issued for
    nonce = sc.private("POST", "link-peers/nonces", {"storageDeviceId": fake})["nonce"]
    e = _refused(sc, "link-peers", {**forged, "nonce": nonce})
    assert (e.status, e.message_id) == (400, "KART40039-E")
    # removing the primary's record from the secondary alone is refused too
    e = _refused(sc, f"link-peers/{p.storage_device_id}/forget", {"isMutualDeletion": True})
    assert e.status == 400
    nonce = sc.private("POST", "link-peers/nonces", {"storageDeviceId": p.storage_device_id})["nonce"]
    e = _refused(sc, f"link-peers/{p.storage_device_id}/forget",
                 {"isMutualDeletion": True, "nonce": nonce, "proof": "00" * 32})
    assert (e.status, e.message_id) == (401, "KART40061-E")
    assert _peer_ids(sc) == before
    # the link still authenticates with the secret of the real registration
    set_link_ports(sc, False)
    set_link_ports(sc, True)
    gid = pc.get("remotepath-groups")["data"][0]["remotepathGroupId"]
    pc.wait_path_status(gid, "NML_01", 30)
    assert pc.link_test(s.serial, 0, count=5)["succeeded"] == 5
    # and a proper mutual deletion and registration again still work
    for c in (pc, sc):
        for g in c.get("remotepath-groups")["data"]:
            c.invoke("DELETE", f"remotepath-groups/{g['remotepathGroupId']}")
    pc.unregister_remote(sc, mutual=True)
    assert _peer_ids(sc) == {} and _peer_ids(pc) == {}
    link_systems(pc, sc)
    assert pc.link_test(s.serial, 0, count=5)["succeeded"] == 5


def test_registration_confirm_answers_only_a_running_registration(system: SystemProcess) -> None:
    r = httpx.post(f"{system.rest_url}/ConfigurationManager/vspemu/v1/registrations/confirm",
                   json={"storageDeviceId": "900000999999", "nonce": "00" * 16},
                   verify=tls_verify(str(system.cert_path)))
    assert r.status_code == 404 and r.json()["messageId"].startswith("KART"), r.text


# -- item 3: certificates pinned at registration; the SDK and the CLI verify ---------------------------------
def test_impostor_at_the_pinned_address_is_refused(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient], tmp_path: Path) -> None:
    p, s, pc, sc = linked
    # each side pinned the other's certificate at registration (the primary in its calls, the secondary when
    # the primary confirmed the registration)
    for me, other in ((p, s), (s, p)):
        fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(other.cert_path.read_text())).hexdigest()
        assert _peer_doc(me, other.storage_device_id)["cert_sha256"] == fingerprint
    assert pc.get("remote-mirror-copygroups", remote=sc, remoteStorageDeviceId=s.storage_device_id)["data"] == []
    sc.close()
    s.stop()
    # another system with the same identity (serial, model) but its own certificate, at the same address
    imp = SystemProcess(tmp_path / "impostor", s.serial, rest_port=s.rest_port).start()
    try:
        with imp.client() as ic:
            with pytest.raises(ApiError) as e:
                pc.get("remote-mirror-copygroups", remote=ic, remoteStorageDeviceId=s.storage_device_id)
            assert (e.value.status, e.value.message_id) == (412, "KART40065-E")
            assert "certificate" in str(e.value.body), e.value.body
    finally:
        imp.stop()
    # the real system back at its address: accepted again
    s.start()
    with s.client() as sc2:
        assert pc.get("remote-mirror-copygroups", remote=sc2,
                      remoteStorageDeviceId=s.storage_device_id)["data"] == []


def test_sdk_verifies_by_default(make_system: MakeSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VSPEMU_CA_CERT", raising=False)
    a, b = make_system(), make_system()
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        VspClient(a.rest_url)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        VspClient(a.rest_url, verify=str(b.cert_path))  # another system's certificate
    for verify in (str(a.cert_path), False, f"{b.cert_path}{os.pathsep}{a.cert_path}"):
        with VspClient(a.rest_url, verify=verify) as c:
            assert c.storage_device_id == a.storage_device_id
    monkeypatch.setenv("VSPEMU_CA_CERT", str(a.cert_path))
    with VspClient(a.rest_url) as c:
        assert c.storage_device_id == a.storage_device_id
    monkeypatch.delenv("VSPEMU_CA_CERT")
    # the CLI: refused without a certificate, fine with --ca-cert or --insecure
    urls = ["--primary", a.rest_url, "--secondary", b.rest_url]
    r = CliRunner().invoke(app, ["pair", "display", "-g", "nothing", *urls])
    assert r.exit_code == 2 and "cannot reach" in r.output, r.output
    certs = f"{a.cert_path}{os.pathsep}{b.cert_path}"
    for opts in (["--ca-cert", certs], ["--insecure"]):
        r = CliRunner().invoke(app, ["pair", *opts, "display", "-g", "nothing", *urls])
        assert "KART" in r.output and "cannot reach" not in r.output, (opts, r.output)  # the array answered


# -- item 4: names, and what a peer sends ------------------------------------------------------------------------
def test_group_and_pair_names_with_separators_are_refused(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, pc, sc = linked
    pv, sv = pc.create_ldev("16M"), sc.create_ldev("16M")
    base = {"copyGroupName": "g", "copyPairName": "p", "replicationType": "TC",
            "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": "NEVER"}
    for field, value in (("copyGroupName", "a,b"), ("copyGroupName", "a/b"), ("copyPairName", "x/y"),
                         ("copyPairName", "x,y"), ("copyPairName", "x y"), ("localDeviceGroupName", "d%2C"),
                         ("remoteDeviceGroupName", "r/s")):
        with pytest.raises(ApiError) as e:
            pc.invoke("POST", "remote-mirror-copypairs", {**base, field: value}, remote=sc)
        assert (e.value.status, e.value.message_id) == (400, "KART40039-E"), (field, value)
    for c in (pc, sc):
        assert c.get("remote-copypairs")["data"] == []
        assert c.get("remote-mirror-copygroups")["data"] == []




def test_bad_peer_headers_get_an_error_reply_and_change_nothing(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, pc, sc = linked
    sv = sc.create_ldev("16M")
    secret = _link_secret(p, s.storage_device_id)
    ports = {x["portId"]: int(x["port"]) for x in sc.link_info()["linkPorts"]}
    good_group = {"name": "pg", "local_dg": "pgS_", "remote_dg": "pgP_", "remote_device_id": s.storage_device_id,
                  "remote_serial": s.serial, "replication_type": "TC", "role": "S", "path_group_id": 0,
                  "mu_number": 0, "local_journal_id": None, "remote_journal_id": None, "ctg_id": -1}
    good = {"group": good_group, "pair": "p1", "pvol": 0, "svol": sv, "size": 16 << 20, "status": "COPY",
            "fence": "NEVER", "copy_pace": 3, "new_group": True}
    assert peer_headers.create_header(good)["group"]["mu_number"] == 0  # what the real primary sends passes
    bad = [{**good, "group": {**good_group, "mu_number": "../../../x"}},
           {**good, "group": {**good_group, "mu_number": 99}},
           {**good, "group": {**good_group, "name": "a/b"}},
           {**good, "group": {**good_group, "role": "X"}},
           {**good, "group": {**good_group, "evil": 1}},
           {**good, "group": "pg"},
           {**good, "pair": "x,y"},
           {**good, "svol": "0"},
           {**good, "status": "BOGUS"},
           {**good, "copy_pace": 10**30}]

    async def main() -> None:
        # the primary's identity and secret (as a compromised or buggy peer would hold them)
        fake = Link(p.storage_device_id, p.serial, lambda d: secret if d == s.storage_device_id else None,
                    lambda d, port: ("127.0.0.1", ports[port]) if port in ports else None, ports={"CL3-A": 0})
        await fake.start()
        try:
            group = fake.ensure_group(s.serial, s.storage_device_id, 9, 10)
            await group.add_path("CL3-A", "CL3-A")
            await group.wait_attempted(5)
            for h in bad:
                with pytest.raises(RemoteError) as e:
                    await group.call("pair.create", h)
                assert e.value.detail.get("key") == "INVALID_VALUE", (h, e.value.detail)
            for msg, h in (("pair.set", {"group": "pg", "pairs": ["p1"], "status": "WHATEVER"}),
                           ("pair.swap", {"group": "pg", "pairs": ["p1"], "to": "Q"})):
                with pytest.raises(RemoteError):
                    await group.call(msg, h)
        finally:
            await fake.close()

    asyncio.run(main())
    assert sc.get("remote-copypairs")["data"] == [] and sc.get("remote-mirror-copygroups")["data"] == []
    assert not list(s.data_dir.rglob("*x.bmp"))
    assert sc.get("storages")["data"][0]["storageDeviceId"] == s.storage_device_id  # still serving


def test_ur_restore_refuses_an_entry_beyond_the_svol(
        linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    p, s, pc, sc = linked
    for c in (pc, sc):
        c.create_journal(1, [c.create_ldev("64M")])
    size = 16 << 20
    pv, sv = pc.create_ldev("16M"), sc.create_ldev("16M")
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": "ug", "copyPairName": "u0", "replicationType": "UR",
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "ASYNC", "muNumber": 1, "pvolJournalId": 1, "svolJournalId": 1},
        remote=sc)
    secret = _link_secret(p, s.storage_device_id)
    pc.close()
    p.stop()
    svol_file = s.data_dir / "ldevs" / f"{sv:05d}.img"
    assert svol_file.stat().st_size == size

    async def main() -> None:
        reads: list[dict[str, Any]] = []
        two = asyncio.Event()

        async def jnl_read(peer: Any, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
            reads.append(h)
            if len(reads) >= 2:
                two.set()
            first = int(h.get("from") or 1)
            data = b"\xaa" * 4096
            head = ENTRY.pack(ENTRY_MAGIC, 1 << (MIRROR_SHIFT + 1), first, pv, len(data), size, 0, 0)
            crc = crc32c(data, crc32c(head[:32]))
            raw = ENTRY.pack(ENTRY_MAGIC, 1 << (MIRROR_SHIFT + 1), first, pv, len(data), size, crc, 0) + data
            return {"count": 1, "first": first, "skip": False, "mu": 1, "floor": 0, "svols": {str(pv): sv},
                    "lastSeq": first, "qCount": 1, "usage": 0, "headSeq": first, "nextSeq": 0}, raw

        # a primary (with the real one's identity and secret) that sends an entry past the S-VOL's end
        ports = dict(zip(("CL3-A", "CL4-A", "CL3-B", "CL4-B"), p.link_ports, strict=True))
        fake = Link(p.storage_device_id, p.serial, lambda d: secret if d == s.storage_device_id else None,
                    lambda d, port: None, ports=ports)
        fake.register_handler("jnl.read", jnl_read)
        await fake.start()
        try:
            await asyncio.wait_for(two.wait(), 60)  # the second read comes after the first reply was handled
        finally:
            await fake.close()
        assert reads[1].get("from") == reads[0].get("from")  # the bad entry was not restored

    asyncio.run(main())
    assert svol_file.stat().st_size == size
