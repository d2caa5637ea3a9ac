"""Start and stop storage-system processes on free ports: used by the tests and the bench scripts."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from vspemu.client import VspClient
from vspemu.system.storage import storage_device_id

_PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range (32768-60999): outgoing connections never take them
_taken: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, outside the ephemeral range, not handed out before by this process."""

    for _ in range(1000):
        port = random.randrange(*_PORT_RANGE)
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError("no free port found")


class SystemProcess:
    """One ``vspemu serve`` process with its own data directory and ports."""

    def __init__(self, data_dir: Path, serial: int, model: str = "VSP 5500H", host: str = "127.0.0.1",
                 rest_port: int | None = None, nbd_port: int | None = None,
                 extra_args: list[str] | None = None, link_ports: list[int] | None = None,
                 password: str | None = None) -> None:
        self.data_dir = data_dir
        self.serial = serial
        self.model = model
        self.host = host
        self.rest_port = rest_port or free_port()
        self.nbd_port = nbd_port or free_port()
        self.extra_args = extra_args or []
        self.password = password  # the account's password: given in the environment, never on the command line
        # replication ports (CL3-A, CL4-A, CL3-B, CL4-B): fixed for the life of this object, so a restarted
        # system answers on the same addresses
        self.link_ports = link_ports or [free_port() for _ in range(4)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.storage_device_id = storage_device_id(model, serial)

    @property
    def rest_url(self) -> str:
        return f"https://{self.host}:{self.rest_port}"

    @property
    def cert_path(self) -> Path:
        """The system's own REST certificate (made at its first start): what its clients trust."""
        return self.data_dir / "tls" / "server.crt"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vspemu", "serve", "--serial", str(self.serial),
                "--data-dir", str(self.data_dir), "--rest-port", str(self.rest_port),
                "--rest-host", self.host, "--nbd-port", str(self.nbd_port), "--nbd-host", self.host,
                "--model", self.model, "--log-level", "info",
                "--link-ports", ",".join(map(str, self.link_ports)), *self.extra_args]

    def start(self, timeout: float = 30.0) -> SystemProcess:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.password is not None:
            env["VSPEMU_PASSWORD"] = self.password
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.rest_url}/ConfigurationManager/configuration/version"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"storage {self.serial} exited ({self.proc.returncode}); see {self.log_path}:\n"
                                   + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(url, verify=False, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"storage {self.serial} not ready after {timeout} s; see {self.log_path}")

    def client(self, **kwargs: object) -> VspClient:
        """A logged-in SDK client that trusts exactly this system's certificate (unless ``verify=`` says
        otherwise)."""
        kwargs.setdefault("verify", str(self.cert_path))
        if self.password is not None:
            kwargs.setdefault("password", self.password)
        return VspClient(self.rest_url, **kwargs)  # type: ignore[arg-type]

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait: a clean shutdown."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the process hangs (its sockets stay open, nothing answers)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or closed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> SystemProcess:
        self.stop()
        return self.start()

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def link_systems(primary: VspClient, secondary: VspClient, path_group_id: int = 0, timeout: float = 30.0) -> None:
    """Register the two systems with each other and create path groups in both directions (CL3-A, CL4-A)."""
    primary.register_remote(secondary, mutual=True)
    for local, remote in ((primary, secondary), (secondary, primary)):
        gid = local.create_path_group(remote, path_group_id, "CL3-A", "CL3-A")
        local.add_remote_path(gid, "CL4-A", "CL4-A")
        local.wait_path_status(gid, "NML_01", timeout)


def volume_digest(nbd_port: int, ldev: int, size: int, host: str = "127.0.0.1") -> str:
    """sha256 of the first ``size`` bytes of an exported LDEV, read over NBD (how tests compare volumes)."""
    import hashlib

    from vspemu.client.nbd import NbdClient

    h = hashlib.sha256()
    with NbdClient(host, nbd_port, str(ldev)) as c:
        for off in range(0, size, 4 << 20):
            h.update(c.read(off, min(4 << 20, size - off)))
    return h.hexdigest()


def set_link_ports(client: VspClient, enabled: bool, ports: tuple[str, ...] = ("CL3-A", "CL4-A")) -> None:
    """Take replication ports of a system offline or online (vspemu-private): how tests cut a link."""
    for port in ports:
        r = client.raw("PUT", f"vspemu/v1/link-ports/{port}", json={"enabled": enabled}, headers=client.headers())
        if r.status_code != 200:
            raise RuntimeError(f"link port {port}: {r.status_code} {r.text}")
