"""The store's write-ahead log: every write is framed, appended and fsynced here before it is applied.

A record is `MWAL | body length | crc32 | body`, body = op, n, dim, int64 ids, float32 vectors and the payloads
as JSON. The op says what the record does: OP_ADD_ASSIGNED (ids the store assigned: replay advances the id
counter past them; records written before explicit ids had their own op are read as this too), OP_ADD (ids the
client chose: the counter is left alone) and OP_REMOVE. `Wal.append` returns only after fsync; `Wal.records`
stops at the first torn or corrupt record and cuts the file there (such a record was never acknowledged)."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np

from mantis_jax.memory.semantic.payload import Payload

_MAGIC = b"MWAL"
_HEADER = struct.Struct("<4sQI")  # magic, body length, crc32 of body
OP_ADD_ASSIGNED, OP_REMOVE, OP_ADD = 1, 2, 3


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def encode_add(ids: np.ndarray, vectors_nd: np.ndarray, payloads: list[Payload], *, assigned: bool) -> bytes:
    n, d = vectors_nd.shape
    rows = json.dumps([p.to_row() for p in payloads]).encode()
    op = OP_ADD_ASSIGNED if assigned else OP_ADD
    return struct.pack("<BII", op, n, d) + ids.astype("<i8").tobytes() + vectors_nd.astype("<f4").tobytes() + rows


def encode_remove(ids: np.ndarray) -> bytes:
    return struct.pack("<BII", OP_REMOVE, len(ids), 0) + ids.astype("<i8").tobytes()


def decode(body: bytes):
    """(op, ids, vectors or None, payloads or None) of a record body."""
    op, n, d = struct.unpack_from("<BII", body)
    at = 9
    ids = np.frombuffer(body, "<i8", n, at).astype(np.int64)
    at += 8 * n
    if op == OP_REMOVE:
        return op, ids, None, None
    vectors = np.frombuffer(body, "<f4", n * d, at).reshape(n, d).astype(np.float32)
    payloads = [Payload.from_row(r) for r in json.loads(body[at + 4 * n * d:])]
    return op, ids, vectors, payloads


class Wal:
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
