"""Errors of the knowledge base. Each message says what was expected, what was found, and what to do."""

from __future__ import annotations

from blockrag.errors import BlockRAGError, InvalidInputError


class KnowledgeBaseError(BlockRAGError):
    """A knowledge base cannot be used as asked."""


class NotAKnowledgeBaseError(KnowledgeBaseError, FileNotFoundError):
    """The directory is not a blockrag knowledge base (no manifest), or does not exist."""


class EmptyKnowledgeBaseError(KnowledgeBaseError):
    """The knowledge base has no passages to answer from."""


class EmbedderMismatchError(KnowledgeBaseError):
    """The embedder given is not the one the knowledge base's vectors were made with."""


class KnowledgeBaseLockedError(KnowledgeBaseError):
    """Another process is writing to the knowledge base."""


class DocumentError(InvalidInputError):
    """A document or path that cannot be ingested as given."""


class RecordedModelError(KnowledgeBaseError):
    """The model a knowledge base records cannot be loaded here (pass another with --model / an engine)."""
