"""A TrueCopy round trip with the vspemu SDK: pair two volumes, write, split, resync, compare, delete.

Run it against a running lab (``vspemu up``) or let it start a throw-away lab on free ports:

    python examples/tc_roundtrip.py                       # starts two systems in a temporary folder
    python examples/tc_roundtrip.py --lab                 # uses the running lab (8443/8444, NBD 10809/10810)
                                                          #   (export VSPEMU_CA_CERT as `vspemu up` prints)
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, link_systems

MiB = 1 << 20
SIZE = 64 * MiB


def sha256(host: str, port: int, ldev: int) -> str:
    h = hashlib.sha256()
    with NbdClient(host, port, str(ldev)) as c:
        for off in range(0, SIZE, 4 * MiB):
            h.update(c.read(off, 4 * MiB))
    return h.hexdigest()


def wait_pair(p: VspClient, s: VspClient, pair_id: str, want: tuple[str, str], timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = p.get(f"remote-mirror-copypairs/{pair_id}", remote=s)
        if (info["pvolStatus"], info["svolStatus"]) == want:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pair_id}: {info['pvolStatus']}/{info['svolStatus']}")
        print(f"  copying: {info['copyProgressRate']}%")
        time.sleep(0.2)


def roundtrip(p: VspClient, s: VspClient, p_nbd: int, s_nbd: int) -> None:
    # 1. volumes of the same size; the P-VOL needs a LUN for host I/O, the S-VOL one to be read back
    pvol, svol = p.create_ldev("64M"), s.create_ldev("64M")
    p.add_lun(pvol)
    s.add_lun(svol)
    with NbdClient("127.0.0.1", p_nbd, str(pvol)) as c:
        c.write(0, os.urandom(16 * MiB))
        c.flush()
    # 2. the pair: POST to the primary with the secondary's session as Remote-Authorization
    group = f"example{os.getpid()}"
    job = p.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": group, "copyPairName": "pair1", "replicationType": "TC",
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pvol, "svolLdevId": svol,
        "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15,
    }, remote=s, nowait=True)
    pair_id = VspClient.resource_id(job)  # "<secondary id>,<group>,<group>P_,<group>S_,pair1"
    print(f"created {pair_id}")
    wait_pair(p, s, pair_id, ("PAIR", "PAIR"))
    # 3. split, write on the P-VOL while split, resync: only the changed tracks are copied
    p.invoke("PUT", f"remote-mirror-copypairs/{pair_id}/actions/split/invoke",
             {"parameters": {"replicationType": "TC"}}, remote=s)
    print("split:", wait_pair(p, s, pair_id, ("PSUS", "SSUS"))["pvolStatus"])
    with NbdClient("127.0.0.1", p_nbd, str(pvol)) as c:
        c.write(40 * MiB, b"written while split".ljust(4096))
    p.invoke("PUT", f"remote-mirror-copypairs/{pair_id}/actions/resync/invoke",
             {"parameters": {"replicationType": "TC"}}, remote=s, nowait=True)
    wait_pair(p, s, pair_id, ("PAIR", "PAIR"))
    # 4. compare, then delete the pair (the copy group goes with its last pair)
    ps, ss = sha256("127.0.0.1", p_nbd, pvol), sha256("127.0.0.1", s_nbd, svol)
    print(f"P-VOL {ps}\nS-VOL {ss}")
    assert ps == ss, "the S-VOL differs from the P-VOL"
    p.invoke("DELETE", f"remote-mirror-copypairs/{pair_id}", remote=s)
    print("deleted; S-VOL equals P-VOL")


def main() -> None:
    if "--lab" in sys.argv:
        with VspClient("https://127.0.0.1:8443") as p, VspClient("https://127.0.0.1:8444") as s:
            if s.storage_device_id not in {r["storageDeviceId"] for r in p.get("remote-storages")["data"]}:
                link_systems(p, s)
            roundtrip(p, s, 10809, 10810)
        return
    with tempfile.TemporaryDirectory() as tmp:
        primary = SystemProcess(Path(tmp) / "primary", 410001).start()
        secondary = SystemProcess(Path(tmp) / "secondary", 410002).start()
        try:
            with primary.client() as p, secondary.client() as s:
                link_systems(p, s)  # register both ways + path group 0 (CL3-A, CL4-A) in both directions
                roundtrip(p, s, primary.nbd_port, secondary.nbd_port)
        finally:
            primary.stop()
            secondary.stop()


if __name__ == "__main__":
    main()
