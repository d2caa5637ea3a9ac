"""Configuration persistence: one SQLite database per storage system.

Every configuration object is a JSON document keyed by (kind, id). The in-memory model of
:class:`vspemu.system.storage.StorageSystem` is the working copy; each change is written through here
and committed (WAL, synchronous=FULL) before the job that made it reports Succeeded, so a server killed
with SIGKILL comes back with every acknowledged change.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        # link secrets and password hashes: 0600 from the start (SQLite makes its -wal, -shm and journal files
        # with the mode of the database file), and tightened if an earlier version made them 0644
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"),
                  path.with_name(path.name + "-journal")):
            try:
                if p.stat().st_mode & 0o077:
                    os.chmod(p, 0o600)
            except FileNotFoundError:
                pass
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS objects (kind TEXT NOT NULL, id TEXT NOT NULL, doc TEXT NOT NULL,"
            " PRIMARY KEY (kind, id))"
        )
        self._lock = threading.RLock()
        self._depth = 0

    def load(self, kind: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute("SELECT id, doc FROM objects WHERE kind = ?", (kind,)).fetchall()
        return {row[0]: json.loads(row[1]) for row in rows}

    def get(self, kind: str, obj_id: object) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT doc FROM objects WHERE kind = ? AND id = ?", (kind, str(obj_id))
            ).fetchone()
        return json.loads(row[0]) if row else None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several puts/deletes into one atomic, durable commit (nests)."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._conn.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._conn.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._conn.execute("COMMIT")

    def put(self, kind: str, obj_id: object, doc: dict[str, Any]) -> None:
        with self.transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO objects (kind, id, doc) VALUES (?, ?, ?)",
                (kind, str(obj_id), json.dumps(doc, separators=(",", ":"))),
            )

    def delete(self, kind: str, obj_id: object) -> None:
        with self.transaction():
            self._conn.execute("DELETE FROM objects WHERE kind = ? AND id = ?", (kind, str(obj_id)))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
