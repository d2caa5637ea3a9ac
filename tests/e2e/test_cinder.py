"""The real Cinder Hitachi driver (PyPI ``cinder``, REST backend) provisions on a vspemu storage system.

A venv with ``cinder`` is made once under the repository's ``.venv-cinder`` (Python 3.12, under a lock). The
driver runs in a subprocess with that venv's python (tests/cinder/run_driver.py) and is told one step at a
time; between steps this test looks at the storage system through its REST API. No OpenStack service runs
and nothing of vspemu is mocked. Locally the test skips when the venv cannot be built; in CI (CI=true) it fails.
"""

from __future__ import annotations

import fcntl
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ansible import python312, unavailable  # tests/e2e is on sys.path

from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-cinder"
SCRIPT = ROOT / "tests" / "cinder" / "run_driver.py"
CINDER = "cinder==29.0.0"
USER, PASSWORD = "maintenance", "raid-maintenance"
GiB_BLOCKS = (1 << 30) // 512

COMPUTE = {"ip": "10.0.0.5", "host": "compute1", "wwpns": ["100000109b1a2b3c", "100000109b1a2b3d"],
           "initiator": "iqn.1994-05.com.redhat:compute1", "multipath": False, "os_type": "linux"}
CINDER_NODE = {"ip": "10.0.0.4", "host": "cinder1", "wwpns": ["100000109b0c0c01"],
               "initiator": "iqn.1994-05.com.redhat:cinder1", "multipath": False}


def cinder_venv() -> Path:
    python = VENV / "bin" / "python"

    def ready() -> bool:
        check = [str(python), "-c", "import cinder.volume.drivers.hitachi.hbsd_rest_api"]
        return python.exists() and subprocess.run(check, capture_output=True).returncode == 0

    if ready():
        return VENV
    with open(ROOT / ".venv-cinder.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready():
            base = python312() or sys.executable
            if VENV.exists():
                shutil.rmtree(VENV)
            for cmd in ([base, "-m", "venv", str(VENV)], [str(VENV / "bin" / "pip"), "install", "-q", CINDER]):
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
                if r.returncode != 0:
                    unavailable(f"cannot build {VENV} with {CINDER}: {r.stderr[-1500:]}")
    if not ready():
        unavailable(f"{VENV} cannot import the Hitachi driver")
    return VENV


class Driver:
    """The driver subprocess: one step a line, one JSON answer a line."""

    def __init__(self, venv: Path, system: SystemProcess, mode: str, ports: list[str]) -> None:
        self.proc = subprocess.Popen([str(venv / "bin" / "python"), str(SCRIPT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        config = {"mode": mode, "san_ip": "127.0.0.1", "san_api_port": system.rest_port, "user": USER,
                  "password": PASSWORD, "storage_id": system.storage_device_id, "pool": "0", "ports": ports,
                  "size_gib": 1, "connector": COMPUTE, "local_connector": CINDER_NODE}
        self._send(json.dumps(config))

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def step(self, name: str) -> Any:
        self._send(name)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            pytest.fail(f"the driver process ended at {name}: {err[-3000:]}")
        reply = json.loads(line)
        assert reply["ok"], f"{name}: {reply['error']}\n{reply['traceback']}"
        return reply["result"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def driver_for(system: SystemProcess) -> Iterator[Any]:
    venv = cinder_venv()
    made: list[Driver] = []

    def make(mode: str, ports: list[str]) -> Driver:
        made.append(Driver(venv, system, mode, ports))
        return made[-1]

    yield make
    for d in made:
        d.close()


def groups_of(api: VspClient, port: str) -> dict[str, dict[str, Any]]:
    return {h["hostGroupName"]: h for h in api.get("host-groups", portId=port)["data"]}


def test_fc_driver_provisions_maps_and_unmaps(system: SystemProcess, api: VspClient, driver_for: Any) -> None:
    drv = driver_for("fc", ["CL1-A"])
    info = drv.step("do_setup")["storage_info"]
    assert info["controller_ports"] == ["CL1-A"] and info["wwns"]["CL1-A"] == api.get("ports/CL1-A")["wwn"]
    # the Cinder node's own host group, with its WWN
    own = groups_of(api, "CL1-A")[f"HBSD-{CINDER_NODE['wwpns'][0]}"]
    assert [w["hostWwn"] for w in api.get("host-wwns", portId="CL1-A",
                                          hostGroupNumber=own["hostGroupNumber"])["data"]] == CINDER_NODE["wwpns"]
    stats = drv.step("get_volume_stats")
    assert stats["pools"][0]["total_capacity_gb"] > 0

    ldev = drv.step("create_volume")["ldev"]
    assert api.get(f"ldevs/{ldev}")["blockCapacity"] == GiB_BLOCKS
    drv.step("extend_volume")
    assert api.get(f"ldevs/{ldev}")["blockCapacity"] == 2 * GiB_BLOCKS

    conn = drv.step("initialize_connection")
    assert conn["driver_volume_type"] == "fibre_channel"
    assert conn["data"]["target_wwn"] == [api.get("ports/CL1-A")["wwn"]]
    host = groups_of(api, "CL1-A")[f"HBSD-{COMPUTE['wwpns'][0]}"]
    number = host["hostGroupNumber"]
    wwns = api.get("host-wwns", portId="CL1-A", hostGroupNumber=number)["data"]
    assert sorted(w["hostWwn"] for w in wwns) == sorted(COMPUTE["wwpns"])
    luns = api.get("luns", ldevId=ldev)["data"]
    assert [(x["portId"], x["hostGroupNumber"], x["lun"]) for x in luns] == [
        ("CL1-A", number, conn["data"]["target_lun"])]

    drv.step("terminate_connection")
    assert api.get("luns", ldevId=ldev)["data"] == []
    assert f"HBSD-{COMPUTE['wwpns'][0]}" not in groups_of(api, "CL1-A")  # hitachi_group_delete

    drv.step("delete_volume")
    assert api.get(f"ldevs/{ldev}")["emulationType"] == "NOT DEFINED"


def test_iscsi_driver_connects_through_an_iscsi_target(system: SystemProcess, api: VspClient,
                                                       driver_for: Any) -> None:
    drv = driver_for("iscsi", ["CL5-A"])
    info = drv.step("do_setup")["storage_info"]
    port = api.get("ports/CL5-A")
    assert info["portals"] == {"CL5-A": f"{port['ipv4Address']}:3260"}
    drv.step("get_volume_stats")
    ldev = drv.step("create_volume")["ldev"]
    conn = drv.step("initialize_connection")
    assert conn["driver_volume_type"] == "iscsi"
    targets = {h["iscsiName"]: h for h in api.get("host-groups", portId="CL5-A")["data"]}
    target = targets[conn["data"]["target_iqn"]]
    initiators = api.get("host-iscsis", portId="CL5-A", hostGroupNumber=target["hostGroupNumber"])["data"]
    assert [i["iscsiName"] for i in initiators] == [COMPUTE["initiator"]]
    assert [(x["portId"], x["hostGroupNumber"], x["lun"]) for x in api.get("luns", ldevId=ldev)["data"]] == [
        ("CL5-A", target["hostGroupNumber"], conn["data"]["target_lun"])]
    drv.step("terminate_connection")
    assert api.get("luns", ldevId=ldev)["data"] == []
    drv.step("delete_volume")
    assert api.get(f"ldevs/{ldev}")["emulationType"] == "NOT DEFINED"


MiB = 1 << 20
# where the test writes: the first 4 MiB, 1 MiB across a 256 KiB track boundary in the middle, the last MiB
REGIONS = ((0, 4 * MiB), (600 * MiB + 100 * 1024, MiB), (2047 * MiB, MiB))


def write_regions(system: SystemProcess, ldev: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as n:
        for off, length in REGIONS:
            out.append(rnd.randbytes(length))
            n.write(off, out[-1])
        n.flush()
    return out


def read_regions(system: SystemProcess, ldev: int) -> list[bytes]:
    with NbdClient("127.0.0.1", system.nbd_port, str(ldev)) as n:
        return [n.read(off, length) for off, length in REGIONS]


def exported(api: VspClient, ldev: int) -> None:
    """A LU path on the Cinder node's port (host group 0), so the test reads the volume over NBD."""
    api.add_lun(ldev, "CL1-A", 0)


def snapshots_of(api: VspClient, **query: int) -> list[dict[str, Any]]:
    return list(api.get("snapshots", **query)["data"])


def test_snapshot_clone_and_revert_with_real_data(system: SystemProcess, api: VspClient, driver_for: Any) -> None:
    """create_snapshot, create_volume_from_snapshot, create_cloned_volume, revert_to_snapshot and
    delete_snapshot of the real driver: Thin Image snapshots and clones (isClone + clonesAutomation), checked
    through the REST API after each step and by the data over NBD."""
    drv = driver_for("fc", ["CL1-A"])
    drv.step("do_setup")
    drv.step("get_volume_stats")  # Cinder asks for them before it places a volume
    vol = drv.step("create_volume")["ldev"]
    drv.step("extend_volume")  # 2 GiB
    exported(api, vol)
    before = write_regions(system, vol, seed=1)

    snap = drv.step("create_snapshot")
    sv = snap["ldev"]
    [s] = snapshots_of(api, pvolLdevId=vol)
    assert (s["status"], s["svolLdevId"], s["snapshotGroupName"]) == ("PSUS", sv, f"HBSD-snap{sv % 8}")
    assert s["canCascade"] is True
    [s_seen] = snapshots_of(api, svolLdevId=sv)
    assert s_seen["primaryOrSecondary"] == "S-VOL" and s_seen["pvolLdevId"] == vol
    assert api.get(f"ldevs/{sv}")["label"] == snap["id"].replace("-", "")
    assert "HTI" in api.get(f"ldevs/{vol}")["attributes"] and "HTI" in api.get(f"ldevs/{sv}")["attributes"]
    after = write_regions(system, vol, seed=2)  # the volume keeps changing; the snapshot keeps its instant
    exported(api, sv)
    assert read_regions(system, sv) == before

    from_snap = drv.step("create_volume_from_snapshot")["ldev"]  # a clone of the snapshot's S-VOL
    assert snapshots_of(api, svolLdevId=from_snap) == []  # the clone pair is gone once the copy is done
    assert "HTI" not in api.get(f"ldevs/{from_snap}")["attributes"]
    exported(api, from_snap)
    assert read_regions(system, from_snap) == before

    cloned = drv.step("create_cloned_volume")["ldev"]  # a clone of the volume as it is now
    assert snapshots_of(api, svolLdevId=cloned) == []
    exported(api, cloned)
    assert read_regions(system, cloned) == after
    assert [x["svolLdevId"] for x in snapshots_of(api, pvolLdevId=vol)] == [sv]  # only the snapshot is left

    drv.step("revert_to_snapshot")
    assert read_regions(system, vol) == before
    [s] = snapshots_of(api, pvolLdevId=vol)
    assert (s["status"], s["svolLdevId"]) == ("PSUS", sv)  # split again at once (autoSplit)
    assert read_regions(system, sv) == before
    assert read_regions(system, from_snap) == before and read_regions(system, cloned) == after  # their own data

    drv.step("delete_snapshot")
    assert snapshots_of(api, pvolLdevId=vol) == []
    assert api.get(f"ldevs/{sv}")["emulationType"] == "NOT DEFINED"
    assert "HTI" not in api.get(f"ldevs/{vol}")["attributes"]
    for name, ldev in (("create_volume_from_snapshot", from_snap), ("create_cloned_volume", cloned)):
        drv.step(f"delete_volume {name}")
        assert api.get(f"ldevs/{ldev}")["emulationType"] == "NOT DEFINED"
    drv.step("delete_volume")
    assert api.get(f"ldevs/{vol}")["emulationType"] == "NOT DEFINED"
