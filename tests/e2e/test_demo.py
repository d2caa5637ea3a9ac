"""``vspemu up`` + ``vspemu demo`` as a user runs them: two subprocesses on the default lab ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

LAB_PORTS = [8440, 8443, 8444, 10809, 10810, *range(17001, 17005), *range(17101, 17105)]


def busy_ports() -> list[int]:
    busy = []
    for port in LAB_PORTS:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def wait_ready(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "vspemu up exited early"
        try:
            if all(httpx.get(f"https://127.0.0.1:{port}/ConfigurationManager/configuration/version", verify=False,
                             timeout=1.0).status_code == 200 for port in (8443, 8444)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the lab did not answer")


def test_demo_on_a_fresh_lab(tmp_path: Path) -> None:
    busy = busy_ports()
    if busy:
        pytest.skip(f"the default lab ports are in use ({busy}): is a lab already running?")
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 - handed to the child process
    up = subprocess.Popen([sys.executable, "-m", "vspemu", "up", "--data-dir", str(tmp_path / "lab")],
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(up)
        # the CLI verifies TLS: trust the lab's certificates, as `vspemu up` tells
        certs = os.pathsep.join(str(tmp_path / "lab" / str(serial) / "tls" / "server.crt")
                                for serial in (410001, 410002))
        for run in (1, 2):  # twice on the same lab: fresh LDEVs and group names each time
            r = subprocess.run([sys.executable, "-m", "vspemu", "demo", "--size", "32M"], capture_output=True,
                               text=True, timeout=300, env={**os.environ, "COLUMNS": "200", "VSPEMU_CA_CERT": certs})
            out = r.stdout + r.stderr
            assert r.returncode == 0, f"run {run}:\n{out}"
            line = next((x for x in out.splitlines() if x.startswith("final check:")), "")
            assert "S-VOL data equals P-VOL data" in line and "TC OK" in line and "DR OK" in line, out
            # the failover rehearsal, step by step
            lines = [x for x in out.splitlines() if x.startswith("> DR: ")]
            expect = ["failover rehearsal", "(fence NEVER): pair1 PAIR/PAIR", "all acknowledged",
                      "in force: path-group 0", "suspended by error: pair1 PSUE/",
                      "takeover (forceSplit) on 900000410002: S-VOL SSWS",
                      "equals the P-VOL's after the writes acknowledged while PAIR: no acknowledged write lost",
                      "recovery site wrote", "fault cleared: paths ['NML_01', 'NML_01']",
                      "swap resync: P-VOL", "on 900000410002 -> S-VOL", ": PAIR/PAIR",
                      "verify (per-track checksums on both sides): 0 differing tracks",
                      "pair deleted; faults in force on 900000410001: 0"]
            text = "\n".join(lines)
            for want in expect:
                assert want in text, f"run {run}: {want!r} missing:\n{out}"
            steps = [next(i for i, x in enumerate(lines) if want in x) for want in expect]
            assert steps == sorted(steps), out
            # `vspemu up` registers the two systems with each other (its default topology): the demo finds them so
            assert "remote storage 900000410002 already registered on 900000410001" in out, out
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            code = up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
            code = up.wait()
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert "lab stopped" in (tmp_path / "up.log").read_text()
