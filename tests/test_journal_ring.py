"""The master journal ring buffer: random appends, reads and frees against a model, with restarts."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from vspemu.replication.journal import ENTRY, CorruptEntry, JournalFull, MasterJournal, parse_entries


def open_journal(path: Path, size: int) -> MasterJournal:
    return MasterJournal(path, size)


def new_journal(path: Path, size: int) -> MasterJournal:
    """A journal on a fresh (sparse) journal-volume file of ``size`` bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return open_journal(path, size)


def test_ring_buffer_against_a_model(tmp_path: Path) -> None:
    path = tmp_path / "jnl.img"
    size = 1 << 20
    j = new_journal(path, size)
    rng = random.Random(7)
    model: list[tuple[int, int, bytes | None]] = []  # (seq, offset, data)
    acked = 0
    fulls = 0
    for step in range(12000):
        if rng.random() < 0.6:
            n = rng.choice([512, 4096, 65536, 100])
            data = os.urandom(n) if rng.random() < 0.9 else None
            offset = rng.randrange(0, 1 << 30)
            try:
                seq = j.append(3, offset, data, n)
            except JournalFull:
                fulls += 1
                continue
            model.append((seq, offset, data))
        elif model:
            got = j.read(acked + 1, 200000)
            expected = [m for m in model if m[0] > acked][:len(got)]
            assert [(e.seq, e.offset) for e in got] == [(m[0], m[1]) for m in expected]
            assert all((e.data if not e.zero else None) == m[2] for e, m in zip(got, expected, strict=True))
            upto = model[0][0] if rng.random() < 0.9 else model[-1][0]  # mostly a slow secondary
            j.free(upto)
            acked = max(acked, upto)
            model = [m for m in model if m[0] > upto]
        assert j.count == len(model)
        assert 0 <= j.usage_rate() <= 100
        if step % 997 == 0:  # a restart: the tail is found again by walking from the head
            j.close()
            j = open_journal(path, size)
            assert j.count == len(model)
    assert fulls > 0  # the journal did fill up at times


def test_corrupt_entry_ends_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "jnl.img"
    j = new_journal(path, 1 << 20)
    for i in range(5):
        j.append(1, i * 4096, bytes([i]) * 4096, 4096)
    j.close()
    # flip one byte of the third entry's data: recovery keeps the first two only
    entry = ENTRY.size + 4096
    with open(path, "r+b") as f:
        f.seek(4096 + 2 * entry + ENTRY.size + 10)
        f.write(b"\xff")
    j = open_journal(path, 1 << 20)
    assert j.count == 2 and j.last_seq == 2


def test_batched_reads_of_small_entries_across_the_wrap(tmp_path: Path) -> None:
    """read() takes runs of entries with one pread; zero ranges, wrap markers and limits still hold."""
    path = tmp_path / "jnl.img"
    size = 256 << 10
    j = new_journal(path, size)
    rng = random.Random(3)
    written: dict[int, tuple[int, bytes | None]] = {}
    next_read = 1
    for _ in range(40):
        for _ in range(rng.randrange(1, 30)):
            n = rng.choice([512, 4096, 100])
            data = None if rng.random() < 0.2 else os.urandom(n)
            try:
                seq = j.append(5, rng.randrange(1 << 20), data, n)
            except JournalFull:
                break
            written[seq] = (n, data)
        while True:
            got = j.read(next_read, rng.choice([1, 5000, 64 << 10]))
            if not got:
                break
            assert [e.seq for e in got] == list(range(next_read, next_read + len(got)))
            for e in got:
                n, data = written[e.seq]
                assert e.length == n and e.zero == (data is None)
                assert (None if e.zero else bytes(e.data)) == data
            next_read = got[-1].seq + 1
        j.free(next_read - 1)
        assert j.count == 0
    assert j.head_seq == next_read


def test_batched_read_detects_a_corrupt_entry(tmp_path: Path) -> None:
    path = tmp_path / "jnl.img"
    j = new_journal(path, 1 << 20)
    for i in range(5):
        j.append(1, i * 4096, bytes([i + 1]) * 4096, 4096)
    with open(path, "r+b") as f:  # under the running journal: its next read must not hand the entry on
        f.seek(4096 + 3 * (ENTRY.size + 4096) + ENTRY.size + 7)
        f.write(b"\x00")
    with pytest.raises(RuntimeError, match="checksum"):
        j.read(1, 1 << 20)



def test_two_readers_and_mirror_bits_and_floors(tmp_path: Path) -> None:
    """Multi-target: each entry names its mirrors; two readers keep their own cursors; the mirrors' floors
    survive a reopen; a journal written before floors existed (VSPJNL02) is still read."""
    path = tmp_path / "jnl.img"
    j = new_journal(path, 1 << 20)
    for i in range(20):
        j.append(1, i * 4096, bytes([i]) * 4096, 4096, mirrors=0b0110 if i % 2 else 0b0010)
    assert [e.seq for e in j.read(1, 5 * 4096, reader=1)] == [1, 2, 3, 4, 5]
    assert [e.seq for e in j.read(1, 3 * 4096, reader=2)] == [1, 2, 3]
    assert [e.seq for e in j.read(6, 5 * 4096, reader=1)] == [6, 7, 8, 9, 10]
    assert [e.seq for e in j.read(4, 2 * 4096, reader=2)] == [4, 5]
    got = j.read(1, 1 << 20, reader=3)
    assert [e.is_for(1) for e in got] == [True] * 20
    assert [e.is_for(2) for e in got] == [i % 2 == 1 for i in range(20)]
    assert not any(e.is_for(0) or e.is_for(3) for e in got)
    j.set_floor(2, 9)
    assert [e.seq for e in got if j.is_for(e, 2)] == [10, 12, 14, 16, 18, 20]
    j.close()
    j = open_journal(path, 1 << 20)
    assert j.floors == [0, 0, 9, 0] and j.count == 20
    assert [e.seq for e in j.read(1, 1 << 20) if j.is_for(e, 2)] == [10, 12, 14, 16, 18, 20]
    j.close()
    with open(path, "r+b") as f:  # the header as the one-mirror format wrote it: no floors
        f.write(b"VSPJNL02")
        f.seek(24)
        f.write(bytes(32))
    j = open_journal(path, 1 << 20)
    assert j.floors == [0, 0, 0, 0] and j.count == 20 and j.read(1, 1)[0].data == bytes(4096)


def test_raw_reads_across_the_wrap_with_runs_of_other_mirrors(tmp_path: Path) -> None:
    """read_raw hands out stored entries (checked by parse_entries on the other side), never across the wrap,
    and splits them into runs for the reader's mirror and runs it only has to count."""
    path = tmp_path / "jnl.img"
    j = new_journal(path, 256 << 10)
    rng = random.Random(5)
    written: dict[int, tuple[int, bytes | None, int]] = {}
    next_read = 1
    for _ in range(60):
        for _ in range(rng.randrange(1, 30)):
            n = rng.choice([512, 4096, 100, 30000])
            data = None if rng.random() < 0.2 else os.urandom(n)
            bits = rng.choice([0b0010, 0b0100, 0b0110, 0])
            try:
                seq = j.append(5, rng.randrange(1 << 20), data, n, mirrors=bits)
            except JournalFull:
                break
            written[seq] = (n, data, bits)
        if rng.random() < 0.1:
            j.set_floor(2, j.last_seq - rng.randrange(3))
        while True:
            raw, first, count, own = j.read_raw(next_read, rng.choice([1, 5000, 64 << 10]), mu=2)
            if not count:
                break
            assert first == next_read
            for seq in range(first, first + count):
                bits = written[seq][2]
                assert own == (seq > j.floors[2] and (not bits or bool(bits & 0b0100)))
            if own:
                got = list(parse_entries(raw, first))
                assert [e.seq for e in got] == list(range(first, first + count))
                for e in got:
                    n, data, _ = written[e.seq]
                    assert e.length == n and (None if e.zero else bytes(e.data)) == data
            else:
                assert raw == b""
            next_read = first + count
        j.free(next_read - 1)
        assert j.count == 0


def test_parse_entries_refuses_what_is_not_whole_next_and_intact(tmp_path: Path) -> None:
    j = new_journal(tmp_path / "jnl.img", 1 << 20)
    for i in range(3):
        j.append(1, i * 4096, bytes([i + 1]) * 4096, 4096)
    raw, first, count, own = j.read_raw(1, 1 << 20)
    raw = bytes(raw)
    assert count == 3 and own and len(list(parse_entries(raw, 1))) == 3
    with pytest.raises(CorruptEntry, match="missing"):  # not the sequence number expected
        list(parse_entries(raw, 2))
    with pytest.raises(CorruptEntry, match="cut short"):
        list(parse_entries(raw[:-100], 1))
    bad = bytearray(raw)
    bad[ENTRY.size + 4096 + ENTRY.size + 9] ^= 1  # a bit of the second entry's data
    with pytest.raises(CorruptEntry, match="checksum"):
        list(parse_entries(bad, 1))


def test_entries_by_reference_read_the_pvol_until_protected(tmp_path: Path) -> None:
    """An entry by reference stores 64 bytes; its data is read from the P-VOL when the secondary pulls it, and
    copied into its reserved place before the P-VOL range is written again; a reopened journal knows them."""
    pvol = bytearray(os.urandom(1 << 20))

    def source(ldev: int, offset: int, into: memoryview) -> None:
        assert ldev == 9
        into[:] = pvol[offset:offset + len(into)]

    path = tmp_path / "jnl.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    j = MasterJournal(path, 1 << 20, source)
    first = bytes(pvol[0:65536])
    assert j.append(9, 0, first, 65536, mirrors=0b1, ref=True) == 1
    assert j.append(9, 65536, None, 4096, mirrors=0b1) == 2  # a zero range, stored as always
    assert j.append(9, 70000, bytes(pvol[70000:71000]), 1000, mirrors=0b1, ref=True) == 3
    assert j.by_reference and j.used == 3 * ENTRY.size + 65536 + 4096 - 4096 + 1024
    with open(path, "rb") as f:  # only the header was written: the reserved place is still a hole
        f.seek(4096 + ENTRY.size)
        assert f.read(65536) == bytes(65536)
    raw, first_seq, count, own = j.read_raw(1, 1 << 20, mu=0)
    assert (first_seq, count, own) == (1, 1, True)  # (a run by reference, then the stored zero range)
    got = list(parse_entries(raw, 1))
    assert bytes(got[0].data) == first
    assert j.protect(9, 60000, 20000) == 2  # overlaps entries 1 and 3: both get their data now
    pvol[0:1 << 20] = os.urandom(1 << 20)  # the P-VOL changes afterwards
    entries = j.read(1, 1 << 20)
    assert [e.seq for e in entries] == [1, 2, 3] and bytes(entries[0].data) == first
    assert bytes(entries[2].data) != bytes(pvol[70000:71000]) and entries[1].zero
    assert j.protect(9, 0, 1 << 20) == 0
    assert j.append(9, 4096, bytes(pvol[4096:8192]), 4096, ref=True) == 4
    j.close()
    j = MasterJournal(path, 1 << 20, source)  # a restart: stored, zero and by-reference entries are found
    assert j.count == 4 and j.by_reference
    assert bytes(j.read(4, 1)[0].data) == bytes(pvol[4096:8192])
    assert j.protect(9, 4096, 1) == 1
    j.free(4)
    assert j.count == 0 and j.protect(9, 0, 1 << 20) == 0
