"""The master journal of Universal Replicator: a ring buffer of write entries on a journal volume's file.

Layout of the journal volume (its LDEV file)::

    [0, 4096)        header: magic "VSPJNL03", head offset, head sequence number, and per mirror (mu 0-3) its
                     floor: the last sequence number that is not for that mirror whatever its bits say
                     (set when a mirror starts or is purged; u64 each)
    [4096, size)     entries, one after the other, wrapping to 4096 at the end

    entry = magic u32 | flags u32 | seq u64 | ldev u32 | length u32 | offset u64 | crc32c u32 | pad to 64 | data

The checksum is CRC-32C (Castagnoli) over the first 32 bytes of the entry header and the data, computed
with the CPU's CRC instruction by the ``crc32c`` package (about 25 GB/s here, against 2.8 GB/s for zlib's
CRC-32, which cost a third of a millisecond per MiB on the host's write path). Entries have the format
of "VSPJNL02", whose header (without floors) is still read.

Entries start at multiples of 64 bytes, so the data of an entry is 64-byte aligned in the file (copies
into the page cache are markedly slower from or to unaligned addresses).

``flags`` bit 0 marks a zero range (no data follows), bit 1 a wrap marker (the rest of the volume is
unused; the next entry is at 4096), and bits 8-11 the mirrors (mu 0-3) the write was journaled for: a
journal serves up to four mirrors (multi-target), and a write to a data volume is for those of its pairs
that were in PAIR or PFUL then. No mirror bit at all (entries written before the bits existed) means
every mirror. Sequence numbers grow by one per entry, forever (a purge does not
reset them), and every entry carries a CRC, so after a crash the tail is found by walking from the head
while the entries are valid and consecutive.

The backlog lives here, on the journal volume, not in memory: memory holds only the head, the tail, the
next sequence number and a read cursor per mirror. Entries are freed (the head moves) when every mirror
that needs them reports them restored (the caller works out how far that is). The header is rewritten
then without an fsync: after a crash the head may be older, and the secondary receives entries it already
restored again, which is harmless because it applies them in order (a redo log).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from crc32c import crc32c

HEADER_SIZE = 4096
MAGIC = b"VSPJNL03"
OLD_MAGIC = b"VSPJNL02"  # the same without mirror floors (one mirror per journal)
_HDR = struct.Struct("<8sQQ4Q")
MIRRORS = 4
ENTRY = struct.Struct("<IIQIIQII24x")  # 64 bytes
ENTRY_MAGIC = 0x4A4E4C45
ZERO = 1
WRAP = 2
MIRROR_SHIFT = 8  # flags bits 8-11: the mirrors (mu 0-3) an entry is for
MIRROR_MASK = 0xF << MIRROR_SHIFT
ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


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


class MasterJournal:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_RDWR)
        self.head = HEADER_SIZE
        self.head_seq = 1
        self.tail = HEADER_SIZE
        self.next_seq = 1
        self.count = 0
        self.used = 0  # bytes between head and tail, wrap gaps included
        self._cursors: dict[int, tuple[int, int]] = {}  # reader (mirror) -> (offset, seq) of its next entry
        self.floors = [0] * MIRRORS
        self.held_full = False  # fault on demand: behave as full (see vspemu.system.faults)
        self._recover()

    @property
    def capacity(self) -> int:
        return self.size - HEADER_SIZE

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
        os.pwrite(self.fd, _HDR.pack(MAGIC, self.head, self.head_seq, *self.floors), 0)

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
            _, head, head_seq, *floors = _HDR.unpack(raw)
            if HEADER_SIZE <= head < self.size:
                self.head, self.head_seq = head, head_seq
                self.floors = floors if raw[:8] == MAGIC else [0] * MIRRORS
        self.tail, self.next_seq = self.head, self.head_seq
        self.count = self.used = 0
        while True:
            pos, entry = self._read_at(self.tail, self.next_seq)
            if entry is None:
                if pos != self.tail:  # a wrap marker
                    self.used += self.size - self.tail
                    self.tail = pos
                    continue
                break
            self.used += entry.size
            self.tail = pos + entry.size
            self.next_seq += 1
            self.count += 1
        self._write_header()

    def reset(self) -> None:
        """Drop every entry (a purge: the caller has turned them into bitmap marks)."""
        self.head = self.tail = HEADER_SIZE
        self.head_seq = self.next_seq
        self.count = self.used = 0
        self._cursors.clear()
        self._write_header()

    # -- reading ----------------------------------------------------------------------------------
    def _read_at(self, pos: int, seq: int, with_data: bool = True) -> tuple[int, Entry | None]:
        """The entry with sequence ``seq`` at ``pos`` (following a wrap marker), or (pos, None)."""
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
        zero = bool(flags & ZERO)
        if not zero and pos + ENTRY.size + length > self.size:
            return pos, None
        data = b""
        if with_data:
            if not zero:
                data = os.pread(self.fd, length, pos + ENTRY.size)
            if _checksum(raw, data) != crc:
                return pos, None
        return pos, Entry(seq, ldev, offset, length, zero, data, _mirrors(flags))

    def _start(self, from_seq: int) -> tuple[int, int]:
        """(offset, seq) to walk from to reach ``from_seq``: the nearest read cursor at or before it, or the head."""
        best = (self.head, self.head_seq)
        for pos, seq in self._cursors.values():
            if best[1] < seq <= from_seq:
                best = (pos, seq)
        return best

    def read(self, from_seq: int, max_bytes: int, reader: int = 0) -> list[Entry]:
        """Entries from ``from_seq`` on (at least one if any), up to about ``max_bytes`` of data.

        Each ``reader`` (a mirror) has its own cursor, so readers at different places do not walk from the
        head. The entries that follow one another in the file are read with one ``pread`` (a batch of 4 KiB
        writes would otherwise cost two system calls per entry); their data are views of that buffer."""
        if from_seq < self.head_seq:
            from_seq = self.head_seq
        if from_seq >= self.next_seq:
            return []
        pos, seq = self._start(from_seq)
        out: list[Entry] = []
        total = 0
        while seq < self.next_seq and (not out or total < max_bytes):
            run, pos, seq = self._read_run(pos, seq, max_bytes - total)
            if not run:  # a wrap marker, or an entry larger than the run read: this one alone
                npos, entry = self._read_at(pos, seq)
                if entry is None:
                    if npos != pos:
                        pos = npos
                        continue
                    raise RuntimeError(f"journal {self.path.name}: entry {seq} is missing or corrupt")
                run, pos, seq = [entry], npos + entry.size, seq + 1
            for entry in run:
                if entry.seq >= from_seq:
                    out.append(entry)
                    total += entry.length if not entry.zero else 0
        self._cursors[reader] = (pos, seq)
        return out

    def _seek(self, from_seq: int) -> tuple[int, int]:
        """(offset, seq) of entry ``from_seq`` (head_seq <= from_seq < next_seq), walking entry headers from the
        nearest cursor."""
        pos, seq = self._start(from_seq)
        while seq < from_seq:
            npos, entry = self._read_at(pos, seq, with_data=False)
            if entry is None:
                if npos != pos:
                    pos = npos
                    continue
                raise RuntimeError(f"journal {self.path.name}: entry {seq} is missing or corrupt")
            pos, seq = npos + entry.size, seq + 1
        return pos, seq

    def _header_of(self, pos: int, seq: int) -> tuple[int, tuple[int, int, int, int, int]]:
        """(offset, header fields) of entry ``seq``, which is at ``pos`` or, after a wrap, at the start."""
        for _ in range(2):
            if pos + ENTRY.size <= self.size:
                raw = os.pread(self.fd, ENTRY.size, pos)
                fields = _fields(raw, 0, seq) if len(raw) == ENTRY.size else None
                if fields is None:
                    break
                if not fields[0] & WRAP:
                    return pos, fields
            pos = HEADER_SIZE
        raise RuntimeError(f"journal {self.path.name}: entry {seq} is missing or corrupt")

    def read_raw(self, from_seq: int, max_bytes: int, mu: int = 0) -> tuple[bytes | memoryview, int, int, bool]:
        """The entries from ``from_seq`` on as they are stored (headers, data, padding), read with one
        ``pread`` and not copied again, for mirror ``mu`` (its read cursor): (raw, first seq, count, own).

        Up to about ``max_bytes`` of data, at least one entry if any, never across the wrap, and either only
        entries for the mirror (``own``) or only entries that are not (then ``raw`` is empty: the mirror
        only has to count them). Checksums are left to the reader (:func:`parse_entries`), which makes the
        check end to end."""
        if from_seq < self.head_seq:
            from_seq = self.head_seq
        if from_seq >= self.next_seq:
            return b"", from_seq, 0, True
        pos, seq = self._seek(from_seq)
        pos, fields = self._header_of(pos, seq)
        end = self.tail if self.tail > pos else self.size
        first_size = ENTRY.size + (0 if fields[0] & ZERO else _align(fields[2]))
        buf = os.pread(self.fd, min(end - pos, max(first_size, max_bytes + ENTRY.size + 4096)), pos)
        at = count = got = 0  # at: where the next entry starts (the last one's padding may lie beyond buf)
        own = True
        floor = self.floors[mu]
        while at + ENTRY.size <= len(buf) and seq < self.next_seq and (not count or got < max_bytes):
            entry = _fields(buf, at, seq)
            if entry is None or entry[0] & WRAP:
                break
            fields = entry
            mine = for_mirror(seq, _mirrors(fields[0]), mu, floor)
            if not count:
                own = mine
            elif mine != own:
                break
            length = 0 if fields[0] & ZERO else fields[2]
            if at + ENTRY.size + length > len(buf):
                break
            at += ENTRY.size + _align(length)
            got += length
            count += 1
            seq += 1
        self._cursors[mu] = (pos + at, seq)
        if not own:
            return b"", from_seq, count, False
        return (buf if at >= len(buf) else memoryview(buf)[:at]), from_seq, count, True

    def _read_run(self, pos: int, seq: int, budget: int) -> tuple[list[Entry], int, int]:
        """The entries that follow one another from ``pos``, read with one ``pread``: (entries, pos, seq) after.

        Stops at a wrap marker, at the tail, at an entry not wholly in what was read, or once ``budget`` bytes
        of data are parsed (at least one entry if it fits); returns no entry if not even the first fits."""
        end = self.tail if self.tail > pos else self.size
        want = min(end - pos, max(budget, 0) + ENTRY.size + 4096)
        if want < ENTRY.size:
            return [], pos, seq
        buf = os.pread(self.fd, want, pos)
        view = memoryview(buf)
        run: list[Entry] = []
        at = got = 0
        while at + ENTRY.size <= len(buf) and seq < self.next_seq and (not run or got < budget):
            fields = _fields(buf, at, seq)
            if fields is None or fields[0] & WRAP:
                break
            flags, ldev, length, offset, crc = fields
            zero = bool(flags & ZERO)
            if at + ENTRY.size + (0 if zero else length) > len(buf):
                break
            data = b"" if zero else view[at + ENTRY.size:at + ENTRY.size + length]
            if _checksum(view[at:], data) != crc:
                raise RuntimeError(f"journal {self.path.name}: entry {seq} fails its checksum")
            entry = Entry(seq, ldev, offset, length, zero, data, _mirrors(flags))
            run.append(entry)
            got += 0 if zero else length
            at += entry.size
            seq += 1
        return run, pos + at, seq

    # -- writing ----------------------------------------------------------------------------------
    def _place(self, need: int) -> int | None:
        """Where an entry of ``need`` bytes goes, or None if it does not fit now."""
        if need > self.capacity - ENTRY.size:
            return None
        if self.count == 0:
            if self.tail != HEADER_SIZE or self.head != HEADER_SIZE:
                self.head = self.tail = HEADER_SIZE
                self._cursors.clear()
                self._write_header()
            self.used = 0
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

    def append(self, ldev: int, offset: int, data: bytes | memoryview | None, length: int, mirrors: int = 0) -> int:
        """Write one entry for the ``mirrors`` (bit mu per mirror; 0 = all); returns its sequence number.
        Raises JournalFull if there is no room."""
        zero = data is None
        need = ENTRY.size + (0 if zero else _align(length))
        pos = self._place(need)
        if pos is None:
            raise JournalFull(f"journal {self.path.name} is full ({self.usage_rate()}%)")
        seq = self.next_seq
        if pos != self.tail:  # wrap: mark the end as unused
            if self.tail + ENTRY.size <= self.size:
                os.pwrite(self.fd, ENTRY.pack(ENTRY_MAGIC, WRAP, seq, 0, 0, 0, 0, 0), self.tail)
            self.used += self.size - self.tail
            self.tail = pos
        flags = (ZERO if zero else 0) | (mirrors & 0xF) << MIRROR_SHIFT
        head = ENTRY.pack(ENTRY_MAGIC, flags, seq, ldev, length, offset, 0, 0)
        crc = _checksum(head, b"" if zero else data)  # type: ignore[arg-type]
        head = ENTRY.pack(ENTRY_MAGIC, flags, seq, ldev, length, offset, crc, 0)
        if zero:
            os.pwrite(self.fd, head, pos)
        else:
            pad = _align(length) - length
            os.pwritev(self.fd, [head, data, b"\0" * pad] if pad else [head, data], pos)  # type: ignore[list-item]
        self.tail = pos + need
        self.used += need
        self.next_seq += 1
        self.count += 1
        return seq

    def free(self, upto_seq: int) -> int:
        """Free every entry up to ``upto_seq`` (restored by the secondary); returns how many."""
        freed = 0
        while self.count and self.head_seq <= upto_seq:
            pos, entry = self._read_at(self.head, self.head_seq, with_data=False)
            if entry is None:
                if pos != self.head:  # wrap marker
                    self.used -= self.size - self.head
                    self.head = pos
                    continue
                break
            self.head = pos + entry.size
            self.used -= entry.size
            self.head_seq += 1
            self.count -= 1
            freed += 1
        if self.count == 0:
            self.used = 0
            self.head = self.tail
        if freed:
            self._write_header()
        return freed

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def pending(self) -> list[Entry]:
        """Every entry not yet freed, in order, without data (to turn them into bitmap marks)."""
        out: list[Entry] = []
        pos, seq = self.head, self.head_seq
        while seq < self.next_seq:
            npos, entry = self._read_at(pos, seq, with_data=False)
            if entry is None:
                if npos != pos:
                    pos = npos
                    continue
                break
            out.append(entry)
            pos = npos + entry.size
            seq += 1
        return out
