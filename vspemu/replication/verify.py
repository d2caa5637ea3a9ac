"""Online verify of pairs (like DRBD's online verify): compare P-VOL and S-VOL by per-track checksums.

The system that holds the P-VOLs drives a verify. For each batch of tracks (the differential bitmap's
256 KiB tracks, :data:`BATCH` at a time) it hashes its own tracks in a worker thread and, at the same time,
asks the other system for the digests of the same tracks of the S-VOL with the link message ``verify.sums``
(header ``{ldev, from_track, count, algo}``, reply payload = ``count`` packed digests of :data:`DIGEST`
bytes: never the data). Both sides therefore read and hash in parallel, each on its own disk and CPU.
Reads are large (:data:`READ_CHUNK`), done with ``os.preadv`` into a reused buffer; hashing releases the GIL.

What is compared and when:

* TrueCopy in PAIR: writes continue while the verify runs, so a track written during the verify may hash
  differently on the two sides for a moment. Tracks found differing are hashed again, once, on both sides
  (after the first pass) and only those that still differ are reported. A track under continuous writes may
  still show.
* TrueCopy split or suspended (PSUS, PSUE): a plain comparison. Tracks the host wrote since the split are
  already marked in the P-VOL's bitmap; the report counts them (``alreadyMarked``).
* Universal Replicator: only after a split (PSUS/PSUE/PFUS), e.g. a flush split, when the S-VOL holds the
  whole journal up to the split. In PAIR/COPY/PFUL the S-VOL lags by the journal not yet restored, so a
  comparison would report that lag, not damage: refused (KART40062-E).
* TrueCopy in COPY: refused (the copy is still writing the S-VOL).

``mark``: the differing tracks are set in the P-VOL's differential bitmap (persisted), so the next resync
copies them. Marking is done only on a split/suspended pair: on PAIR ``mark`` is refused (split, verify with
mark, resync); a pair in PAIR does not read its bitmap, and a resync is what repairs tracks on the array too.

Hash: SHA-1 (truncated to 16 bytes) by default: with the SHA extensions of current x86 CPUs it measured
~1.8x faster than BLAKE2b on the development machine (775 vs 440 MB/s per core, 256 KiB tracks); the digest
only has to tell accidental differences apart. ``blake2b`` (digest_size 16) may be asked for instead.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from vspemu.errors import VspError, not_found
from vspemu.replication.bitmap import TRACK
from vspemu.replication.model import COPY, PAIR, PFUL, PFUS, PSUE, PSUS, CopyGroup, Pair
from vspemu.replication.wire import PeerInfo

if TYPE_CHECKING:
    from vspemu.replication.kinds import EngineCore

MSG = "verify.sums"
DIGEST = 16
BATCH = 128  # tracks per request (32 MiB)
MAX_COUNT = 4096  # tracks a verify.sums request may ask for (1 GiB)
READ_CHUNK = 32  # tracks per read (8 MiB)
WINDOW = 2  # batches in flight
MAX_LIST = 1000  # track numbers a report may list
MAX_REPORTS = 64
DEFAULT_ALGO = "sha1"


def _sha1(b: memoryview) -> bytes:
    return hashlib.sha1(b).digest()[:DIGEST]


def _blake2b(b: memoryview) -> bytes:
    return hashlib.blake2b(b, digest_size=DIGEST).digest()


ALGOS: dict[str, Callable[[memoryview], bytes]] = {"sha1": _sha1, "blake2b": _blake2b}
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(2, thread_name_prefix="vspemu-verify")
    return _pool


def hash_tracks(fd: int, size: int, first: int, count: int, algo: str = DEFAULT_ALGO) -> bytes:
    """The packed digests of tracks ``first .. first+count-1`` of the volume (file) ``fd`` of ``size`` bytes.

    Blocking: run it in a worker thread. A file shorter than the volume reads as zeros past its end."""
    fn = ALGOS[algo]
    out = bytearray()
    buf = bytearray(READ_CHUNK * TRACK)
    view = memoryview(buf)
    t = first
    end = min(first + count, -(-size // TRACK))
    while t < end:
        n = min(READ_CHUNK, end - t)
        offset = t * TRACK
        length = min(n * TRACK, size - offset)
        if _is_hole(fd, offset, length):  # a thin volume's unwritten range: zeros, not worth reading
            out += b"".join(_zero_digest(algo, min(TRACK, length - i * TRACK)) for i in range(n))
            t += n
            continue
        got = 0
        while got < length:
            r = os.preadv(fd, [view[got:length]], offset + got)
            if r == 0:
                view[got:length] = bytes(length - got)
                break
            got += r
        for i in range(n):
            out += fn(view[i * TRACK:min((i + 1) * TRACK, length)])
        t += n
    return bytes(out)


def _is_hole(fd: int, offset: int, length: int) -> bool:
    """True when the file holds no data in ``[offset, offset+length)`` (reads as zeros)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as e:
        return e.errno == errno.ENXIO  # no data after offset at all


@functools.cache
def _zero_digest(algo: str, length: int) -> bytes:
    return ALGOS[algo](memoryview(bytes(length)))


def _differing(a: bytes, b: bytes) -> np.ndarray:
    """Indexes of the digests that differ between two packed digest strings of equal length."""
    x = np.frombuffer(a, dtype=np.uint8).reshape(-1, DIGEST)
    y = np.frombuffer(b, dtype=np.uint8).reshape(-1, DIGEST)
    return np.nonzero((x != y).any(axis=1))[0]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Verifier:
    """Verify of one system's pairs; serves ``verify.sums`` for its S-VOLs."""

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self.reports: dict[str, dict[str, Any]] = {}  # "group" or "group/pair" -> the last report
        engine.link.register_handler(MSG, self._h_sums)

    # -- the S side -----------------------------------------------------------------------------------
    async def _h_sums(self, peer: PeerInfo, h: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        eng = self.engine
        try:
            ldev_id, first, count = int(h["ldev"]), int(h["from_track"]), int(h["count"])
        except (KeyError, TypeError, ValueError) as e:
            raise VspError("INVALID_VALUE", attribute="verify.sums header", value=str(h)[:100],
                           cause="ldev, from_track and count are integers") from e
        algo = str(h.get("algo", DEFAULT_ALGO))
        pairs = eng.ldev_pairs.get(ldev_id) or []
        ok = False
        for p in pairs:
            g = eng.groups.get(p.group)
            if g is not None and p.role == "S" and g.remote_device_id == peer.storage_device_id:
                ok = True
        vol = eng.system.volumes.get(ldev_id)
        if not ok or vol is None:
            raise VspError("WRONG_STATE", detail=f"ldev {ldev_id} is not an S-VOL of a pair with "
                                                 f"{peer.storage_device_id}")
        ntracks = -(-vol.size // TRACK)
        if algo not in ALGOS or first < 0 or count < 0 or count > MAX_COUNT or first + count > ntracks:
            raise VspError("INVALID_VALUE", attribute="verify.sums", value=f"{algo} {first}+{count}",
                           cause=f"the S-VOL has {ntracks} tracks; at most {MAX_COUNT} per request")
        if vol.behind is not None:  # host writes not yet in the file: in it first (hashing reads the file)
            vol.behind.drain_sync()
        sums = await asyncio.get_running_loop().run_in_executor(
            _executor(), hash_tracks, vol.fd, vol.size, first, count, algo)
        return {"count": count}, sums

    # -- the P side -----------------------------------------------------------------------------------
    def check(self, group: CopyGroup, pair_name: str | None, mark: bool) -> list[Pair]:
        """The pairs a verify would compare; raises (changing nothing) when it cannot run now."""
        eng = self.engine
        pairs = eng.select(group, pair_name)
        if group.role != "P" or any(p.role != "P" for p in pairs):
            raise VspError("WRONG_STATE", detail=f"copy group {group.name}: send the verify to the storage "
                                                 "system that holds the P-VOLs")
        for p in pairs:
            where = f"pair {group.name},{p.name} is {p.status}"
            if p.status == COPY:
                raise VspError("WRONG_STATE", detail=f"{where}: the copy is still writing the S-VOL; verify "
                                                     "once the pair is PAIR or split")
            if group.replication_type == "UR" and p.status in (PAIR, PFUL):
                raise VspError("WRONG_STATE", detail=f"{where}: a Universal Replicator S-VOL lags the P-VOL by "
                                                     "the journal not yet restored; split the mirror (a flush "
                                                     "split) and verify the PSUS pair")
            if p.status not in (PAIR, PSUS, PSUE, PFUS):
                raise VspError("WRONG_STATE", detail=f"{where}: verify needs PAIR or a split/suspended pair")
            if mark and p.status == PAIR:
                raise VspError("WRONG_STATE", detail=f"{where}: tracks are marked for the next resync only on a "
                                                     "split pair; split it, verify with mark, then resync")
            if p.local_ldev not in eng.system.volumes or p.key not in eng.bitmaps:
                raise VspError("WRONG_STATE", detail=f"{where}: its P-VOL has no volume")
        return pairs

    def report(self, group_name: str, pair_name: str | None) -> dict[str, Any]:
        key = group_name if pair_name is None else f"{group_name}/{pair_name}"
        r = self.reports.get(key)
        if r is None:
            raise not_found("verify report of", key.replace("/", ","))
        return r

    async def run(self, group: CopyGroup, pair_name: str | None, mark: bool, max_list: int = 100,
                  algo: str = DEFAULT_ALGO) -> dict[str, Any]:
        """Verify the pairs (all of the group, or one); the report is also kept for :meth:`report`."""
        pairs = self.check(group, pair_name, mark)
        key = group.name if pair_name is None else f"{group.name}/{pair_name}"
        started = time.time()
        report: dict[str, Any] = {
            "copyGroupName": group.name, "copyPairName": pair_name, "state": "Running", "hash": algo,
            "trackSize": TRACK, "mark": mark, "startedTime": _iso(started), "pairs": [],
        }
        self.reports.pop(key, None)
        self.reports[key] = report
        while len(self.reports) > MAX_REPORTS:
            self.reports.pop(next(iter(self.reports)))
        try:
            for p in pairs:
                report["pairs"].append(await self._verify_pair(group, p, mark, max_list, algo))
        except VspError as e:
            report.update(state="Failed", error=e.message)
            raise
        except Exception as e:
            report.update(state="Failed", error=type(e).__name__)
            raise
        finally:
            report["seconds"] = round(time.time() - started, 3)
        report["differingTrackCount"] = sum(x["differingTrackCount"] for x in report["pairs"])
        report["differingBytes"] = sum(x["differingBytes"] for x in report["pairs"])
        report["state"] = "Completed"
        report["completedTime"] = _iso(time.time())
        return report

    async def _sums(self, group: CopyGroup, pair: Pair, first: int, count: int, algo: str) -> tuple[bytes, bytes]:
        vol = self.engine.system.volumes[pair.local_ldev]
        if vol.behind is not None:
            vol.behind.drain_sync()
        loop = asyncio.get_running_loop()
        local = loop.run_in_executor(_executor(), hash_tracks, vol.fd, vol.size, first, count, algo)
        remote = self.engine.call(group, MSG, {"ldev": pair.remote_ldev, "from_track": first, "count": count,
                                               "algo": algo}, timeout=120.0)
        mine, (_, theirs) = await asyncio.gather(local, remote)
        if len(theirs) != len(mine):
            raise VspError("WRONG_STATE", detail=f"the S-VOL {pair.remote_ldev} answered {len(theirs)} digest "
                                                 f"bytes for {len(mine)}: its size differs from the P-VOL's")
        return mine, bytes(theirs)

    async def _verify_pair(self, group: CopyGroup, pair: Pair, mark: bool, max_list: int,
                           algo: str) -> dict[str, Any]:
        vol = self.engine.system.volumes[pair.local_ldev]
        ntracks = -(-vol.size // TRACK)
        diff: list[int] = []
        sem = asyncio.Semaphore(WINDOW)

        async def batch(first: int) -> list[int]:
            async with sem:
                n = min(BATCH, ntracks - first)
                mine, theirs = await self._sums(group, pair, first, n, algo)
                return [first + int(i) for i in _differing(mine, theirs)]

        for found in await asyncio.gather(*(batch(f) for f in range(0, ntracks, BATCH))):
            diff.extend(found)
        rechecked = False
        if diff and pair.status == PAIR:  # writes go on: a track written meanwhile may differ for a moment
            rechecked = True
            still: list[int] = []
            for t in diff:
                mine, theirs = await self._sums(group, pair, t, 1, algo)
                if mine != theirs:
                    still.append(t)
            diff = still
        bm = self.engine.bitmap(pair)
        already = sum(1 for t in diff if bm.is_set(t))
        nbytes = sum(min(TRACK, vol.size - t * TRACK) for t in diff)
        if mark and diff and pair.status not in (PSUS, PSUE, PFUS):  # resynced while the verify ran
            raise VspError("WRONG_STATE", detail=f"pair {group.name},{pair.name} became {pair.status} during "
                                                 "the verify: nothing was marked; split it and verify again")
        if mark and diff:
            bm.set_ranges([(t * TRACK, TRACK) for t in diff])
        return {
            "copyPairName": pair.name, "pvolLdevId": pair.local_ldev, "svolLdevId": pair.remote_ldev,
            "status": pair.status, "tracks": ntracks, "differingTrackCount": len(diff),
            "differingTracks": diff[:max(0, min(max_list, MAX_LIST))], "differingBytes": nbytes,
            "alreadyMarked": already, "marked": len(diff) if mark else 0, "rechecked": rechecked,
        }
