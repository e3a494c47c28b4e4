"""What crosses the semantic memory's API: the Payload of a stored fact and the SearchResult of a query batch."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np


@dataclasses.dataclass
class Payload:
    """What a stored fact carries: the real text span and its metadata (provenance goes in `metadata`)."""

    text: str
    source: str = ""
    timestamp: float = 0.0
    importance: float = 0.0
    namespace: str = ""
    metadata: dict = dataclasses.field(default_factory=dict)

    def to_row(self) -> list:
        return [self.text, self.source, self.timestamp, self.importance, self.namespace, self.metadata]

    @classmethod
    def from_row(cls, row) -> "Payload":
        text, source, timestamp, importance, namespace, metadata = row
        meta = json.loads(metadata) if isinstance(metadata, str) else metadata
        # NULL: a NaN that SQLite stored before non-finite numbers were refused; read it back rather than fail
        timestamp, importance = (math.nan if v is None else float(v) for v in (timestamp, importance))
        return cls(text, source, timestamp, importance, namespace, meta)


@dataclasses.dataclass
class SearchResult:
    ids: np.ndarray  # [B, K] int64, -1 where fewer than K live entries matched
    scores: np.ndarray  # [B, K] float32, higher is better; -inf where the id is -1
    payloads: list | None  # B lists of K Payload-or-None (None when with_payloads=False)
