"""The real Ansible modules hv_snapshot and hv_snapshot_group drive Thin Image on one vspemu system (issue 17).

Reuses tests/e2e/test_ansible.py's cached venv and lab machinery; the playbook is tests/ansible/snapshot.yml.
The playbook waits for a marker file after the split: the test writes to the P-VOL then, so the restore has
something to undo.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator

import pytest
from test_ansible import AnsibleLab, single_system_lab

from vspemu.client.nbd import NbdClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
MiB = 1 << 20


@pytest.fixture(scope="module")
def slab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnsibleLab]:
    yield from single_system_lab(tmp_path_factory, 410031)


def _digest(lab: AnsibleLab, ldev: int, size: int) -> str:
    h = hashlib.sha256()
    with NbdClient("127.0.0.1", lab.p.nbd_port, str(ldev)) as c:
        for off in range(0, size, 4 * MiB):
            h.update(c.read(off, min(4 * MiB, size - off)))
    return h.hexdigest()


def test_hv_snapshot_and_group(slab: AnsibleLab) -> None:
    size = 16 * MiB
    pc = slab.pc
    # not LDEV 0: the collection takes primary_volume_id 0 (and mirror unit 0) for "not given"
    pvol, svol, pvol2 = (pc.create_ldev("16M", ldev_id=i) for i in (101, 102, 103))
    for ldev in (pvol, svol):
        pc.add_lun(ldev)
    with NbdClient("127.0.0.1", slab.p.nbd_port, str(pvol)) as c:
        c.write(0, os.urandom(size))
        c.flush()
    before = _digest(slab, pvol, size)
    marker = slab.scratch / "written"
    slab.scratch.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    seen: dict[str, str] = {}

    def write_after_split() -> None:  # once the play has split the snapshot: change the P-VOL
        with slab.p.client() as c:  # its own client: the test's is not shared across threads
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                snaps = c.get("snapshots", pvolLdevId=pvol)["data"]
                if snaps and snaps[0]["status"] == "PSUS" and seen.get("synced"):
                    break
                if snaps and snaps[0]["status"] == "PAIR":
                    seen["synced"] = "yes"
                time.sleep(0.2)
        with NbdClient("127.0.0.1", slab.p.nbd_port, str(pvol)) as c:
            c.write(MiB, os.urandom(3 * MiB))
            c.flush()
        seen["changed"] = _digest(slab, pvol, size)
        seen["snapshot"] = _digest(slab, svol, size)
        marker.write_text("ok")

    t = threading.Thread(target=write_after_split, daemon=True)
    t.start()
    slab.play("snapshot.yml", pvol=pvol, svol=svol, pvol2=pvol2, marker=str(marker))
    t.join(30)
    assert seen["changed"] != before and seen["snapshot"] == before  # the S-VOL kept the split instant
    assert _digest(slab, pvol, size) == before  # the restore brought the P-VOL back
    assert pc.get("snapshots")["data"] == []
