"""Typed errors. Every message says what was expected, what was found, and what to do."""

from __future__ import annotations


class BlockRAGError(Exception):
    """Base class of every error blockrag raises on purpose."""


class UnsupportedModelError(BlockRAGError):
    """The model's position encoding or attention layout cannot be re-encoded block by block."""


class KVBlockMismatchError(BlockRAGError):
    """A stored KV block does not belong to this engine (model fingerprint, dtype or device)."""


class PromptTooLongError(BlockRAGError, ValueError):
    """The assembled prompt does not fit in the model's maximum positions."""


class InvalidInputError(BlockRAGError, ValueError):
    """A question, passage or argument that cannot be used as given."""


class StoreError(BlockRAGError):
    """A KV store could not do what was asked."""


class StoreWriteError(StoreError, OSError):
    """Writing a file failed (e.g. no space left on device); no partial file was left behind."""
