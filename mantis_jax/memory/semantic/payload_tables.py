"""Where a store keeps its payloads: a dict (a store without a data dir) or a SQLite table `payloads.sqlite` (WAL
mode, one connection per thread). Rows go in as (id, Payload) pairs under the store's write lock and come back
as Payloads, or None for unknown ids. The store validates payloads first, so every row written here can be read
back (SQLite would turn a NaN into NULL)."""

from __future__ import annotations

import json
import sqlite3
import threading

from mantis_jax.memory.semantic.payload import Payload


class MemoryPayloads:
    def __init__(self):
        self._rows: dict[int, Payload] = {}

    def put(self, ids, payloads):
        self._rows.update(zip(ids, payloads))

    def delete(self, ids):
        for i in ids:
            self._rows.pop(i, None)

    def get(self, ids) -> list:
        return [self._rows.get(i) for i in ids]

    def checkpoint(self):
        """Nothing to flush: these payloads live in memory only."""

    def close(self):
        """Nothing to release: these payloads live in memory only."""


class SqlitePayloads:
    """One connection per thread; writes happen under the store's write lock only."""

    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._conn().execute(
            "CREATE TABLE IF NOT EXISTS payloads (id INTEGER PRIMARY KEY, text TEXT, source TEXT, timestamp REAL,"
            " importance REAL, namespace TEXT, metadata TEXT)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # the store's own fsynced log is the durability point
            self._local.conn = conn
            with self._guard:
                self._all.append(conn)
        return conn

    def put(self, ids, payloads):
        rows = [(i, p.text, p.source, p.timestamp, p.importance, p.namespace, json.dumps(p.metadata))
                for i, p in zip(ids, payloads)]
        conn = self._conn()
        with conn:
            conn.execute("BEGIN")
            conn.executemany("INSERT OR REPLACE INTO payloads VALUES (?,?,?,?,?,?,?)", rows)

    def delete(self, ids):
        conn = self._conn()
        with conn:
            conn.execute("BEGIN")
            conn.executemany("DELETE FROM payloads WHERE id = ?", [(i,) for i in ids])

    def get(self, ids) -> list:
        found = {}
        conn = self._conn()
        for lo in range(0, len(ids), 30000):  # below SQLite's bound-parameter limit
            part = ids[lo:lo + 30000]
            query = f"SELECT * FROM payloads WHERE id IN ({','.join('?' * len(part))})"
            for row in conn.execute(query, part):
                found[row[0]] = Payload.from_row(row[1:])
        return [found.get(i) for i in ids]

    def checkpoint(self):
        self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # syncs the database file

    def close(self):
        with self._guard:
            for conn in self._all:
                conn.close()
            self._all.clear()
