"""Durable pieces of the semantic store: the fsynced write-ahead log and the payload tables.

A log record is `MWAL | body length | crc32 | body`, body = op (add/remove), n, dim, int64 ids, float32 vectors
and the payloads as JSON. `_Wal.append` returns only after fsync; `_Wal.records` stops at the first torn or
corrupt record and cuts the file there (such a record was never acknowledged). Payloads live in SQLite (WAL
mode, one connection per thread) or, for a store without a data_dir, in a dict."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import threading
import zlib

import numpy as np

from mantis_jax.memory._faiss_types import Payload

_MAGIC = b"MWAL"
_HEADER = struct.Struct("<4sQI")  # magic, body length, crc32 of body
_OP_ADD, _OP_REMOVE = 1, 2


class _MemoryPayloads:
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


class _SqlitePayloads:
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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _encode_add(ids: np.ndarray, vectors_nd: np.ndarray, payloads: list[Payload]) -> bytes:
    n, d = vectors_nd.shape
    rows = json.dumps([p.to_row() for p in payloads]).encode()
    return struct.pack("<BII", _OP_ADD, n, d) + ids.astype("<i8").tobytes() + vectors_nd.astype("<f4").tobytes() + rows


def _encode_remove(ids: np.ndarray) -> bytes:
    return struct.pack("<BII", _OP_REMOVE, len(ids), 0) + ids.astype("<i8").tobytes()


def _decode(body: bytes):
    op, n, d = struct.unpack_from("<BII", body)
    at = 9
    ids = np.frombuffer(body, "<i8", n, at).astype(np.int64)
    at += 8 * n
    if op == _OP_REMOVE:
        return op, ids, None, None
    vectors = np.frombuffer(body, "<f4", n * d, at).reshape(n, d).astype(np.float32)
    payloads = [Payload.from_row(r) for r in json.loads(body[at + 4 * n * d:])]
    return op, ids, vectors, payloads


class _Wal:
    """Append-only log of framed records; `append` returns only after fsync."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, body: bytes) -> None:
        record = _HEADER.pack(_MAGIC, len(body), zlib.crc32(body)) + body
        view = memoryview(record)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        os.close(self._fd)

    @staticmethod
    def records(path: str):
        """Yields record bodies; cuts the file at the first torn or corrupt record (it was never acknowledged)."""
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at + _HEADER.size <= len(data):
            magic, length, crc = _HEADER.unpack_from(data, at)
            body = data[at + _HEADER.size: at + _HEADER.size + length]
            if magic != _MAGIC or len(body) != length or zlib.crc32(body) != crc:
                break
            yield body
            at += _HEADER.size + length
        if at != len(data):
            with open(path, "r+b") as f:
                f.truncate(at)
                os.fsync(f.fileno())
