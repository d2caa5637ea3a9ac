"""The interfaces between the replication engine and the modules around it (types only, no behaviour).

:class:`ReplicationKind` is what the engine (:mod:`.engine`) calls per replication type: TrueCopy
(:mod:`.truecopy`) and Universal Replicator (:mod:`.ur`) implement it; GAD and the local copies add an
implementation (and a state table in :mod:`.states`) instead of branches in the engine.

The modules below the engine (the write path :mod:`.datapath`, the copier :mod:`.copier`, the peer-side
handlers :mod:`.peer`, the replicators :mod:`.truecopy` / :mod:`.ur`, the verifier :mod:`.verify`) reach the
engine through the Protocols here, never through the ``Replication`` class: the imports go one way (see
docs/architecture.md and tests/test_architecture.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from vspemu.replication.model import CopyGroup, Pair

if TYPE_CHECKING:
    from vspemu.replication.bitmap import DirtyBitmap
    from vspemu.replication.link import Link, PathGroup
    from vspemu.replication.states import StateTable
    from vspemu.replication.wire import PeerInfo
    from vspemu.system.storage import StorageSystem
    from vspemu.volumes.volume import Volume

# how a host write to a pair's volume travels (ReplicationKind.write_mode)
FORWARD = "forward"  # TrueCopy in PAIR: sent to the S-VOL before the host is answered
JOURNAL = "journal"  # UR in PAIR/PFUL: appended to the master journal, pulled by the secondary
LOCAL = "local"  # written here only, the bitmap marks it (suspended, copying, or the S side)
ACTIVE = "active"  # GAD in PAIR, either side: one order set by the P side, both volumes before the answer (.gad_io)


class ReplicationKind(Protocol):
    """One replication type, as the engine sees it (every hook is called on the event loop)."""

    replication_type: str  # "TC", "UR", ... (CopyGroup.replication_type)
    whole_group: bool  # operations act on whole copy groups (UR mirrors), not on single pairs

    @property
    def table(self) -> StateTable: ...

    def write_mode(self, pair: Pair) -> str:
        """FORWARD, JOURNAL or LOCAL for a host write of this pair's volume in its current status."""
        ...

    def check_create(self, group_name: str, group: CopyGroup | None, fence: str, mu_number: int | None,
                     journal_id: int | None) -> None:
        """The type's own checks of a create on the primary (``group``: the existing group, if any)."""
        ...

    def check_create_secondary(self, group: CopyGroup) -> None:
        """The type's own checks of a create on the secondary (the incoming group as this side records it)."""
        ...

    def group_created(self, group: CopyGroup) -> None:
        """A new group was recorded on the primary (inside the create's transaction)."""
        ...

    def secondary_created(self, group: CopyGroup) -> None:
        """A pair of the group was recorded on the secondary."""
        ...

    def group_forgotten(self, group: CopyGroup) -> None:
        """The group's last pair was deleted (or its create undone)."""
        ...

    def became_primary(self, group: CopyGroup) -> None:
        """After a swap, this side holds every P-VOL of the group."""
        ...

    def before_swap(self, group: CopyGroup) -> None:
        """Before the bitmaps of the group are exchanged for a swap or a resync."""
        ...

    def before_suspend(self, group: CopyGroup, pair: Pair) -> bool:
        """A pair is suspended by error; returns True if host writes of the P-VOL must be refused (fence)."""
        ...

    def copy_starting(self, group: CopyGroup) -> None:
        """A copy of a pair of the group starts (initial copy or resync)."""
        ...

    def copy_after_restart(self, pair: Pair, marked: int) -> bool:
        """After a restart: True if a P-side pair in PAIR with ``marked`` tracks must copy them (COPY) first."""
        ...

    async def peer_silent(self, group: CopyGroup, pairs: list[Pair]) -> None:
        """The other system did not answer the status polls for a while."""
        ...

    async def before_split(self, group: CopyGroup) -> None:
        """A split issued on the primary, with the group's write barrier held, before the statuses change."""
        ...

    async def split_on_secondary(self, group: CopyGroup, rw: bool) -> bool:
        """A split issued on the secondary: True if the type did it all itself (UR asks the primary)."""
        ...

    def mirror_stats(self, group: CopyGroup) -> dict[str, Any] | None:
        """Type-specific counters of a group for the stats page (None: nothing to show)."""
        ...

    def background_tasks(self) -> list[Coroutine[Any, Any, None]]:
        """The loops the type runs while the system runs (started by Replication.start)."""
        ...


class QuietHooks:
    """The hooks of :class:`ReplicationKind` a synchronous type (TrueCopy, GAD) has nothing to do in: a kind
    inherits these no-ops and writes only the hooks it needs."""

    def group_created(self, group: CopyGroup) -> None:
        return None

    def secondary_created(self, group: CopyGroup) -> None:
        return None

    def group_forgotten(self, group: CopyGroup) -> None:
        return None

    def became_primary(self, group: CopyGroup) -> None:
        return None

    def before_swap(self, group: CopyGroup) -> None:
        return None

    def copy_starting(self, group: CopyGroup) -> None:
        return None

    async def before_split(self, group: CopyGroup) -> None:
        return None

    async def split_on_secondary(self, group: CopyGroup, rw: bool) -> bool:
        return False

    def mirror_stats(self, group: CopyGroup) -> dict[str, Any] | None:
        return None


class Journaler(Protocol):
    """What the write path asks of Universal Replicator."""

    async def journal_write(self, pairs: list[Pair], volume: Volume, offset: int, length: int,
                            data: bytes | memoryview | None, fua: bool) -> bool: ...

    async def flush(self, pair: Pair) -> None: ...


class EngineCore(Protocol):
    """What the modules below the engine use of it: the records, the link, status changes."""

    system: StorageSystem
    link: Link
    remotes: Any
    groups: dict[str, CopyGroup]
    pairs: dict[str, Pair]
    ldev_pairs: dict[int, list[Pair]]
    barriers: dict[str, Any]  # group name -> datapath.WriteBarrier
    bitmaps: dict[str, DirtyBitmap]  # pair key -> the differential bitmap of its local volume

    def kind(self, group: CopyGroup) -> ReplicationKind: ...

    def bitmap(self, pair: Pair) -> DirtyBitmap: ...

    def pairs_of(self, ldev_id: int) -> list[Pair]: ...

    def group_pairs(self, group: str) -> list[Pair]: ...

    def get_pair(self, group: str, name: str) -> Pair: ...

    def select(self, group: CopyGroup, pair_name: str | None) -> list[Pair]: ...

    def peer(self, group: CopyGroup) -> PathGroup | None: ...

    def peer_group(self, peer: PeerInfo, name: str) -> CopyGroup: ...

    async def call(self, group: CopyGroup, msg: str, header: dict[str, Any], payload: bytes | memoryview = b"",
                   timeout: float | None = None) -> tuple[dict[str, Any], bytes]: ...

    async def try_call(self, group: CopyGroup, msg: str, header: dict[str, Any]) -> dict[str, Any] | None: ...

    def set_status(self, pair: Pair, status: str, peer_status: str | None = None) -> None: ...

    def save(self, pair: Pair) -> None: ...

    def save_group(self, group: CopyGroup) -> None: ...

    def background(self, coro: Coroutine[Any, Any, Any]) -> None: ...

    async def suspend_on_error(self, pair: Pair, reason: str) -> None: ...

    async def split(self, group_name: str, pair_name: str | None, *, svol_rw: bool = False,
                    ssws: bool = False, pvol_write_protect: bool = False) -> list[Pair]: ...


class PeerCore(EngineCore, Protocol):
    """What the peer-side handlers (:mod:`.peer`) use besides :class:`EngineCore`: the record keeping."""

    def index(self, pair: Pair, new: bool = False) -> None: ...

    def unindex(self, pair: Pair) -> None: ...

    def learn(self, group: CopyGroup, statuses: dict[str, str]) -> None: ...

    def become(self, group: CopyGroup, pairs: list[Pair], role: str) -> None: ...

    async def resync_after_swap(self, group: CopyGroup, pairs: list[Pair]) -> None: ...

    async def forget_held(self, group: CopyGroup, pairs: list[Pair]) -> None: ...

    def refuse_multi_target_swap(self, pairs: list[Pair]) -> None: ...


class CopyRuntime(Protocol):
    """The in-memory state of a pair's copy (engine.PairRuntime)."""

    copy_task: asyncio.Task[None] | None
    settled: asyncio.Event
    bytes_sent: int
    tracks_sent: int


class WritePathHost(Protocol):
    """What a paired volume's write path (:class:`.datapath.PairVolume`) calls: per pair, how a write
    travels, and the replicators that carry it."""

    groups: dict[str, CopyGroup]

    @property
    def ur(self) -> Journaler: ...

    def write_mode(self, pair: Pair) -> str: ...

    async def forward_write(self, pair: Pair, rep: Any, offset: int, length: int,
                            data: bytes | memoryview | None, fua: bool, write_local: Callable[[], None]) -> None: ...

    async def forward_flush(self, pair: Pair) -> None: ...

    async def active_write(self, pair: Pair, rep: Any, volume: Volume, offset: int, length: int,
                           data: bytes | memoryview | None, fua: bool) -> None: ...

    async def active_flush(self, pair: Pair) -> None: ...
