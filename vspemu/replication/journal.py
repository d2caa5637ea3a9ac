"""The master journal of Universal Replicator: a ring buffer of write entries on a journal volume's file.

Layout of the journal volume (its LDEV file)::

    [0, 4096)        header: magic "VSPJNL03", head offset, head sequence number, and per mirror (mu 0-3) its
                     floor: the last sequence number that is not for that mirror whatever its bits say
                     (set when a mirror starts or is purged; u64 each), then flags (u64: FLAG_REFS)
    [4096, size)     entries, one after the other, wrapping to 4096 at the end

    entry = magic u32 | flags u32 | seq u64 | ldev u32 | length u32 | offset u64 | crc32c u32 | pad to 64 | data

The checksum is CRC-32C (Castagnoli) over the first 32 bytes of the entry header and the data, computed
with the CPU's CRC instruction by the ``crc32c`` package (about 25 GB/s here, against 2.8 GB/s for zlib's
CRC-32, which cost a third of a millisecond per MiB on the host's write path). Entries have the format
of "VSPJNL02", whose header (without floors) is still read.

Entries start at multiples of 64 bytes, so the data of an entry is 64-byte aligned in the file (copies
into the page cache are markedly slower from or to unaligned addresses).

``flags`` bit 0 marks a zero range (no data follows), bit 1 a wrap marker (the rest of the volume is
unused; the next entry is at 4096), bit 2 an entry by reference (its place is reserved, its data is in the
P-VOL, its CRC covers the header only; it never travels in that form), and bits 8-11 the mirrors (mu 0-3)
the write was journaled for: a journal serves up to four mirrors (multi-target), and a write to a data
volume is for those of its pairs that were in PAIR or PFUL then. No mirror bit at all (entries written
before the bits existed) means every mirror. Sequence numbers grow by one per entry, forever (a purge does
not reset them), and every entry carries a CRC, so after a crash the tail is found by walking from the head
while the entries are valid and consecutive.

The backlog lives here, on the journal volume, not in memory: memory holds the head, the tail, the next
sequence number and an index of the live entries (place, size, what each is for: a few dozen bytes each).
Entries are freed (the head moves) when every mirror that needs them reports them restored (the caller
works out how far that is). The header is rewritten then without an fsync: after a crash the head may be
older, and the secondary receives entries it already restored again, which is harmless because it applies
them in order (a redo log).

**Entries by reference** (``append(..., ref=True)``, flag ``REF``): the entry's header is written and its
place in the ring reserved, but its data is not copied: it is still in the P-VOL, which is read when a
secondary pulls the entry (the entry then travels in the stored form, its CRC computed over what was read).
That holds as long as the P-VOL range is not written again, so a write (or discard) that overlaps a live
entry by reference first calls :meth:`MasterJournal.protect`, which reads the old bytes from the P-VOL and
writes them into the entry's reserved place (the entry becomes an ordinary one) before the P-VOL changes. A
sequential stream so writes 64 bytes per entry instead of a second copy of its data. A journal that holds
entries by reference is not replayed onto its P-VOLs after a restart (:data:`FLAG_REFS`): every entry but the
last was written to the P-VOL before the next one was journaled, and replaying an older entry would undo a
newer write; the caller replays only the last entry if it is not by reference.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from crc32c import crc32c

from vspemu.replication.receiver import BUFFERS

HEADER_SIZE = 4096
MAGIC = b"VSPJNL03"
OLD_MAGIC = b"VSPJNL02"  # the same without mirror floors (one mirror per journal)
_HDR = struct.Struct("<8sQQ4QQ")  # magic, head, head seq, floors, flags
MIRRORS = 4
ENTRY = struct.Struct("<IIQIIQII24x")  # 64 bytes
ENTRY_MAGIC = 0x4A4E4C45
ZERO = 1
WRAP = 2
MIRROR_SHIFT = 8  # flags bits 8-11: the mirrors (mu 0-3) an entry is for
MIRROR_MASK = 0xF << MIRROR_SHIFT
ALIGN = 64
REF = 4  # flags bit 2: the data is not stored here but in the P-VOL (see "Entries by reference")
FLAG_REFS = 2  # header flags: the journal holds (or held) entries by reference: never replayed as a whole
PAGE = 4096
TRACK = 256 << 10  # entries by reference are indexed by the P-VOL tracks they cover


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _pooled_view(n: int, file_pos: int = 0) -> tuple[mmap.mmap, memoryview]:
    """A pooled, page-aligned buffer and a view of ``n`` bytes in it, starting at the page offset ``file_pos`` has
    in a file: no fresh mapping and zero-filling per entry or batch (a fresh MiB costs page faults), and a copy
    between the view and the page cache at ``file_pos`` runs between equally aligned addresses (a bytearray's
    data start 16 bytes into a page: a third of the speed; see :mod:`vspemu.buffers`)."""
    lead = file_pos % PAGE
    buf = BUFFERS.get(lead + n)
    return buf, memoryview(buf)[lead:lead + n]


@dataclass
class Entry:
    seq: int
    ldev: int
    offset: int
    length: int
    zero: bool
    data: bytes | memoryview  # empty for a zero range
    mirrors: int = 0  # bit mu set: the entry is for mirror mu (0: every mirror, an entry of the old format)

    @property
    def size(self) -> int:
        return ENTRY.size + (0 if self.zero else _align(self.length))

    def is_for(self, mu: int, floor: int = 0) -> bool:
        return for_mirror(self.seq, self.mirrors, mu, floor)


def for_mirror(seq: int, mirrors: int, mu: int, floor: int = 0) -> bool:
    """Whether entry ``seq`` with the mirror bits ``mirrors`` is for mirror ``mu`` whose floor is ``floor``."""
    return seq > floor and (not mirrors or bool(mirrors >> mu & 1))


def _mirrors(flags: int) -> int:
    return (flags & MIRROR_MASK) >> MIRROR_SHIFT


class JournalFull(Exception):
    pass


class CorruptEntry(Exception):
    """An entry fails its checksum, or the next sequence number is not where it should be."""


def _checksum(header: bytes | memoryview, data: bytes | memoryview) -> int:
    """CRC-32C of an entry: the first 32 bytes of its header (the crc field excluded), then its data."""
    return crc32c(data, crc32c(header[:32]))


def parse_entries(raw: bytes | memoryview, first_seq: int) -> Iterator[Entry]:
    """The entries of ``raw`` (as :meth:`MasterJournal.read_raw` returns them: stored entries, one after
    the other, from ``first_seq`` on), each checked against its checksum; data are views of ``raw``.
    Raises CorruptEntry at an entry that is not whole, not the next in sequence, or fails its checksum."""
    view = memoryview(raw)
    at, seq = 0, first_seq
    while at < len(view):
        if at + ENTRY.size > len(view):
            raise CorruptEntry(f"entry {seq} is cut short")
        fields = _fields(view, at, seq)
        if fields is None or fields[0] & WRAP:
            raise CorruptEntry(f"entry {seq} is missing")
        flags, ldev, length, offset, crc = fields
        zero = bool(flags & ZERO)
        end = at + ENTRY.size + (0 if zero else length)
        if end > len(view):
            raise CorruptEntry(f"entry {seq} is cut short")
        data = b"" if zero else view[at + ENTRY.size:end]
        if _checksum(view[at:], data) != crc:
            raise CorruptEntry(f"entry {seq} fails its checksum")
        entry = Entry(seq, ldev, offset, length, zero, data, _mirrors(flags))
        yield entry
        at += entry.size
        seq += 1


def _fields(raw: bytes | memoryview, at: int, seq: int) -> tuple[int, int, int, int, int] | None:
    """(flags, ldev, length, offset, crc) of the entry or wrap marker ``seq`` whose header is at ``raw[at:]``,
    or None if no such entry starts there (another magic or sequence number: the end of the journal)."""
    magic, flags, eseq, ldev, length, offset, crc, _ = ENTRY.unpack_from(raw, at)
    if magic != ENTRY_MAGIC or eseq != seq:
        return None
    return flags, ldev, length, offset, crc


_ZEROS = bytes(ALIGN)


class _Slot:
    """One live entry (between head and tail): where it is in the ring and what it is for."""

    __slots__ = ("seq", "pos", "size", "flags", "ldev", "offset", "length")

    def __init__(self, seq: int, pos: int, size: int, flags: int, ldev: int, offset: int, length: int) -> None:
        self.seq, self.pos, self.size, self.flags = seq, pos, size, flags
        self.ldev, self.offset, self.length = ldev, offset, length

    def entry(self, data: bytes | memoryview = b"") -> Entry:
        return Entry(self.seq, self.ldev, self.offset, self.length, bool(self.flags & ZERO), data,
                     _mirrors(self.flags))


ReadSource = Callable[[int, int, memoryview], None]  # (ldev, offset, into): the P-VOL's bytes there


class MasterJournal:
    def __init__(self, path: Path, size: int, source: ReadSource | None = None) -> None:
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_RDWR)
        self.source = source  # reads a P-VOL (entries by reference)
        self.head = HEADER_SIZE
        self.head_seq = 1
        self.tail = HEADER_SIZE
        self.next_seq = 1
        self._slots: deque[_Slot] = deque()  # live entries, head first: _slots[i].seq == head_seq + i
        self._refs: dict[tuple[int, int], list[_Slot]] = {}  # (ldev, track) -> live entries by reference there
        self.flags = 0
        self.floors = [0] * MIRRORS
        self.held_full = False  # fault on demand: behave as full (see vspemu.system.faults)
        self.protected_bytes = 0  # counter: data of entries by reference copied in before an overwrite
        self._recover()

    @property
    def capacity(self) -> int:
        return self.size - HEADER_SIZE

    @property
    def count(self) -> int:
        return len(self._slots)

    @property
    def used(self) -> int:
        """Bytes between head and tail, the wrap gap included."""
        if not self._slots:
            return 0
        if self.tail > self.head:
            return self.tail - self.head
        return self.size - self.head + self.tail - HEADER_SIZE

    @property
    def by_reference(self) -> bool:
        return bool(self.flags & FLAG_REFS)

    def usage_rate(self) -> int:
        if self.held_full:
            return 100
        return min(100, self.used * 100 // self.capacity) if self.capacity > 0 else 100

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- header and recovery ------------------------------------------------------------------------
    def _write_header(self) -> None:
        os.pwrite(self.fd, _HDR.pack(MAGIC, self.head, self.head_seq, *self.floors, self.flags), 0)

    def set_floor(self, mu: int, seq: int) -> None:
        """No entry up to ``seq`` is for mirror ``mu`` any more (it starts, or its entries became bitmap marks).
        Made durable at once: a resync must never receive an entry from before it."""
        self.floors[mu] = seq
        self._write_header()
        os.fdatasync(self.fd)

    def is_for(self, entry: Entry, mu: int) -> bool:
        return entry.is_for(mu, self.floors[mu])

    def _recover(self) -> None:
        raw = os.pread(self.fd, _HDR.size, 0)
        if len(raw) == _HDR.size and raw[:8] in (MAGIC, OLD_MAGIC):
            _, head, head_seq, *floors, flags = _HDR.unpack(raw)
            if HEADER_SIZE <= head < self.size:
                self.head, self.head_seq = head, head_seq
                if raw[:8] == MAGIC:
                    self.floors, self.flags = floors, flags
        self.tail, self.next_seq = self.head, self.head_seq
        while True:
            pos, fields = self._header_at(self.tail, self.next_seq)
            if fields is None:
                if pos != self.tail:  # a wrap marker
                    self.tail = pos
                    continue
                break
            flags, ldev, length, offset, _ = fields
            slot = _Slot(self.next_seq, pos, ENTRY.size + (0 if flags & ZERO else _align(length)), flags, ldev,
                         offset, length)
            self._slots.append(slot)
            if flags & REF:
                self._index(slot)
            self.tail = pos + slot.size
            self.next_seq += 1
        if self._slots:
            self.head = self._slots[0].pos
        self._write_header()

    def reset(self) -> None:
        """Drop every entry (a purge: the caller has turned them into bitmap marks)."""
        self.head = self.tail = HEADER_SIZE
        self.head_seq = self.next_seq
        self._slots.clear()
        self._refs.clear()
        self._write_header()

    # -- the index of entries by reference --------------------------------------------------------------------
    def _tracks(self, s: _Slot) -> range:
        return range(s.offset // TRACK, (s.offset + max(s.length, 1) - 1) // TRACK + 1)

    def _index(self, s: _Slot) -> None:
        for t in self._tracks(s):
            self._refs.setdefault((s.ldev, t), []).append(s)

    def _unindex(self, s: _Slot) -> None:
        for t in self._tracks(s):
            key = (s.ldev, t)
            lst = self._refs.get(key)
            if lst is not None:
                if s in lst:
                    lst.remove(s)
                if not lst:
                    del self._refs[key]

    def protect(self, ldev: int, offset: int, length: int) -> int:
        """Before ``ldev`` is written in [offset, offset + length): the live entries by reference that overlap
        it get their data (the P-VOL's bytes as they are now) written into their places; returns how many."""
        if not self._refs:
            return 0
        end = offset + max(length, 1)
        hit: list[_Slot] = []
        for t in range(offset // TRACK, (end - 1) // TRACK + 1):
            for s in self._refs.get((ldev, t), ()):
                if s.offset < end and offset < s.offset + s.length and s not in hit:
                    hit.append(s)
        for s in sorted(hit, key=lambda x: x.seq):
            self._materialize(s)
        return len(hit)

    def _materialize(self, s: _Slot) -> None:
        buf, view = _pooled_view(s.size, s.pos)
        try:
            self._store(s, view)
            written = os.pwrite(self.fd, view, s.pos)
            del view
        finally:
            BUFFERS.put(buf)
        if written != s.size:
            raise OSError(f"journal {self.path.name}: short write of entry {s.seq}")
        self._unindex(s)
        s.flags &= ~REF
        self.protected_bytes += s.length

    def _store(self, s: _Slot, view: memoryview) -> None:
        """The stored form of entry by reference ``s`` into ``view`` (its ``size`` bytes): header with the CRC,
        the data as the P-VOL holds it now, zero padding."""
        if self.source is None:
            raise RuntimeError(f"journal {self.path.name}: entry {s.seq} is by reference and nothing reads LDEV "
                               f"{s.ldev}")
        data = view[ENTRY.size:ENTRY.size + s.length]
        self.source(s.ldev, s.offset, data)
        view[ENTRY.size + s.length:s.size] = _ZEROS[:s.size - ENTRY.size - s.length]
        flags = s.flags & ~REF
        head = ENTRY.pack(ENTRY_MAGIC, flags, s.seq, s.ldev, s.length, s.offset, 0, 0)
        ENTRY.pack_into(view, 0, ENTRY_MAGIC, flags, s.seq, s.ldev, s.length, s.offset, _checksum(head, data), 0)

    # -- reading ----------------------------------------------------------------------------------
    def _header_at(self, pos: int, seq: int) -> tuple[int, tuple[int, int, int, int, int] | None]:
        """The fields of entry ``seq`` at ``pos`` in the file (following a wrap marker), checked against its
        checksum, or (pos, None): (the place, the fields)."""
        if pos + ENTRY.size > self.size:
            return (HEADER_SIZE, None) if pos != HEADER_SIZE else (pos, None)
        raw = os.pread(self.fd, ENTRY.size, pos)
        if len(raw) < ENTRY.size:
            return pos, None
        fields = _fields(raw, 0, seq)
        if fields is None:
            return pos, None
        flags, ldev, length, offset, crc = fields
        if flags & WRAP:
            return HEADER_SIZE, None
        stored = not flags & (ZERO | REF)
        if pos + ENTRY.size + (_align(length) if not flags & ZERO else 0) > self.size:
            return pos, None
        data = os.pread(self.fd, length, pos + ENTRY.size) if stored else b""
        if _checksum(raw, data) != crc:
            return pos, None
        return pos, fields

    def _run(self, from_seq: int, max_bytes: int, mu: int | None) -> tuple[int, bool, bool]:
        """The run of entries from ``from_seq`` (live) that one read hands out: (count, by reference, own).

        Entries stored here and contiguous (never across the wrap), or entries by reference; up to about
        ``max_bytes`` of data (at least one entry); for mirror ``mu`` either only entries for it (``own``) or
        only entries that are not (their bytes are not needed)."""
        slots = self._slots
        i = from_seq - self.head_seq
        first = slots[i]
        floor = self.floors[mu] if mu is not None else 0
        own = mu is None or for_mirror(first.seq, _mirrors(first.flags), mu, floor)
        ref = bool(first.flags & REF)
        count = got = 0
        end = first.pos
        for j in range(i, len(slots)):
            s = slots[j]
            if count and got >= max_bytes:
                break
            if mu is not None and for_mirror(s.seq, _mirrors(s.flags), mu, floor) != own:
                break
            if own and (bool(s.flags & REF) != ref or (not ref and s.pos != end)):
                break
            end = s.pos + s.size
            got += 0 if s.flags & ZERO else s.length
            count += 1
        return count, ref, own

    def _raw(self, from_seq: int, count: int, ref: bool) -> bytes | memoryview:
        """The stored form (headers, data, padding) of ``count`` entries from ``from_seq`` of one run."""
        i = from_seq - self.head_seq
        first, last = self._slots[i], self._slots[i + count - 1]
        if not ref:
            n = last.pos + last.size - first.pos
            buf, view = _pooled_view(n, first.pos)
            BUFFERS.put(buf)  # (handed out again only once the link no longer holds the view)
            if os.preadv(self.fd, [view], first.pos) != n:
                raise RuntimeError(f"journal {self.path.name}: entries from {from_seq} are cut short")
            return view
        slots = list(itertools.islice(self._slots, i, i + count))
        n = sum(s.size for s in slots)
        buf, view = _pooled_view(n)
        BUFFERS.put(buf)  # (handed out again only once the link no longer holds the view)
        at = 0
        for s in slots:
            self._store(s, view[at:at + s.size])
            at += s.size
        return view

    def read(self, from_seq: int, max_bytes: int, reader: int = 0) -> list[Entry]:
        """Entries from ``from_seq`` on (at least one if any), up to about ``max_bytes`` of data, each checked
        against its checksum (``reader`` is accepted for older callers: the index makes cursors needless).

        Entries that follow one another in the file are read with one ``pread``; their data are views of it."""
        seq = max(from_seq, self.head_seq)
        out: list[Entry] = []
        total = 0
        while seq < self.next_seq and (not out or total < max_bytes):
            count, ref, _ = self._run(seq, max_bytes - total, None)
            try:
                batch = list(parse_entries(self._raw(seq, count, ref), seq))
            except CorruptEntry as e:
                raise RuntimeError(f"journal {self.path.name}: {e}") from None
            out += batch
            total += sum(0 if e.zero else e.length for e in batch)
            seq += count
        return out

    def read_raw(self, from_seq: int, max_bytes: int, mu: int = 0) -> tuple[bytes | memoryview, int, int, bool]:
        """The entries from ``from_seq`` on as they are stored (headers, data, padding), for mirror ``mu``:
        (raw, first seq, count, own). Stored entries are read with one ``pread`` and not copied again; the data
        of entries by reference are read from their P-VOLs.

        Up to about ``max_bytes`` of data, at least one entry if any, never across the wrap, and either only
        entries for the mirror (``own``) or only entries that are not (then ``raw`` is empty: the mirror
        only has to count them). Checksums are left to the reader (:func:`parse_entries`), which makes the
        check end to end."""
        if from_seq < self.head_seq:
            from_seq = self.head_seq
        if from_seq >= self.next_seq:
            return b"", from_seq, 0, True
        count, ref, own = self._run(from_seq, max_bytes, mu)
        if not own:
            return b"", from_seq, count, False
        return self._raw(from_seq, count, ref), from_seq, count, True

    # -- writing ----------------------------------------------------------------------------------
    def _place(self, need: int) -> int | None:
        """Where an entry of ``need`` bytes goes, or None if it does not fit now."""
        if need > self.capacity - ENTRY.size:
            return None
        if not self._slots:
            if self.tail != HEADER_SIZE or self.head != HEADER_SIZE:
                self.head = self.tail = HEADER_SIZE
                self._write_header()
            return HEADER_SIZE
        if self.tail > self.head:  # entries in [head, tail): room at the end, then at the start
            if self.tail + need <= self.size:
                return self.tail
            return HEADER_SIZE if HEADER_SIZE + need < self.head else None
        return self.tail if self.tail + need < self.head else None  # wrapped: room in [tail, head)

    def fits(self, length: int, zero: bool = False) -> bool:
        if self.held_full:  # fault on demand (journal-full): no room for anything
            return False
        return self._place(ENTRY.size + (0 if zero else _align(length))) is not None

    def append(self, ldev: int, offset: int, data: bytes | memoryview | None, length: int, mirrors: int = 0,
               ref: bool = False) -> int:
        """Write one entry for the ``mirrors`` (bit mu per mirror; 0 = all); returns its sequence number.
        Raises JournalFull if there is no room. With ``ref`` (and a ``source``) a data entry is written by
        reference: its data stays in the P-VOL (see the module); the caller has called :meth:`protect`."""
        zero = data is None
        need = ENTRY.size + (0 if zero else _align(length))
        pos = self._place(need)
        if pos is None:
            raise JournalFull(f"journal {self.path.name} is full ({self.usage_rate()}%)")
        ref = ref and not zero and self.source is not None
        if ref and not self.flags & FLAG_REFS:
            self.flags |= FLAG_REFS
            self._write_header()
            os.fdatasync(self.fd)
        seq = self.next_seq
        if pos != self.tail:  # wrap: mark the end as unused
            if self.tail + ENTRY.size <= self.size:
                os.pwrite(self.fd, ENTRY.pack(ENTRY_MAGIC, WRAP, seq, 0, 0, 0, 0, 0), self.tail)
            self.tail = pos
        flags = (ZERO if zero else REF if ref else 0) | (mirrors & 0xF) << MIRROR_SHIFT
        head = ENTRY.pack(ENTRY_MAGIC, flags, seq, ldev, length, offset, 0, 0)
        stored = not (zero or ref)
        crc = _checksum(head, data if stored else b"")  # type: ignore[arg-type]
        head = ENTRY.pack(ENTRY_MAGIC, flags, seq, ldev, length, offset, crc, 0)
        if not stored:
            os.pwrite(self.fd, head, pos)
        else:
            pad = need - ENTRY.size - length
            os.pwritev(self.fd, [head, data, bytes(pad)] if pad else [head, data], pos)  # type: ignore[list-item]
        slot = _Slot(seq, pos, need, flags, ldev, offset, length)
        self._slots.append(slot)
        if ref:
            self._index(slot)
        self.tail = pos + need
        self.next_seq += 1
        return seq

    def free(self, upto_seq: int) -> int:
        """Free every entry up to ``upto_seq`` (restored by the secondary); returns how many."""
        freed = 0
        slots = self._slots
        while slots and slots[0].seq <= upto_seq:
            s = slots.popleft()
            if s.flags & REF:
                self._unindex(s)
            self.head_seq += 1
            freed += 1
        if freed:
            self.head = slots[0].pos if slots else self.tail
            self._write_header()
        return freed

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def pending(self) -> list[Entry]:
        """Every entry not yet freed, in order, without data (to turn them into bitmap marks)."""
        return [s.entry() for s in self._slots]
