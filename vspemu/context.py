"""Everything one storage system process holds, handed to the API routes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vspemu.jobs import Jobs
from vspemu.system.journals import Journals
from vspemu.system.sessions import Sessions
from vspemu.system.storage import StorageSystem

if TYPE_CHECKING:
    from vspemu.localcopy.shadowimage import ShadowImages
    from vspemu.localcopy.snapshot import Snapshots
    from vspemu.replication.engine import Replication
    from vspemu.replication.link import Link
    from vspemu.system.faults import Faults
    from vspemu.system.quorum import QuorumDisks
    from vspemu.system.remotes import Remotes


@dataclass
class StorageContext:
    system: StorageSystem
    sessions: Sessions
    jobs: Jobs
    rest_host: str = "127.0.0.1"
    rest_port: int = 443
    nbd_host: str = "127.0.0.1"
    nbd_port: int | None = None
    journals: Journals = field(init=False)
    # the replication link and the remote systems (set by the server; None when built without a link)
    link: Link | None = None
    remotes: Remotes | None = None
    replication: Replication | None = None  # pairs and copy groups (set by the server)
    faults: Faults | None = None  # faults on demand (set by the server)
    snapshots: Snapshots | None = None  # Thin Image snapshots (set by the server)
    quorum: QuorumDisks | None = None  # external volumes and quorum disks for GAD (set by the server)
    shadow_images: ShadowImages | None = None  # ShadowImage pairs (set by the server)

    def __post_init__(self) -> None:
        self.journals = Journals(self.system)

    def journal_ldevs(self, journal_id: int) -> list[int]:
        """The LDEVs that are journal volumes of a journal."""
        return self.journals.ldevs_of(journal_id)
