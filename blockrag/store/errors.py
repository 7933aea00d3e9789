"""Errors of the KV stores. All derive from BlockRAGError and say what was expected and what was found."""

from __future__ import annotations

from blockrag.errors import InvalidInputError, StoreError, StoreWriteError

__all__ = ["CorruptBlockError", "StoreError", "StoreURLError", "StoreWriteError"]


class CorruptBlockError(StoreError):
    """A stored KV file is damaged: truncated, checksum mismatch, or a header that contradicts its name."""


class StoreURLError(StoreError, InvalidInputError):
    """A store URL that create_store cannot parse."""
