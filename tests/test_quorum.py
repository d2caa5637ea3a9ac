"""Quorum disks backed by a real LDEV of a third system, reached over NBD (issue 18: the configuration GAD needs).

Three server processes: ``q`` holds the quorum volume (an LDEV with an LU path), ``a`` and ``b`` are the two
systems of future GAD pairs. Both register q's LDEV as an external volume and as quorum disk 0 and see it
NORMAL; when q stops (or the LU path goes) they see it BLOCKED, and NORMAL again when it is back.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import MakeSystem
from tests.test_resource_groups import refused
from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess
from vspemu.system.quorum import HEADER_MAGIC, SLOT_SIZE, QuorumSlot, slot_of, slot_offset

EXT = 500  # the local LDEV id of the external volume on a and b


def add_external(c: VspClient, q: SystemProcess, ldev: int, local: int = EXT) -> dict[str, Any]:
    with q.client() as qc:
        return c.add_external_volume(local, qc, ldev, "127.0.0.1", q.nbd_port)


def add_quorum(c: VspClient, partner: SystemProcess, qid: int = 0, ldev: int | None = EXT) -> dict[str, Any]:
    body: dict[str, Any] = {"quorumDiskId": qid, "remoteSerialNumber": str(partner.serial),
                            "remoteStorageTypeId": "R9", "ldevId": ldev}
    return c.invoke("POST", "quorum-disks", body)


def status(c: VspClient, qid: int = 0) -> str:
    return c.get(f"quorum-disks/{qid}")["status"]  # type: ignore[no-any-return]


def test_quorum_disk_on_a_third_system(make_system: MakeSystem) -> None:
    q, a, b = make_system(), make_system(), make_system()
    qc, ac, bc = q.client(), a.client(), b.client()
    try:
        qldev = qc.create_ldev("16M")
        lun = qc.add_lun(qldev)
        ac.register_remote(bc)  # mutual: a knows b, b knows a

        ext = add_external(ac, q, qldev)
        assert ext["blockCapacity"] == (16 << 20) // 512
        add_external(bc, q, qldev)
        view = ac.get(f"ldevs/{EXT}")
        assert view["attributes"] == ["ELUN"] and view["externalSerialNumber"] == str(q.serial)
        with pytest.raises(ApiError, match="KART40045-E"):  # the id is taken (a failed job, as for any LDEV)
            ac.create_ldev("16M", ldev_id=EXT)
        assert [x["ldevId"] for x in ac.get("ldevs", ldevOption="externalVolume")["data"]] == [EXT]
        assert ac.get("ldevs", headLdevId=EXT, count=1)["data"][0]["attributes"] == ["ELUN"]
        assert EXT not in [x["ldevId"] for x in ac.get("ldevs", ldevOption="undefined", headLdevId=EXT - 1,
                                                        count=3)["data"]]

        assert ac.create_quorum_disk(0, bc, EXT)["status"] == "NORMAL"  # the SDK's helper
        add_quorum(bc, a)
        for c, partner in ((ac, b), (bc, a)):
            disks = c.get("quorum-disks")["data"]
            assert disks == [{"quorumDiskId": 0, "remoteSerialNumber": str(partner.serial),
                              "remoteStorageTypeId": "R9", "readResponseGuaranteedTime": 40,
                              "status": "NORMAL", "ldevId": EXT}]
        assert ac.get(f"ldevs/{EXT}")["attributes"] == ["ELUN", "QRD"]
        # the record is really on q's volume: the header and a heartbeat slot of each system
        with NbdClient("127.0.0.1", q.nbd_port, str(qldev)) as nbd:
            assert nbd.read(0, len(HEADER_MAGIC)) == HEADER_MAGIC
            for me, partner in ((a, b), (b, a)):
                slot = QuorumSlot.unpack(nbd.read(slot_offset(slot_of(me.serial, partner.serial)), SLOT_SIZE))
                assert slot is not None and (slot.serial, slot.partner, slot.quorum_disk_id) == \
                    (me.serial, partner.serial, 0)
        details = ac.private("GET", "quorum-disks/0")
        assert details["partner"]["serialNumber"] == b.serial and details["sequence"] >= 1

        # the quorum system goes away: blocked on both; back: normal again
        q.stop()
        assert status(ac) == "BLOCKED" and status(bc) == "BLOCKED"
        assert ac.get("quorum-disks")["data"][0]["status"] == "BLOCKED"
        q.start()
        assert status(ac) == "NORMAL" and status(bc) == "NORMAL"

        # the quorum system hangs (SIGSTOP): the exchange times out, blocked; resumed: normal
        q.pause()
        try:
            assert status(ac) == "BLOCKED"
        finally:
            q.resume()
        assert status(ac) == "NORMAL"

        # its LU path goes (the export disappears): blocked; mapped again: normal
        qc.close()
        qc = q.client()
        qc.delete_lun(lun)
        assert status(ac) == "BLOCKED"
        qc.add_lun(qldev)
        assert status(ac) == "NORMAL"

        # persisted: a restarted system has its external volume and quorum disk, and checks them again
        a.restart()
        ac.close()
        ac = a.client()
        assert status(ac) == "NORMAL"
        assert ac.get(f"ldevs/{EXT}")["attributes"] == ["ELUN", "QRD"]
    finally:
        for c in (qc, ac, bc):
            c.close()


def test_refusals_change_nothing(make_system: MakeSystem) -> None:
    q, a, b = make_system(), make_system(), make_system()
    with q.client() as qc, a.client() as ac, b.client():
        qldev = qc.create_ldev("16M")
        unmapped = qc.create_ldev("16M")
        qc.add_lun(qldev)
        plain = ac.create_ldev("16M")
        with b.client() as bc:
            ac.register_remote(bc)
        # external volumes: an export that does not exist (no LU path), a port nobody listens on, a taken id
        refused(lambda: add_external(ac, q, unmapped), 404, "KART30013-E")
        refused(lambda: ac.private("POST", "external-volumes", {
            "ldevId": EXT, "externalSerialNumber": q.serial, "externalLdevId": qldev, "nbdHost": "127.0.0.1",
            "nbdPort": 1}), 412, "KART40065-E")
        refused(lambda: add_external(ac, q, qldev, local=plain), 409, "KART40045-E")
        assert ac.private("GET", "external-volumes")["data"] == []
        add_external(ac, q, qldev)
        add_quorum(ac, b)
        before = (ac.get("quorum-disks"), ac.private("GET", "external-volumes"), ac.get(f"ldevs/{plain}"))

        def post(body: dict[str, Any]) -> Any:
            return lambda: ac.invoke("POST", "quorum-disks", body)

        base = {"remoteSerialNumber": str(b.serial), "remoteStorageTypeId": "R9"}
        refused(post({**base, "quorumDiskId": 32, "ldevId": EXT}), 400, "KART40039-E")  # id out of range
        refused(post({**base, "quorumDiskId": -1}), 400, "KART40039-E")
        refused(post({**base, "quorumDiskId": 0, "ldevId": EXT}), 409, "KART40045-E")  # duplicate id
        refused(post({**base, "quorumDiskId": 1, "ldevId": 777}), 404, "KART30013-E")  # unknown external volume
        refused(post({**base, "quorumDiskId": 1, "ldevId": plain}), 400, "KART40039-E")  # not an external one
        refused(post({**base, "quorumDiskId": 1, "ldevId": EXT}), 412, "KART40063-E")  # already a quorum disk
        refused(post({**base, "quorumDiskId": 1, "remoteSerialNumber": "999998"}), 404, "KART30013-E")
        refused(post({**base, "quorumDiskId": 1, "remoteStorageTypeId": "M8"}), 400, "KART40039-E")
        refused(post({**base, "quorumDiskId": 1, "remoteSerialNumber": str(a.serial)}), 400, "KART40039-E")
        refused(post({**base, "quorumDiskId": 1, "ldevId": EXT, "isQuorumDiskLess": True}), 400)
        refused(post({**base, "quorumDiskId": 1, "bogus": 1}), 400, "KART40038-E")
        refused(lambda: ac.private("DELETE", f"external-volumes/{EXT}"), 412, "KART40063-E")  # in use
        refused(lambda: ac.invoke("DELETE", "quorum-disks/5"), 404, "KART30013-E")
        refused(lambda: ac.invoke("DELETE", "quorum-disks/40"), 400)
        assert (ac.get("quorum-disks"), ac.private("GET", "external-volumes"), ac.get(f"ldevs/{plain}")) == before

        # quorum-less (no LDEV), as the array allows since 2019: always NORMAL
        ac.invoke("POST", "quorum-disks", {**base, "quorumDiskId": 1, "isQuorumDiskLess": True})
        qd = ac.get("quorum-disks/1")
        assert qd["status"] == "NORMAL" and "ldevId" not in qd
        # the collection sends ldevId null for a quorum-less disk, and omits the id to get the next free one
        ac.invoke("POST", "quorum-disks", {**base, "ldevId": None})
        assert [d["quorumDiskId"] for d in ac.get("quorum-disks")["data"]] == [0, 1, 2]
        for qid in (2, 1, 0):
            ac.invoke("DELETE", f"quorum-disks/{qid}")
        ac.private("DELETE", f"external-volumes/{EXT}")
        assert ac.get("quorum-disks")["data"] == [] and ac.get(f"ldevs/{EXT}")["emulationType"] == "NOT DEFINED"
