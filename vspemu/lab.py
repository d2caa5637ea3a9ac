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
from typing import Any

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
                 password: str | None = None, new_session: bool = False, log_level: str = "info") -> None:
        self.data_dir = data_dir
        self.new_session = new_session  # its own session: a Ctrl-C in the terminal reaches only the supervisor
        self.log_level = log_level
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
                "--model", self.model, "--log-level", self.log_level,
                "--link-ports", ",".join(map(str, self.link_ports)), *self.extra_args]

    def start(self, timeout: float = 30.0) -> SystemProcess:
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        """Start the process and return at once (``wait_ready`` waits for its REST API)."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.password is not None:
            env["VSPEMU_PASSWORD"] = self.password
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=self.new_session)
        log.close()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.rest_url}/ConfigurationManager/configuration/version"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"storage {self.serial} exited ({self.proc.returncode}); see {self.log_path}:\n"
                                   + self.log_path.read_text()[-3000:])
            # Ready means: this system answers with its own certificate. A server of another process that took
            # the same port between free_port() and our bind (parallel test runs) fails verification and does
            # not count; our process then exits on its bind and the poll above says so.
            if self.cert_path.exists():
                try:
                    if httpx.get(url, verify=str(self.cert_path), timeout=1.0).status_code == 200:
                        return
                except (httpx.HTTPError, OSError):
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


# -- the lab: N systems started together and registered with each other (``vspemu up``) ---------------------

TOPOLOGIES = ("pair", "chain", "star", "mesh", "none")
LAB_STATE = "lab.json"  # in the lab's data directory: what ``vspemu down`` and ``vspemu status`` read
LAB_STOPPED = "lab.stopped.json"  # the state of the lab last stopped there: its ports are reused by the next up
LAB_PATH_GROUP = 0
LAB_PATHS = (("CL3-A", "CL3-A"), ("CL4-A", "CL4-A"))  # (local port, remote port) of every path group made


def topology_links(n: int, topology: str) -> list[tuple[int, int]]:
    """The system pairs (1-based numbers, smaller first) registered with each other in a lab of ``n`` systems.

    pair: 1-2, 3-4, ... (independent two-system labs); chain: 1-2, 2-3, ... (a cascade: 3DC cascade labs);
    star: 1-2, 1-3, ... (the first system reaches every other: 3DC multi-target labs); mesh: every two systems
    (a triangle for three: 3DC with delta resync); none: no registration."""
    if not 1 <= n <= 8:
        raise ValueError("a lab has 1 to 8 systems")
    if topology == "pair":
        return [(i, i + 1) for i in range(1, n, 2)]
    if topology == "chain":
        return [(i, i + 1) for i in range(1, n)]
    if topology == "star":
        return [(1, i) for i in range(2, n + 1)]
    if topology == "mesh":
        return [(i, j) for i in range(1, n + 1) for j in range(i + 1, n + 1)]
    if topology == "none":
        return []
    raise ValueError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")


def connect_systems(a: VspClient, b: VspClient, path_group_id: int = LAB_PATH_GROUP,
                    timeout: float = 30.0) -> dict[str, str]:
    """Register ``a`` and ``b`` with each other and make path group ``path_group_id`` both ways (CL3-A -> CL3-A,
    CL4-A -> CL4-A), leaving alone what is there already (a lab restarted on its data directory); waits until
    the paths are NML_01. Returns {storageDeviceId: remotepathGroupId on that system}."""
    for local, remote in ((a, b), (b, a)):
        registered = {r["storageDeviceId"] for r in local.get("remote-storages")["data"]
                      if r.get("dkcType") == "Remote"}
        if remote.storage_device_id not in registered:
            local.register_remote(remote, mutual=False)
    out = {}
    for local, remote in ((a, b), (b, a)):
        serial = int(remote.get("storages")["data"][0]["serialNumber"])
        gid = next((str(g["remotepathGroupId"]) for g in local.get("remotepath-groups")["data"]
                    if int(g["remoteSerialNumber"]) == serial and int(g["pathGroupId"]) == path_group_id), None)
        if gid is None:
            (l0, r0), *more = LAB_PATHS
            gid = local.create_path_group(remote, path_group_id, l0, r0)
            for lp, rp in more:
                local.add_remote_path(gid, lp, rp)
        out[local.storage_device_id] = gid
    for local in (a, b):
        local.wait_path_status(out[local.storage_device_id], "NML_01", timeout)
    return out


class Lab:
    """``n`` storage systems, each its own process, data directory (``<data_dir>/<serial>``) and ports, registered
    with each other as ``topology`` says. System i (1-based) is serial 410000+i; with fixed ports its REST API is
    on ``rest_port``+i-1, NBD on ``nbd_port``+i-1 and replication ports CL3-A, CL4-A, CL3-B, CL4-B on
    ``link_port_base``+100*(i-1)+0..3 (the two-system lab of old: 8443/8444, 10809/10810, 17001/17101)."""

    def __init__(self, data_dir: Path, n: int = 2, topology: str = "chain", *, model: str = "VSP 5500H",
                 host: str = "127.0.0.1", free_ports: bool = False, password: str | None = None,
                 rest_port: int = 8443, nbd_port: int = 10809, link_port_base: int = 17001,
                 serial_base: int = 410001, log_level: str = "warning") -> None:
        self.links = topology_links(n, topology)
        self.data_dir = data_dir = data_dir.resolve()
        self.topology = topology
        self.model = model
        self.host = host
        self.password = password
        self.path_groups: dict[tuple[int, int], dict[str, str]] = {}
        self.systems: list[SystemProcess] = []
        # a lab restarted on its data directory keeps its ports: the registrations hold them
        before: dict[int, dict[str, Any]] = {}
        old = read_lab_state(data_dir, LAB_STOPPED) if free_ports else None
        for s in (old or {}).get("systems", []):
            if isinstance(s, dict) and s.get("dataDir") == str(data_dir / str(s.get("serial"))):
                before[s["serial"]] = {"rest_port": int(s["restPort"]), "nbd_port": int(s["nbdPort"]),
                                       "link_ports": [int(x) for x in s["linkPorts"].values()]}
                _taken.update([before[s["serial"]]["rest_port"], before[s["serial"]]["nbd_port"],
                               *before[s["serial"]]["link_ports"]])  # never handed to another system
        for i in range(n):
            serial = serial_base + i
            if free_ports and serial in before:
                ports: dict[str, Any] = before[serial]
            elif free_ports:
                ports = {}
            else:
                base = link_port_base + 100 * i
                ports = {"rest_port": rest_port + i, "nbd_port": nbd_port + i,
                         "link_ports": [base, base + 1, base + 2, base + 3]}
            self.systems.append(SystemProcess(data_dir / str(serial), serial, model, host, password=password,
                                              new_session=True, log_level=log_level, **ports))

    def client(self, i: int, **kwargs: object) -> VspClient:
        """A logged-in client of system ``i`` (1-based)."""
        return self.systems[i - 1].client(**kwargs)

    def start(self, timeout: float = 60.0) -> None:
        """Start every system (together), wait for their REST APIs, then register and link them."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for s in self.systems:
            s.launch()
        for s in self.systems:
            s.wait_ready(timeout)
        clients = [s.client() for s in self.systems]
        try:
            for a, b in self.links:
                self.path_groups[(a, b)] = connect_systems(clients[a - 1], clients[b - 1])
        finally:
            for c in clients:
                c.close()

    def stop(self) -> None:
        for s in self.systems:
            if s.proc is not None and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        for s in self.systems:
            s.stop()

    def registered_with(self, i: int) -> list[int]:
        return sorted({b for a, b in self.links if a == i} | {a for a, b in self.links if b == i})

    def state(self, supervisor_pid: int | None = None, console: dict[str, Any] | None = None) -> dict[str, Any]:
        """What ``lab.json`` holds: every system's addresses and process, the links, the console."""
        systems = []
        for i, s in enumerate(self.systems, 1):
            systems.append({
                "index": i, "serial": s.serial, "storageDeviceId": s.storage_device_id, "model": s.model,
                "restUrl": s.rest_url, "restPort": s.rest_port, "nbdHost": s.host, "nbdPort": s.nbd_port,
                "linkPorts": dict(zip(("CL3-A", "CL4-A", "CL3-B", "CL4-B"), s.link_ports, strict=True)),
                "dataDir": str(s.data_dir.resolve()), "cert": str(s.cert_path.resolve()),
                "log": str(s.log_path.resolve()), "pid": s.proc.pid if s.proc is not None else None,
                "registeredWith": [self.systems[j - 1].serial for j in self.registered_with(i)]})
        links = []
        for a, b in self.links:
            sa, sb = self.systems[a - 1], self.systems[b - 1]
            links.append({"systems": [sa.serial, sb.serial], "pathGroupId": LAB_PATH_GROUP,
                          "paths": [list(p) for p in LAB_PATHS],
                          "remotepathGroupIds": self.path_groups.get((a, b), {})})
        return {"version": 1, "topology": self.topology, "host": self.host, "model": self.model,
                "supervisorPid": supervisor_pid, "console": console, "systems": systems, "links": links}

    def write_state(self, supervisor_pid: int | None = None, console: dict[str, Any] | None = None) -> Path:
        return write_lab_state(self.data_dir, self.state(supervisor_pid, console))


def write_lab_state(data_dir: Path, state: dict[str, Any]) -> Path:
    import json

    path = data_dir / LAB_STATE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, path)
    return path


def read_lab_state(data_dir: Path, name: str = LAB_STATE) -> dict[str, Any] | None:
    """The lab's ``lab.json``, or None when no lab was started there (or it was stopped)."""
    import json

    try:
        state = json.loads((data_dir / name).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def process_alive(pid: object, *marks: str) -> bool:
    """``pid`` is a running vspemu process whose command line holds every one of ``marks`` (a recycled pid of
    another program is not ours to signal)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] == "Z":  # a zombie: exited, not yet reaped
        return False
    return "vspemu" in " ".join(cmdline) and all(m in cmdline for m in marks)


def stop_lab(data_dir: Path, timeout: float = 20.0) -> list[str]:
    """Stop what ``lab.json`` lists (the supervisor of a foreground ``vspemu up``, the console, every system)
    with SIGTERM, waiting for each; returns what was stopped. Removes ``lab.json``."""
    state = read_lab_state(data_dir)
    if state is None:
        return []
    targets: list[tuple[str, int]] = []
    sup = state.get("supervisorPid")
    if process_alive(sup, "up"):
        targets.append(("vspemu up", sup))  # type: ignore[arg-type]
    console = state.get("console") or {}
    if process_alive(console.get("pid"), "vspemu.console"):
        targets.append(("console", console["pid"]))
    for s in state.get("systems", []):
        if process_alive(s.get("pid"), "serve", str(s.get("dataDir"))):
            targets.append((f"storage {s.get('serial')}", s["pid"]))
    for _, pid in targets:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for _, pid in targets:
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    retire_lab_state(data_dir)
    return [name for name, _ in targets]


def retire_lab_state(data_dir: Path) -> None:
    """``lab.json`` becomes ``lab.stopped.json``: no lab runs there, and the next ``up --free-ports`` there takes
    the same ports again."""
    try:
        os.replace(data_dir / LAB_STATE, data_dir / LAB_STOPPED)
    except FileNotFoundError:
        pass


def start_console(data_dir: Path, host: str, port: int, timeout: float = 30.0) -> tuple[subprocess.Popen[bytes],
                                                                                          dict[str, Any]]:
    """Start the lab console (``python -m vspemu.console``: one status page for every system of the lab in
    ``data_dir``, whose ``lab.json`` must be written) and wait until it answers; returns the process and what
    ``lab.json`` records of it."""
    data_dir = data_dir.resolve()
    log = open(data_dir / "console.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen([sys.executable, "-m", "vspemu.console", "--data-dir", str(data_dir), "--host", host,
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log.close()
    url = f"https://{host}:{port}/lab"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the lab console exited ({proc.returncode}); see {data_dir / 'console.log'}:\n"
                               + (data_dir / "console.log").read_text()[-3000:])
        try:
            if httpx.get(url, verify=False, timeout=1.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"the lab console did not answer on {url}")
        time.sleep(0.1)
    return proc, {"url": url, "port": port, "pid": proc.pid,
                  "cert": str(data_dir / "console" / "tls" / "server.crt")}
