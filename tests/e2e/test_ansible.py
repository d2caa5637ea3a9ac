"""The real Ansible collection (hitachivantara.vspone_block) drives a two-system vspemu lab.

The playbooks live in tests/ansible/. A venv with PyPI ``ansible`` (which bundles the collection) is made once
under the repository's ``.venv-ansible`` (Python 3.12 for ansible 14.x; ansible 12.x on this interpreter if no
3.12 is found). Each playbook asserts the statuses every task reports; after the TrueCopy and UR plays the test
compares the P-VOL and S-VOL data over NBD. Every file the collection writes (logs, telemetry, consent file)
goes to a scratch folder. Playbook durations are printed (run with ``-s`` to see them) and kept in
``<scratch>/timings.json``.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vspemu.client import ApiError, VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, link_systems

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-ansible"
PLAYBOOKS = ROOT / "tests" / "ansible"
COLLECTION = "ansible_collections/hitachivantara/vspone_block"
MiB = 1 << 20
VOLUME = "32M"
USER, PASSWORD = "maintenance", "raid-maintenance"


def python312() -> str | None:
    """A Python 3.12 that really runs (a pyenv shim on PATH may exist without a 3.12 selected)."""
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    for cand in [*pyenv, shutil.which("python3.12")]:
        check = [cand, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"] if cand else []
        if cand and os.access(cand, os.X_OK) and subprocess.run(check, capture_output=True).returncode == 0:
            return cand
    return None


def unavailable(reason: str) -> None:
    """Skip on a developer's machine; in CI (CI=true) the collection must run, so fail instead."""
    (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


def ansible_venv() -> Path:
    """The cached venv with ansible-playbook and the collection; created (under a lock) when missing."""
    playbook = VENV / "bin" / "ansible-playbook"

    def ready() -> bool:
        return playbook.exists() and bool(glob.glob(str(VENV / "lib" / "python3*" / "site-packages" / COLLECTION)))

    if ready():
        return VENV
    lock_path = ROOT / ".venv-ansible.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready():
            py = python312()
            spec = "ansible==14.5.0" if py else "ansible>=12,<13"
            base = py or sys.executable
            if VENV.exists():
                shutil.rmtree(VENV)
            steps = [[base, "-m", "venv", str(VENV)], [str(VENV / "bin" / "pip"), "install", "-q", spec]]
            for cmd in steps:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if r.returncode != 0:
                    unavailable(f"cannot install {spec} into {VENV}: {r.stderr[-1500:]}")
    lock_path.unlink(missing_ok=True)
    if not ready():
        unavailable(f"{VENV} has no ansible-playbook or no {COLLECTION}")
    return VENV


@dataclass
class AnsibleLab:
    p: SystemProcess
    s: SystemProcess
    pc: VspClient
    sc: VspClient
    venv: Path
    scratch: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def base_vars(self) -> dict[str, Any]:
        return {"p_addr": f"127.0.0.1:{self.p.rest_port}", "s_addr": f"127.0.0.1:{self.s.rest_port}",
                "user": USER, "password": PASSWORD, "p_serial": self.p.serial, "s_serial": self.s.serial}

    def env(self) -> dict[str, str]:
        s = self.scratch
        for d in ("home", "logs", "tmp", "ansible"):
            (s / d).mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TZ", "TERM", "USER", "LOGNAME")}
        return {
            **keep,
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(s / "home"),
            "HV_ANSIBLE_LOG_PATH": str(s / "logs"),
            "HV_ANSIBLE_LOG_LEVEL": "DEBUG",
            "HV_TELEMETRY_FILE_PATH": str(s / "usages"),
            "HV_REGISTRATION_FILE_PATH": str(s / "reg"),
            "HV_ENABLE_AUDIT_LOG": "false",
            "HV_APIG_URL": "https://127.0.0.1:9/x",
            "ANSIBLE_PYTHON_INTERPRETER": str(self.venv / "bin" / "python"),
            "ANSIBLE_HOME": str(s / "ansible"),
            "ANSIBLE_LOCAL_TEMP": str(s / "tmp"),
            "ANSIBLE_REMOTE_TEMP": str(s / "tmp"),
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_DEPRECATION_WARNINGS": "false",
            "ANSIBLE_LOCALHOST_WARNING": "false",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def play(self, playbook: str, **extra: Any) -> str:
        """Run one playbook; fail the test with the failing task's output if it fails. Returns stdout."""
        env = self.env()
        varfile = self.scratch / f"{Path(playbook).stem}.vars.json"
        varfile.write_text(json.dumps({**self.base_vars, **extra}))
        cmd = [str(self.venv / "bin" / "ansible-playbook"), "-i", "localhost,", str(PLAYBOOKS / playbook),
               "-e", f"@{varfile}"]
        start = time.monotonic()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=self.scratch)
        elapsed = time.monotonic() - start
        self.timings[playbook] = round(elapsed, 1)
        (self.scratch / "timings.json").write_text(json.dumps(self.timings, indent=1))
        (self.scratch / f"{Path(playbook).stem}.out").write_text(r.stdout + r.stderr)
        print(f"\n[ansible] {playbook}: {elapsed:.1f} s (rc {r.returncode})")
        if r.returncode != 0:
            out = r.stdout
            at = out.find("fatal:")
            excerpt = out[max(0, out.rfind("TASK [", 0, at if at >= 0 else len(out)) - 200):][:6000]
            pytest.fail(f"{playbook} failed (rc {r.returncode}) after {elapsed:.1f} s:\n{excerpt}\n{r.stderr[-2000:]}")
        return r.stdout

    def volumes(self, size: str = VOLUME, svol_lun: bool = True) -> tuple[int, int]:
        """A P-VOL with a LUN (numOfPorts >= 1) filled with random data, and an S-VOL of the same size."""
        pv = self.pc.create_ldev(size)
        self.pc.add_lun(pv)
        sv = self.sc.create_ldev(size)
        if svol_lun:
            self.sc.add_lun(sv)
        total = self.pc.get(f"ldevs/{pv}")["blockCapacity"] * 512
        with NbdClient("127.0.0.1", self.p.nbd_port, str(pv)) as c:
            for off in range(0, total // 2, 4 * MiB):  # the upper half stays holes
                c.write(off, os.urandom(min(4 * MiB, total - off)))
            c.flush()
        with NbdClient("127.0.0.1", self.s.nbd_port, str(sv)) as c:
            c.write(total - MiB, b"\xee" * 4096)  # stale data on the S-VOL: the initial copy must clear it
        return pv, sv

    def digest(self, side: str, ldev: int) -> str:
        proc, client = (self.p, self.pc) if side == "p" else (self.s, self.sc)
        total = client.get(f"ldevs/{ldev}")["blockCapacity"] * 512
        h = hashlib.sha256()
        with NbdClient("127.0.0.1", proc.nbd_port, str(ldev)) as c:
            for off in range(0, total, 4 * MiB):
                h.update(c.read(off, min(4 * MiB, total - off)))
        return h.hexdigest()


def single_system_lab(tmp_path_factory: pytest.TempPathFactory, serial: int) -> Iterator[AnsibleLab]:
    """One system, for the provisioning plays: the lab's secondary is the same process (a fixture body)."""
    venv = ansible_venv()
    base = tmp_path_factory.mktemp("ansible-prov")
    p = SystemProcess(base / "array", serial).start()
    pc = p.client()
    try:
        yield AnsibleLab(p, p, pc, pc, venv, base / "scratch")
    finally:
        pc.close()
        p.stop()


@pytest.fixture(scope="module")
def alab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnsibleLab]:
    venv = ansible_venv()
    base = tmp_path_factory.mktemp("ansible-lab")
    p = SystemProcess(base / "primary", 410001).start()
    s = SystemProcess(base / "secondary", 410002).start()
    pc, sc = p.client(), s.client()
    try:
        link_systems(pc, sc)
        yield AnsibleLab(p, s, pc, sc, venv, base / "scratch")
    finally:
        pc.close()
        sc.close()
        p.stop()
        s.stop()


def test_remote_storages_and_connections(alab: AnsibleLab) -> None:
    alab.play("remote.yml")
    # the path group the play made and deleted is gone; path group 0 is untouched
    groups = [g["remotepathGroupId"] for g in alab.pc.get("remotepath-groups")["data"]]
    assert groups == [f"{alab.s.serial},R9,0"]


def test_truecopy(alab: AnsibleLab) -> None:
    pv, sv = alab.volumes()
    alab.play("truecopy.yml", pvol=pv, svol=sv, cg="ans_tc", cp="ans_tc_p1")
    assert alab.pc.get("remote-copypairs")["data"] == []
    assert alab.sc.get("remote-copypairs")["data"] == []
    assert alab.digest("p", pv) == alab.digest("s", sv)


def test_journals(alab: AnsibleLab) -> None:
    a = alab.pc.create_ldev("64M")
    b = alab.pc.create_ldev("64M")
    alab.play("journal.yml", journal_id=37, jnl_ldev_a=a, jnl_ldev_b=b)
    assert all(j["journalId"] != 37 for j in alab.pc.get("journals")["data"])


def _ur_refusal(alab: AnsibleLab, pjnl: int, sjnl: int) -> str | None:
    """Try a UR create with the SDK: the reason the server refuses it, or None (the probe pair is deleted)."""
    pv = alab.pc.create_ldev("8M")
    sv = alab.sc.create_ldev("8M")
    body = {"copyGroupName": "ur_probe", "copyPairName": "probe", "replicationType": "UR",
            "remoteStorageDeviceId": alab.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": "ASYNC", "muNumber": 0, "pvolJournalId": pjnl,
            "svolJournalId": sjnl}
    try:
        job = alab.pc.invoke("POST", "remote-mirror-copypairs", body, remote=alab.sc, nowait=True, timeout=60)
    except (ApiError, TimeoutError) as e:
        return f"UR create refused by the server: {e}"
    pair_id = VspClient.resource_id(job)
    try:
        alab.pc.invoke("DELETE", f"remote-mirror-copypairs/{pair_id}", remote=alab.sc, timeout=60)
    except (ApiError, TimeoutError) as e:
        return f"UR probe pair could not be deleted: {e}"
    return None


def test_universal_replicator(alab: AnsibleLab) -> None:
    jp = [alab.pc.create_ldev("256M") for _ in range(1)]
    js = [alab.sc.create_ldev("256M") for _ in range(1)]
    try:
        alab.pc.create_journal(11, jp)
        alab.sc.create_journal(13, js)
    except ApiError as e:
        unavailable(f"journals for UR could not be created: {e}")
    reason = _ur_refusal(alab, 11, 13)
    if reason:
        unavailable(reason)
    pv, sv = alab.volumes()
    alab.play("hur.yml", pvol=pv, svol=sv, cg="ans_ur", cp="ans_ur_p1", pjnl=11, sjnl=13, mu=1)
    assert alab.pc.get("remote-copypairs")["data"] == []
    assert alab.digest("p", pv) == alab.digest("s", sv)


def test_truecopy_and_ur_from_one_pvol(alab: AnsibleLab) -> None:
    """3DC multi-target as the collection does it: hv_truecopy, then hv_hur on mirror unit 1 of the same
    P-VOL; host writes reach both S-VOLs; then both pairs are split and deleted with the collection."""
    try:
        alab.pc.create_journal(21, [alab.pc.create_ldev("256M")])
        alab.sc.create_journal(23, [alab.sc.create_ldev("256M")])
    except ApiError as e:
        unavailable(f"journals for UR could not be created: {e}")
    pv, svol_tc = alab.volumes()
    svol_ur = alab.sc.create_ldev(VOLUME)
    alab.sc.add_lun(svol_ur)
    ids = {"pvol": pv, "svol_tc": svol_tc, "svol_ur": svol_ur, "pjnl": 21, "sjnl": 23}
    alab.play("tdc.yml", phase="create", **ids)
    with NbdClient("127.0.0.1", alab.p.nbd_port, str(pv)) as c:
        for k in range(16):
            c.write(k * 2 * MiB + 4096 * k, os.urandom(256 * 1024))
        c.flush()
    deadline = time.monotonic() + 60
    while any(j["qCount"] for j in alab.pc.get("journals", journalInfo="basic")["data"] if j["journalId"] == 21):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert alab.digest("s", svol_tc) == alab.digest("p", pv) == alab.digest("s", svol_ur)
    alab.play("tdc.yml", phase="delete", **ids)
    assert alab.pc.get("remote-copypairs")["data"] == [] and alab.sc.get("remote-copypairs")["data"] == []


def test_remote_storage_registration(alab: AnsibleLab) -> None:
    """Last (it tears the link down): unregister with the SDK, then register and connect with the collection."""
    for local in (alab.pc, alab.sc):
        for g in local.get("remotepath-groups")["data"]:
            local.invoke("DELETE", f"remotepath-groups/{g['remotepathGroupId']}")
    alab.pc.unregister_remote(alab.sc, mutual=True)
    assert [r["dkcType"] for r in alab.pc.get("remote-storages")["data"]] == ["Local"]
    alab.play("registration.yml")
    remotes = {r["serialNumber"]: r for r in alab.pc.get("remote-storages")["data"]}
    assert remotes[alab.s.serial]["dkcType"] == "Remote"
    assert remotes[alab.s.serial]["restServerPort"] == alab.s.rest_port
    assert alab.p.serial in {r["serialNumber"] for r in alab.sc.get("remote-storages")["data"]}
    for local, remote in ((alab.pc, alab.s), (alab.sc, alab.p)):
        local.wait_path_status(f"{remote.serial},R9,0", "NML_01", 30)
    # the link works: a TrueCopy pair made with the SDK copies the data
    pv, sv = alab.volumes("8M")
    alab.pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": "after_reg", "copyPairName": "p1", "replicationType": "TC",
        "remoteStorageDeviceId": alab.s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "copyPace": 15}, remote=alab.sc)
    assert alab.digest("p", pv) == alab.digest("s", sv)
