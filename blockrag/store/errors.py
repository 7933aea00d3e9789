"""Errors of the KV stores. All derive from BlockRAGError and say what was expected and what was found."""

from __future__ import annotations

from blockrag.errors import BlockRAGError, InvalidInputError


class StoreError(BlockRAGError):
    """A KV store could not do what was asked."""


class CorruptBlockError(StoreError):
    """A stored KV file is damaged: truncated, checksum mismatch, or a header that contradicts its name."""


class StoreWriteError(StoreError, OSError):
    """Writing to a store failed (e.g. no space left on device); no partial file was left behind."""


class StoreURLError(StoreError, InvalidInputError):
    """A store URL that create_store cannot parse."""
