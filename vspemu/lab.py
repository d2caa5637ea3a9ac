"""Start and stop storage-system processes on free ports: used by the tests and the bench scripts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from vspemu.client import VspClient
from vspemu.system.storage import storage_device_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SystemProcess:
    """One ``vspemu serve`` process with its own data directory and ports."""

    def __init__(self, data_dir: Path, serial: int, model: str = "VSP 5500H", host: str = "127.0.0.1",
                 rest_port: int | None = None, nbd_port: int | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.serial = serial
        self.model = model
        self.host = host
        self.rest_port = rest_port or free_port()
        self.nbd_port = nbd_port or free_port()
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.storage_device_id = storage_device_id(model, serial)

    @property
    def rest_url(self) -> str:
        return f"https://{self.host}:{self.rest_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vspemu", "serve", "--serial", str(self.serial),
                "--data-dir", str(self.data_dir), "--rest-port", str(self.rest_port),
                "--rest-host", self.host, "--nbd-port", str(self.nbd_port), "--nbd-host", self.host,
                "--model", self.model, "--log-level", "info", *self.extra_args]

    def start(self, timeout: float = 30.0) -> SystemProcess:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        env = dict(os.environ, PYTHONUNBUFFERED="1")
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
        return VspClient(self.rest_url, **kwargs)  # type: ignore[arg-type]

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait: a clean shutdown."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

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
