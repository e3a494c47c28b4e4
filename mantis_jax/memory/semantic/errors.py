"""The semantic memory's errors: each maps to one gRPC status, so the in-process store, the service and the client
raise the same classes (the service answers `code`, the client turns it back into the class)."""

from __future__ import annotations


class SemanticMemoryError(Exception):
    """Base class; `code` is the gRPC status name the service answers with."""

    code = "INTERNAL"


class InvalidArgument(SemanticMemoryError, ValueError):
    code = "INVALID_ARGUMENT"


class NotFound(SemanticMemoryError, LookupError):
    code = "NOT_FOUND"


class ResourceExhausted(SemanticMemoryError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(SemanticMemoryError):
    code = "UNAUTHENTICATED"


class Unavailable(SemanticMemoryError):
    code = "UNAVAILABLE"


ERRORS = {cls.code: cls for cls in (InvalidArgument, NotFound, ResourceExhausted, Unauthenticated, Unavailable)}
