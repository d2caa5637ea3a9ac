"""Fixtures: real storage-system processes over HTTPS on free ports, each with its own data dir."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vspemu.client import VspClient
from vspemu.lab import SystemProcess

_serials = itertools.count(420001)

MakeSystem = Callable[..., SystemProcess]


@pytest.fixture
def make_system(tmp_path: Path) -> Iterator[MakeSystem]:
    """Start storage systems: ``make_system()`` or ``make_system(serial=410001)``; all stop at the end."""
    started: list[SystemProcess] = []

    def make(serial: int | None = None, **kwargs: object) -> SystemProcess:
        serial = serial or next(_serials)
        proc = SystemProcess(tmp_path / f"sys-{serial}", serial, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def system(make_system: MakeSystem) -> SystemProcess:
    """One running storage system."""
    return make_system()


@pytest.fixture
def api(system: SystemProcess) -> Iterator[VspClient]:
    """A logged-in SDK client of ``system``."""
    with system.client() as c:
        yield c


@pytest.fixture
def linked(make_system: MakeSystem) -> Iterator[tuple[SystemProcess, SystemProcess, VspClient, VspClient]]:
    """Two systems registered with each other, with path groups in both directions: (p, s, pc, sc)."""
    from vspemu.lab import link_systems

    p, s = make_system(), make_system()
    pc, sc = p.client(), s.client()
    link_systems(pc, sc)
    yield p, s, pc, sc
    pc.close()
    sc.close()


def primary_and_two_secondaries(make_system: MakeSystem, journals: tuple[int, ...]
                                ) -> tuple[list[SystemProcess], list[VspClient], list[list[int]]]:
    """Three systems, the first registered with each of the others; a 16 MiB journal 1 on the systems at the
    indexes ``journals``; on every system two 32 MiB volumes with LUNs, the first system's holding 8 MiB of
    random data: (systems, clients, volumes)."""
    from vspemu.client.nbd import NbdClient
    from vspemu.lab import link_systems

    systems = [make_system() for _ in range(3)]
    clients = [s.client() for s in systems]
    link_systems(clients[0], clients[1])
    link_systems(clients[0], clients[2])
    for i in journals:
        clients[i].create_journal(1, [clients[i].create_ldev("16M")])
    volumes = []
    for c in clients:
        volumes.append([c.create_ldev("32M") for _ in range(2)])
        for v in volumes[-1]:
            c.add_lun(v)
    for v in volumes[0]:
        with NbdClient("127.0.0.1", systems[0].nbd_port, str(v)) as nbd:
            nbd.write(0, os.urandom(8 << 20))
    return systems, clients, volumes
