"""Everything one storage system process holds, handed to the API routes."""

from __future__ import annotations

from dataclasses import dataclass

from vspemu.jobs import Jobs
from vspemu.system.sessions import Sessions
from vspemu.system.storage import StorageSystem


@dataclass
class StorageContext:
    system: StorageSystem
    sessions: Sessions
    jobs: Jobs
    rest_host: str = "127.0.0.1"
    rest_port: int = 443
    nbd_host: str = "127.0.0.1"
    nbd_port: int | None = None

    def journal_ldevs(self, journal_id: int) -> list[int]:
        """The LDEVs that are journal volumes of a journal (none until journals exist)."""
        return []
