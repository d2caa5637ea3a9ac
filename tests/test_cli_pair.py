"""``vspemu pair``: the CCI-style commands, run in-process against two real storage-system processes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from vspemu.cli.main import app
from vspemu.client import VspClient
from vspemu.client.nbd import NbdClient
from vspemu.lab import SystemProcess, volume_digest

MiB = 1 << 20


@dataclass
class Lab:
    p: SystemProcess
    s: SystemProcess
    pc: VspClient
    sc: VspClient

    def run(self, *args: str, swap: bool = False) -> tuple[int, str]:
        """``vspemu pair ARGS`` with --primary/--secondary (reversed with ``swap``); (exit code, output)."""
        first, second = (self.s, self.p) if swap else (self.p, self.s)
        urls = ["--primary", first.rest_url, "--secondary", second.rest_url]
        if args[0] == "takeover":
            urls = urls[2:]
        r = CliRunner(env=self.env).invoke(app, ["pair", *args, *urls])
        return r.exit_code, r.output

    @property
    def env(self) -> dict[str, str]:
        """The CLI verifies TLS: trust the two systems' own certificates."""
        return {"VSPEMU_CA_CERT": os.pathsep.join(str(x.cert_path) for x in (self.p, self.s))}

    def volumes(self, size: str = "16M") -> tuple[int, int]:
        pv = self.pc.create_ldev(size)
        self.pc.add_lun(pv)
        sv = self.sc.create_ldev(size)
        self.sc.add_lun(sv)
        with NbdClient("127.0.0.1", self.p.nbd_port, str(pv)) as c:
            c.write(0, os.urandom(8 * MiB))
            c.flush()
        return pv, sv

    def digest(self, side: str, ldev: int, size: int = 16 * MiB) -> str:
        return volume_digest((self.p if side == "p" else self.s).nbd_port, ldev, size)

    def statuses(self, group: str, pair: str) -> tuple[str, str]:
        gid = next(g["remoteMirrorCopyGroupId"] for g in self.pc.get(
            "remote-mirror-copygroups", remote=self.sc, remoteStorageDeviceId=self.s.storage_device_id)["data"]
            if g["copyGroupName"] == group)
        x = self.pc.get(f"remote-mirror-copypairs/{gid},{pair}", remote=self.sc)
        return x["pvolStatus"], x["svolStatus"]


@pytest.fixture
def lab(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> Lab:
    return Lab(*linked)


def test_pair_commands_end_to_end(lab: Lab) -> None:
    (pv1, sv1), (pv2, sv2) = lab.volumes(), lab.volumes()
    code, out = lab.run("create", "-g", "cg", "-d", "p1", "--pvol", str(pv1), "--svol", str(sv1), "-c", "15",
                        "-f", "DATA")
    assert code == 0, out
    assert "new copy group" in out and "p1 PAIR/PAIR" in out
    code, out = lab.run("create", "-g", "cg", "-d", "p2", "--pvol", str(pv2), "--svol", str(sv2), "--nowait")
    assert code == 0, out
    assert "new copy group" not in out
    code, out = lab.run("wait", "-g", "cg", "-s", "pair", "--timeout", "60")
    assert code == 0, out
    assert lab.digest("p", pv1) == lab.digest("s", sv1) and lab.digest("p", pv2) == lab.digest("s", sv2)

    code, out = lab.run("display", "-g", "cg")
    assert code == 0, out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("cg ")]
    assert [r[:9] for r in rows] == [
        ["cg", "p1", "L", str(lab.p.serial), str(pv1), "P-VOL", "PAIR", "DATA", "100"],
        ["cg", "p1", "R", str(lab.s.serial), str(sv1), "S-VOL", "PAIR", "DATA", "100"],
        ["cg", "p2", "L", str(lab.p.serial), str(pv2), "P-VOL", "PAIR", "NEVER", "100"],
        ["cg", "p2", "R", str(lab.s.serial), str(sv2), "S-VOL", "PAIR", "NEVER", "100"],
    ]
    assert rows[0][9] == str(sv1) and rows[1][9] == str(pv1)

    # split one pair with the S-VOL writable; pairevtwait semantics and exit codes
    code, out = lab.run("split", "-g", "cg", "-d", "p1", "-rw")
    assert code == 0 and "p1 PSUS/SSUS" in out, out
    with NbdClient("127.0.0.1", lab.s.nbd_port, str(sv1)) as c:
        c.write(0, b"written on the S-VOL".ljust(512))
    assert lab.run("wait", "-g", "cg", "-d", "p1", "-s", "ssus", "--timeout", "5")[0] == 0
    assert lab.run("wait", "-g", "cg", "-d", "p1", "-s", "psus", "--timeout", "5")[0] == 0
    code, out = lab.run("wait", "-g", "cg", "-d", "p1", "-s", "pair", "--timeout", "0.3")
    assert code == 1 and "timeout" in out, out
    code, out = lab.run("wait", "-g", "cg", "-s", "psus", "--timeout", "0.3")  # p2 is still PAIR
    assert code == 1, out
    code, out = lab.run("resync", "-g", "cg", "-d", "p1")
    assert code == 0 and "p1 PAIR/PAIR" in out, out
    assert lab.digest("p", pv1) == lab.digest("s", sv1)

    # swap split on the secondary, swap resync from there: the secondary's volumes become the P-VOLs
    code, out = lab.run("split", "-g", "cg", "-RS")
    assert code == 0 and "p1 PSUS/SSWS" in out and "p2 PSUS/SSWS" in out, out
    code, out = lab.run("resync", "-g", "cg", "--swaps")
    assert code == 0 and "p1 PAIR/PAIR" in out, out
    code, out = lab.run("display", "-g", "cg", "-d", "p1", swap=True)
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("cg ")]
    assert [r[2:7] for r in rows] == [["L", str(lab.s.serial), str(sv1), "P-VOL", "PAIR"],
                                      ["R", str(lab.p.serial), str(pv1), "S-VOL", "PAIR"]]
    # and back: split, then swap resync issued to the current primary (--swapp)
    assert lab.run("split", "-g", "cg", swap=True)[0] == 0
    code, out = lab.run("resync", "-g", "cg", "--swapp", swap=True)
    assert code == 0, out
    assert lab.statuses("cg", "p1") == ("PAIR", "PAIR")
    assert lab.run("display", "-g", "cg", "-d", "p2")[1].count("P-VOL") == 1
    assert lab.digest("p", pv2) == lab.digest("s", sv2)

    # takeover on the secondary alone (NotSpecified ids, no Remote-Authorization)
    code, out = lab.run("takeover", "-g", "cg", "-d", "p2", "--mode", "forceSplit")
    assert code == 0 and "SSWS" in out, out
    assert lab.statuses("cg", "p2")[1] == "SSWS"

    code, out = lab.run("delete", "-g", "cg", "-d", "p2")
    assert code == 0, out
    code, out = lab.run("delete", "-g", "cg")
    assert code == 0 and "SMPL" in out, out
    assert lab.pc.get("remote-copypairs")["data"] == [] and lab.sc.get("remote-copypairs")["data"] == []
    code, out = lab.run("display", "-g", "cg")
    assert code == 3 and "does not exist" in out
    assert lab.run("wait", "-g", "cg", "-s", "smpl", "--timeout", "1")[0] == 0


def test_errors_show_the_arrays_message(lab: Lab) -> None:
    pv, _ = lab.volumes()
    code, out = lab.run("create", "-g", "bad", "-d", "p1", "--pvol", str(pv), "--svol", "999")
    assert code == 2, out
    assert "KART30013-E" in out and "does not exist" in out
    code, out = lab.run("create", "-g", "bad", "-d", "p1", "--pvol", str(pv), "--svol", "1", "--type", "UR")
    assert code == 3 and "--jp" in out, out
    code, out = lab.run("split", "-g", "nothing")
    assert code == 3 and "does not exist" in out, out
    code, out = lab.run("wait", "-g", "nothing", "-s", "pair", "--timeout", "1")
    assert code == 2, out
    code, out = lab.run("split", "-g", "x", "-rw", "-RS")
    assert code == 3, out
    r = CliRunner(env=lab.env).invoke(app, ["pair", "display", "-g", "cg", "--primary", lab.p.rest_url, "--secondary",
                                 lab.s.rest_url, "--password", "wrong-password"])
    assert r.exit_code == 2 and "KART" in r.output, r.output
    r = CliRunner(env=lab.env).invoke(app, ["pair", "display", "-g", "cg", "--primary", "https://127.0.0.1:9",
                                 "--secondary", lab.s.rest_url])
    assert r.exit_code == 2 and "cannot reach" in r.output, r.output
